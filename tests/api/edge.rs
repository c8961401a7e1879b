//! The HTTP/JSON edge over a real socket: every binding, REST CRUD, JSON edge cases,
//! errors, isolation, and server streams as NDJSON and SSE.
use std::time::Duration;

use mediaplane::{config::CorsOrigins, edge::rules::Seg, proto::v1 as pb};
use serde_json::{Value, json};

use crate::helpers::*;

struct Rest {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Rest {
    fn new(app: &TestApp, token: Option<&str>) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: app.http(""),
            token: token.map(str::to_owned),
        }
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

#[tokio::test]
async fn every_binding_in_the_proto_is_routed_through_authentication() {
    let app = TestApp::spawn().await;
    let pool =
        prost_reflect::DescriptorPool::decode(mediaplane::proto::FILE_DESCRIPTOR_SET).unwrap();
    let bindings = mediaplane::edge::rules::bindings(&pool).unwrap();
    let rpcs: usize = pool
        .services()
        .filter(|s| s.package_name() == "mediaplane.v1")
        .map(|s| s.methods().len())
        .sum();
    assert_eq!(bindings.len(), rpcs, "one binding per RPC");
    let anonymous = Rest::new(&app, None);
    for b in &bindings {
        // A concrete path for the template: every `*` and `**` gets an id.
        let id = uuid::Uuid::now_v7().to_string();
        let mut path = String::new();
        for s in &b.template.segs {
            path.push('/');
            path.push_str(match s {
                Seg::Literal(l) => l,
                Seg::Star | Seg::DoubleStar => &id,
            });
        }
        if let Some(v) = &b.template.verb {
            path = format!("{path}:{v}");
        }
        let body = (!b.body.is_empty()).then(|| json!({}));
        let (status, err) = anonymous
            .send(
                reqwest::Method::from_bytes(b.method.as_str().as_bytes()).unwrap(),
                &path,
                body,
            )
            .await;
        // Client-streaming uploads take the raw body, so they too reach authentication.
        let expected = 401;
        assert_eq!(
            status,
            expected,
            "{} {path} ({}): {err}",
            b.method,
            b.rpc.full_name()
        );
        assert!(
            err["error"]["status"].is_string(),
            "JSON error shape for {path}: {err}"
        );
    }
}

#[tokio::test]
async fn projects_over_rest_with_canonical_json() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let rest = Rest::new(&app, Some(&t));
    let (status, created) = rest
        .send(reqwest::Method::POST, "/v1/projects", Some(json!({"displayName": "REST", "description": "keep", "labels": {"env": "prod"}, "metadata": {"fps": 24}})))
        .await;
    assert_eq!(status, 200, "{created}");
    let name = created["name"].as_str().unwrap().to_owned();
    assert_eq!(created["metadata"]["fps"], 24.0);
    // Both proto names and JSON names are accepted in.
    let (status, snake) = rest
        .send(
            reqwest::Method::POST,
            "/v1/projects",
            Some(json!({"display_name": "snake"})),
        )
        .await;
    assert_eq!(
        (status, snake["displayName"].as_str()),
        (200, Some("snake"))
    );
    assert_eq!(
        snake["description"], "",
        "default values are emitted: a stable shape"
    );

    let (_, got) = rest
        .send(reqwest::Method::GET, &format!("/v1/{name}"), None)
        .await;
    assert_eq!(got, created);
    let (_, page) = rest
        .send(
            reqwest::Method::GET,
            "/v1/projects?pageSize=1&orderBy=create_time",
            None,
        )
        .await;
    assert_eq!(page["projects"].as_array().unwrap().len(), 1);
    assert_eq!(page["projects"][0]["name"], name.as_str());
    assert!(!page["nextPageToken"].as_str().unwrap().is_empty());
    let (_, filtered) = rest
        .send(
            reqwest::Method::GET,
            "/v1/projects?filter=labels.env%20%3D%20%22prod%22",
            None,
        )
        .await;
    assert_eq!(filtered["projects"].as_array().unwrap().len(), 1);

