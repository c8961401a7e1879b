//! Jobs: state machine, worker protocol, fencing, fan-out across instances.
use std::{collections::HashSet, time::Duration};

use mediaplane::proto::v1::{self as pb, job::State, job_event::Type};
use prost_types::{Duration as PbDuration, Struct, Value, value::Kind};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::helpers::*;

fn worker() -> String {
    token_with("fleet", &["worker"], Duration::from_secs(600))
}

fn secs(s: f64) -> Option<PbDuration> {
    Some(PbDuration {
        seconds: s.trunc() as i64,
        nanos: (s.fract() * 1e9) as i32,
    })
}

fn job(kind: &str) -> pb::Job {
    let input = Struct {
        fields: [(
            "prompt".to_owned(),
            Value {
                kind: Some(Kind::StringValue("a cat".into())),
            },
        )]
        .into(),
    };
    pb::Job {
        kind: kind.into(),
        input: Some(input),
        ..Default::default()
    }
}

async fn create_job(app: &TestApp, t: &str, project: &str, j: pb::Job) -> pb::Job {
    app.jobs(t)
        .create_job(pb::CreateJobRequest {
            parent: project.into(),
            job: Some(j),
            request_id: String::new(),
        })
        .await
        .expect("create job")
        .into_inner()
}

async fn acquire(
    app: &TestApp,
    worker_id: &str,
    kinds: &[&str],
    max: i32,
    lease: f64,
    wait: f64,
) -> Vec<pb::LeasedJob> {
    acquire_as(app, &worker(), worker_id, kinds, max, lease, wait).await
}

async fn acquire_as(
    app: &TestApp,
    token: &str,
    worker_id: &str,
    kinds: &[&str],
    max: i32,
    lease: f64,
    wait: f64,
) -> Vec<pb::LeasedJob> {
    app.jobs(token)
        .acquire_jobs(pb::AcquireJobsRequest {
            worker_id: worker_id.into(),
            kinds: kinds.iter().map(|k| k.to_string()).collect(),
            max_jobs: max,
            lease_duration: secs(lease),
            wait_timeout: secs(wait),
        })
        .await
        .expect("acquire")
        .into_inner()
        .jobs
}

/// An AcquireJobs call for "render" jobs that waits up to 20 s, running in the background.
/// What a waiting AcquireJobs (see `spawn_acquire`) returned, woken within `secs`
/// (less than its 20 s wait: an empty return at the wait's end fails too).
async fn woken(
    waiting: impl Future<Output = Result<Vec<pb::LeasedJob>, tokio::task::JoinError>>,
    secs: u64,
) -> Vec<pb::LeasedJob> {
    tokio::time::timeout(Duration::from_secs(secs), waiting)
        .await
        .expect("woken before the wait ends")
        .unwrap()
}

fn spawn_acquire(
    app: &TestApp,
    worker_id: &str,
    max: i32,
) -> tokio::task::JoinHandle<Vec<pb::LeasedJob>> {
    let mut c = app.jobs(&worker());
    let worker_id = worker_id.to_owned();
    tokio::spawn(async move {
        c.acquire_jobs(pb::AcquireJobsRequest {
            worker_id,
            kinds: vec!["render".into()],
            max_jobs: max,
            lease_duration: secs(30.0),
            wait_timeout: secs(20.0),
        })
        .await
        .expect("acquire")
        .into_inner()
        .jobs
    })
}

