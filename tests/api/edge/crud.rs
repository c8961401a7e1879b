//! REST CRUD with canonical JSON, the error envelope, CORS and the OpenAPI document.
use super::*;

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
