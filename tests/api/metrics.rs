//! `/metrics` on the admin listener, read by the Prometheus project's own parser
//! (Python `prometheus_client`) after a known workload.
use std::time::Duration;

use mediaplane::proto::v1 as pb;
use serde_json::Value;

use crate::helpers::*;

/// The families of a scrape of `app`, as `prometheus_client` parses them.
async fn scrape(app: &TestApp) -> Vec<Value> {
    let text = app.metrics_text().await;
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    assert!(
        std::path::Path::new(python).exists(),
        "{python} not found: run scripts/test.sh, which installs it"
    );
    let mut child = tokio::process::Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/interop/scrape.py"
        ))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "the parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The value of the sample `name` whose labels include all of `labels`.
fn sample(families: &[Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    families
        .iter()
        .flat_map(|f| f["samples"].as_array().unwrap())
        .find(|s| {
            s["name"] == name
                && labels
                    .iter()
                    .all(|(k, v)| s["labels"][*k].as_str() == Some(*v))
        })
        .and_then(|s| s["value"].as_f64())
}

fn family_type(families: &[Value], name: &str) -> String {
    families
        .iter()
        .find(|f| f["name"] == name)
        .map(|f| f["type"].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn metrics_count_calls_on_every_door_and_read_queues_from_postgres() {
    let app = TestApp::spawn_with(|s| {
        s.queue_figures_interval = Duration::from_millis(200);
    })
    .await;
    let t = token("alice");
    let p = create_project(&app, &t, "measured").await;
    for _ in 0..3 {
        create_job_of(&app, &t, &p.name, "render").await;
    }
    create_job_of(&app, &t, &p.name, "transcode").await;
    let w = token_with("fleet", &["worker"], Duration::from_secs(600));
    let first = acquire_one(&app, &w, "w1", "render").await;
    let second = acquire_one(&app, &w, "w1", "render").await;
    app.jobs(&w)
        .complete_job(pb::CompleteJobRequest {
            name: first.job.unwrap().name,
            lease_id: first.lease_id,
            ..Default::default()
        })
        .await
        .unwrap();
    app.jobs(&w)
        .fail_job(pb::FailJobRequest {
            name: second.job.unwrap().name,
            lease_id: second.lease_id,
            error: Some(tonic_types::pb::Status {
                code: 13,
                message: "no GPU".into(),
                details: vec![],
            }),
            retryable: false,
            retry_after: None,
        })
        .await
        .unwrap();
    let thumb = create_job_of(&app, &t, &p.name, "thumbnail").await;
    app.jobs(&t)
        .cancel_job(pb::CancelJobRequest { name: thumb.name })
        .await
        .unwrap();
    // REST, grpc-web and a call without a token.
    let http = reqwest::Client::new();
    let r = http
        .get(app.http(&format!("/v1/{}", p.name)))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = reqwest::Client::builder()
        .http1_only()
        .build()
        .unwrap()
        .post(app.http("/mediaplane.v1.ProjectsService/GetProject"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .bearer_auth(&t)
        .body(grpc_web_frame(&pb::GetProjectRequest {
            name: p.name.clone(),
        }))
        .send()
        .await
        .unwrap();
    let _ = r.bytes().await.unwrap();
    let _ = app
        .projects("not-a-token")
        .list_projects(pb::ListProjectsRequest::default())
        .await;

    // An asset up and down over REST: 5,000 bytes each way.
    let asset = create_pending_asset(&app, &t, &p.name, "bytes").await;
    let r = http
        .post(app.http(&format!("/v1/{}:upload", asset.name)))
        .bearer_auth(&t)
        .body(vec![9u8; 5000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .get(app.http(&format!("/v1/{}:download?alt=media", asset.name)))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 5000);

    let peer = app.spawn_peer().await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let families = scrape(&app).await;
    let handled = |service: &str, method: &str, transport: &str, code: &str| {
        sample(
            &families,
            "grpc_server_handled_total",
            &[
                ("grpc_service", service),
                ("grpc_method", method),
                ("transport", transport),
                ("grpc_code", code),
            ],
        )
    };
    let jobs = "mediaplane.v1.JobsService";
    let projects = "mediaplane.v1.ProjectsService";
    assert_eq!(handled(jobs, "CreateJob", "grpc", "OK"), Some(5.0));
    assert_eq!(handled(jobs, "AcquireJobs", "grpc", "OK"), Some(2.0));
    assert_eq!(handled(jobs, "CompleteJob", "grpc", "OK"), Some(1.0));
    assert_eq!(handled(jobs, "FailJob", "grpc", "OK"), Some(1.0));
    assert_eq!(handled(projects, "GetProject", "rest", "OK"), Some(1.0));
    assert_eq!(handled(projects, "GetProject", "grpc-web", "OK"), Some(1.0));
    assert_eq!(
        handled(projects, "ListProjects", "grpc", "UNAUTHENTICATED"),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &families,
            "grpc_server_started_total",
            &[("grpc_method", "CreateJob")]
        ),
        Some(5.0)
    );
    assert_eq!(
        family_type(&families, "grpc_server_handling_seconds"),
        "histogram"
    );
    assert_eq!(
        sample(
            &families,
            "grpc_server_handling_seconds_count",
            &[("grpc_method", "CreateJob"), ("transport", "grpc")]
        ),
        Some(5.0)
    );

    // What happened to the jobs, by kind.
    for (kind, event, n) in [
        ("render", "created", 3.0),
        ("transcode", "created", 1.0),
        ("render", "leased", 2.0),
        ("render", "succeeded", 1.0),
        ("render", "failed", 1.0),
        ("thumbnail", "cancelled", 1.0),
    ] {
        assert_eq!(
            sample(
                &families,
                "mediaplane_job_events_total",
                &[("kind", kind), ("event", event)]
            ),
            Some(n),
            "{kind} {event}"
        );
    }
    // Queues, from Postgres: 1 render queued (3 made, 2 leased and ended), 1 transcode.
    for (kind, queued, running) in [("render", 1.0, 0.0), ("transcode", 1.0, 0.0)] {
        for (who, f) in [("app", &families), ("peer", &scrape(&peer).await)] {
            assert_eq!(
                sample(f, "mediaplane_jobs_queued", &[("kind", kind)]),
                Some(queued),
                "{who} {kind} queued"
            );
            assert_eq!(
                sample(f, "mediaplane_jobs_running", &[("kind", kind)]),
                Some(running),
                "{who} {kind} running"
            );
        }
        let age = sample(
            &families,
            "mediaplane_jobs_oldest_queued_age_seconds",
            &[("kind", kind)],
        )
        .unwrap();
        assert!(age > 1.0 && age < 60.0, "{kind}: {age}");
    }
    // The age keeps growing while nothing is taken.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let later = scrape(&app).await;
    let age = |f: &[Value]| {
        sample(
            f,
            "mediaplane_jobs_oldest_queued_age_seconds",
            &[("kind", "transcode")],
        )
        .unwrap()
    };
    assert!(age(&later) >= age(&families) + 1.0);

    // Dependencies.
    assert_eq!(
        sample(&families, "mediaplane_db_pool_max_connections", &[]),
        Some(4.0)
    );
    assert!(sample(&families, "mediaplane_db_pool_connections", &[]).unwrap() >= 1.0);
    assert!(
        sample(
            &families,
            "mediaplane_db_pool_acquires_total",
            &[("outcome", "direct")]
        )
        .unwrap()
            > 5.0
    );
    assert_eq!(
        sample(&families, "mediaplane_redis_connected", &[]),
        Some(1.0)
    );
    assert!(sample(&families, "mediaplane_group_commit_failures_total", &[]).is_some());

    // Assets.
    for direction in ["uploaded", "downloaded"] {
        assert_eq!(
            sample(
                &families,
                "mediaplane_asset_bytes_total",
                &[("direction", direction)]
            ),
            Some(5000.0),
            "{direction}"
        );
    }
    assert_eq!(
        sample(&families, "mediaplane_uploads_in_progress", &[]),
        Some(0.0)
    );

    // The process.
    assert!(sample(&families, "process_resident_memory_bytes", &[]).unwrap() > 1e6);
    assert!(sample(&families, "process_open_fds", &[]).unwrap() > 5.0);
    assert!(sample(&families, "process_cpu_seconds", &[]).unwrap_or(0.0) >= 0.0);

    // Not on the public port.
    let r = http.get(app.http("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // Unknown paths do not become labels.
    let _ = http
        .post(app.http("/mediaplane.v1.JobsService/NoSuchMethod"))
        .header("content-type", "application/grpc")
        .body(vec![0u8, 0, 0, 0, 0])
        .send()
        .await;
    let after = scrape(&app).await;
    assert!(
        after
            .iter()
            .flat_map(|f| f["samples"].as_array().unwrap())
            .all(|s| s["labels"]["grpc_method"] != "NoSuchMethod"),
        "unknown methods are `unknown`"
    );
}

#[tokio::test]
async fn live_progress_job_timings_and_group_sizes_are_measured() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "live").await;
    let mut watch = app
        .jobs(&t)
        .watch_jobs(pb::WatchJobsRequest {
            parent: p.name.clone(),
            filter: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let job = create_job_of(&app, &t, &p.name, "render").await;
    create_job_of(&app, &t, &p.name, "render").await;
    let w = token_with("fleet", &["worker"], Duration::from_secs(600));
    let mut leases = 0.0;
    let leased = loop {
        let l = acquire_one(&app, &w, "w1", "render").await;
        leases += 1.0;
        if l.job.as_ref().unwrap().name == job.name {
            break l;
        }
        // The other one: back to the queue.
        app.jobs(&w)
            .fail_job(pb::FailJobRequest {
                name: l.job.unwrap().name,
                lease_id: l.lease_id,
                error: Some(tonic_types::pb::Status {
                    code: 14,
                    message: "not this one".into(),
                    details: vec![],
                }),
                retryable: true,
                retry_after: None,
            })
            .await
            .unwrap();
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.jobs(&w)
        .complete_job(pb::CompleteJobRequest {
            name: job.name.clone(),
            lease_id: leased.lease_id,
            ..Default::default()
        })
        .await
        .unwrap();
    // The watcher sees the job through to its end.
    let mut received = 0.0;
    loop {
        let e = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        received += 1.0;
        let j = e.job.unwrap();
        if j.name == job.name && j.state == pb::job::State::Succeeded as i32 {
            break;
        }
    }

    let families = scrape(&app).await;
    let get = |name: &str, labels: &[(&str, &str)]| sample(&families, name, labels).unwrap_or(-1.0);
    let watch_jobs = [
        ("grpc_service", "mediaplane.v1.JobsService"),
        ("grpc_method", "WatchJobs"),
        ("transport", "grpc"),
    ];
    assert_eq!(get("mediaplane_watch_streams_open", &[]), 1.0);
    assert_eq!(get("grpc_server_streams_open", &watch_jobs), 1.0);
    assert!(get("grpc_server_msg_sent_total", &watch_jobs) >= received);
    assert!(get("mediaplane_job_events_delivered_total", &[]) >= received);
    assert!(get("mediaplane_job_events_published_total", &[]) >= received);
    assert!(get("mediaplane_job_event_lag_seconds_count", &[]) >= received);
    assert_eq!(
        family_type(&families, "mediaplane_job_event_lag_seconds"),
        "histogram"
    );
    assert_eq!(get("mediaplane_job_events_superseded_total", &[]), 0.0);
    // Every lease waited; one run to success of >= 300 ms.
    let render = [("kind", "render")];
    assert_eq!(get("mediaplane_job_wait_seconds_count", &render), leases);
    assert_eq!(get("mediaplane_job_run_seconds_count", &render), 1.0);
    assert!(get("mediaplane_job_run_seconds_sum", &render) >= 0.3);
    assert_eq!(
        family_type(&families, "mediaplane_job_run_seconds"),
        "histogram"
    );
    for lane in ["create", "acquire", "write", "project_create"] {
        assert!(
            get("mediaplane_group_commit_size_count", &[("lane", lane)]) >= 1.0,
            "{lane}"
        );
    }
    assert_eq!(get("mediaplane_redis_reconnects_total", &[]), 0.0);

    // A watcher too slow for a job's progress is given the newest snapshot: each
    // event carries the job's ~200 KB input, so the stream's windows fill at once and
    // the rest of the reports pass it by.
    let big = prost_types::Struct {
        fields: [(
            "prompt".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("x".repeat(200_000))),
            },
        )]
        .into(),
    };
    let slow_job = app
        .jobs(&t)
        .create_job(pb::CreateJobRequest {
            parent: p.name.clone(),
            job: Some(pb::Job {
                kind: "upscale".into(),
                input: Some(big),
                ..Default::default()
            }),
            request_id: String::new(),
            key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut slow = app
        .jobs(&t)
        .watch_job(pb::WatchJobRequest {
            name: slow_job.name.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let l = acquire_one(&app, &w, "w2", "upscale").await;
    for percent in 0..150 {
        app.jobs(&w)
            .report_progress(pb::ReportProgressRequest {
                name: slow_job.name.clone(),
                lease_id: l.lease_id.clone(),
                progress_percent: percent % 100,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // Now the watcher reads: it catches up with the newest state.
    let mut last = None;
    while let Ok(Some(Ok(e))) = tokio::time::timeout(Duration::from_millis(1500), slow.message())
        .await
        .map(|m| m.transpose())
    {
        last = Some(e.sequence);
    }
    assert!(last.is_some());
    let families = scrape(&app).await;
    assert!(
        sample(&families, "mediaplane_job_events_superseded_total", &[]).unwrap() > 0.0,
        "the slow watcher skipped to the newest state"
    );

    drop(watch);
    drop(slow);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let families = scrape(&app).await;
    assert_eq!(
        sample(&families, "mediaplane_watch_streams_open", &[]),
        Some(0.0)
    );
    assert_eq!(
        sample(&families, "grpc_server_streams_open", &watch_jobs),
        Some(0.0)
    );
}