async fn progress(
    app: &TestApp,
    leased: &pb::LeasedJob,
    percent: i32,
    step: &str,
) -> Result<pb::ReportProgressResponse, tonic::Status> {
    let name = leased.job.as_ref().unwrap().name.clone();
    app.jobs(&worker())
        .report_progress(pb::ReportProgressRequest {
            name,
            lease_id: leased.lease_id.clone(),
            progress_percent: percent,
            current_step: step.into(),
            message: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn complete(app: &TestApp, leased: &pb::LeasedJob) -> Result<pb::Job, tonic::Status> {
    let result = Struct {
        fields: [(
            "frames".to_owned(),
            Value {
                kind: Some(Kind::NumberValue(240.0)),
            },
        )]
        .into(),
    };
    app.jobs(&worker())
        .complete_job(pb::CompleteJobRequest {
            name: leased.job.as_ref().unwrap().name.clone(),
            lease_id: leased.lease_id.clone(),
            result: Some(result),
            output_assets: vec![],
        })
        .await
        .map(|r| r.into_inner())
}

async fn fail(
    app: &TestApp,
    leased: &pb::LeasedJob,
    retryable: bool,
    retry_after: Option<PbDuration>,
) -> Result<pb::Job, tonic::Status> {
    app.jobs(&worker())
        .fail_job(pb::FailJobRequest {
            name: leased.job.as_ref().unwrap().name.clone(),
            lease_id: leased.lease_id.clone(),
            error: Some(tonic_types::pb::Status {
                code: Code::Internal as i32,
                message: "gpu fell over".into(),
                details: vec![],
            }),
            retryable,
            retry_after,
        })
        .await
        .map(|r| r.into_inner())
}

async fn get(app: &TestApp, t: &str, name: &str) -> pb::Job {
    app.jobs(t)
        .get_job(pb::GetJobRequest { name: name.into() })
        .await
        .expect("get job")
        .into_inner()
}

/// Opens a WatchJob stream for `name` after `after_sequence`.
async fn watch(
    app: &TestApp,
    token: &str,
    name: &str,
    after_sequence: i64,
) -> tonic::Streaming<pb::JobEvent> {
    app.jobs(token)
        .watch_job(pb::WatchJobRequest {
            name: name.to_owned(),
            after_sequence,
        })
        .await
        .expect("watch job")
        .into_inner()
}

async fn collect(
    stream: &mut tonic::Streaming<pb::JobEvent>,
    timeout: Duration,
) -> Vec<pb::JobEvent> {
    let mut out = Vec::new();
    while let Ok(Some(item)) = tokio::time::timeout(timeout, stream.next()).await {
        out.push(item.expect("watch stream item"));
    }
    out
}

/// The first page of a project's jobs, newest first.
async fn list_first_page(app: &TestApp, token: &str, parent: &str) -> pb::ListJobsResponse {
    app.jobs(token)
        .list_jobs(pb::ListJobsRequest {
            parent: parent.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// How many events Postgres keeps for the job `name`.
async fn stored_events(app: &TestApp, name: &str) -> i64 {
    use diesel_async::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let id = uuid::Uuid::parse_str(name.rsplit('/').next().unwrap()).unwrap();
    let mut conn = <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(
        &app.db.url(),
    )
    .await
    .unwrap();
    diesel::sql_query("SELECT count(*) AS n FROM job_events WHERE job_id = $1")
        .bind::<diesel::sql_types::Uuid, _>(id)
        .get_result::<Count>(&mut conn)
        .await
        .unwrap()
        .n
}

fn state(e: &pb::JobEvent) -> State {
    State::try_from(e.job.as_ref().unwrap().state).unwrap()
}

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
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err), vec!["job.kind", "job.max_attempts"]);

    let request = |kind: &str| pb::CreateJobRequest {
        parent: String::new(),
        job: Some(job(kind)),
        request_id: String::new(),
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
async fn concurrent_acquirers_never_lease_the_same_job() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "race").await;
    let requests = (0..300)
        .map(|_| pb::CreateJobRequest {
            parent: String::new(),
            job: Some(job("render")),
            request_id: String::new(),
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

#[tokio::test]
async fn worker_tokens_limited_to_kinds() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "kinds").await;
    create_job(&app, &t, &p.name, job("render")).await;
    // The fleet's own subject (leases are bound to the subject that acquired them),
    // narrowed to one kind.
    let limited = mediaplane::auth::mint(
        &mediaplane::config::Secret::new(SECRET),
        "fleet",
        &["worker".into()],
        &["transcode".into()],
        Duration::from_secs(60),
    )
    .unwrap();
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

/// One completion of a BatchCompleteJobs request.
fn completion(leased: &pb::LeasedJob) -> pb::CompleteJobRequest {
    pb::CompleteJobRequest {
        name: leased.job.as_ref().unwrap().name.clone(),
        lease_id: leased.lease_id.clone(),
        ..Default::default()
    }
}

/// The code of each result of a batch; OK for a completed job.
fn outcomes(results: &[pb::CompleteJobResult]) -> Vec<Code> {
    use pb::complete_job_result::Outcome;
    results
        .iter()
        .map(
            |r| match r.outcome.as_ref().expect("an outcome per result") {
                Outcome::Job(job) => {
                    assert_eq!(job.state(), State::Succeeded);
                    Code::Ok
                }
                Outcome::Error(status) => Code::from(status.code),
            },
        )
        .collect()
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
            .batch_complete_jobs(pb::BatchCompleteJobsRequest { requests })
            .await
            .unwrap_err();
        assert_eq!(violations(&err), vec!["requests"]);
    }
    // 999 problems: the first ones are listed, not all (the details travel in a header
    // whose overflow would fail the connection); the connection serves on.
    let err = c
        .batch_complete_jobs(pb::BatchCompleteJobsRequest {
            requests: (0..1000).map(|_| completion(&left_running)).collect(),
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
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(outcomes(&results), vec![Code::Ok]);
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

#[tokio::test]
async fn two_instances_a_watcher_on_one_and_a_worker_on_the_other_see_every_event_in_order() {
    let a = TestApp::spawn().await;
    let b = a.spawn_peer().await;
    let t = token("alice");
    let p = create_project(&a, &t, "fleet").await;
    let created = create_job(&a, &t, &p.name, job("render")).await;
    let mut watcher = watch(&a, &t, &created.name, 0).await;
    let mut dashboard = a
        .jobs(&t)
        .watch_jobs(pb::WatchJobsRequest {
            parent: p.name.clone(),
            filter: String::new(),
        })
        .await
        .unwrap()
        .into_inner();

    let l = acquire(&b, "b-worker", &["render"], 1, 30.0, 5.0)
        .await
        .remove(0);
    for pct in (10..=90).step_by(10) {
        progress(&b, &l, pct, &format!("step {pct}")).await.unwrap();
    }
    complete(&b, &l).await.unwrap();

    let events = collect(&mut watcher, Duration::from_secs(10)).await;
    let seqs: Vec<i64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(
        seqs,
        (1..=12).collect::<Vec<_>>(),
        "snapshot, lease, 9 progress reports, completion"
    );
    assert_eq!(Type::try_from(events[0].r#type).unwrap(), Type::Snapshot);
    let pcts: Vec<i32> = events[2..11]
        .iter()
        .map(|e| e.job.as_ref().unwrap().progress_percent)
        .collect();
    assert_eq!(pcts, (10..=90).step_by(10).collect::<Vec<_>>());
    assert_eq!(state(events.last().unwrap()), State::Succeeded);

    let mut seen = Vec::new();
    while let Ok(Some(Ok(e))) = tokio::time::timeout(Duration::from_secs(3), dashboard.next()).await
    {
        seen.push(e.sequence);
        if e.sequence == 12 {
            break;
        }
    }
    assert_eq!(
        seen.last(),
        Some(&12),
        "the dashboard follows too: {seen:?}"
    );
    assert!(seen.windows(2).all(|w| w[1] > w[0]), "{seen:?}");
}

async fn dashboard(
    app: &TestApp,
    t: &str,
    parent: &str,
    filter: &str,
) -> tonic::Streaming<pb::JobEvent> {
    app.jobs(t)
        .watch_jobs(pb::WatchJobsRequest {
            parent: parent.to_owned(),
            filter: filter.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// (job name, state) of each event.
fn named_states(events: &[pb::JobEvent]) -> Vec<(String, State)> {
    events
        .iter()
        .map(|e| (e.job.as_ref().unwrap().name.clone(), state(e)))
        .collect()
}

#[tokio::test]
async fn a_filtered_dashboard_gets_its_jobs_however_many_others_changed_since() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "busy").await;
    let render = create_job(&app, &t, &p.name, job("render")).await;
    // 1,000 jobs of another kind, all changed after the render job (more than a
    // dashboard's first snapshot holds).
    app.jobs(&t)
        .batch_create_jobs(pb::BatchCreateJobsRequest {
            parent: p.name.clone(),
            requests: (0..1000)
                .map(|_| pb::CreateJobRequest {
                    parent: String::new(),
                    job: Some(job("transcode")),
                    request_id: String::new(),
                })
                .collect(),
        })
        .await
        .unwrap();

    let mut renders = dashboard(&app, &t, &p.name, "kind = \"render\"").await;
    let events = collect(&mut renders, Duration::from_secs(2)).await;
    assert_eq!(
        named_states(&events),
        vec![(render.name.clone(), State::Queued)]
    );
    let mut queued = dashboard(&app, &t, &p.name, "state = QUEUED AND kind = \"render\"").await;
    let events = collect(&mut queued, Duration::from_secs(2)).await;
    assert_eq!(
        named_states(&events),
        vec![(render.name.clone(), State::Queued)]
    );

    // Unfiltered: the 1,000 changed last (read a page at a time), each once.
    let mut all = dashboard(&app, &t, &p.name, "").await;
    let events = collect(&mut all, Duration::from_secs(3)).await;
    assert_eq!(events.len(), 1000);
    let names: HashSet<&str> = events
        .iter()
        .map(|e| e.job.as_ref().unwrap().name.as_str())
        .collect();
    assert_eq!(names.len(), 1000);
    assert!(
        !names.contains(render.name.as_str()),
        "the oldest change is not among them"
    );
}

#[tokio::test]
async fn a_job_leaving_a_dashboards_filter_is_sent_once_more() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "queue view").await;
    let mut queued = dashboard(&app, &t, &p.name, "state = QUEUED").await;
    let a = create_job(&app, &t, &p.name, job("render")).await;
    let l = acquire(&app, "w", &["render"], 1, 30.0, 5.0)
        .await
        .remove(0);
    progress(&app, &l, 50, "half").await.unwrap();
    complete(&app, &l).await.unwrap();
    let b = create_job(&app, &t, &p.name, job("render")).await;

    let events = collect(&mut queued, Duration::from_secs(2)).await;
    assert_eq!(
        named_states(&events),
        vec![
            (a.name.clone(), State::Queued),
            // The change that takes it out of the view, so the dashboard drops it;
            // its progress and completion are not for this view.
            (a.name.clone(), State::Running),
            (b.name, State::Queued),
        ]
    );
}

#[tokio::test]
async fn a_dashboard_of_a_deleted_project_ends_with_not_found() {
    let app = TestApp::spawn_with(|s| s.watch_resync = Duration::from_millis(300)).await;
    let t = token("alice");
    let p = create_project(&app, &t, "short-lived").await;
    create_job(&app, &t, &p.name, job("render")).await;
    let mut all = dashboard(&app, &t, &p.name, "").await;
    assert_eq!(collect(&mut all, Duration::from_millis(500)).await.len(), 1);
    app.projects(&t)
        .delete_project(pb::DeleteProjectRequest {
            name: p.name.clone(),
            etag: String::new(),
        })
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), all.next())
        .await
        .expect("the stream ends after the next resync");
    assert_eq!(
        end.expect("a final status").unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn a_dashboard_learns_of_a_job_that_left_its_filter_while_redis_was_away() {
    let (app, proxy) = app_behind_redis_proxy().await;
    let t = token("alice");
    let p = create_project(&app, &t, "queue view").await;
    let a = create_job(&app, &t, &p.name, job("render")).await;
    let mut queued = dashboard(&app, &t, &p.name, "state = QUEUED").await;
    let first = collect(&mut queued, Duration::from_secs(1)).await;
    assert_eq!(named_states(&first), vec![(a.name.clone(), State::Queued)]);

    proxy.cut().await;
    // Its event is published while this instance is not subscribed: lost.
    acquire(&app, "w", &["render"], 1, 30.0, 5.0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.restore();

    // Back on Redis, the dashboard re-reads Postgres; the job no longer matches its
    // filter, and it must still hear that.
    let events = collect(&mut queued, Duration::from_secs(10)).await;
    assert_eq!(named_states(&events), vec![(a.name, State::Running)]);
}

/// A change whose transaction ran longer than the resyncs between its start and its
/// commit, and whose Redis event never came (written straight in SQL, as a lost
/// message would leave it): its update_time is the transaction's start, long before
/// it became visible. A resync must still find it.
#[tokio::test]
async fn a_dashboard_finds_a_change_whose_transaction_outlived_several_resyncs() {
    use diesel_async::{AsyncConnection, SimpleAsyncConnection};
    let app = TestApp::spawn_with(|s| s.watch_resync = Duration::from_millis(300)).await;
    let t = token("alice");
    let p = create_project(&app, &t, "slow writer").await;
    let a = create_job(&app, &t, &p.name, job("render")).await;
    let mut all = dashboard(&app, &t, &p.name, "").await;
    assert_eq!(collect(&mut all, Duration::from_millis(500)).await.len(), 1);

    let id = a.name.rsplit('/').next().unwrap();
    let mut writer = diesel_async::AsyncPgConnection::establish(&app.db.url())
        .await
        .unwrap();
    writer
        .batch_execute(&format!(
            "BEGIN; UPDATE jobs SET current_step = 'slow', progress_percent = 7 WHERE id = '{id}'"
        ))
        .await
        .unwrap();
    // Many resyncs pass while the transaction is open, and more than any fixed overlap.
    tokio::time::sleep(Duration::from_secs(7)).await;
    writer.batch_execute("COMMIT").await.unwrap();

    let events = collect(&mut all, Duration::from_secs(3)).await;
    assert!(
        events
            .iter()
            .any(|e| e.job.as_ref().is_some_and(|j| j.current_step == "slow")),
        "the change was found by a resync: {events:?}"
    );
}

#[tokio::test]
async fn resuming_a_watch_gets_exactly_what_was_missed() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "resume").await;
    let mut labelled = job("render");
    labelled.labels = [("shot".to_owned(), "12".to_owned())].into();
    let created = create_job(&app, &t, &p.name, labelled).await;
    // Sees every change live, to compare with what a resume replays from Postgres.
    let mut live = watch(&app, &t, &created.name, 0).await;
    let l = acquire(&app, "w", &["render"], 1, 30.0, 0.0)
        .await
        .remove(0);
    for (pct, step) in [(20, "decode"), (40, "render"), (60, "encode")] {
        progress(&app, &l, pct, step).await.unwrap();
    }
    // Seen up to sequence 3 (created, leased, 20%): resume gets 4 and 5, then live events.
    let mut stream = watch(&app, &t, &created.name, 3).await;
    app.jobs(&t)
        .cancel_job(pb::CancelJobRequest {
            name: created.name.clone(),
        })
        .await
        .unwrap();
    complete(&app, &l).await.unwrap();
    let events = collect(&mut stream, Duration::from_secs(10)).await;
    assert_eq!(
        events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        vec![4, 5, 6, 7]
    );
    assert_eq!(Type::try_from(events[0].r#type).unwrap(), Type::Progress);
    // Replayed events are the events as they were published, snapshot and all.
    let live = collect(&mut live, Duration::from_secs(10)).await;
    assert_eq!(
        live.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6, 7]
    );
    // (6 and 7 may arrive as a snapshot: they can commit before the replay ends.)
    assert_eq!(events[..2], live[3..5]);
    assert_eq!(events[0].job.as_ref().unwrap().current_step, "render");
    assert_eq!(events[0].job.as_ref().unwrap().labels["shot"], "12");
    // Of a finished job, every event after the first is replayed from Postgres: the
    // types the database records (leased, progress, cancel requested, succeeded) are
    // the ones that were published.
    let mut replay = watch(&app, &t, &created.name, 1).await;
    let replayed = collect(&mut replay, Duration::from_secs(10)).await;
    assert_eq!(replayed[..], live[1..]);
    assert_eq!(
        replayed
            .iter()
            .map(|e| Type::try_from(e.r#type).unwrap())
            .collect::<Vec<_>>(),
        vec![
            Type::StateChanged,
            Type::Progress,
            Type::Progress,
            Type::Progress,
            Type::CancelRequested,
            Type::StateChanged
        ]
    );

    // When the events are gone (pruned), a resume gets a fresh snapshot.
    let mut conn = <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(
        &app.db.url(),
    )
    .await
    .unwrap();
    diesel_async::SimpleAsyncConnection::batch_execute(
        &mut conn,
        "DELETE FROM job_events WHERE sequence < 7",
    )
    .await
    .unwrap();
    let mut stream = watch(&app, &t, &created.name, 2).await;
    let events = collect(&mut stream, Duration::from_secs(10)).await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        (
            Type::try_from(events[0].r#type).unwrap(),
            events[0].sequence
        ),
        (Type::Snapshot, 7)
    );
}

#[tokio::test]
async fn resuming_far_behind_replays_every_event_a_page_at_a_time() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "long render").await;
    let created = create_job(&app, &t, &p.name, job("render")).await;
    let l = acquire(&app, "w", &["render"], 1, 30.0, 0.0)
        .await
        .remove(0);
    // 250 reports: several pages of the replay (32 events each).
    for n in 1..=250 {
        progress(&app, &l, n * 100 / 250, &format!("frame {n}"))
            .await
            .unwrap();
    }
    let mut resumed = watch(&app, &t, &created.name, 1).await;
    let first = collect(&mut resumed, Duration::from_secs(2)).await;
    complete(&app, &l).await.unwrap();
    let rest = collect(&mut resumed, Duration::from_secs(10)).await;
    let events: Vec<_> = first.into_iter().chain(rest).collect();
    assert_eq!(
        events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        (2..=253).collect::<Vec<_>>(),
        "every event after the first, none skipped for a snapshot"
    );
    assert!(
        events[1..251]
            .iter()
            .enumerate()
            .all(|(i, e)| Type::try_from(e.r#type) == Ok(Type::Progress)
                && e.job.as_ref().unwrap().current_step == format!("frame {}", i + 1)),
        "the reports, replayed in order"
    );
    assert_eq!(state(events.last().unwrap()), State::Succeeded);
}

#[tokio::test]
async fn a_watch_survives_a_redis_outage_and_still_sees_the_terminal_state() {
    let (app, proxy) = app_behind_redis_proxy().await;
    let t = token("alice");
    let p = create_project(&app, &t, "outage").await;
    let created = create_job(&app, &t, &p.name, job("render")).await;
    let mut stream = watch(&app, &t, &created.name, 0).await;
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(state(&first), State::Queued);

    proxy.cut().await;
    // Everything a client is told succeeds while Redis is gone.
    let l = acquire(&app, "w", &["render"], 1, 30.0, 0.0)
        .await
        .remove(0);
    progress(&app, &l, 50, "half").await.unwrap();
    complete(&app, &l).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.restore();

    let events = collect(&mut stream, Duration::from_secs(15)).await;
    let last = events.last().expect("events after Redis came back");
    assert_eq!(state(last), State::Succeeded, "the terminal state arrives");
    let mut seq = first.sequence;
    for e in &events {
        assert!(e.sequence > seq, "never backwards");
        seq = e.sequence;
    }
}

#[tokio::test]
async fn finished_jobs_are_pruned_after_the_retention() {
    let app = TestApp::spawn_with(|s| {
        s.reap_interval = Duration::from_millis(50);
        s.job_retention = Duration::from_secs(1);
    })
    .await;
    let t = token("alice");
    let p = create_project(&app, &t, "prune").await;
    let keep = create_job(&app, &t, &p.name, job("transcode")).await;
    let done = create_job(&app, &t, &p.name, job("render")).await;
    let l = acquire(&app, "w", &["render"], 1, 30.0, 0.0)
        .await
        .remove(0);
    complete(&app, &l).await.unwrap();
    eventually(Duration::from_secs(15), "finished job pruned", || {
        let mut c = app.jobs(&t);
        let name = done.name.clone();
        async move {
            c.get_job(pb::GetJobRequest { name })
                .await
                .is_err_and(|e| e.code() == Code::NotFound)
        }
    })
    .await;
    get(&app, &t, &keep.name).await;
    assert_eq!(
        stored_events(&app, &done.name).await,
        0,
        "events go with the job"
    );
    assert_eq!(stored_events(&app, &keep.name).await, 1);
}

/// Pruning waits on a lock (an operator's transaction holding an old job's events):
/// leases that expire meanwhile are still reaped.
#[tokio::test]
async fn a_prune_held_up_does_not_hold_up_expired_leases() {
    use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
    let app = TestApp::spawn_with(|s| {
        s.reap_interval = Duration::from_millis(100);
        s.job_retention = Duration::from_secs(1);
    })
    .await;
    let t = token("alice");
    let p = create_project(&app, &t, "prune and reap").await;
    let old = create_job(&app, &t, &p.name, job("render")).await;
    let l = acquire(&app, "w", &["render"], 1, 30.0, 0.0)
        .await
        .remove(0);
    complete(&app, &l).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let id = old.name.rsplit('/').next().unwrap();
    let mut holder = diesel_async::AsyncPgConnection::establish(&app.db.url())
        .await
        .unwrap();
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM job_events WHERE job_id = '{id}' FOR UPDATE"
        ))
        .await
        .unwrap();
    // The next prune deletes the old job, and waits for its events' lock.
    let mut watcher = diesel_async::AsyncPgConnection::establish(&app.db.url())
        .await
        .unwrap();
    #[derive(diesel::QueryableByName)]
    struct Waiting {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let blocked = tokio::time::Instant::now();
    loop {
        let w: Waiting = diesel::sql_query(
            "SELECT count(*) AS n FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock' \
               AND query LIKE 'DELETE FROM jobs%'",
        )
        .get_result(&mut watcher)
        .await
        .unwrap();
        if w.n > 0 {
            break;
        }
        assert!(
            blocked.elapsed() < Duration::from_secs(15),
            "no prune waited on the lock"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let fresh = create_job(&app, &t, &p.name, job("render")).await;
    acquire(&app, "w2", &["render"], 1, 1.0, 0.0).await;
    // Its lease expires in a second; the reaper puts it back for another attempt.
    eventually(Duration::from_secs(5), "the expired lease reaped", || {
        let (app, t, name) = (&app, &t, fresh.name.clone());
        async move { get(app, t, &name).await.state == State::Queued as i32 }
    })
    .await;
    holder.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test]
async fn retention_deletes_in_bounded_batches() {
    use diesel_async::AsyncConnection;
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "prune in batches").await;
    let keep = create_job(&app, &t, &p.name, job("transcode")).await;
    let mut done = Vec::new();
    for _ in 0..3 {
        done.push(create_job(&app, &t, &p.name, job("render")).await.name);
    }
    for l in acquire(&app, "w", &["render"], 3, 30.0, 0.0).await {
        complete(&app, &l).await.unwrap();
    }
    let mut conn = diesel_async::AsyncPgConnection::establish(&app.db.url())
        .await
        .unwrap();
    let now = chrono::Utc::now();
    // Events are kept (their cut-off is long ago); finished jobs go, two per statement.
    let old = now - chrono::Duration::days(1);
    let mut deleted = Vec::new();
    for _ in 0..3 {
        let (jobs, events) = mediaplane::db::jobs::prune(&mut conn, now, old, 2)
            .await
            .unwrap();
        assert_eq!(events, 0);
        deleted.push(jobs);
    }
    assert_eq!(
        deleted,
        [2, 1, 0],
        "at most a batch per statement, until none is left"
    );
    for name in &done {
        assert_eq!(stored_events(&app, name).await, 0, "events go with the job");
    }
    get(&app, &t, &keep.name).await;
    // Events by age: the queued job's one event is the only one left.
    let (jobs, events) = mediaplane::db::jobs::prune(&mut conn, old, now, 2)
        .await
        .unwrap();
    assert_eq!((jobs, events), (0, 1));
    assert_eq!(stored_events(&app, &keep.name).await, 0);
}

#[tokio::test]
async fn deleting_a_project_deletes_its_jobs() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "doomed").await;
    let j = create_job(&app, &t, &p.name, job("render")).await;
    assert_eq!(stored_events(&app, &j.name).await, 1);
    app.projects(&t)
        .delete_project(pb::DeleteProjectRequest {
            name: p.name.clone(),
            etag: String::new(),
        })
        .await
        .unwrap();
    let err = app
        .jobs(&admin_token("root"))
        .get_job(pb::GetJobRequest {
            name: j.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        acquire(&app, "w", &["render"], 1, 30.0, 0.0)
            .await
            .is_empty()
    );
    assert_eq!(
        stored_events(&app, &j.name).await,
        0,
        "events go with the job"
    );
}

#[tokio::test]
async fn a_project_being_deleted_holds_up_its_own_calls_only() {
    use diesel_async::{AsyncConnection, RunQueryDsl};
    // Shared with the calls spawned to wait for the deletion.
    let app = std::sync::Arc::new(TestApp::spawn().await);
    let t = token("alice");
    let doomed = create_project(&app, &t, "doomed").await;
    let busy = create_project(&app, &t, "busy").await;
    let id: uuid::Uuid = doomed.name.rsplit('/').next().unwrap().parse().unwrap();
    // Two running jobs in the doomed project: one for a progress report (the shared
    // fenced statement's path), one for a FailJob (the path that locks jobs first).
    create_job(&app, &t, &doomed.name, job("doomed")).await;
    create_job(&app, &t, &doomed.name, job("doomed")).await;
    let doomed_leased = acquire(&app, "w-doomed", &["doomed"], 2, 120.0, 0.0).await;
    assert_eq!(doomed_leased.len(), 2);
    // A deletion in progress (one of a project with many jobs takes a while), run by
    // the server's own deletion code: the project's row and its jobs' rows stay locked
    // until its transaction ends, first in a rollback, then in a commit.
    let mut deletion = diesel_async::AsyncPgConnection::establish(&app.db.url())
        .await
        .unwrap();
    for end in ["ROLLBACK", "COMMIT"] {
        // This round's jobs in the other project, running.
        create_job(&app, &t, &busy.name, job("busy")).await;
        create_job(&app, &t, &busy.name, job("busy")).await;
        let busy_leased = acquire(&app, "w-busy", &["busy"], 2, 120.0, 0.0).await;
        assert_eq!(busy_leased.len(), 2);

        diesel::sql_query("BEGIN")
            .execute(&mut deletion)
            .await
            .unwrap();
        let outcome = mediaplane::db::projects::delete(&mut deletion, None, id, None)
            .await
            .unwrap();
        assert!(matches!(
            outcome,
            mediaplane::db::projects::Outcome::Done(())
        ));
        let (mut client, parent) = (app.jobs(&t), doomed.name.clone());
        let create = tokio::spawn(async move {
            client
                .create_job(pb::CreateJobRequest {
                    parent,
                    job: Some(job("render")),
                    request_id: String::new(),
                })
                .await
                .map(|r| r.into_inner().name)
        });
        let (a, leased) = (app.clone(), doomed_leased[0].clone());
        let report = tokio::spawn(async move {
            progress(&a, &leased, 50, "half")
                .await
                .map(|r| r.lease_expire_time.is_some())
        });
        let (a, leased) = (app.clone(), doomed_leased[1].clone());
        // Retryable: after a rollback the job is queued again.
        let failed =
            tokio::spawn(async move { fail(&a, &leased, true, None).await.map(|j| j.state()) });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let soon = Duration::from_secs(3);
        for _ in 0..3 {
            tokio::time::timeout(soon, create_job(&app, &t, &busy.name, job("render")))
                .await
                .expect("creates in other projects do not wait for the deletion");
        }
        tokio::time::timeout(soon, progress(&app, &busy_leased[0], 50, "half"))
            .await
            .expect("worker writes in other projects do not wait for the deletion")
            .unwrap();
        tokio::time::timeout(soon, complete(&app, &busy_leased[0]))
            .await
            .expect("worker writes in other projects do not wait for the deletion")
            .unwrap();
        tokio::time::timeout(soon, fail(&app, &busy_leased[1], false, None))
            .await
            .expect("worker writes in other projects do not wait for the deletion")
            .unwrap();
        assert!(
            !create.is_finished() && !report.is_finished() && !failed.is_finished(),
            "calls about the project being deleted wait for the deletion's outcome"
        );
        diesel::sql_query(end).execute(&mut deletion).await.unwrap();
        let created = tokio::time::timeout(Duration::from_secs(5), create)
            .await
            .expect("the create ends with the deletion")
            .unwrap();
        let reported = tokio::time::timeout(Duration::from_secs(5), report)
            .await
            .expect("the report ends with the deletion")
            .unwrap();
        let failed = tokio::time::timeout(Duration::from_secs(5), failed)
            .await
            .expect("the fail ends with the deletion")
            .unwrap();
        if end == "ROLLBACK" {
            let name = created.expect("the project is still there");
            assert!(name.starts_with(&doomed.name), "{name}");
            assert_eq!(get(&app, &t, &name).await.state(), State::Queued);
            assert!(reported.expect("the job is still there"));
            assert_eq!(failed.expect("the job is still there"), State::Queued);
        } else {
            for err in [
                created.unwrap_err(),
                reported.unwrap_err(),
                failed.unwrap_err(),
            ] {
                assert_eq!(err.code(), Code::NotFound, "{err:?}");
            }
        }
    }
}

#[tokio::test]
async fn a_slow_watcher_gets_the_newest_snapshot_not_a_backlog() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "slow").await;
    let created = create_job(&app, &t, &p.name, job("render")).await;
    // A client with small HTTP/2 windows (a slow link) opens the watch, then does not
    // read while the job produces far more than the transport buffers.
    let slow = tonic::transport::Endpoint::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(16 * 1024))
        .connect()
        .await
        .unwrap();
    let mut slow =
        pb::jobs_service_client::JobsServiceClient::with_interceptor(slow, Bearer::new(&t));
    let mut stream = slow
        .watch_job(pb::WatchJobRequest {
            name: created.name.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let l = acquire(&app, "w", &["render"], 1, 60.0, 0.0)
        .await
        .remove(0);
    let reports = 600;
    let mut c = app.jobs(&worker());
    for i in 0..reports {
        c.report_progress(pb::ReportProgressRequest {
            name: created.name.clone(),
            lease_id: l.lease_id.clone(),
            progress_percent: i % 100,
            current_step: format!("frame {i}"),
            message: "x".repeat(1000),
        })
        .await
        .unwrap();
    }
    complete(&app, &l).await.unwrap();

    let events = collect(&mut stream, Duration::from_secs(10)).await;
    let last = events.last().expect("events");
    assert_eq!(state(last), State::Succeeded, "the newest state arrives");
    assert!(
        events.len() < reports as usize,
        "no full backlog was kept: {} events",
        events.len()
    );
    let snapshots_after_start = events
        .iter()
        .skip(1)
        .filter(|e| Type::try_from(e.r#type) == Ok(Type::Snapshot))
        .count();
    assert!(
        snapshots_after_start >= 1,
        "the gap was bridged by a snapshot"
    );
    assert!(
        events.windows(2).all(|w| w[1].sequence > w[0].sequence),
        "in order"
    );
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
