//! Jobs: creating, validating, paging, idempotency and group commit; one owner's
//! jobs hidden from another.
use std::{collections::HashSet, time::Duration};

use mediaplane::proto::v1::{self as pb, job::State, job_event::Type};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::helpers::*;

use super::*;

#[tokio::test]
async fn a_job_runs_from_queued_to_succeeded_and_rejects_wrong_transitions() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "jobs").await;
    let created = create_job(
        &app,
        &t,
        &p.name,
        pb::Job {
            priority: 5,
            ..job("render")
        },
    )
    .await;
    assert!(created.name.starts_with(&format!("{}/jobs/", p.name)));
    assert_eq!(State::try_from(created.state).unwrap(), State::Queued);
    assert_eq!(
        (created.attempt, created.max_attempts, created.sequence),
        (0, 3, 1)
    );

    // Only workers take jobs.
    let err = app
        .jobs(&t)
        .acquire_jobs(pb::AcquireJobsRequest {
            worker_id: "me".into(),
            kinds: vec!["render".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        acquire(&app, "w1", &["transcode"], 1, 30.0, 0.0)
            .await
            .is_empty(),
        "other kinds are not leased"
    );

    let leased = acquire(&app, "w1", &["render"], 10, 30.0, 0.0).await;
    assert_eq!(leased.len(), 1);
    let l = &leased[0];
    let running = l.job.as_ref().unwrap();
    assert_eq!(State::try_from(running.state).unwrap(), State::Running);
    assert_eq!((running.attempt, running.worker_id.as_str()), (1, "w1"));
    assert!(!l.lease_id.is_empty() && l.lease_expire_time.is_some());

    let beat = progress(&app, l, 40, "denoising").await.unwrap();
    assert!(!beat.cancel_requested);
    assert!(
        beat.lease_expire_time.unwrap().seconds >= l.lease_expire_time.unwrap().seconds,
        "heartbeat extends the lease"
    );
    let bad = progress(&app, l, 101, "").await.unwrap_err();
    assert_eq!(violations(&bad), vec!["progress_percent"]);
    let mut forged = l.clone();
    forged.lease_id = uuid::Uuid::now_v7().to_string();
    assert_eq!(
        progress(&app, &forged, 50, "").await.unwrap_err().code(),
        Code::Aborted
    );
    let got = get(&app, &t, &running.name).await;
    assert_eq!(
        (got.progress_percent, got.current_step.as_str()),
        (40, "denoising")
    );

    let done = complete(&app, l).await.unwrap();
    assert_eq!(State::try_from(done.state).unwrap(), State::Succeeded);
    assert_eq!(done.progress_percent, 100);
    assert!(done.result.unwrap().fields.contains_key("frames"));
    assert!(done.end_time.is_some() && done.lease_expire_time.is_none());

    // Finished is final.
    assert_eq!(complete(&app, l).await.unwrap_err().code(), Code::Aborted);
    assert_eq!(
        fail(&app, l, true, None).await.unwrap_err().code(),
        Code::Aborted
    );
    let err = app
        .jobs(&t)
        .cancel_job(pb::CancelJobRequest {
            name: done.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = app
        .jobs(&t)
        .retry_job(pb::RetryJobRequest {
            name: done.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // A watch after the end gets the final snapshot and ends.
    let mut stream = watch(&app, &t, &done.name, 0).await;
    let events = collect(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        (Type::try_from(events[0].r#type).unwrap(), state(&events[0])),
        (Type::Snapshot, State::Succeeded)
    );

    let listed = app
        .jobs(&t)
        .list_jobs(pb::ListJobsRequest {
            parent: p.name.clone(),
            filter: "state = SUCCEEDED".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.jobs.len(), 1);
    let none = app
        .jobs(&t)
        .list_jobs(pb::ListJobsRequest {
            parent: p.name.clone(),
            filter: "state = QUEUED".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.jobs.is_empty());
}

#[tokio::test]
async fn a_page_of_large_jobs_is_cut_to_fit_one_response() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    // About 4.8 MB of jobs, within the default page size of 50.
    let (p, names) = project_of_large_jobs(&app, &t).await;
    let mut c = app.jobs(&t);
    let mut pages = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = c
            .list_jobs(pb::ListJobsRequest {
                parent: p.name.clone(),
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .expect("a page that fits, not the whole list refused")
            .into_inner();
        pages.push(page.jobs.into_iter().map(|j| j.name).collect::<Vec<_>>());
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert!(pages.len() > 1 && pages[0].len() < 20, "{pages:?}");
    let listed: Vec<String> = pages.concat();
    assert_eq!(listed.len(), 20);
    assert_eq!(listed.into_iter().collect::<HashSet<_>>(), names);
}

#[tokio::test]
async fn a_worker_gets_as_many_large_jobs_as_one_response_holds_and_the_rest_stay_queued() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let (_, names) = project_of_large_jobs(&app, &t).await;
    // 20 leased jobs of ~240 KB would not fit in one 4 MiB response.
    let first = acquire(&app, "w1", &["render"], 20, 60.0, 0.0).await;
    assert!((1..20).contains(&first.len()), "{} jobs", first.len());
    // The others were never this worker's: queued, their attempt not counted.
    let second = acquire(&app, "w2", &["render"], 20, 60.0, 0.0).await;
    assert!(!second.is_empty());
    let mut taken: Vec<String> = Vec::new();
    let mut batches = vec![first, second];
    while taken.len() + batches.iter().map(Vec::len).sum::<usize>() < 20 {
        let more = acquire(&app, "w3", &["render"], 20, 60.0, 0.0).await;
        assert!(!more.is_empty(), "every job can be taken");
        batches.push(more);
    }
    for leased in batches.iter().flatten() {
        let job = leased.job.as_ref().unwrap();
        assert_eq!(
            job.attempt, 1,
            "{}: the released lease was not an attempt",
            job.name
        );
        taken.push(job.name.clone());
    }
    assert_eq!(taken.len(), 20);
    assert_eq!(
        taken.into_iter().collect::<HashSet<_>>(),
        names,
        "each exactly once"
    );

    // All 20 completed in one batch: committed, and the answer gets through, each job
    // in brief (in full, with their inputs, they would not fit).
    let results = app
        .jobs(&worker())
        .batch_complete_jobs(pb::BatchCompleteJobsRequest {
            requests: batches.iter().flatten().map(completion).collect(),
            ..Default::default()
        })
        .await
        .expect("the answer to committed completions fits")
        .into_inner()
        .results;
    assert_eq!(outcomes(&results), vec![Code::Ok; 20]);
    for r in &results {
        if let Some(pb::complete_job_result::Outcome::Job(job)) = &r.outcome {
            assert!(
                job.input.is_none() && names.contains(&job.name),
                "{}",
                job.name
            );
        }
    }
    for name in &names {
        let stored = get(&app, &t, name).await;
        assert_eq!(stored.state(), State::Succeeded);
        assert!(stored.input.is_some(), "GetJob still reads it in full");
    }
}

#[tokio::test]
async fn a_batch_whose_answer_would_not_fit_is_refused_before_anything_is_written() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "near the limit").await;
    // A request just under the 4 MiB limit: the answer, each job with its name and
    // times, would be just over it.
    let mut sized = job("render");
    sized.input = Some(sized_struct("prompt", 4_050));
    let request = pb::BatchCreateJobsRequest {
        parent: p.name.clone(),
        requests: (0..1000)
            .map(|_| pb::CreateJobRequest {
                parent: String::new(),
                job: Some(sized.clone()),
                request_id: String::new(),
                key: String::new(),
            })
            .collect(),
    };
    assert!(prost::Message::encoded_len(&request) < 4 * 1024 * 1024);
    let err = app
        .jobs(&t)
        .batch_create_jobs(request)
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(violations(&err), vec!["requests"]);
    let listed = list_first_page(&app, &t, &p.name).await;
    assert!(listed.jobs.is_empty(), "nothing written");
}

/// A project of 20 jobs with ~240 KB of input each: together past the 4 MiB message
/// limit. Their names.
async fn project_of_large_jobs(app: &TestApp, t: &str) -> (pb::Project, HashSet<String>) {
    let p = create_project(app, t, "large inputs").await;
    let mut names = HashSet::new();
    for _ in 0..20 {
        names.insert(create_job(app, t, &p.name, large_job()).await.name);
    }
    (p, names)
}

fn large_job() -> pb::Job {
    let mut large = job("render");
    large.input = Some(sized_struct("prompt", 240_000));
    large
}

#[tokio::test]
async fn validation_and_batches_are_all_or_nothing() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "batch").await;
    let mut c = app.jobs(&t);
    let err = c
        .create_job(pb::CreateJobRequest {
            parent: p.name.clone(),
            job: Some(pb::Job {
                kind: "Bad Kind".into(),
                max_attempts: 500,
                ..Default::default()
            }),
            request_id: String::new(),
            key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err), vec!["job.kind", "job.max_attempts"]);

    let request = |kind: &str| pb::CreateJobRequest {
        parent: String::new(),
        job: Some(job(kind)),
        request_id: String::new(),
        key: String::new(),
    };
    let err = c
        .batch_create_jobs(pb::BatchCreateJobsRequest {
            parent: p.name.clone(),
            requests: vec![request("render"), request("NOPE"), request("render")],
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err), vec!["requests[1].job.kind"]);
    let listed = c
        .list_jobs(pb::ListJobsRequest {
            parent: p.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.jobs.is_empty(),
        "nothing of a rejected batch is written"
    );

    let too_many = c
        .batch_create_jobs(pb::BatchCreateJobsRequest {
            parent: p.name.clone(),
            requests: (0..1001).map(|_| request("render")).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&too_many), vec!["requests"]);

    let batch = c
        .batch_create_jobs(pb::BatchCreateJobsRequest {
            parent: p.name.clone(),
            requests: (0..1000).map(|_| request("render")).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.jobs.len(), 1000);
    let mut names = HashSet::new();
    let mut token_ = String::new();
    loop {
        let page = c
            .list_jobs(pb::ListJobsRequest {
                parent: p.name.clone(),
                page_size: 300,
                page_token: token_.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        names.extend(page.jobs.into_iter().map(|j| j.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token_ = page.next_page_token;
    }
    assert_eq!(names.len(), 1000);
}

#[tokio::test]
async fn request_ids_make_create_idempotent_under_concurrency() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "idem").await;
    let mut calls = Vec::new();
    for _ in 0..8 {
        let mut c = app.jobs(&t);
        let r = pb::CreateJobRequest {
            parent: p.name.clone(),
            job: Some(job("render")),
            request_id: "render-42".into(),
            key: String::new(),
        };
        calls.push(tokio::spawn(async move {
            c.create_job(r).await.map(|r| r.into_inner().name)
        }));
    }
    let mut names = HashSet::new();
    for call in calls {
        names.insert(call.await.unwrap().expect("every retry succeeds"));
    }
    assert_eq!(names.len(), 1, "{names:?}");
    let other = app
        .jobs(&t)
        .create_job(pb::CreateJobRequest {
            parent: p.name.clone(),
            job: Some(job("transcode")),
            request_id: "render-42".into(),
            key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists);
    let listed = list_first_page(&app, &t, &p.name).await;
    assert_eq!(listed.jobs.len(), 1);
}

/// Concurrent single-job writes share transactions (group commit), but each call keeps
/// its own outcome: a refused call never fails, or is hidden by, the others.
#[tokio::test]
async fn concurrent_calls_share_commits_but_not_outcomes() {
    let app = TestApp::spawn().await;
    let (alice, bob) = (token("alice"), token("bob"));
    let p = create_project(&app, &alice, "group").await;
    let foreign = create_project(&app, &bob, "not alice's").await;
    let mut calls = Vec::new();
    for i in 0..70 {
        let mut c = app.jobs(&alice);
        let (parent, request_id, kind) = match i % 7 {
            // Another owner's project: NOT_FOUND for these calls only.
            0 => (foreign.name.clone(), String::new(), "render".to_owned()),
            // One request id, ten different payloads: one wins, nine ALREADY_EXISTS.
            1 => (p.name.clone(), "shared-id".to_owned(), format!("kind-{i}")),
            _ => (p.name.clone(), String::new(), "render".to_owned()),
        };
        calls.push(tokio::spawn(async move {
            c.create_job(pb::CreateJobRequest {
                parent,
                job: Some(job(&kind)),
                request_id,
                key: String::new(),
            })
            .await
            .map(|r| r.into_inner())
        }));
    }
    let mut created = Vec::new();
    let mut codes = std::collections::BTreeMap::new();
    for call in calls {
        match call.await.unwrap() {
            Ok(j) => created.push(j),
            Err(e) => *codes.entry(format!("{:?}", e.code())).or_insert(0) += 1,
        }
    }
    assert_eq!(created.len(), 51, "{codes:?}");
    assert_eq!(codes.get("NotFound"), Some(&10), "{codes:?}");
    assert_eq!(codes.get("AlreadyExists"), Some(&9), "{codes:?}");
    let listed = app
        .jobs(&alice)
        .list_jobs(pb::ListJobsRequest {
            parent: p.name.clone(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.jobs.len(),
        51,
        "exactly the jobs reported created exist"
    );
    let foreign_jobs = list_first_page(&app, &bob, &foreign.name).await;
    assert!(foreign_jobs.jobs.is_empty());

    // Worker writes: every job completed with its lease and again with a wrong one,
    // all at once. The right ones succeed, the wrong ones are refused, and nothing of
    // a refused call is written.
    let leased = acquire(&app, "w", &["render"], 100, 60.0, 1.0).await;
    assert_eq!(leased.len(), 50);
    let mut calls = Vec::new();
    for l in &leased {
        for lease_id in [l.lease_id.clone(), uuid::Uuid::now_v7().to_string()] {
            let mut c = app.jobs(&worker());
            let name = l.job.as_ref().unwrap().name.clone();
            let good = lease_id == l.lease_id;
            calls.push(tokio::spawn(async move {
                let r = c
                    .complete_job(pb::CompleteJobRequest {
                        name,
                        lease_id,
                        result: None,
                        output_assets: vec![],
                    })
                    .await;
                (good, r.map(|r| r.into_inner()))
            }));
        }
    }
    for call in calls {
        match call.await.unwrap() {
            (true, Ok(j)) => {
                assert_eq!(j.state, State::Succeeded as i32);
                assert_eq!(j.sequence, 3, "created, leased, succeeded");
            }
            (false, Err(e)) => assert_eq!(e.code(), Code::Aborted, "{e:?}"),
            (good, other) => panic!("lease ok={good}: {other:?}"),
        }
    }
    for l in &leased {
        let name = l.job.as_ref().unwrap().name.clone();
        let events: Vec<pb::JobEvent> = app
            .jobs(&alice)
            .watch_job(pb::WatchJobRequest {
                name,
                after_sequence: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .map(|e| e.unwrap())
            .collect()
            .await;
        let last = events.last().unwrap();
        assert_eq!(last.sequence, 3);
        assert_eq!(last.job.as_ref().unwrap().state, State::Succeeded as i32);
    }
}

#[tokio::test]
async fn another_owners_jobs_are_invisible_everywhere() {
    let app = TestApp::spawn().await;
    let (alice, bob) = (token("alice"), token("bob"));
    let p = create_project(&app, &alice, "private").await;
    let j = create_job(&app, &alice, &p.name, job("render")).await;
    let mut c = app.jobs(&bob);
    let codes = [
        c.get_job(pb::GetJobRequest {
            name: j.name.clone(),
        })
        .await
        .unwrap_err()
        .code(),
        c.list_jobs(pb::ListJobsRequest {
            parent: p.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .code(),
        c.watch_job(pb::WatchJobRequest {
            name: j.name.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap_err()
        .code(),
        c.watch_jobs(pb::WatchJobsRequest {
            parent: p.name.clone(),
            filter: String::new(),
        })
        .await
        .unwrap_err()
        .code(),
        c.cancel_job(pb::CancelJobRequest {
            name: j.name.clone(),
        })
        .await
        .unwrap_err()
        .code(),
        c.retry_job(pb::RetryJobRequest {
            name: j.name.clone(),
        })
        .await
        .unwrap_err()
        .code(),
        c.create_job(pb::CreateJobRequest {
            parent: p.name.clone(),
            job: Some(job("render")),
            request_id: String::new(),
            key: String::new(),
        })
        .await
        .unwrap_err()
        .code(),
    ];
    assert_eq!(codes, [Code::NotFound; 7]);
    assert_eq!(
        State::try_from(get(&app, &alice, &j.name).await.state).unwrap(),
        State::Queued
    );
    // Admins see it.
    get(&app, &admin_token("root"), &j.name).await;
}
