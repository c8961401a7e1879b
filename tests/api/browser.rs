//! A real browser (headless Chromium via playwright-core): a page with a generated
//! TypeScript client over grpc-web creates a project and a job and shows its progress,
//! and follows the same job with EventSource over SSE, while a worker advances it.
use std::{process::Command, time::Duration};

use mediaplane::{config::CorsOrigins, proto::v1 as pb};

use crate::helpers::*;

#[tokio::test]
async fn a_browser_page_follows_a_job_over_grpc_web_and_sse() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    for needed in [
        "/usr/bin/chromium",
        &format!("{dir}/node_modules/playwright-core"),
        &format!("{dir}/gen/mediaplane/v1/jobs_pb.ts"),
    ] {
        assert!(
            std::path::Path::new(needed).exists(),
            "{needed} missing: run scripts/test.sh, which installs and generates it"
        );
    }
    let page_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let origin = format!("http://127.0.0.1:{page_port}");
    let app =
        TestApp::spawn_with(|s| s.cors_origins = CorsOrigins::List(vec![origin.clone()])).await;

    // The worker waits for the job the page creates, then advances it.
    let worker = {
        let mut c = app.jobs(&token_with("gpu", &["worker"], Duration::from_secs(600)));
        tokio::spawn(async move {
            let leased = loop {
                let got = c
                    .acquire_jobs(pb::AcquireJobsRequest {
                        worker_id: "browser-test".into(),
                        kinds: vec!["browser-render".into()],
                        max_jobs: 1,
                        lease_duration: Some(prost_types::Duration {
                            seconds: 30,
                            nanos: 0,
                        }),
                        wait_timeout: Some(prost_types::Duration {
                            seconds: 20,
                            nanos: 0,
                        }),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .jobs;
                if let Some(l) = got.into_iter().next() {
                    break l;
                }
            };
            let name = leased.job.unwrap().name;
            for (pct, step) in [(25, "sketch"), (50, "color"), (75, "light")] {
                tokio::time::sleep(Duration::from_millis(400)).await;
                c.report_progress(pb::ReportProgressRequest {
                    name: name.clone(),
                    lease_id: leased.lease_id.clone(),
                    progress_percent: pct,
                    current_step: step.into(),
                    message: String::new(),
                })
                .await
                .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
            c.complete_job(pb::CompleteJobRequest {
                name: name.clone(),
                lease_id: leased.lease_id.clone(),
                result: None,
                output_assets: vec![],
            })
            .await
            .unwrap();
            name
        })
    };

    let screenshot = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/browser-job-progress.png"
    );
    let _ = std::fs::remove_file(screenshot);
    let (server, tok) = (app.http(""), token("alice"));
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(format!("{dir}/run.mjs"))
            .env("SERVER", server)
            .env("TOKEN", tok)
            .env("PORT", page_port.to_string())
            .env("SCREENSHOT", screenshot)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = worker.await.unwrap();
    let seen: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(
        seen["grpcweb"]
            .as_str()
            .unwrap()
            .starts_with("SUCCEEDED 100%"),
        "{seen}"
    );
    assert!(
        seen["sse"].as_str().unwrap().starts_with("SUCCEEDED 100%"),
        "{seen}"
    );
    assert!(
        std::fs::metadata(screenshot).unwrap().len() > 1000,
        "a screenshot was saved"
    );
    let done = app
        .jobs(&token("alice"))
        .get_job(pb::GetJobRequest { name: job })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        pb::job::State::try_from(done.state).unwrap(),
        pb::job::State::Succeeded
    );
}
