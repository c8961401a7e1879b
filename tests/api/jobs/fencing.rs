//! Jobs: writes under a lease: fencing, expired leases, retries and backoff,
//! cancellation, worker tokens limited to kinds, batch completes, reapers on two
//! instances.
//!
//! Just over 600 lines: every test here is a write racing a lease, and they share one
//! set of expectations (what a stale token gets back).
use std::time::Duration;

use mediaplane::proto::v1::{self as pb, job::State};
use prost_types::{Struct, Value, value::Kind};
use tonic::Code;

use crate::helpers::*;

use super::*;

#[tokio::test]
async fn a_worker_presumed_dead_is_fenced_off_and_the_job_completes_once() {
    let app = TestApp::spawn_with(|s| {
        s.reap_interval = Duration::from_millis(100);
        s.retry_base = Duration::from_millis(50);
        s.retry_max = Duration::from_millis(100);
    })
    .await;
    let t = token("alice");
    let p = create_project(&app, &t, "zombie").await;
    let created = create_job(&app, &t, &p.name, job("render")).await;
    let mut stream = watch(&app, &t, &created.name, 0).await;

    let zombie = acquire(&app, "zombie", &["render"], 1, 1.0, 0.0)
        .await
        .remove(0);
    // The zombie stops heartbeating; its lease expires; the job goes back to the queue.
    let second = acquire(&app, "healthy", &["render"], 1, 30.0, 10.0)
        .await
        .remove(0);
    assert_eq!(second.job.as_ref().unwrap().attempt, 2);
    assert_ne!(second.lease_id, zombie.lease_id);

    let late = progress(&app, &zombie, 90, "still here").await.unwrap_err();
    assert_eq!(late.code(), Code::Aborted);
    assert!(late.message().contains("lease"), "{}", late.message());
    complete(&app, &second).await.unwrap();
    let late = complete(&app, &zombie).await.unwrap_err();
    assert_eq!(
        late.code(),
        Code::Aborted,
        "the zombie's late CompleteJob is rejected"
    );

    let events = collect(&mut stream, Duration::from_secs(10)).await;
    let states: Vec<_> = events.iter().map(state).collect();
    assert_eq!(
        states.iter().filter(|s| **s == State::Succeeded).count(),
        1,
        "{states:?}"
    );
    assert_eq!(states.last(), Some(&State::Succeeded));
    let final_job = events.last().unwrap().job.as_ref().unwrap();
    assert_eq!(final_job.worker_id, "healthy");
    assert!(events.iter().any(|e| {
        e.job
            .as_ref()
            .unwrap()
            .error
            .as_ref()
            .is_some_and(|e| e.message.contains("lease expired"))
    }));
    for w in events.windows(2) {
        assert_eq!(w[1].sequence, w[0].sequence + 1, "no gaps, no reordering");
    }
}

#[tokio::test]
async fn expired_leases_fail_the_job_when_attempts_are_used_up() {
    let app = TestApp::spawn_with(|s| {
        s.reap_interval = Duration::from_millis(100);
        s.retry_base = Duration::from_millis(10);
        s.retry_max = Duration::from_millis(20);
    })
    .await;
    let t = token("alice");
    let p = create_project(&app, &t, "expiry").await;
    let created = create_job(
        &app,
        &t,
        &p.name,
        pb::Job {
            max_attempts: 2,
            ..job("render")
        },
    )
    .await;
    acquire(&app, "a", &["render"], 1, 1.0, 0.0).await.remove(0);
    acquire(&app, "b", &["render"], 1, 1.0, 10.0)
        .await
        .remove(0);
    eventually(
        Duration::from_secs(10),
        "job FAILED after two expired leases",
        || {
            let (app, t, name) = (&app, t.clone(), created.name.clone());
            async move { State::try_from(get(app, &t, &name).await.state) == Ok(State::Failed) }
        },
    )
    .await;
    let failed = get(&app, &t, &created.name).await;
    assert_eq!(failed.attempt, 2);
    assert_eq!(failed.error.unwrap().code, Code::DeadlineExceeded as i32);
}

