//! Traces: W3C `traceparent` on every door, the job's trace context handed to its
//! worker and its command, log lines with trace ids, spans exported over OTLP to a real
//! receiver (Python, opentelemetry-proto's TraceService).
use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use mediaplane::proto::v1 as pb;
use tonic::metadata::MetadataValue;

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_mediaplane");
const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
const RECEIVER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/interop/otlp_receiver.py"
);

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// A caller's context: (traceparent, trace id, span id).
fn caller_context() -> (String, String, String) {
    let (trace, span) = (random_hex(16), random_hex(8));
    (format!("00-{trace}-{span}-01"), trace, span)
}

/// Lines a child prints, collected by a thread.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn collect(&self, from: impl std::io::Read + Send + 'static) {
        let lines = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(from).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
    }

    fn snapshot(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Waits until some line satisfies `pred`.
    async fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(l) = self.snapshot().into_iter().find(|l| pred(l)) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no line {what}: {:#?}",
                self.snapshot()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_traceparent_reaches_the_worker_its_command_the_logs_and_the_otlp_receiver() {
    // The receiver.
    let mut receiver = Command::new(PYTHON)
        .arg(RECEIVER)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the OTLP receiver starts (tests/interop/requirements.txt)");
    let spans = Lines::default();
    spans.collect(receiver.stdout.take().unwrap());
    let _receiver_stdin = receiver.stdin.take();
    let receiver = Killed(receiver);
    let port = spans
        .wait_for("with the receiver's port", |l| l.starts_with("port "))
        .await;
    let port = port.trim_start_matches("port ").to_owned();

    // The server, exporting to it.
    let db = ScratchDb::reserve().await;
    let mut server = Command::new(BIN)
        .arg("serve")
        .env_remove("MEDIAPLANE_CONFIG")
        .env("MEDIAPLANE_JWT_SECRET", SECRET)
        .env("MEDIAPLANE_ADDR", "127.0.0.1:0")
        .env("MEDIAPLANE_ADMIN_ADDR", "127.0.0.1:0")
        .env(
            "MEDIAPLANE_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        )
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("DATABASE_URL", db.url())
        .env(
            "MEDIAPLANE_REDIS_PREFIX",
            format!("mp_traces_{}", random_hex(4)),
        )
        .env("MEDIAPLANE_LOG_FORMAT", "json")
        .env(
            "MEDIAPLANE_STORAGE_URL",
            format!("file://{}", db.storage_dir().display()),
        )
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let logs = Lines::default();
    logs.collect(server.stdout.take().unwrap());
    let server = Killed(server);
    let serving = logs
        .wait_for("saying where it serves", |l| l.contains("serving gRPC"))
        .await;
    let v: serde_json::Value = serde_json::from_str(&serving).unwrap();
    let addr = v["fields"]["addr"].as_str().unwrap().to_owned();

    let t = token("tracer");
    let http = reqwest::Client::new();
    let base = format!("http://{addr}");

    // REST: a project, then a job, each under its own caller's trace.
    let (tp_project, _, _) = caller_context();
    let project: serde_json::Value = http
        .post(format!("{base}/v1/projects"))
        .bearer_auth(&t)
        .header("traceparent", &tp_project)
        .json(&serde_json::json!({"displayName": "traced"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let project = project["name"]
        .as_str()
        .expect("project created")
        .to_owned();
    let (tp_job, trace_job, span_job) = caller_context();
    let r = http
        .post(format!("{base}/v1/{project}/jobs"))
        .bearer_auth(&t)
        .header("traceparent", &tp_job)
        .json(&serde_json::json!({"kind": "traced"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let job: serde_json::Value = r.json().await.unwrap();
    let job = job["name"].as_str().unwrap().to_owned();

    // The worker runs the command, which reports the TRACEPARENT it was given.
    let out = tokio::process::Command::new(BIN)
        .args([
            "worker",
            "--server",
            &base,
            "--kinds",
            "traced",
            "--max-jobs",
            "1",
        ])
        .args([
            "--command",
            r#"echo "RESULT {\"traceparent\": \"$TRACEPARENT\"}""#,
        ])
        .env(
            "MEDIAPLANE_TOKEN",
            token_with("runner", &["worker"], Duration::from_secs(600)),
        )
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("the worker runs one job and exits")
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done: serde_json::Value = http
        .get(format!("{base}/v1/{job}"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(done["state"], "SUCCEEDED", "{done}");
    let given = done["result"]["traceparent"].as_str().unwrap().to_owned();
    let parts: Vec<&str> = given.split('-').collect();
    assert_eq!(parts.len(), 4, "a W3C traceparent: {given:?}");
    assert_eq!(
        parts[1], trace_job,
        "the command runs in the caller's trace"
    );
    assert_ne!(
        parts[2], span_job,
        "its parent is the server's span for the call"
    );

    // gRPC and grpc-web take the header too.
    let (tp_grpc, trace_grpc, span_grpc) = caller_context();
    let channel = tonic::transport::Endpoint::from_shared(base.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut projects = pb::projects_service_client::ProjectsServiceClient::with_interceptor(
        channel,
        Bearer::new(&t),
    );
    let mut request = tonic::Request::new(pb::GetProjectRequest {
        name: project.clone(),
    });
    request.metadata_mut().insert(
        "traceparent",
        MetadataValue::try_from(tp_grpc.as_str()).unwrap(),
    );
    projects.get_project(request).await.unwrap();
    let (tp_web, trace_web, span_web) = caller_context();
    let r = http
        .post(format!("{base}/mediaplane.v1.ProjectsService/GetProject"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("traceparent", &tp_web)
        .bearer_auth(&t)
        .body(grpc_web_frame(&pb::GetProjectRequest {
            name: project.clone(),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.unwrap();
    assert!(parse_grpc_web(&body).0.is_some(), "grpc-web answered");

    // The receiver gets each call's span as a child of its caller's span ...
    let span_of = |line: &str| serde_json::from_str::<serde_json::Value>(line).ok();
    for (trace, parent, door) in [
        (&trace_job, &span_job, "REST"),
        (&trace_grpc, &span_grpc, "gRPC"),
        (&trace_web, &span_web, "grpc-web"),
    ] {
        let line = spans
            .wait_for(&format!("with the {door} call's span"), |l| {
                span_of(l)
                    .is_some_and(|s| s["trace_id"] == **trace && s["parent_span_id"] == **parent)
            })
            .await;
        let s = span_of(&line).unwrap();
        assert_eq!(s["service"], "mediaplane", "{s}");
        assert_eq!(s["kind"], 2, "a server span: {s}");
        // Named after the RPC on every door (a REST path with ids in it would make a
        // name per resource).
        let rpc = match door {
            "REST" => "/mediaplane.v1.JobsService/CreateJob",
            _ => "/mediaplane.v1.ProjectsService/GetProject",
        };
        assert_eq!(s["name"], rpc, "{s}");
        // What a trace viewer needs about the call is exported; the log-only
        // `trace_id` field (the span's own id, again) is not.
        let attributes = &s["attributes"];
        assert!(attributes["request_id"].is_string(), "{s}");
        match door {
            "REST" => assert_eq!(attributes["http.response.status_code"], 200, "{s}"),
            _ => assert_eq!(attributes["rpc.grpc.status_code"], 0, "{s}"),
        }
        assert!(attributes.get("trace_id").is_none(), "{s}");
    }
    // ... and the worker's calls about the job (its completion, BatchCompleteJobs) join the job's trace.
    spans
        .wait_for("for the worker's completion in the job's trace", |l| {
            span_of(l).is_some_and(|s| {
                s["trace_id"] == *trace_job
                    && s["name"]
                        .as_str()
                        .is_some_and(|n| n.ends_with("/BatchCompleteJobs"))
            })
        })
        .await;

    // Log lines carry the trace id.
    logs.wait_for("with the job call's trace id", |l| {
        l.contains(&format!("\"trace_id\":\"{trace_job}\""))
    })
    .await;

    drop(server);
    drop(receiver);
}

#[tokio::test]
async fn acquire_jobs_hands_out_the_creating_calls_trace_context() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "traced").await;

    let (tp, trace, span) = caller_context();
    let mut request = tonic::Request::new(pb::CreateJobRequest {
        parent: p.name.clone(),
        job: Some(pb::Job {
            kind: "render".into(),
            ..Default::default()
        }),
        request_id: String::new(),
        key: String::new(),
    });
    request
        .metadata_mut()
        .insert("traceparent", MetadataValue::try_from(tp.as_str()).unwrap());
    let traced = app.jobs(&t).create_job(request).await.unwrap().into_inner();
    // A call without one starts its own trace.
    let untraced = create_job_of(&app, &t, &p.name, "render").await;

    let w = token_with("w", &["worker"], Duration::from_secs(600));
    let mut leased = Vec::new();
    while leased.len() < 2 {
        let got = acquire_one(&app, &w, "w1", "render").await;
        leased.push(got);
    }
    let traceparent_of = |name: &str| {
        leased
            .iter()
            .find(|l| l.job.as_ref().unwrap().name == name)
            .unwrap()
            .traceparent
            .clone()
    };
    let given = traceparent_of(&traced.name);
    let parts: Vec<&str> = given.split('-').collect();
    assert_eq!(
        (parts.len(), parts[0], parts[1]),
        (4, "00", trace.as_str()),
        "{given}"
    );
    assert_ne!(parts[2], span);
    assert_eq!(parts[3], "01", "the caller's sampling decision is kept");
    let own = traceparent_of(&untraced.name);
    let own: Vec<&str> = own.split('-').collect();
    assert_eq!(own.len(), 4);
    assert_ne!(own[1], trace);
    assert_ne!(own[1], "0".repeat(32));
}
