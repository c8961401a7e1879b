//! Jobs: leasing: concurrent acquirers, the order jobs are handed out in, and idle
//! workers woken through Redis.
use std::{collections::HashSet, time::Duration};

use mediaplane::proto::v1::{self as pb, job::State};

use crate::helpers::*;

use super::*;

#[tokio::test]
async fn concurrent_acquirers_never_lease_the_same_job() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "race").await;
    let requests = (0..300)
        .map(|_| pb::CreateJobRequest {
            parent: String::new(),
            job: Some(job("render")),
            request_id: String::new(),
            key: String::new(),
        })
        .collect();
    app.jobs(&t)
        .batch_create_jobs(pb::BatchCreateJobsRequest {
            parent: p.name.clone(),
            requests,
        })
        .await
        .unwrap();

    // Callers that arrive together share a leasing statement: each still gets at most
    // its own `max_jobs`, under its own worker id and lease, whatever kinds it asked for.
    let mut workers = Vec::new();
    for w in 0..8 {
        let c = app.jobs(&worker());
        workers.push(tokio::spawn(async move {
            let mut c = c;
            let mut mine = Vec::new();
            let max = 3 + w;
            let kinds = if w % 2 == 0 {
                vec!["render".into()]
            } else {
                vec!["transcode".into(), "render".into()]
            };
            loop {
                let got = c
                    .acquire_jobs(pb::AcquireJobsRequest {
                        worker_id: format!("w{w}"),
                        kinds: kinds.clone(),
                        max_jobs: max,
                        lease_duration: secs(60.0 + f64::from(w)),
                        wait_timeout: None,
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .jobs;
                if got.is_empty() {
                    return mine;
                }
                assert!(got.len() <= max as usize);
                for l in got {
                    let job = l.job.unwrap();
                    assert_eq!(
                        (job.worker_id.as_str(), job.state()),
                        (format!("w{w}").as_str(), State::Running)
                    );
                    let expires =
                        l.lease_expire_time.unwrap().seconds - job.update_time.unwrap().seconds;
                    assert!(
                        (60 + i64::from(w) - 1..=60 + i64::from(w)).contains(&expires),
                        "w{w}'s own lease: {expires}"
                    );
                    mine.push(job.name);
                }
            }
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "a job was leased twice");
    assert_eq!(all.len(), 300, "every job was leased");
}

#[tokio::test]
async fn a_shared_leasing_statement_hands_out_jobs_in_its_callers_order() {
    use diesel_async::AsyncConnection;
    use mediaplane::db::jobs::{Taker, acquire_for};
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "shared lease").await;
    let mut created = Vec::new();
    for priority in [5, 4, 3, 2, 1] {
        let mut j = job("render");
        j.priority = priority;
        created.push(create_job(&app, &t, &p.name, j).await.name);
    }
    let mut conn = diesel_async::AsyncPgConnection::establish(&app.db.url())
        .await
        .unwrap();
    let taker = |worker_id, max, lease_ms| Taker {
        worker_id,
        max,
        lease_ms,
    };
    let kinds = ["render".to_owned()];
    let leased = acquire_for(
        &mut conn,
        &kinds,
        &[
            taker("a", 2, 10_000),
            taker("b", 0, 10_000),
            taker("c", 1, 20_000),
            taker("d", 9, 30_000),
        ],
    )
    .await
    .unwrap();
    let names = |i: usize| -> Vec<String> {
        leased[i]
            .iter()
            .map(|j| format!("projects/{}/jobs/{}", j.project_id, j.id))
            .collect()
    };
    assert_eq!(
        names(0),
        created[0..2],
        "the first caller gets the best jobs"
    );
    assert!(names(1).is_empty());
    assert_eq!(names(2), created[2..3]);
    assert_eq!(names(3), created[3..5], "the last caller gets what is left");
    for (i, (worker, lease_ms)) in [("a", 10_000), ("b", 0), ("c", 20_000), ("d", 30_000)]
        .into_iter()
        .enumerate()
    {
        for j in &leased[i] {
            assert_eq!(j.worker_id.as_deref(), Some(worker));
            let lease = j.lease_expire_time.unwrap() - j.update_time;
            assert_eq!(lease.num_milliseconds(), lease_ms);
        }
    }
    let leases: HashSet<_> = leased
        .iter()
        .flatten()
        .map(|j| j.lease_id.unwrap())
        .collect();
    assert_eq!(leases.len(), 5, "a lease per job");
    // Nothing left: another group gets nothing, each of its callers an empty list.
    let none = acquire_for(
        &mut conn,
        &kinds,
        &[taker("e", 5, 10_000), taker("f", 5, 10_000)],
    )
    .await
    .unwrap();
    assert_eq!(none.iter().map(Vec::len).collect::<Vec<_>>(), [0, 0]);
}

#[tokio::test]
async fn priority_then_schedule_then_creation_order() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "order").await;
    let low = create_job(&app, &t, &p.name, job("render")).await;
    let high = create_job(
        &app,
        &t,
        &p.name,
        pb::Job {
            priority: 10,
            ..job("render")
        },
    )
    .await;
    let later = prost_types::Timestamp {
        seconds: chrono::Utc::now().timestamp() + 3600,
        nanos: 0,
    };
    let future = create_job(
        &app,
        &t,
        &p.name,
        pb::Job {
            priority: 100,
            schedule_time: Some(later),
            ..job("render")
        },
    )
    .await;
    let got: Vec<_> = acquire(&app, "w", &["render"], 10, 30.0, 0.0)
        .await
        .into_iter()
        .map(|l| l.job.unwrap().name)
        .collect();
    assert_eq!(
        got,
        vec![high.name, low.name],
        "a job scheduled for later is not run before its time"
    );
    assert_eq!(
        State::try_from(get(&app, &t, &future.name).await.state).unwrap(),
        State::Queued
    );
}

#[tokio::test]
async fn idle_workers_are_woken_through_redis_not_by_polling() {
    // A poll interval longer than the wait: only a wake-up can deliver the job in time.
    let app = TestApp::spawn_with(|s| s.poll_interval = Duration::from_secs(60)).await;
    let t = token("alice");
    let p = create_project(&app, &t, "wake").await;
    let waiting = spawn_acquire(&app, "idle", 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let created = create_job(&app, &t, &p.name, job("render")).await;
    let got = woken(waiting, 15).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].job.as_ref().unwrap().name, created.name);
}

#[tokio::test]
async fn new_jobs_wake_as_many_idle_workers_as_they_need_and_none_waits_for_the_poll() {
    let app = TestApp::spawn_with(|s| s.poll_interval = Duration::from_secs(60)).await;
    let t = token("alice");
    let p = create_project(&app, &t, "wake-by-capacity").await;
    let mut first = spawn_acquire(&app, "w1", 5);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut second = spawn_acquire(&app, "w2", 5);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Three new jobs: the longest idle worker, who would take five, is enough.
    let request = || pb::CreateJobRequest {
        parent: String::new(),
        job: Some(job("render")),
        request_id: String::new(),
        key: String::new(),
    };
    app.jobs(&t)
        .batch_create_jobs(pb::BatchCreateJobsRequest {
            parent: p.name.clone(),
            requests: vec![request(), request(), request()],
        })
        .await
        .unwrap();
    let got = woken(&mut first, 10).await;
    assert_eq!(got.len(), 3, "one worker took the three");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut second)
            .await
            .is_err(),
        "the other worker is still idle"
    );

    // One more: the worker still idle is woken for it.
    let created = create_job(&app, &t, &p.name, job("render")).await;
    let got = woken(second, 10).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].job.as_ref().unwrap().name, created.name);
}