#[tokio::test]
async fn retries_back_off_and_end_in_failure_and_retry_job_revives() {
    let app = TestApp::spawn_with(|s| {
        s.retry_base = Duration::from_secs(2);
        s.retry_max = Duration::from_secs(60);
    })
    .await;
    let t = token("alice");
    let p = create_project(&app, &t, "retry").await;
    let created = create_job(
        &app,
        &t,
        &p.name,
        pb::Job {
            max_attempts: 2,
            ..job("render")
        },
    )
    .await;

    let first = acquire(&app, "w", &["render"], 1, 30.0, 0.0)
        .await
        .remove(0);
    let requeued = fail(&app, &first, true, None).await.unwrap();
    assert_eq!(State::try_from(requeued.state).unwrap(), State::Queued);
    assert_eq!(requeued.error.as_ref().unwrap().message, "gpu fell over");
    let delay = requeued.schedule_time.unwrap().seconds - requeued.update_time.unwrap().seconds;
    assert!(
        (0..=2).contains(&delay),
        "backoff of attempt 1 is 1-2 s with jitter: {delay}"
    );
    assert!(
        acquire(&app, "w", &["render"], 1, 30.0, 0.0)
            .await
            .is_empty(),
        "not before its backoff"
    );

    let second = acquire(&app, "w", &["render"], 1, 30.0, 10.0)
        .await
        .remove(0);
    assert_eq!(second.job.as_ref().unwrap().attempt, 2);
    let failed = fail(&app, &second, true, None).await.unwrap();
    assert_eq!(
        State::try_from(failed.state).unwrap(),
        State::Failed,
        "attempts used up"
    );
    assert!(failed.end_time.is_some());

    let revived = app
        .jobs(&t)
        .retry_job(pb::RetryJobRequest {
            name: created.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(State::try_from(revived.state).unwrap(), State::Queued);
    assert!(revived.error.is_none() && revived.end_time.is_none());
    let third = acquire(&app, "w", &["render"], 1, 30.0, 5.0)
        .await
        .remove(0);
    assert_eq!(third.job.as_ref().unwrap().attempt, 3, "a new attempt");
    let not_retryable = fail(&app, &third, false, None).await.unwrap();
    assert_eq!(State::try_from(not_retryable.state).unwrap(), State::Failed);

    // retry_after wins over the backoff.
    let other = create_job(&app, &t, &p.name, job("render")).await;
    let l = acquire(&app, "w", &["render"], 1, 30.0, 0.0)
        .await
        .remove(0);
    assert_eq!(l.job.as_ref().unwrap().name, other.name);
    let later = fail(&app, &l, true, secs(120.0)).await.unwrap();
    let delay = later.schedule_time.unwrap().seconds - later.update_time.unwrap().seconds;
    assert!((119..=121).contains(&delay), "{delay}");
}

#[tokio::test]
async fn cancel_queued_at_once_and_running_through_the_worker_or_the_reaper() {
    let app = TestApp::spawn_with(|s| s.reap_interval = Duration::from_millis(100)).await;
    let t = token("alice");
    let p = create_project(&app, &t, "cancel").await;
    let queued = create_job(&app, &t, &p.name, job("render")).await;
    let cancelled = app
        .jobs(&t)
        .cancel_job(pb::CancelJobRequest {
            name: queued.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(State::try_from(cancelled.state).unwrap(), State::Cancelled);
    assert!(
        acquire(&app, "w", &["render"], 1, 30.0, 0.0)
            .await
            .is_empty()
    );

    // Running, and the worker listens: it learns on its next heartbeat and stops.
    let running = create_job(&app, &t, &p.name, job("render")).await;
    let l = acquire(&app, "w", &["render"], 1, 30.0, 0.0)
        .await
        .remove(0);
    let asked = app
        .jobs(&t)
        .cancel_job(pb::CancelJobRequest {
            name: running.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(State::try_from(asked.state).unwrap(), State::Running);
    assert!(asked.cancel_requested);
    assert!(progress(&app, &l, 30, "").await.unwrap().cancel_requested);
    let stopped = fail(&app, &l, true, None).await.unwrap();
    assert_eq!(
        State::try_from(stopped.state).unwrap(),
        State::Cancelled,
        "a cancelled job is not retried"
    );

    // Running, and the worker never answers: lease expiry ends it CANCELLED.
    let silent = create_job(&app, &t, &p.name, job("render")).await;
    acquire(&app, "w", &["render"], 1, 1.0, 0.0).await.remove(0);
    app.jobs(&t)
        .cancel_job(pb::CancelJobRequest {
            name: silent.name.clone(),
        })
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "silent job CANCELLED by lease expiry",
        || {
            let (app, t, name) = (&app, t.clone(), silent.name.clone());
            async move { State::try_from(get(app, &t, &name).await.state) == Ok(State::Cancelled) }
        },
    )
    .await;
}

#[tokio::test]
async fn worker_tokens_limited_to_kinds() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "kinds").await;
    create_job(&app, &t, &p.name, job("render")).await;
    let limited = fleet_token_for("transcode");
    let err = app
        .jobs(&limited)
        .acquire_jobs(pb::AcquireJobsRequest {
            worker_id: "gpu-1".into(),
            kinds: vec!["render".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Holding a current lease of another kind does not let it write either.
    let render = acquire(&app, "w", &["render"], 1, 30.0, 0.0)
        .await
        .remove(0);
    let render_name = render.job.as_ref().unwrap().name.clone();
    let err = app
        .jobs(&limited)
        .report_progress(pb::ReportProgressRequest {
            name: render_name.clone(),
            lease_id: render.lease_id.clone(),
            progress_percent: 50,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = app
        .jobs(&limited)
        .complete_job(pb::CompleteJobRequest {
            name: render_name.clone(),
            lease_id: render.lease_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let untouched = get(&app, &t, &render_name).await;
    assert_eq!(
        (untouched.state(), untouched.progress_percent),
        (State::Running, 0)
    );

    // Its own kind: acquire, progress and complete.
    let transcode = create_job(&app, &t, &p.name, job("transcode")).await;
    let leased = acquire_as(&app, &limited, "gpu-1", &["transcode"], 1, 30.0, 0.0)
        .await
        .remove(0);
    let progress = app
        .jobs(&limited)
        .report_progress(pb::ReportProgressRequest {
            name: transcode.name.clone(),
            lease_id: leased.lease_id.clone(),
            progress_percent: 50,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!progress.cancel_requested);
    let done = app
        .jobs(&limited)
        .complete_job(pb::CompleteJobRequest {
            name: transcode.name.clone(),
            lease_id: leased.lease_id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state(), State::Succeeded);
}

#[tokio::test]
async fn batch_complete_applies_each_completion_on_its_own() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "batch complete").await;
    for _ in 0..5 {
        create_job(&app, &t, &p.name, job("render")).await;
    }
    create_job(&app, &t, &p.name, job("transcode")).await;
    // The fleet's own subject (leases are bound to the subject that acquired them),
    // narrowed to one kind.
    let render_only = mediaplane::auth::mint(
        &mediaplane::config::Secret::new(SECRET),
        "fleet",
        &["worker".into()],
        &["render".into()],
        Duration::from_secs(60),
    )
    .unwrap();
    let mut leased = acquire(&app, "w", &["render"], 5, 30.0, 0.0).await;
    assert_eq!(leased.len(), 5);
    let transcode = acquire(&app, "w", &["transcode"], 1, 30.0, 0.0)
        .await
        .remove(0);
    // `stale`'s first lease is replaced: fail it for a retry at once and lease it again.
    let stale = leased.remove(0);
    fail(&app, &stale, true, secs(0.0)).await.unwrap();
    let relet = acquire(&app, "w2", &["render"], 1, 30.0, 0.0)
        .await
        .remove(0);
    assert_eq!(
        relet.job.as_ref().unwrap().name,
        stale.job.as_ref().unwrap().name
    );
    let [good, with_missing_asset, also_good, left_running] = <[_; 4]>::try_from(leased).unwrap();
    let good_name = good.job.as_ref().unwrap().name.clone();
    let mut watching = watch(&app, &t, &good_name, 0).await;

    let mut missing_asset = completion(&with_missing_asset);
    missing_asset.output_assets = vec![format!("{}/assets/{}", p.name, uuid::Uuid::new_v4())];
    let mut with_result = completion(&good);
    with_result.result = Some(Struct {
        fields: [(
            "frames".to_owned(),
            Value {
                kind: Some(Kind::NumberValue(240.0)),
            },
        )]
        .into(),
    });
    let unknown = pb::CompleteJobRequest {
        name: format!("{}/jobs/{}", p.name, uuid::Uuid::new_v4()),
        lease_id: uuid::Uuid::new_v4().to_string(),
        ..Default::default()
    };
    let results = app
        .jobs(&render_only)
        .batch_complete_jobs(pb::BatchCompleteJobsRequest {
            requests: vec![
                with_result,
                completion(&stale),
                missing_asset,
                completion(&transcode),
                unknown,
                completion(&also_good),
            ],
            ..Default::default()
        })
        .await
        .expect("a batch with refused completions still answers")
        .into_inner()
        .results;
    assert_eq!(
        outcomes(&results),
        vec![
            Code::Ok,
            Code::Aborted,
            Code::FailedPrecondition,
            Code::PermissionDenied,
            Code::NotFound,
            Code::Ok,
        ]
    );
    let pb::complete_job_result::Outcome::Error(why) = results[1].outcome.clone().unwrap() else {
        unreachable!()
    };
    assert!(
        why.message.contains("not the current lease"),
        "{}",
        why.message
    );

    // Stored: the accepted completions, and nothing of the refused ones.
    let done = get(&app, &t, &good_name).await;
    assert_eq!(done.state(), State::Succeeded);
    assert_eq!(
        done.result.unwrap().fields["frames"].kind,
        Some(Kind::NumberValue(240.0))
    );
    assert_eq!(
        get(&app, &t, &also_good.job.unwrap().name).await.state(),
        State::Succeeded
    );
    for (refused, by) in [
        (&relet, "w2"),
        (&with_missing_asset, "w"),
        (&transcode, "w"),
    ] {
        let job = get(&app, &t, &refused.job.as_ref().unwrap().name).await;
        assert_eq!((job.state(), job.worker_id.as_str()), (State::Running, by));
    }
    // The replacing lease still completes its job.
    complete(&app, &relet)
        .await
        .expect("the current lease completes");
    let events = collect(&mut watching, Duration::from_secs(2)).await;
    assert_eq!(
        events.iter().map(state).collect::<Vec<_>>(),
        vec![State::Running, State::Succeeded],
        "a watcher sees a batch's completion as any other"
    );

    // Malformed batches are refused whole, every problem listed, nothing written.
    let mut c = app.jobs(&worker());
    let bad_name = pb::CompleteJobRequest {
        name: "projects/nope".into(),
        ..completion(&left_running)
    };
    let bad_lease = pb::CompleteJobRequest {
        lease_id: "not-a-lease".into(),
        ..completion(&relet)
    };
    let err = c
        .batch_complete_jobs(pb::BatchCompleteJobsRequest {
            requests: vec![
                completion(&left_running),
                bad_name,
                completion(&left_running),
                bad_lease,
            ],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        violations(&err),
        vec![
            "requests[1].name",
            "requests[2].name",
            "requests[3].lease_id"
        ]
    );
    assert_eq!(
        get(&app, &t, &left_running.job.as_ref().unwrap().name)
            .await
            .state(),
        State::Running
    );
    let unknown = |_| pb::CompleteJobRequest {
        name: format!("{}/jobs/{}", p.name, uuid::Uuid::new_v4()),
        lease_id: uuid::Uuid::new_v4().to_string(),
        ..Default::default()
    };
    for requests in [vec![], (0..1001).map(unknown).collect()] {
        let err = c
            .batch_complete_jobs(pb::BatchCompleteJobsRequest {
                requests,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(violations(&err), vec!["requests"]);
    }
    // 999 problems: the first ones are listed, not all (the details travel in a header
    // whose overflow would fail the connection); the connection serves on.
    let err = c
        .batch_complete_jobs(pb::BatchCompleteJobsRequest {
            requests: (0..1000).map(|_| completion(&left_running)).collect(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("999 invalid fields: requests[1].name, "),
        "{}",
        err.message()
    );
    assert_eq!(violations(&err).len(), mediaplane::domain::MAX_REPORTED);
    let err = app
        .jobs(&t)
        .batch_complete_jobs(pb::BatchCompleteJobsRequest {
            requests: vec![completion(&left_running)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "a client token is not a worker"
    );
    let results = c
        .batch_complete_jobs(pb::BatchCompleteJobsRequest {
            requests: vec![completion(&left_running)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(outcomes(&results), vec![Code::Ok]);
}

#[tokio::test]
async fn reapers_on_two_instances_requeue_each_expired_job_exactly_once() {
    let a = TestApp::spawn_with(|s| {
        s.reap_interval = Duration::from_millis(20);
        s.retry_base = Duration::from_secs(600);
        s.retry_max = Duration::from_secs(600);
    })
    .await;
    let b = a.spawn_peer().await;
    let t = token("alice");
    let p = create_project(&a, &t, "reapers").await;
    let requests = (0..60)
        .map(|_| pb::CreateJobRequest {
            parent: String::new(),
            job: Some(job("render")),
            request_id: String::new(),
            key: String::new(),
        })
        .collect();
    a.jobs(&t)
        .batch_create_jobs(pb::BatchCreateJobsRequest {
            parent: p.name.clone(),
            requests,
        })
        .await
        .unwrap();
    assert_eq!(
        acquire(&a, "doomed", &["render"], 100, 1.0, 0.0)
            .await
            .len(),
        60
    );

    eventually(Duration::from_secs(15), "every lease reaped", || {
        let c = a.jobs(&t);
        let parent = p.name.clone();
        async move {
            let mut c = c;
            let jobs = c
                .list_jobs(pb::ListJobsRequest {
                    parent,
                    page_size: 100,
                    filter: "state = QUEUED".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .jobs;
            jobs.len() == 60
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let jobs = b
        .jobs(&t)
        .list_jobs(pb::ListJobsRequest {
            parent: p.name.clone(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    for j in jobs {
        // created (1), leased (2), requeued once (3): a second reaper never touched it again.
        assert_eq!((j.sequence, j.attempt), (3, 1), "{}", j.name);
    }
}
