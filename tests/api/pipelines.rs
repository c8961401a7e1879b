//! Pipelines: jobs that wait for jobs. Release in the transaction that ends the last
//! dependency, cascades of failure and cancel, retry re-arming, batch references, and
//! dependencies handed to workers with their lease; over gRPC against real Postgres.
use std::time::Duration;

use mediaplane::proto::v1::{self as pb, job::State};
use prost_types::{Struct, Value, value::Kind};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::helpers::*;

fn text_struct(key: &str, value: &str) -> Struct {
    Struct {
        fields: [(
            key.to_owned(),
            Value {
                kind: Some(Kind::StringValue(value.into())),
            },
        )]
        .into(),
    }
}

/// A batch request for `kind`, with `key` and `depends_on`, labelled `pipeline=p`.
fn step(kind: &str, key: &str, depends_on: &[&str]) -> pb::CreateJobRequest {
    pb::CreateJobRequest {
        job: Some(pb::Job {
            kind: kind.into(),
            depends_on: depends_on.iter().map(|d| d.to_string()).collect(),
            labels: [("pipeline".to_owned(), "p".to_owned())].into(),
            ..Default::default()
        }),
        key: key.into(),
        ..Default::default()
    }
}

async fn batch(
    app: &TestApp,
    t: &str,
    parent: &str,
    requests: Vec<pb::CreateJobRequest>,
) -> Result<Vec<pb::Job>, tonic::Status> {
    app.jobs(t)
        .batch_create_jobs(pb::BatchCreateJobsRequest {
            parent: parent.into(),
            requests,
        })
        .await
        .map(|r| r.into_inner().jobs)
}

async fn get(app: &TestApp, t: &str, name: &str) -> pb::Job {
    app.jobs(t)
        .get_job(pb::GetJobRequest { name: name.into() })
        .await
        .expect("get job")
        .into_inner()
}

