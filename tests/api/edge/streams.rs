//! Server streams as NDJSON and SSE: resume, errors after the 200, shutdown, deadlines.
use super::*;

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
            key: String::new(),
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
            key: String::new(),
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
            key: String::new(),
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
