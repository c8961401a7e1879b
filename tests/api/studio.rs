//! The studio page, served by the binary at `/`, driven in a real browser (headless
//! Chromium via playwright-core).
use std::time::Duration;

use mediaplane::proto::v1 as pb;

use crate::helpers::*;

/// A script of tests/browser run by node in headless Chromium: the lines it prints as
/// it goes can be waited for, and its last line is what it saw, as JSON.
struct Page {
    node: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    last: String,
}

impl Page {
    fn start(script: &str, env: &[(&str, &str)]) -> Self {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
        for needed in [
            "/usr/bin/chromium",
            &format!("{dir}/node_modules/playwright-core"),
        ] {
            assert!(
                std::path::Path::new(needed).exists(),
                "{needed} missing: run scripts/test.sh, which installs it"
            );
        }
        let mut node = tokio::process::Command::new("node")
            .arg(format!("{dir}/{script}"))
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = tokio::io::BufReader::new(node.stdout.take().unwrap());
        Self {
            node,
            lines: tokio::io::AsyncBufReadExt::lines(stdout),
            last: String::new(),
        }
    }

    /// Waits for a line starting with `prefix`.
    async fn until(&mut self, prefix: &str) -> String {
        while let Some(line) = self.lines.next_line().await.unwrap() {
            if line.starts_with(prefix) {
                return line;
            }
            self.last = line;
        }
        panic!("the page ended before `{prefix}`: {}", self.last);
    }

    /// Waits for the script to end well, and returns what it saw.
    async fn seen(mut self) -> serde_json::Value {
        while let Some(line) = self.lines.next_line().await.unwrap() {
            self.last = line;
        }
        let status = self.node.wait().await.unwrap();
        assert!(status.success(), "browser run failed: {}", self.last);
        serde_json::from_str(&self.last).unwrap()
    }
}