/// The summary of the jobs labelled `pipeline=p` in `parent`.
async fn summarize(app: &TestApp, t: &str, parent: &str) -> pb::JobsSummary {
    app.jobs(t)
        .summarize_jobs(pb::SummarizeJobsRequest {
            parent: parent.into(),
            filter: r#"labels.pipeline = "p""#.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

fn state(job: &pb::Job) -> State {
    State::try_from(job.state).unwrap()
}

async fn lease(app: &TestApp, kinds: &[&str], max: i32) -> Vec<pb::LeasedJob> {
    app.jobs(&worker_token())
        .acquire_jobs(pb::AcquireJobsRequest {
            worker_id: "w".into(),
            kinds: kinds.iter().map(|k| k.to_string()).collect(),
            max_jobs: max,
            ..Default::default()
        })
        .await
        .expect("acquire")
        .into_inner()
        .jobs
}

async fn complete(
    app: &TestApp,
    leased: &pb::LeasedJob,
    result: Option<Struct>,
    outputs: Vec<String>,
) -> pb::Job {
    app.jobs(&worker_token())
        .complete_job(pb::CompleteJobRequest {
            name: leased.job.as_ref().unwrap().name.clone(),
            lease_id: leased.lease_id.clone(),
            result,
            output_assets: outputs,
        })
        .await
        .expect("complete")
        .into_inner()
}

async fn fail(app: &TestApp, leased: &pb::LeasedJob) -> pb::Job {
    app.jobs(&worker_token())
        .fail_job(pb::FailJobRequest {
            name: leased.job.as_ref().unwrap().name.clone(),
            lease_id: leased.lease_id.clone(),
            error: Some(tonic_types::pb::Status {
                code: Code::Internal as i32,
                message: "the GPU caught fire".into(),
                details: vec![],
            }),
            retryable: false,
            retry_after: None,
        })
        .await
        .expect("fail")
        .into_inner()
}

#[tokio::test]
async fn a_pipeline_runs_in_order_and_each_step_gets_what_the_one_before_made() {
    let app = TestApp::spawn().await;
    let t = token("studio");
    let project = create_project(&app, &t, "pipeline").await;
    let parent = project.name.clone();
    // An existing job, and a batch that depends on it and on its own earlier requests.
    let script = app
        .jobs(&t)
        .create_job(pb::CreateJobRequest {
            parent: parent.clone(),
            job: Some(pb::Job {
                kind: "script".into(),
                labels: [("pipeline".to_owned(), "p".to_owned())].into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut watch = app
        .jobs(&t)
        .watch_jobs(pb::WatchJobsRequest {
            parent: parent.clone(),
            filter: r#"labels.pipeline = "p""#.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let created = batch(
        &app,
        &t,
        &parent,
        vec![
            step("tts", "speech", &[&script.name]),
            step("render", "video", &["@speech", "@0", &script.name]),
            step("thumbnail", "", &["@video"]),
        ],
    )
    .await
    .expect("pipeline created");
    let names: Vec<String> = created.iter().map(|j| j.name.clone()).collect();
    assert!(
        created.iter().all(|j| state(j) == State::Waiting),
        "{created:?}"
    );
    assert_eq!(
        created[1].depends_on,
        vec![names[0].clone(), script.name.clone()]
    );
    assert_eq!(created[2].depends_on, vec![names[1].clone()]);

    // Only the script can run; the others wait.
    let leased = lease(&app, &["script", "tts", "render", "thumbnail"], 10).await;
    assert_eq!(leased.len(), 1);
    assert!(leased[0].dependencies.is_empty());
    complete(&app, &leased[0], Some(text_struct("text", "hello")), vec![]).await;
    // Released in the completing transaction: queued as soon as the call returned.
    assert_eq!(state(&get(&app, &t, &names[0]).await), State::Queued);
    assert_eq!(state(&get(&app, &t, &names[1]).await), State::Waiting);

    // The speech job gets the script's result with its lease, and makes an asset.
    let leased = lease(&app, &["tts", "render", "thumbnail"], 10).await;
    assert_eq!(leased.len(), 1);
    let deps = &leased[0].dependencies;
    assert_eq!(deps.len(), 1);
    assert_eq!(deps[0].name, script.name);
    assert_eq!(deps[0].state, State::Succeeded as i32);
    assert_eq!(deps[0].result, Some(text_struct("text", "hello")));
    let speech = crate::assets::upload(&app, &t, &parent, b"RIFF speech")
        .await
        .expect("upload");
    complete(&app, &leased[0], None, vec![speech.name.clone()]).await;

    // The render finds the speech asset among what its dependencies made.
    let leased = lease(&app, &["render", "thumbnail"], 10).await;
    assert_eq!(leased.len(), 1);
    let render = &leased[0];
    assert_eq!(render.job.as_ref().unwrap().name, names[1]);
    let deps: Vec<(&str, &[String])> = render
        .dependencies
        .iter()
        .map(|d| (d.name.as_str(), d.output_assets.as_slice()))
        .collect();
    assert_eq!(
        deps,
        vec![
            (names[0].as_str(), std::slice::from_ref(&speech.name)),
            (script.name.as_str(), &[][..])
        ]
    );
    // Half way: the summary counts the pipeline's jobs and its progress.
    let summary = summarize(&app, &t, &parent).await;
    assert_eq!(
        (
            summary.total_jobs,
            summary.succeeded_jobs,
            summary.running_jobs,
            summary.waiting_jobs
        ),
        (4, 2, 1, 1)
    );
    assert_eq!(summary.progress_percent, 50.0);
    assert!(!summary.done);
    let film = crate::assets::upload(&app, &t, &parent, b"\x00\x00\x00\x18ftypmp42 film")
        .await
        .expect("upload");
    complete(
        &app,
        render,
        Some(text_struct("frames", "240")),
        vec![film.name.clone()],
    )
    .await;
    // The last stage gets the render's result and film.
    let leased = lease(&app, &["thumbnail"], 10).await;
    assert_eq!(leased.len(), 1);
    let deps = &leased[0].dependencies;
    assert_eq!(deps.len(), 1);
    assert_eq!(deps[0].name, names[1]);
    assert_eq!(deps[0].kind, "render");
    assert_eq!(deps[0].result, Some(text_struct("frames", "240")));
    assert_eq!(deps[0].output_assets, vec![film.name.clone()]);
    complete(&app, &leased[0], None, vec![]).await;

    // One stream followed the whole pipeline: every job reached SUCCEEDED in it.
    let mut done = std::collections::HashSet::new();
    let wanted: std::collections::HashSet<String> =
        names.iter().cloned().chain([script.name.clone()]).collect();
    let mut saw_waiting = false;
    while done.len() < 4 {
        let ev = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("pipeline events")
            .unwrap()
            .unwrap();
        let job = ev.job.unwrap();
        assert!(
            wanted.contains(&job.name),
            "only the pipeline's jobs: {}",
            job.name
        );
        saw_waiting |= state(&job) == State::Waiting;
        if state(&job) == State::Succeeded {
            done.insert(job.name);
        }
    }
    assert!(saw_waiting);
    let summary = summarize(&app, &t, &parent).await;
    assert!(
        summary.done && summary.progress_percent == 100.0,
        "{summary:?}"
    );
}

#[tokio::test]
async fn a_failure_cancels_the_jobs_waiting_on_it_transitively_and_a_retry_rearms_them() {
    let app = TestApp::spawn().await;
    let t = token("studio");
    let parent = create_project(&app, &t, "chain").await.name;
    let mut cleanup = step("cleanup", "", &["@0"]);
    cleanup.job.as_mut().unwrap().run_anyway = true;
    let jobs = batch(
        &app,
        &t,
        &parent,
        vec![
            step("train", "train", &[]),
            step("generate", "gen", &["@train"]),
            step("publish", "", &["@gen"]),
            cleanup,
        ],
    )
    .await
    .unwrap();
    assert_eq!(state(&jobs[0]), State::Queued);
    let leased = lease(&app, &["train"], 1).await;
    let failed = fail(&app, &leased[0]).await;
    assert_eq!(state(&failed), State::Failed);

    let generate = get(&app, &t, &jobs[1].name).await;
    assert_eq!(state(&generate), State::Cancelled);
    let why = generate.error.unwrap().message;
    assert!(
        why.contains(&jobs[0].name) && why.contains("FAILED"),
        "{why}"
    );
    let publish = get(&app, &t, &jobs[2].name).await;
    assert_eq!(state(&publish), State::Cancelled);
    assert!(publish.error.unwrap().message.contains(&jobs[1].name));
    // The clean-up step runs anyway, once its dependency ended.
    assert_eq!(state(&get(&app, &t, &jobs[3].name).await), State::Queued);

    // A cancelled dependent cannot be retried while its dependency is FAILED.
    let refused = app
        .jobs(&t)
        .retry_job(pb::RetryJobRequest {
            name: jobs[1].name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains(&jobs[0].name),
        "{}",
        refused.message()
    );

    // Retrying the failed job puts what it cancelled back to waiting.
    let retried = app
        .jobs(&t)
        .retry_job(pb::RetryJobRequest {
            name: jobs[0].name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&retried), State::Queued);
    for j in &jobs[1..3] {
        let j = get(&app, &t, &j.name).await;
        assert_eq!(state(&j), State::Waiting);
        assert!(j.error.is_none() && j.end_time.is_none());
    }
    let leased = lease(&app, &["train"], 1).await;
    complete(&app, &leased[0], None, vec![]).await;
    assert_eq!(state(&get(&app, &t, &jobs[1].name).await), State::Queued);
    assert_eq!(state(&get(&app, &t, &jobs[2].name).await), State::Waiting);
}

#[tokio::test]
async fn cancelling_a_job_cancels_what_waits_on_it() {
    let app = TestApp::spawn().await;
    let t = token("studio");
    let parent = create_project(&app, &t, "cancel").await.name;
    let jobs = batch(
        &app,
        &t,
        &parent,
        vec![
            step("a", "", &[]),
            step("b", "", &["@0"]),
            step("c", "", &["@1"]),
            step("d", "", &[]),
            step("e", "", &["@3"]),
        ],
    )
    .await
    .unwrap();
    // Queued: cancelled at once, and its chain with it.
    app.jobs(&t)
        .cancel_job(pb::CancelJobRequest {
            name: jobs[0].name.clone(),
        })
        .await
        .unwrap();
    for j in &jobs[..3] {
        assert_eq!(state(&get(&app, &t, &j.name).await), State::Cancelled);
    }
    let c = get(&app, &t, &jobs[2].name).await;
    assert!(c.error.unwrap().message.contains(&jobs[1].name));
    // Running: its dependents go now; the job itself when its worker stops.
    let leased = lease(&app, &["d"], 1).await;
    let d = app
        .jobs(&t)
        .cancel_job(pb::CancelJobRequest {
            name: jobs[3].name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(d.cancel_requested && state(&d) == State::Running);
    assert_eq!(state(&get(&app, &t, &jobs[4].name).await), State::Cancelled);
    // A waiting job can be cancelled itself.
    let more = batch(
        &app,
        &t,
        &parent,
        vec![step("f", "", &[]), step("g", "", &["@0"])],
    )
    .await
    .unwrap();
    let g = app
        .jobs(&t)
        .cancel_job(pb::CancelJobRequest {
            name: more[1].name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&g), State::Cancelled);
    drop(leased);
}

#[tokio::test]
async fn bad_references_are_refused_and_nothing_is_created() {
    let app = TestApp::spawn().await;
    let t = token("studio");
    let parent = create_project(&app, &t, "refs").await.name;
    let other = create_project(&app, &t, "other").await.name;
    let foreign = create_job_of(&app, &t, &other, "x").await;

    let err = batch(
        &app,
        &t,
        &parent,
        vec![step("a", "", &["@1"]), step("b", "", &[])],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err), vec!["requests[0].job.depends_on[0]"]);

    let err = batch(&app, &t, &parent, vec![step("a", "", &["@0"])])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "a job cannot depend on itself"
    );

    let err = batch(
        &app,
        &t,
        &parent,
        vec![step("a", "k", &[]), step("b", "k", &[])],
    )
    .await
    .unwrap_err();
    assert_eq!(violations(&err), vec!["requests[1].key"]);

    // Another owner's job is not found (as any job the caller cannot see).
    let stranger = token("stranger");
    let theirs = create_project(&app, &stranger, "theirs").await.name;
    let their_job = create_job_of(&app, &stranger, &theirs, "x").await;
    let err = batch(&app, &t, &parent, vec![step("a", "", &[&their_job.name])])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    // So is one of the caller's own jobs in another project.
    let err = batch(&app, &t, &parent, vec![step("a", "", &[&foreign.name])])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());

    let missing = format!("{parent}/jobs/{}", uuid::Uuid::now_v7());
    let err = batch(
        &app,
        &t,
        &parent,
        vec![step("a", "", &[]), step("b", "", &[&missing])],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let id = missing.rsplit('/').next().unwrap();
    assert!(err.message().contains(id), "{}", err.message());

    let err = app
        .jobs(&t)
        .create_job(pb::CreateJobRequest {
            parent: parent.clone(),
            job: step("a", "", &["@0"]).job,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err), vec!["job.depends_on[0]"]);

    // A failed dependency refuses a new dependent, unless it runs anyway.
    let lone = create_job_of(&app, &t, &parent, "doomed").await;
    let leased = lease(&app, &["doomed"], 1).await;
    fail(&app, &leased[0]).await;
    let err = batch(&app, &t, &parent, vec![step("a", "", &[&lone.name])])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let mut anyway = step("a", "", &[&lone.name]);
    anyway.job.as_mut().unwrap().run_anyway = true;
    let ok = batch(&app, &t, &parent, vec![anyway]).await.unwrap();
    assert_eq!(state(&ok[0]), State::Queued);

    // Only the lone job and its clean-up step exist in the project.
    let listed = app
        .jobs(&t)
        .list_jobs(pb::ListJobsRequest {
            parent: parent.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(listed.len(), 2, "refused batches wrote nothing: {listed:?}");
}

/// Two dependencies completed at the same moment by workers on two instances: the
/// dependent is released exactly once, never left waiting.
#[tokio::test]
async fn dependencies_ending_together_on_two_instances_release_their_dependent() {
    let a = TestApp::spawn().await;
    let b = a.spawn_peer().await;
    let t = token("studio");
    let parent = create_project(&a, &t, "race").await.name;
    let mut requests = Vec::new();
    for i in 0..20 {
        requests.push(step("left", &format!("l{i}"), &[]));
        requests.push(step("right", &format!("r{i}"), &[]));
        requests.push(step("join", "", &[&format!("@l{i}"), &format!("@r{i}")]));
    }
    let jobs = batch(&a, &t, &parent, requests).await.unwrap();
    let left = lease(&a, &["left"], 20).await;
    let right = lease(&b, &["right"], 20).await;
    assert_eq!((left.len(), right.len()), (20, 20));
    let (l, r) = tokio::join!(
        futures::future::join_all(left.iter().map(|j| complete(&a, j, None, vec![]))),
        futures::future::join_all(right.iter().map(|j| complete(&b, j, None, vec![]))),
    );
    assert_eq!(l.len() + r.len(), 40);
    for join in jobs.iter().filter(|j| j.kind == "join") {
        let now = get(&a, &t, &join.name).await;
        assert_eq!(state(&now), State::Queued, "{}", now.name);
    }
    assert_eq!(lease(&b, &["join"], 100).await.len(), 20);
}

/// A dependency whose worker vanished ends FAILED when its lease expires (no attempts
/// left); the reaper cancels what waited on it.
#[tokio::test]
async fn a_dependency_lost_with_its_worker_cancels_its_dependents() {
    let app = TestApp::spawn_with(|s| s.reap_interval = Duration::from_millis(200)).await;
    let t = token("studio");
    let parent = create_project(&app, &t, "lost").await.name;
    let mut first = step("gpu", "", &[]);
    first.job.as_mut().unwrap().max_attempts = 1;
    let jobs = batch(&app, &t, &parent, vec![first, step("after", "", &["@0"])])
        .await
        .unwrap();
    app.jobs(&worker_token())
        .acquire_jobs(pb::AcquireJobsRequest {
            worker_id: "w".into(),
            kinds: vec!["gpu".into()],
            max_jobs: 1,
            lease_duration: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the dependent is cancelled",
        || async { state(&get(&app, &t, &jobs[1].name).await) == State::Cancelled },
    )
    .await;
    assert_eq!(state(&get(&app, &t, &jobs[0].name).await), State::Failed);
}

/// `mediaplane jobs create --depends-on`: a step of a pipeline from the terminal.
#[tokio::test]
async fn the_cli_creates_a_job_that_waits_for_another() {
    let app = TestApp::spawn().await;
    let t = token("studio");
    let parent = create_project(&app, &t, "cli").await.name;
    let first = create_job_of(&app, &t, &parent, "script").await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mediaplane"))
        .args(["jobs", "create", "--project", &parent, "--kind", "speech"])
        .args(["--depends-on", &first.name, "--label", "post=42"])
        .args(["--concurrency-key", "acme"])
        .env("MEDIAPLANE_SERVER", app.http(""))
        .env("MEDIAPLANE_TOKEN", &t)
        .output()
        .await
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let name = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let job = get(&app, &t, &name).await;
    assert_eq!(state(&job), State::Waiting);
    assert_eq!(job.depends_on, vec![first.name.clone()]);
    assert_eq!(job.labels.get("post").map(String::as_str), Some("42"));
    assert_eq!(job.concurrency_key, "acme");
}
