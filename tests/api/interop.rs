//! Other languages: a Python grpcio client generated from `proto/` alone.
use std::{path::PathBuf, process::Command};

use mediaplane::proto::v1 as pb;

use crate::helpers::*;

/// The interpreter with grpcio, grpcio-tools and grpcio-health-checking, which
/// scripts/test.sh installs in `.venv`. Missing is a failure, not a skip.
fn python() -> PathBuf {
    let path = std::env::var_os("MEDIAPLANE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python")));
    assert!(
        path.exists(),
        "{} not found: run scripts/test.sh, which installs the Python interop tools",
        path.display()
    );
    path
}

#[tokio::test]
async fn python_grpcio_client_creates_and_reads_a_project_and_checks_health() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/projects_client.py"
    );
    let (python, addr) = (python(), app.addr.to_string());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python).args([script, &addr, &t]).output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["owner"], "alice");

    // What Python created is what the Rust client reads.
    let name = report["name"].as_str().unwrap().to_owned();
    let p = app
        .projects(&token("alice"))
        .get_project(pb::GetProjectRequest { name })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.display_name, "from python");
}

/// Runs `examples/python_worker.py` for "render" jobs with `args`; its stdout, once it
/// exited successfully.
async fn run_python_worker(app: &TestApp, args: &[&str]) -> String {
    let worker = token_with("py", &["worker"], std::time::Duration::from_secs(600));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python_worker.py");
    let mut command = Command::new(python());
    command
        .args([script, &app.addr.to_string(), &worker, "--kinds", "render"])
        .args(args);
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python worker failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn python_worker_completes_a_job() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "python worker").await;
    let input = prost_types::Struct {
        fields: [(
            "prompt".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("a cat".into())),
            },
        )]
        .into(),
    };
    let job = app
        .jobs(&t)
        .create_job(pb::CreateJobRequest {
            parent: p.name.clone(),
            job: Some(pb::Job {
                kind: "render".into(),
                input: Some(input),
                ..Default::default()
            }),
            request_id: String::new(),
            key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut watch = app
        .jobs(&t)
        .watch_job(pb::WatchJobRequest {
            name: job.name.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();

    run_python_worker(&app, &["--max-jobs", "1"]).await;

    let mut percents = Vec::new();
    let mut last = None;
    while let Ok(Some(Ok(e))) = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio_stream::StreamExt::next(&mut watch),
    )
    .await
    {
        let j = e.job.unwrap();
        percents.push(j.progress_percent);
        last = Some(j);
    }
    let done = last.expect("events");
    assert_eq!(
        pb::job::State::try_from(done.state).unwrap(),
        pb::job::State::Succeeded
    );
    let result = done.result.unwrap();
    assert_eq!(
        result.fields["worker"].kind,
        Some(prost_types::value::Kind::StringValue("python".into()))
    );
    assert_eq!(
        result.fields["prompt"].kind,
        Some(prost_types::value::Kind::StringValue("a cat".into()))
    );
    for pct in [25, 50, 75] {
        assert!(
            percents.contains(&pct),
            "progress {pct} seen by the watcher: {percents:?}"
        );
    }
}

#[tokio::test]
async fn python_client_uploads_and_downloads_an_asset() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "python assets").await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/assets_client.py"
    );
    let (python, addr, project, tok) = (python(), app.addr.to_string(), p.name.clone(), t.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .args([script, &addr, &tok, &project])
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python assets client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let asset = app
        .assets(&t)
        .get_asset(pb::GetAssetRequest {
            name: report["name"].as_str().unwrap().into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(asset.sha256, report["sha256"].as_str().unwrap());
    assert_eq!(asset.size_bytes, report["size"].as_i64().unwrap());
}

#[tokio::test]
async fn python_worker_completes_its_jobs_in_one_batch() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "python batch").await;
    let requests = (0..3)
        .map(|_| pb::CreateJobRequest {
            parent: String::new(),
            job: Some(pb::Job {
                kind: "render".into(),
                ..Default::default()
            }),
            request_id: String::new(),
            key: String::new(),
        })
        .collect();
    let created = app
        .jobs(&t)
        .batch_create_jobs(pb::BatchCreateJobsRequest {
            parent: p.name.clone(),
            requests,
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let stdout = run_python_worker(&app, &["--batch", "3", "--max-jobs", "3"]).await;
    for job in &created {
        assert!(
            stdout.contains(&format!("completed {} (batch)", job.name)),
            "{stdout}"
        );
        let stored = app
            .jobs(&t)
            .get_job(pb::GetJobRequest {
                name: job.name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stored.state(), pb::job::State::Succeeded);
        assert_eq!(
            stored.result.unwrap().fields["worker"].kind,
            Some(prost_types::value::Kind::StringValue("python".into()))
        );
    }
}

#[tokio::test]
async fn python_worker_takes_its_next_job_with_each_completion() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "python next").await;
    let mut created = Vec::new();
    for _ in 0..3 {
        created.push(create_job_of(&app, &t, &p.name, "render").await.name);
    }
    let stdout = run_python_worker(&app, &["--max-jobs", "3"]).await;
    // Each completion and the next lease committed together, as a turn.
    assert!(groups_committed(&app, "turn").await >= 2.0, "{stdout}");
    // One AcquireJobs; the other two jobs came with the completions before them.
    assert!(
        stdout.contains(&format!("leased {}\n", created[0])),
        "{stdout}"
    );
    for name in &created[1..] {
        assert!(
            stdout.contains(&format!("leased {name} (with a completion)")),
            "{stdout}"
        );
    }
    for name in &created {
        assert!(stdout.contains(&format!("completed {name}\n")), "{stdout}");
        let stored = app
            .jobs(&t)
            .get_job(pb::GetJobRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stored.state(), pb::job::State::Succeeded);
    }
}

#[tokio::test]
async fn python_worker_runs_its_jobs_over_one_worker_session() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "python session").await;
    let mut created = Vec::new();
    for _ in 0..3 {
        created.push(create_job_of(&app, &t, &p.name, "render").await.name);
    }
    let stdout = run_python_worker(&app, &["--session", "--max-jobs", "3"]).await;
    for name in &created {
        assert!(
            stdout.contains(&format!("completed {name} (session)\n")),
            "{stdout}"
        );
        let stored = app
            .jobs(&t)
            .get_job(pb::GetJobRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stored.state(), pb::job::State::Succeeded);
        assert_eq!(stored.progress_percent, 100);
    }
    // Every worker call went over the stream: one session, and its requests counted as
    // the calls they stand for (4 reports per job, an acquire, three completions).
    assert_eq!(
        calls_started(&app, "WorkerSession", Some("grpc")).await,
        1.0
    );
    assert_eq!(
        calls_started(&app, "ReportProgress", Some("worker-session")).await,
        12.0
    );
    assert_eq!(
        calls_started(&app, "BatchCompleteJobs", Some("worker-session")).await,
        3.0
    );
    assert_eq!(
        calls_started(&app, "AcquireJobs", Some("worker-session")).await,
        1.0
    );
    for method in ["AcquireJobs", "ReportProgress", "BatchCompleteJobs"] {
        assert_eq!(
            calls_started(&app, method, Some("grpc")).await,
            0.0,
            "{method} as a unary call"
        );
    }
}
