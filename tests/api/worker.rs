//! The worker runtime in the binary (`mediaplane worker`) and the `jobs` CLI.
use std::{process::Stdio, time::Duration};

use mediaplane::proto::v1::{self as pb, job::State};
use tokio::process::Command;

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_mediaplane");

fn worker_cmd(app: &TestApp, command: &str, max_jobs: u32) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "worker",
        "--server",
        &format!("http://{}", app.addr),
        "--kinds",
        "render",
        "--lease",
        "3s",
    ])
    .args(["--command", command, "--max-jobs", &max_jobs.to_string()])
    .env(
        "MEDIAPLANE_TOKEN",
        token_with("runtime", &["worker"], Duration::from_secs(600)),
    )
    .env("RUST_LOG", "warn")
    .stdout(Stdio::null())
    .stderr(Stdio::inherit())
    .kill_on_drop(true);
    cmd
}

async fn new_job(app: &TestApp, t: &str, project: &str, max_attempts: i32) -> pb::Job {
    let input = prost_types::Struct {
        fields: [(
            "frames".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(24.0)),
            },
        )]
        .into(),
    };
    app.jobs(t)
        .create_job(pb::CreateJobRequest {
            parent: project.into(),
            job: Some(pb::Job {
                kind: "render".into(),
                input: Some(input),
                max_attempts,
                ..Default::default()
            }),
            request_id: String::new(),
            key: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn state_of(app: &TestApp, t: &str, name: &str) -> pb::Job {
    app.jobs(t)
        .get_job(pb::GetJobRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
}

fn watch_cmd(app: &TestApp, t: &str, name: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "jobs",
        "watch",
        name,
        "--server",
        &format!("http://{}", app.addr),
    ])
    .env("MEDIAPLANE_TOKEN", t)
    .stdout(Stdio::piped())
    .kill_on_drop(true);
    cmd
}

#[tokio::test]
async fn the_runtime_runs_a_command_reports_progress_and_the_cli_follows_it() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "runtime").await;
    let job = new_job(&app, &t, &p.name, 3).await;
    let watcher = watch_cmd(&app, &t, &job.name).spawn().unwrap();

    // The command reads its input from stdin and reports through stdout lines.
    let script = r#"read input; echo "PROGRESS 30 decoding"; sleep 0.3; echo "PROGRESS 80 encoding"; echo "MESSAGE got $input"; echo 'RESULT {"ok": true}'"#;
    let status = worker_cmd(&app, script, 1).status().await.unwrap();
    assert!(status.success());

    let done = state_of(&app, &t, &job.name).await;
    assert_eq!(State::try_from(done.state).unwrap(), State::Succeeded);
    assert_eq!(
        done.result.unwrap().fields["ok"].kind,
        Some(prost_types::value::Kind::BoolValue(true))
    );
    assert!(
        done.message.contains("\"frames\":24"),
        "input reached the command: {}",
        done.message
    );

    let out = tokio::time::timeout(Duration::from_secs(10), watcher.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "exit code by final state");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("RUNNING 30% decoding"), "{text}");
    assert!(
        text.trim_end()
            .ends_with(&format!("{} SUCCEEDED", job.name)),
        "{text}"
    );
}

#[tokio::test]
async fn a_failing_command_fails_the_attempt_and_cancel_kills_the_command() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "runtime failures").await;

    let job = new_job(&app, &t, &p.name, 1).await;
    let status = worker_cmd(&app, "echo 'out of memory' >&2; exit 3", 1)
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let failed = state_of(&app, &t, &job.name).await;
    assert_eq!(State::try_from(failed.state).unwrap(), State::Failed);
    let message = failed.error.unwrap().message;
    assert!(
        message.contains("exit status: 3") && message.contains("out of memory"),
        "{message}"
    );
    let out = watch_cmd(&app, &t, &job.name).output().await.unwrap();
    assert_eq!(out.status.code(), Some(3), "FAILED exits 3");

    // The same with a call per request instead of a WorkerSession (--no-session).
    let job = new_job(&app, &t, &p.name, 3).await;
    let long = "while true; do echo PROGRESS 10 waiting; sleep 0.2; done";
    let mut runtime = worker_cmd(&app, long, 1)
        .arg("--no-session")
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(10), "job running", || {
        let (app, t, name) = (&app, t.clone(), job.name.clone());
        async move { state_of(app, &t, &name).await.progress_percent == 10 }
    })
    .await;
    cancel_stops_the_runtime(&app, &t, &job.name, &mut runtime).await;
    let out = watch_cmd(&app, &t, &job.name).output().await.unwrap();
    assert_eq!(out.status.code(), Some(4), "CANCELLED exits 4");
    // The first runtime spoke over a session, the second made calls.
    assert_eq!(
        calls_started(&app, "WorkerSession", Some("grpc")).await,
        1.0
    );
    assert_eq!(
        calls_started(&app, "AcquireJobs", Some("worker-session")).await,
        1.0
    );
    assert_eq!(calls_started(&app, "AcquireJobs", Some("grpc")).await, 1.0);
    assert_eq!(
        calls_started(&app, "FailJob", Some("worker-session")).await,
        1.0
    );
    assert_eq!(calls_started(&app, "FailJob", Some("grpc")).await, 1.0);
}