#[tokio::test]
async fn the_page_is_served_from_the_binary_and_loads_nothing_from_elsewhere() {
    let app = TestApp::spawn().await;
    let http = reqwest::Client::new();
    for (path, kind) in [
        ("/", "text/html"),
        ("/studio/app.js", "text/javascript"),
        ("/studio/api.js", "text/javascript"),
        ("/studio/app.css", "text/css"),
    ] {
        let r = http.get(app.http(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let headers = r.headers();
        assert!(
            headers["content-type"].to_str().unwrap().starts_with(kind),
            "{path}"
        );
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
            "{csp}"
        );
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert_eq!(headers["x-frame-options"], "DENY");
        assert_eq!(headers["referrer-policy"], "no-referrer");
        assert!(csp.contains("frame-ancestors 'none'") && !csp.contains("unsafe-inline"));
    }
    let html = http
        .get(app.http("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "{html}"
    );
}

#[tokio::test]
async fn a_browser_signs_in_from_the_link_and_manages_projects() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let other = create_project(&app, &token("bob"), "Bob's secret").await;
    let server = app.http("");
    let env = [
        ("SERVER", server.as_str()),
        ("TOKEN", t.as_str()),
        ("OTHER", other.name.as_str()),
    ];
    let seen = Page::start("studio.mjs", &env).seen().await;
    let url = seen["urlAfterLink"].as_str().unwrap();
    assert!(!url.contains("token"), "the fragment is removed: {url}");
    assert_eq!(seen["stored"], t.as_str(), "kept in sessionStorage");
    assert_eq!(seen["tabbedTo"], "new-project", "{seen}");
    assert_eq!(seen["renameFocused"], "New name", "{seen}");
    assert_eq!(seen["searched"], serde_json::json!(["Storyboard"]));
    assert_eq!(
        seen["afterDismiss"].as_array().unwrap().len(),
        2,
        "a dismissed confirmation deletes nothing: {seen}"
    );
    assert!(
        seen["dialogs"][0].as_str().unwrap().contains("Scratch"),
        "{seen}"
    );
    assert_eq!(seen["afterDelete"], serde_json::json!(["Storyboard v2"]));
    assert!(seen["storedAfterSignOut"].is_null(), "{seen}");
    assert!(
        seen["refused"].as_str().unwrap().contains("refused"),
        "{seen}"
    );
    assert_eq!(seen["afterSignIn"], serde_json::json!(["Storyboard v2"]));
    assert!(
        seen["other"].as_str().unwrap().contains("NOT_FOUND"),
        "{seen}"
    );
    assert_eq!(seen["otherTitle"], "", "nothing of bob's project is shown");
    assert_eq!(seen["elsewhere"], serde_json::json!([]), "{seen}");
    assert_eq!(seen["pageErrors"], serde_json::json!([]), "{seen}");

    // What the page did is what the server holds.
    let listed = app
        .projects(&t)
        .list_projects(pb::ListProjectsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .projects;
    let names: Vec<_> = listed.iter().map(|p| p.display_name.as_str()).collect();
    assert_eq!(names, ["Storyboard v2"]);
}

/// Runs jobs of kind `paint` (progress, then success) and `doomed` (fails its first
/// attempt for good, succeeds once retried) until told to stop.
fn studio_worker(app: &TestApp) -> tokio::task::JoinHandle<()> {
    let mut c = app.jobs(&token_with("gpu", &["worker"], Duration::from_secs(600)));
    tokio::spawn(async move {
        loop {
            let leased = c
                .acquire_jobs(pb::AcquireJobsRequest {
                    worker_id: "studio-test".into(),
                    kinds: vec!["paint".into(), "doomed".into()],
                    max_jobs: 1,
                    lease_duration: Some(prost_types::Duration {
                        seconds: 30,
                        nanos: 0,
                    }),
                    wait_timeout: Some(prost_types::Duration {
                        seconds: 5,
                        nanos: 0,
                    }),
                })
                .await;
            let Ok(leased) = leased else { return };
            for l in leased.into_inner().jobs {
                let job = l.job.unwrap();
                if job.kind == "doomed" && job.attempt == 1 {
                    c.fail_job(pb::FailJobRequest {
                        name: job.name,
                        lease_id: l.lease_id,
                        error: Some(tonic_types::pb::Status {
                            code: tonic::Code::Internal as i32,
                            message: "out of film".into(),
                            details: vec![],
                        }),
                        retryable: false,
                        retry_after: None,
                    })
                    .await
                    .unwrap();
                    continue;
                }
                c.report_progress(pb::ReportProgressRequest {
                    name: job.name.clone(),
                    lease_id: l.lease_id.clone(),
                    progress_percent: 50,
                    current_step: "color".into(),
                    message: String::new(),
                })
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(700)).await;
                c.complete_job(pb::CompleteJobRequest {
                    name: job.name,
                    lease_id: l.lease_id,
                    result: None,
                    output_assets: vec![],
                })
                .await
                .unwrap();
            }
        }
    })
}

#[tokio::test]
async fn a_browser_follows_a_projects_jobs_live_and_acts_on_them() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "Launch film").await;
    let create = |kind: &str, max_attempts| pb::CreateJobRequest {
        parent: p.name.clone(),
        job: Some(pb::Job {
            kind: kind.into(),
            max_attempts,
            ..Default::default()
        }),
        request_id: String::new(),
        key: String::new(),
    };
    let mut jobs = app.jobs(&t);
    let queued = jobs
        .create_job(create("render", 3))
        .await
        .unwrap()
        .into_inner();
    let doomed = jobs
        .create_job(create("doomed", 1))
        .await
        .unwrap()
        .into_inner();
    let film = jobs
        .create_job(create("film", 3))
        .await
        .unwrap()
        .into_inner();
    let worker = studio_worker(&app);
    let mut runtime = runtime(&app, "film", "echo PROGRESS 10 rolling; sleep 60")
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(10), "doomed failed", || {
        let (mut jobs, name) = (app.jobs(&t), doomed.name.clone());
        async move {
            let j = jobs
                .get_job(pb::GetJobRequest { name })
                .await
                .unwrap()
                .into_inner();
            j.state == pb::job::State::Failed as i32
        }
    })
    .await;

    let server = app.http("");
    let env = [
        ("SERVER", server.as_str()),
        ("TOKEN", t.as_str()),
        ("PROJECT", p.name.as_str()),
        ("PNG", PIXEL),
        ("SHOTS", concat!(env!("CARGO_MANIFEST_DIR"), "/target")),
    ];
    let seen = Page::start("studio_jobs.mjs", &env).seen().await;
    worker.abort();
    assert_eq!(seen["title"], "Launch film");
    assert!(
        seen["inputError"].as_str().unwrap().starts_with("Input:"),
        "{seen}"
    );
    assert!(!seen["kindError"].as_str().unwrap().is_empty(), "{seen}");
    assert_eq!(
        seen["filteredState"], "FAILED",
        "the filter survived the reload"
    );
    assert_eq!(seen["filteredKinds"], serde_json::json!(["doomed"]));
    assert_eq!(seen["pageErrors"], serde_json::json!([]), "{seen}");
    assert_eq!(seen["downloaded"], "storyboard notes\n", "{seen}");
    assert!(
        seen["phoneOverflow"].as_i64().unwrap() <= 0,
        "nothing wider than a phone's screen but the tables, which scroll: {seen}"
    );
    for shot in ["desktop", "phone", "desktop-dark"] {
        let path = format!("{}/target/studio-{shot}.png", env!("CARGO_MANIFEST_DIR"));
        assert!(std::fs::metadata(&path).unwrap().len() > 1000, "{path}");
    }
    let uploads = seen["uploads"].to_string();
    assert!(
        uploads.contains("frame.png") && uploads.contains("notes.txt") && uploads.contains("done"),
        "{uploads}"
    );

    // What the page did is what the server holds.
    let assets = app
        .assets(&t)
        .list_assets(pb::ListAssetsRequest {
            parent: p.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .assets;
    let mut stored: Vec<_> = assets
        .iter()
        .map(|a| {
            (
                a.display_name.as_str(),
                a.content_type.as_str(),
                a.state,
                a.size_bytes,
            )
        })
        .collect();
    stored.sort();
    let ready = pb::asset::State::Ready as i32;
    assert_eq!(
        stored,
        [
            ("frame.png", "image/png", ready, 68),
            ("notes.txt", "text/plain", ready, 17)
        ]
    );
    let state = |name: String| {
        let mut jobs = app.jobs(&t);
        async move {
            let j = jobs
                .get_job(pb::GetJobRequest { name })
                .await
                .unwrap()
                .into_inner();
            (pb::job::State::try_from(j.state).unwrap(), j.attempt)
        }
    };
    assert_eq!(state(queued.name).await.0, pb::job::State::Cancelled);
    assert_eq!(state(film.name).await.0, pb::job::State::Cancelled);
    assert!(
        runtime.try_wait().unwrap().is_none(),
        "the worker stopped the command, not itself"
    );
    assert_eq!(state(doomed.name).await, (pb::job::State::Succeeded, 2));
    let listed = app
        .jobs(&t)
        .list_jobs(pb::ListJobsRequest {
            parent: p.name.clone(),
            filter: "kind = \"paint\"".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(listed.len(), 1, "one job created from the page");
    assert_eq!(
        pb::job::State::try_from(listed[0].state).unwrap(),
        pb::job::State::Succeeded
    );
}

/// `mediaplane worker` for `kind`, running `command` for each job.
fn runtime(app: &TestApp, kind: &str, command: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_mediaplane"));
    cmd.args(["worker", "--server", &app.http(""), "--kinds", kind])
        .args(["--lease", "3s", "--command", command])
        .env(
            "MEDIAPLANE_TOKEN",
            token_with("runtime", &["worker"], Duration::from_secs(600)),
        )
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// A real 1x1 PNG, so the browser can decode the preview.
const PIXEL: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=";

#[tokio::test]
async fn a_browser_shows_one_job_live_with_its_timeline_result_and_output() {
    use base64::Engine;
    use sha2::Digest;
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "Posters").await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(PIXEL)
        .unwrap();
    let sha: String = sha2::Sha256::digest(&png)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let header = pb::UploadAssetContentRequest {
        payload: Some(pb::upload_asset_content_request::Payload::Header(
            pb::UploadAssetHeader {
                name: String::new(),
                create: Some(pb::CreateAssetRequest {
                    parent: p.name.clone(),
                    asset: Some(pb::Asset {
                        display_name: "poster.png".into(),
                        content_type: "image/png".into(),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                }),
                sha256: sha,
                size_bytes: png.len() as i64,
            },
        )),
    };
    let chunk = pb::UploadAssetContentRequest {
        payload: Some(pb::upload_asset_content_request::Payload::Chunk(
            bytes::Bytes::from(png),
        )),
    };
    let asset = app
        .assets(&t)
        .upload_asset_content(tokio_stream::iter([header, chunk]))
        .await
        .unwrap()
        .into_inner();
    let input = prost_types::Struct {
        fields: [(
            "prompt".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("a fox".into())),
            },
        )]
        .into(),
    };
    let job = app
        .jobs(&t)
        .create_job(pb::CreateJobRequest {
            parent: p.name.clone(),
            job: Some(pb::Job {
                kind: "poster".into(),
                input: Some(input),
                ..Default::default()
            }),
            request_id: String::new(),
            key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();

    let server = app.http("");
    let env = [
        ("SERVER", server.as_str()),
        ("TOKEN", t.as_str()),
        ("JOB", job.name.as_str()),
    ];
    let mut page = Page::start("studio_job.mjs", &env);
    // `mediaplane worker` running a shell command starts once the page follows the job,
    // so the page sees every change.
    page.until("open").await;
    let script = format!(
        "echo PROGRESS 30 sketch; sleep 0.6; echo PROGRESS 70 color; sleep 0.6; \
         echo 'RESULT {{\"frames\": 24}}'; echo OUTPUT {}",
        asset.name
    );
    let mut worker_cmd = runtime(&app, "poster", &script);
    worker_cmd.args(["--max-jobs", "1"]);
    let status = worker_cmd.status().await.unwrap();
    assert!(status.success());
    let seen = page.seen().await;
    assert_eq!(seen["first"], "QUEUED", "{seen}");
    let steps: Vec<&str> = seen["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert!(
        steps.iter().any(|s| s.starts_with("RUNNING 30% sketch"))
            && steps.iter().any(|s| s.starts_with("RUNNING 70% color")),
        "progress pushed step by step: {steps:?}"
    );
    let timeline: Vec<&str> = seen["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert_eq!(timeline.first(), Some(&"CREATED"), "{timeline:?}");
    assert_eq!(timeline.last(), Some(&"SUCCEEDED"), "{timeline:?}");
    assert!(timeline.contains(&"RUNNING"), "{timeline:?}");
    // Two reports, and heartbeats (which renew the lease) when the command runs long.
    assert!(
        timeline.iter().filter(|s| **s == "PROGRESS").count() >= 2,
        "{timeline:?}"
    );
    assert_eq!(seen["result"], serde_json::json!({"frames": 24}));
    assert_eq!(seen["input"], serde_json::json!({"prompt": "a fox"}));
    assert!(
        seen["output"].as_str().unwrap().contains("poster.png"),
        "{seen}"
    );
    assert!(
        seen["back"].as_str().unwrap().contains("project="),
        "{seen}"
    );
    assert_eq!(seen["pageErrors"], serde_json::json!([]), "{seen}");
}

#[tokio::test]
async fn a_dropped_connection_resumes_without_a_lost_update() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "Reels").await;
    let job = app
        .jobs(&t)
        .create_job(pb::CreateJobRequest {
            parent: p.name.clone(),
            job: Some(pb::Job {
                kind: "reel".into(),
                ..Default::default()
            }),
            request_id: String::new(),
            key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    // The browser reaches the server through a proxy the test can cut.
    let proxy = ChaosProxy::start(Box::leak(app.addr.to_string().into_boxed_str())).await;
    let server = format!("http://{}", proxy.addr);
    let env = [
        ("SERVER", server.as_str()),
        ("TOKEN", t.as_str()),
        ("JOB", job.name.as_str()),
    ];
    let mut page = Page::start("studio_resume.mjs", &env);
    page.until("open").await;

    let mut c = app.jobs(&token_with("gpu", &["worker"], Duration::from_secs(600)));
    let leased = c
        .acquire_jobs(pb::AcquireJobsRequest {
            worker_id: "reel-1".into(),
            kinds: vec!["reel".into()],
            max_jobs: 1,
            lease_duration: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
            wait_timeout: None,
        })
        .await
        .unwrap()
        .into_inner()
        .jobs
        .remove(0);
    let report = |pct: i32, step: &str| pb::ReportProgressRequest {
        name: job.name.clone(),
        lease_id: leased.lease_id.clone(),
        progress_percent: pct,
        current_step: step.into(),
        message: String::new(),
    };
    c.report_progress(report(20, "cut")).await.unwrap();
    page.until("step cut").await;
    // Cut: the page's stream drops; two updates happen while it is away.
    proxy.cut().await;
    page.until("live reconnecting").await;
    c.report_progress(report(40, "missed-one")).await.unwrap();
    c.report_progress(report(60, "missed-two")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.restore();
    page.until("step missed-two").await;
    c.complete_job(pb::CompleteJobRequest {
        name: job.name.clone(),
        lease_id: leased.lease_id,
        result: None,
        output_assets: vec![],
    })
    .await
    .unwrap();
    let seen = page.seen().await;
    let timeline = seen["timeline"].to_string();
    for step in ["20% cut", "40% missed-one", "60% missed-two", "SUCCEEDED"] {
        assert!(timeline.contains(step), "{step} in {timeline}");
    }
    let live = seen["live"].to_string();
    assert!(
        live.contains("reconnecting") && live.rfind("live") > live.find("reconnecting"),
        "the page showed the drop and the return: {live}"
    );
    assert_eq!(seen["pageErrors"], serde_json::json!([]), "{seen}");
}

#[tokio::test]
async fn with_s3_storage_the_page_may_reach_the_bucket_and_nothing_else() {
    let s3 = S3Server::start().await;
    let app = TestApp::spawn_with(|s| s3.configure(s)).await;
    let r = reqwest::get(app.http("/")).await.unwrap();
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    let host = s3.endpoint.trim_start_matches("http://");
    for directive in ["connect-src", "img-src", "media-src"] {
        let sources = csp
            .split(';')
            .find(|d| d.trim().starts_with(directive))
            .unwrap();
        assert!(
            sources.contains(host),
            "{directive} allows the bucket: {csp}"
        );
    }
    for directive in [
        "script-src 'self';",
        "style-src 'self';",
        "default-src 'none';",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
}

/// The queues view (an admin pauses a queue and sets its limits, with a field error
/// shown on the way) and a job's pipeline (its dependency and dependent, linked, their
/// states moving live), in a real browser.
#[tokio::test]
async fn a_browser_runs_the_queues_and_follows_a_pipeline() {
    let app = TestApp::spawn().await;
    let admin = admin_token("ops");
    let p = create_project(&app, &token("alice"), "Chain").await;
    let step = |kind: &str, deps: &[&str]| pb::CreateJobRequest {
        job: Some(pb::Job {
            kind: kind.into(),
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let jobs = app
        .jobs(&admin)
        .batch_create_jobs(pb::BatchCreateJobsRequest {
            parent: p.name.clone(),
            requests: vec![
                step("script", &[]),
                step("render", &["@0"]),
                step("thumbnail", &["@1"]),
                step("render", &[]),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let mut page = Page::start(
        "studio_queues.mjs",
        &[
            ("SERVER", &app.http("")),
            ("TOKEN", &admin),
            ("FIRST", &jobs[0].name),
            ("MIDDLE", &jobs[1].name),
            ("LAST", &jobs[2].name),
        ],
    );
    let queues = || {
        pb::queues_service_client::QueuesServiceClient::with_interceptor(
            app.channel.clone(),
            Bearer::new(&admin),
        )
    };
    let render = || pb::GetQueueRequest {
        name: "queues/render".into(),
    };
    page.until("paused").await;
    assert!(
        queues()
            .get_queue(render())
            .await
            .unwrap()
            .into_inner()
            .paused
    );
    page.until("limits").await;
    let q = queues().get_queue(render()).await.unwrap().into_inner();
    assert_eq!(q.max_running, 3);
    assert_eq!(q.start_rate.map(|r| r.jobs), Some(5));
    page.until("pipeline").await;
    let leased = acquire_one(
        &app,
        &token_with("w", &["worker"], Duration::from_secs(60)),
        "w",
        "script",
    )
    .await;
    app.jobs(&token_with("w", &["worker"], Duration::from_secs(60)))
        .complete_job(pb::CompleteJobRequest {
            name: leased.job.unwrap().name,
            lease_id: leased.lease_id,
            ..Default::default()
        })
        .await
        .unwrap();
    let seen = page.seen().await;
    assert_eq!(seen["pageErrors"], serde_json::json!([]));
    let figures: Vec<String> = serde_json::from_value(seen["figures"].clone()).unwrap();
    // Kind, state, waiting, queued: two renders, one of them waiting on the script.
    assert_eq!(
        &figures[..4],
        &["render", "active", "1", "1"],
        "{figures:?}"
    );
    assert!(
        seen["fieldError"]
            .as_str()
            .unwrap()
            .contains("start_rate.jobs: 1 to 10000"),
        "{seen}"
    );
    assert!(
        seen["intervalError"]
            .as_str()
            .unwrap()
            .contains("start_rate.interval"),
        "{seen}"
    );
    let limits: Vec<String> = serde_json::from_value(seen["limits"].clone()).unwrap();
    assert_eq!(
        (limits[7].as_str(), limits[9].as_str()),
        ("3", "5 per 2s"),
        "{limits:?}"
    );
    let middle = jobs[1].name.rsplit('/').next().unwrap();
    let first_dependents = seen["firstDependents"].as_str().unwrap();
    assert!(
        first_dependents.contains(middle) && first_dependents.contains("WAITING"),
        "{seen}"
    );
    assert!(
        seen["firstDependentsAfter"]
            .as_str()
            .unwrap()
            .contains("QUEUED"),
        "{seen}"
    );
    assert_eq!(seen["state"], "QUEUED");
    let dependency = seen["dependency"].as_str().unwrap();
    assert!(
        dependency.contains("script") && dependency.contains("SUCCEEDED"),
        "{dependency}"
    );
    assert_eq!(
        seen["dependencyHref"],
        format!("?job={}", jobs[0].name.replace('/', "%2F"))
    );
    let dependent = seen["dependent"].as_str().unwrap();
    assert!(
        dependent.contains(jobs[2].name.rsplit('/').next().unwrap())
            && dependent.contains("WAITING"),
        "{seen}"
    );
}
