//! Raw HTTP bodies for asset bytes, and a worker driving the protocol over REST.
use super::*;

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
async fn a_worker_over_rest_acquires_and_completes_a_batch() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "rest worker").await;
    let client = Rest::new(&app, Some(&t));
    let create_job = || async {
        let (status, created) = client
            .send(
                reqwest::Method::POST,
                &format!("/v1/{}/jobs", p.name),
                Some(json!({"kind": "render"})),
            )
            .await;
        assert_eq!(status, 200);
        created
    };
    for _ in 0..2 {
        create_job().await;
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

    // Completing the other one takes the next job in the same call.
    let created = create_job().await;
    let (status, answer) = worker
        .send(
            reqwest::Method::POST,
            "/v1/jobs:batchComplete",
            Some(json!({
                "requests": [{"name": leased[1]["job"]["name"], "leaseId": leased[1]["leaseId"]}],
                "acquire": {"workerId": "w", "kinds": ["render"], "leaseDuration": "30s"},
            })),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["results"][0]["job"]["state"], "SUCCEEDED",
        "{answer}"
    );
    let next = &answer["acquired"][0];
    assert_eq!(next["job"]["name"], created["name"], "{answer}");
    assert_eq!(next["job"]["state"], "RUNNING", "{answer}");
    assert!(next["leaseId"].is_string(), "{answer}");
}