/// Cancels `name`, whose command `runtime` is running: the runtime stops the command
/// and exits cleanly, and the job ends CANCELLED.
async fn cancel_stops_the_runtime(
    app: &TestApp,
    t: &str,
    name: &str,
    runtime: &mut tokio::process::Child,
) {
    app.jobs(t)
        .cancel_job(pb::CancelJobRequest { name: name.into() })
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), runtime.wait())
        .await
        .expect("the runtime stops the command and exits")
        .unwrap();
    assert!(status.success());
    assert_eq!(
        State::try_from(state_of(app, t, name).await.state).unwrap(),
        State::Cancelled
    );
}

/// Sends `signal` to the child (the worker process only, not its commands).
fn signal(child: &tokio::process::Child, signal: i32) {
    let pid = child.id().expect("the worker is running") as i32;
    // SAFETY: kill(2) on a child this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

#[tokio::test]
async fn sigterm_lets_running_jobs_finish_takes_no_more_and_exits() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "runtime stops").await;

    // Busy: the job in hand is finished and reported, nothing new is leased.
    let job = new_job(&app, &t, &p.name, 1).await;
    let mut busy = worker_cmd(&app, "echo PROGRESS 50 half; sleep 2", 0)
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(10), "job running", || {
        let (app, t, name) = (&app, t.clone(), job.name.clone());
        async move { state_of(app, &t, &name).await.progress_percent == 50 }
    })
    .await;
    signal(&busy, libc::SIGTERM);
    // A job created once the signal is handled (a long-poll would take it at once).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let next = new_job(&app, &t, &p.name, 1).await;
    let status = tokio::time::timeout(Duration::from_secs(15), busy.wait())
        .await
        .expect("the worker exits after its job")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(
        State::try_from(state_of(&app, &t, &job.name).await.state).unwrap(),
        State::Succeeded,
        "the running job was finished, not abandoned"
    );
    assert_eq!(
        State::try_from(state_of(&app, &t, &next.name).await.state).unwrap(),
        State::Queued,
        "no job is leased after the signal"
    );

    // Idle (the queued job done, in a long-poll): it exits at once.
    let mut idle = worker_cmd(&app, "true", 0).spawn().unwrap();
    eventually(Duration::from_secs(10), "next job done", || {
        let (app, t, name) = (&app, t.clone(), next.name.clone());
        async move { state_of(app, &t, &name).await.state == State::Succeeded as i32 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = std::time::Instant::now();
    signal(&idle, libc::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(5), idle.wait())
        .await
        .expect("an idle worker exits at once")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
}

#[tokio::test]
async fn the_runtime_takes_its_next_job_with_a_completion_and_cancel_still_reaches_it() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "runtime next").await;
    let quick = new_job(&app, &t, &p.name, 1).await;
    let slow = new_job(&app, &t, &p.name, 3).await;
    // The first job ends at once; the second runs until cancelled.
    let command = format!(
        "if [ \"$MEDIAPLANE_JOB_NAME\" = '{}' ]; then exit 0; fi; \
         while true; do echo PROGRESS 10 waiting; sleep 0.2; done",
        quick.name
    );
    let mut runtime = worker_cmd(&app, &command, 2).spawn().unwrap();
    eventually(Duration::from_secs(10), "the second job running", || {
        let (app, t, name) = (&app, t.clone(), slow.name.clone());
        async move { state_of(app, &t, &name).await.progress_percent == 10 }
    })
    .await;
    assert_eq!(
        State::try_from(state_of(&app, &t, &quick.name).await.state).unwrap(),
        State::Succeeded
    );
    // One AcquireJobs for two jobs: the second came with the first one's completion.
    assert_eq!(calls_started(&app, "AcquireJobs", None).await, 1.0);
    assert_eq!(calls_started(&app, "BatchCompleteJobs", None).await, 1.0);
    assert_eq!(
        calls_started(&app, "BatchCompleteJobs", Some("worker-session")).await,
        1.0,
        "over the runtime's WorkerSession"
    );
    assert_eq!(
        groups_committed(&app, "turn").await,
        1.0,
        "the completion and the lease in one transaction"
    );
    // The runtime exits after it (--max-jobs 2).
    cancel_stops_the_runtime(&app, &t, &slow.name, &mut runtime).await;
}