    // PATCH without update_mask: the mask is the fields in the body.
    let (status, patched) = rest
        .send(
            reqwest::Method::PATCH,
            &format!("/v1/{name}"),
            Some(json!({"displayName": "Renamed"})),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(
        (
            patched["displayName"].as_str(),
            patched["description"].as_str()
        ),
        (Some("Renamed"), Some("keep"))
    );
    // An explicit mask (a FieldMask in the query) wins.
    let (_, patched) = rest
        .send(
            reqwest::Method::PATCH,
            &format!("/v1/{name}?updateMask=description"),
            Some(json!({"displayName": "ignored", "description": "changed"})),
        )
        .await;
    assert_eq!(
        (
            patched["displayName"].as_str(),
            patched["description"].as_str()
        ),
        (Some("Renamed"), Some("changed"))
    );
    let (status, stale) = rest
        .send(
            reqwest::Method::PATCH,
            &format!("/v1/{name}"),
            Some(json!({"displayName": "x", "etag": "r1"})),
        )
        .await;
    assert_eq!(
        (status, stale["error"]["status"].as_str()),
        (409, Some("ABORTED"))
    );

    let (status, _) = rest
        .send(reqwest::Method::DELETE, &format!("/v1/{name}"), None)
        .await;
    assert_eq!(status, 200);
    let (status, gone) = rest
        .send(reqwest::Method::GET, &format!("/v1/{name}"), None)
        .await;
    assert_eq!(
        (status, gone["error"]["status"].as_str()),
        (404, Some("NOT_FOUND"))
    );

    // Jobs: int64 as strings, enums as names, custom verbs.
    let p = create_project(&app, &t, "jobs over rest").await;
    let (status, job) = rest
        .send(
            reqwest::Method::POST,
            &format!("/v1/{}/jobs", p.name),
            Some(json!({"kind": "render", "input": {"prompt": "cat"}})),
        )
        .await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(
        (job["state"].as_str(), job["sequence"].as_str()),
        (Some("QUEUED"), Some("1"))
    );
    let (status, cancelled) = rest
        .send(
            reqwest::Method::POST,
            &format!("/v1/{}:cancel", job["name"].as_str().unwrap()),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (status, cancelled["state"].as_str()),
        (200, Some("CANCELLED"))
    );
    let (_, listed) = rest
        .send(
            reqwest::Method::GET,
            &format!("/v1/{}/jobs?filter=state%20%3D%20CANCELLED", p.name),
            None,
        )
        .await;
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn errors_are_json_with_the_right_status_and_details() {
    let app = TestApp::spawn_with(|s| s.max_message_bytes = 16 * 1024).await;
    let t = token("alice");
    let rest = Rest::new(&app, Some(&t));
    let (status, e) = rest
        .send(
            reqwest::Method::POST,
            "/v1/projects",
            Some(json!({"displayName": ""})),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(e["error"]["status"], "INVALID_ARGUMENT");
    assert_eq!(
        e["error"]["details"][0]["@type"],
        "type.googleapis.com/google.rpc.BadRequest"
    );
    assert_eq!(
        e["error"]["details"][0]["fieldViolations"][0]["field"],
        "project.display_name"
    );

    let (status, e) = rest
        .send(
            reqwest::Method::POST,
            "/v1/projects",
            Some(json!({"displayNme": "typo"})),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("displayNme"),
        "the unknown field is named: {e}"
    );
    let (status, e) = rest
        .send(
            reqwest::Method::POST,
            "/v1/projects",
            Some(json!({"displayName": 5})),
        )
        .await;
    assert_eq!(status, 400, "{e}");
    let raw = rest
        .http
        .post(app.http("/v1/projects"))
        .bearer_auth(&t)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
    let (status, e) = rest.send(reqwest::Method::GET, "/v1/nowhere", None).await;
    assert_eq!(
        (status, e["error"]["status"].as_str()),
        (404, Some("NOT_FOUND"))
    );
    let (status, e) = rest.send(reqwest::Method::PUT, "/v1/projects", None).await;
    assert_eq!((status, e["error"]["code"].as_u64()), (405, Some(405)));
    let big = json!({"displayName": "x", "description": "y".repeat(20_000)});
    let (status, e) = rest
        .send(reqwest::Method::POST, "/v1/projects", Some(big))
        .await;
    assert_eq!((status, e["error"]["code"].as_u64()), (413, Some(413)));
    let (status, e) = Rest::new(&app, None)
        .send(reqwest::Method::GET, "/v1/projects", None)
        .await;
    assert_eq!(
        (status, e["error"]["status"].as_str()),
        (401, Some("UNAUTHENTICATED"))
    );

    // Isolation through the edge.
    let p = create_project(&app, &t, "private").await;
    let (status, _) = Rest::new(&app, Some(&token("bob")))
        .send(reqwest::Method::GET, &format!("/v1/{}", p.name), None)
        .await;
    assert_eq!(status, 404);
}

async fn lines(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.unwrap();
    text.lines().map(str::to_owned).collect()
}

#[tokio::test]
async fn job_progress_streams_as_ndjson_and_sse_with_resume() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "streams").await;
    let job = app
        .jobs(&t)
        .create_job(pb::CreateJobRequest {
            parent: p.name.clone(),
            job: Some(pb::Job {
                kind: "render".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let http = reqwest::Client::new();
    let url = app.http(&format!("/v1/{}:watch", job.name));
    let ndjson = http.get(&url).bearer_auth(&t).send().await.unwrap();
    assert_eq!(ndjson.headers()["content-type"], "application/x-ndjson");
    let sse = http
        .get(&url)
        .bearer_auth(&t)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(sse.headers()["content-type"], "text/event-stream");

    let worker = token_with("w", &["worker"], Duration::from_secs(60));
    let leased = app
        .jobs(&worker)
        .acquire_jobs(pb::AcquireJobsRequest {
            worker_id: "w".into(),
            kinds: vec!["render".into()],
            max_jobs: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs
        .remove(0);
    for pct in [30, 60] {
        app.jobs(&worker)
            .report_progress(pb::ReportProgressRequest {
                name: job.name.clone(),
                lease_id: leased.lease_id.clone(),
                progress_percent: pct,
                current_step: String::new(),
                message: String::new(),
            })
            .await
            .unwrap();
    }
    app.jobs(&worker)
        .complete_job(pb::CompleteJobRequest {
            name: job.name.clone(),
            lease_id: leased.lease_id.clone(),
            result: None,
            output_assets: vec![],
        })
        .await
        .unwrap();

    let nd = lines(ndjson).await;
    let results: Vec<Value> = nd
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), 5, "{nd:?}");
    assert_eq!(
        results
            .iter()
            .map(|r| r["result"]["sequence"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>(),
        ["1", "2", "3", "4", "5"]
    );
    assert_eq!(results[4]["result"]["job"]["state"], "SUCCEEDED");

    let ev = lines(sse).await;
    let ids: Vec<&str> = ev.iter().filter_map(|l| l.strip_prefix("id: ")).collect();
    assert_eq!(
        ids,
        ["1", "2", "3", "4", "5"],
        "each event carries its sequence as id"
    );
    assert!(
        ev.iter().any(|l| l == "event: status"),
        "a final status event: {ev:?}"
    );
    let status_line = ev
        .iter()
        .skip_while(|l| *l != "event: status")
        .nth(1)
        .unwrap();
    assert!(status_line.contains("\"OK\""), "{status_line}");

    // A reconnect with Last-Event-ID gets exactly what came after.
    let resumed = http
        .get(&url)
        .bearer_auth(&t)
        .header("accept", "text/event-stream")
        .header("last-event-id", "3")
        .send()
        .await
        .unwrap();
    let ev = lines(resumed).await;
    assert_eq!(
        ev.iter()
            .filter_map(|l| l.strip_prefix("id: "))
            .collect::<Vec<_>>(),
        ["4", "5"]
    );
}

#[tokio::test]
async fn a_stream_that_fails_after_the_200_ends_with_an_error_line() {
    let app = TestApp::spawn_with(|s| s.watch_resync = Duration::from_millis(300)).await;
    let t = token("alice");
    let p = create_project(&app, &t, "doomed").await;
    let job = app
        .jobs(&t)
        .create_job(pb::CreateJobRequest {
            parent: p.name.clone(),
            job: Some(pb::Job {
                kind: "render".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let http = reqwest::Client::new();
    let resp = http
        .get(app.http(&format!("/v1/{}:watch", job.name)))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The job disappears under the watcher (its project is deleted).
    app.projects(&t)
        .delete_project(pb::DeleteProjectRequest {
            name: p.name.clone(),
            etag: String::new(),
        })
        .await
        .unwrap();
    let all = tokio::time::timeout(Duration::from_secs(10), lines(resp))
        .await
        .expect("the stream ends");
    let last: Value = serde_json::from_str(all.last().unwrap()).unwrap();
    assert_eq!(last["error"]["status"], "NOT_FOUND", "{all:?}");
    assert_eq!(last["error"]["code"], 404);
}

#[tokio::test]
async fn rest_shares_the_cors_policy_with_grpc_web() {
    let app = TestApp::spawn_with(|s| {
        s.cors_origins = CorsOrigins::List(vec!["http://studio.example".into()])
    })
    .await;
    let http = reqwest::Client::new();
    let pre = http
        .request(reqwest::Method::OPTIONS, app.http("/v1/projects"))
        .header("origin", "http://studio.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(pre.status().is_success());
    assert_eq!(
        pre.headers()["access-control-allow-origin"],
        "http://studio.example"
    );
    assert_eq!(pre.headers()["access-control-allow-credentials"], "true");
    let r = http
        .get(app.http("/v1/projects"))
        .header("origin", "http://studio.example")
        .bearer_auth(token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://studio.example"
    );
}

#[tokio::test]
async fn the_openapi_document_is_generated_from_the_descriptors_and_validates() {
    let app = TestApp::spawn().await;
    let doc: Value = reqwest::get(app.http("/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        doc["components"]["securitySchemes"]["bearerAuth"]["scheme"],
        "bearer"
    );
    let cancel = &doc["paths"]["/v1/{name}:cancel"]["post"];
    assert_eq!(cancel["operationId"], "JobsService.CancelJob");
    assert!(
        cancel["description"]
            .as_str()
            .unwrap()
            .contains("QUEUED job is CANCELLED"),
        "comments from the proto"
    );
    assert!(
        cancel["requestBody"]["content"]["application/json"]["schema"]["properties"]
            .get("name")
            .is_none(),
        "path fields are not repeated in the body"
    );
    let watch = &doc["paths"]["/v1/{name}:watch"]["get"]["responses"]["200"]["content"];
    assert!(
        watch.get("text/event-stream").is_some() && watch.get("application/x-ndjson").is_some()
    );
    let project = &doc["components"]["schemas"]["mediaplane.v1.Project"]["properties"];
    assert_eq!(project["createTime"]["format"], "date-time");
    let job = &doc["components"]["schemas"]["mediaplane.v1.Job"]["properties"];
    assert_eq!(
        (
            job["sequence"]["type"].as_str(),
            job["state"]["enum"][1].as_str()
        ),
        (Some("string"), Some("QUEUED"))
    );
    let list = &doc["paths"]["/v1/projects"]["get"]["parameters"];
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "pageToken" && p["in"] == "query")
    );

    // A standard validator agrees.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    let out = std::process::Command::new(python)
        .args(["-m", "openapi_spec_validator", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openapi-spec-validator: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn asset_bytes_go_up_and_down_as_raw_http_bodies() {
    use sha2::Digest;
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "raw").await;
    let asset = app
        .assets(&t)
        .create_asset(pb::CreateAssetRequest {
            parent: p.name.clone(),
            asset: Some(pb::Asset {
                display_name: "raw.bin".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let sha: String = sha2::Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let http = reqwest::Client::new();
    let up = http
        .post(app.http(&format!("/v1/{}:upload?header.sha256={sha}", asset.name)))
        .bearer_auth(&t)
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(up.status(), 200);
    let ready: Value = up.json().await.unwrap();
    assert_eq!(
        (ready["state"].as_str(), ready["sha256"].as_str()),
        (Some("READY"), Some(sha.as_str()))
    );

    let down = http
        .get(app.http(&format!("/v1/{}:download?alt=media", asset.name)))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(down.status(), 200);
    assert_eq!(
        down.headers()["content-length"],
        data.len().to_string().as_str()
    );
    assert_eq!(down.headers()["etag"], format!("\"{sha}\"").as_str());
    assert_eq!(down.bytes().await.unwrap().as_ref(), data.as_slice());

    let part = http
        .get(app.http(&format!("/v1/{}:download", asset.name)))
        .bearer_auth(&t)
        .header("accept", "application/octet-stream")
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"],
        format!("bytes 1000-1999/{}", data.len()).as_str()
    );
    assert_eq!(part.bytes().await.unwrap().as_ref(), &data[1000..2000]);

    // Without asking for raw bytes, the stream is NDJSON like any other.
    let nd = http
        .get(app.http(&format!("/v1/{}:download?length=10", asset.name)))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    let lines = lines(nd).await;
    let first: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["result"]["asset"]["name"], asset.name.as_str());

    // A wrong checksum over raw upload is the same 400 as over gRPC.
    let other = app
        .assets(&t)
        .create_asset(pb::CreateAssetRequest {
            parent: p.name.clone(),
            asset: Some(pb::Asset::default()),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let (status, e) = {
        let r = http
            .post(app.http(&format!(
                "/v1/{}:upload?header.sha256={}",
                other.name,
                "0".repeat(64)
            )))
            .bearer_auth(&t)
            .body("abc")
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(
        (status, e["error"]["status"].as_str()),
        (400, Some("INVALID_ARGUMENT"))
    );
}

#[tokio::test]
async fn rest_streams_end_with_a_status_when_the_server_shuts_down() {
    let mut app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "shutdown").await;
    let job = app
        .jobs(&t)
        .create_job(pb::CreateJobRequest {
            parent: p.name.clone(),
            job: Some(pb::Job {
                kind: "render".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let http = reqwest::Client::new();
    let url = app.http(&format!("/v1/{}:watch", job.name));
    let nd = http.get(&url).bearer_auth(&t).send().await.unwrap();
    let sse = http
        .get(&url)
        .bearer_auth(&t)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let server = app.begin_shutdown();
    let nd = tokio::time::timeout(Duration::from_secs(5), lines(nd))
        .await
        .expect("NDJSON stream ends");
    let last: Value = serde_json::from_str(nd.last().unwrap()).unwrap();
    assert_eq!(last["error"]["status"], "UNAVAILABLE", "{nd:?}");
    let ev = tokio::time::timeout(Duration::from_secs(5), lines(sse))
        .await
        .expect("SSE stream ends");
    let status = ev
        .iter()
        .skip_while(|l| *l != "event: status")
        .nth(1)
        .unwrap();
    assert!(status.contains("UNAVAILABLE"), "{ev:?}");
    tokio::time::timeout(Duration::from_secs(6), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn deadlines_from_the_timeout_parameter_and_headers_are_forwarded() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "deadlines").await;
    let rest = Rest::new(&app, Some(&t));
    let (status, _) = rest
        .send(
            reqwest::Method::GET,
            &format!("/v1/{}?timeout=5s", p.name),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (status, e) = rest
        .send(
            reqwest::Method::GET,
            &format!("/v1/{}?timeout=soon", p.name),
            None,
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        e["error"]["message"].as_str().unwrap().contains("timeout"),
        "{e}"
    );

    // A deadline that has already passed by the time the call runs: 504 DEADLINE_EXCEEDED.
    let mut lock = <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(
        &app.db.url(),
    )
    .await
    .unwrap();
    let id = p.name.trim_start_matches("projects/");
    diesel_async::SimpleAsyncConnection::batch_execute(
        &mut lock,
        &format!("BEGIN; SELECT 1 FROM projects WHERE id = '{id}' FOR UPDATE;"),
    )
    .await
    .unwrap();
    // The edge enforces it (the server-wide request timeout is 30 s).
    let (status, e) = tokio::time::timeout(
        Duration::from_secs(10),
        rest.send(
            reqwest::Method::PATCH,
            &format!("/v1/{}?timeout=200ms", p.name),
            Some(json!({"displayName": "late"})),
        ),
    )
    .await
    .expect("the 200 ms deadline ends the call, not the 30 s request timeout");
    assert_eq!(
        (status, e["error"]["status"].as_str()),
        (504, Some("DEADLINE_EXCEEDED")),
        "{e}"
    );
    diesel_async::SimpleAsyncConnection::batch_execute(&mut lock, "COMMIT")
        .await
        .unwrap();

    // x-request-id goes in and comes back.
    let r = rest
        .http
        .get(app.http(&format!("/v1/{}", p.name)))
        .bearer_auth(&t)
        .header("x-request-id", "rest-trace-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "rest-trace-1");
}

#[tokio::test]
async fn a_worker_over_rest_acquires_and_completes_a_batch() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "rest worker").await;
    let client = Rest::new(&app, Some(&t));
    for _ in 0..2 {
        let (status, _) = client
            .send(
                reqwest::Method::POST,
                &format!("/v1/{}/jobs", p.name),
                Some(json!({"kind": "render"})),
            )
            .await;
        assert_eq!(status, 200);
    }
    let worker = Rest::new(
        &app,
        Some(&token_with("w", &["worker"], Duration::from_secs(60))),
    );
    let (status, acquired) = worker
        .send(
            reqwest::Method::POST,
            "/v1/jobs:acquire",
            Some(
                json!({"workerId": "w", "kinds": ["render"], "maxJobs": 2, "leaseDuration": "30s"}),
            ),
        )
        .await;
    assert_eq!(status, 200, "{acquired}");
    let leased = acquired["jobs"].as_array().unwrap();
    assert_eq!(leased.len(), 2);
    let (status, answer) = worker
        .send(
            reqwest::Method::POST,
            "/v1/jobs:batchComplete",
            Some(json!({"requests": [
                {"name": leased[0]["job"]["name"], "leaseId": leased[0]["leaseId"], "result": {"frames": 240}},
                {"name": leased[1]["job"]["name"], "leaseId": uuid::Uuid::new_v4().to_string()},
            ]})),
        )
        .await;
    assert_eq!(status, 200, "refused items do not fail the call: {answer}");
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results[0]["job"]["state"], "SUCCEEDED", "{answer}");
    assert_eq!(results[0]["job"]["result"]["frames"], 240.0);
    assert_eq!(results[1]["error"]["code"], 10, "ABORTED: {answer}");
    assert!(
        results[1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not the current lease"),
        "{answer}"
    );
    let (_, still) = client
        .send(
            reqwest::Method::GET,
            &format!("/v1/{}", leased[1]["job"]["name"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(still["state"], "RUNNING");
}
