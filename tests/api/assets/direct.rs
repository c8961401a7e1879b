//! Direct uploads to S3-compatible storage (StartUpload, FinalizeUpload) and downloads
//! redirected to the store: the bytes never pass through the server. Checksums and
//! URL expiry are shown against s3s-fs, which enforces them as S3 does; multipart
//! against moto, which reports the composite checksum of the parts.
use super::*;

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn pending(app: &TestApp, t: &str, parent: &str, display: &str) -> pb::Asset {
    app.assets(t)
        .create_asset(pb::CreateAssetRequest {
            parent: parent.into(),
            asset: Some(pb::Asset {
                display_name: display.into(),
                content_type: "video/mp4".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

fn start(name: &str, data: &[u8]) -> pb::StartUploadRequest {
    pb::StartUploadRequest {
        name: name.into(),
        size_bytes: data.len() as i64,
        sha256: hex(&Sha256::digest(data)),
        ..Default::default()
    }
}

/// `request` with URLs valid for `seconds`.
fn expiring(request: pb::StartUploadRequest, seconds: i64) -> pb::StartUploadRequest {
    pb::StartUploadRequest {
        ttl: Some(prost_types::Duration { seconds, nanos: 0 }),
        ..request
    }
}

/// PUTs `body` to a part's URL with `headers` (the part's own unless given): the status,
/// or 0 when the store cut the connection (it may refuse before reading the body).
async fn put(
    part: &pb::UploadPart,
    body: Vec<u8>,
    headers: Option<Vec<(String, String)>>,
) -> (u16, String) {
    let mut r = reqwest::Client::new().put(&part.url).body(body);
    let headers = headers.unwrap_or_else(|| part.headers.clone().into_iter().collect());
    for (k, v) in headers {
        r = r.header(k, v);
    }
    match r.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let etag = r
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            (status, etag)
        }
        Err(_) => (0, String::new()),
    }
}

async fn finalize(
    app: &TestApp,
    t: &str,
    name: &str,
    upload_id: &str,
    etags: Vec<String>,
) -> Result<pb::Asset, tonic::Status> {
    app.assets(t)
        .finalize_upload(pb::FinalizeUploadRequest {
            name: name.into(),
            upload_id: upload_id.into(),
            part_etags: etags,
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn a_direct_upload_goes_to_the_bucket_with_its_checksum_enforced_by_the_store() {
    let s3 = StrictS3::start().await;
    let app = TestApp::spawn_with(|s| s3.configure(s)).await;
    let (alice, bob) = (token("alice"), token("bob"));
    let p = create_project(&app, &alice, "direct").await;
    let asset = pending(&app, &alice, &p.name, "clip.mp4").await;
    let data = noise(3 * 1024 * 1024 + 11, 5);

    // Bad declarations are refused field by field, before anything is signed.
    let err = app
        .assets(&alice)
        .start_upload(pb::StartUploadRequest {
            sha256: "xyz".into(),
            part_sha256: vec!["00".into()],
            ..start(&asset.name, &data)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("sha256"), "{}", err.message());
    // Another owner cannot start one.
    let err = app
        .assets(&bob)
        .start_upload(start(&asset.name, &data))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let started = app
        .assets(&alice)
        .start_upload(start(&asset.name, &data))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.parts.len(), 1);
    let part = &started.parts[0];
    assert!(part.url.starts_with(&s3.endpoint), "{}", part.url);
    assert_eq!(
        part.headers.get("x-amz-checksum-sha256"),
        Some(&b64(&Sha256::digest(&data)))
    );

    // Nothing has arrived: finalize says so and the asset stays PENDING.
    let err = finalize(&app, &alice, &asset.name, &started.upload_id, vec![])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // The store refuses other bytes under the signed checksum, and a PUT without it;
    // whatever such a PUT left behind does not finalize.
    let mut tampered = data.clone();
    tampered[1000] ^= 1;
    let (status, _) = put(part, tampered, None).await;
    assert!(
        status == 0 || (400..500).contains(&status),
        "tampered bytes: {status}"
    );
    let (status, _) = put(part, data.clone(), Some(vec![])).await;
    assert!(
        status == 0 || (400..500).contains(&status),
        "no checksum header: {status}"
    );
    let err = finalize(&app, &alice, &asset.name, &started.upload_id, vec![])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let (status, _) = put(part, data.clone(), None).await;
    assert_eq!(status, 200);

    // Only the owner finalizes, only the upload it started.
    let err = finalize(&app, &bob, &asset.name, &started.upload_id, vec![])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = finalize(
        &app,
        &alice,
        &asset.name,
        &uuid::Uuid::now_v7().to_string(),
        vec![],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let ready = finalize(&app, &alice, &asset.name, &started.upload_id, vec![])
        .await
        .unwrap();
    assert_eq!(ready.state, State::Ready as i32);
    assert_eq!(ready.sha256, hex(&Sha256::digest(&data)));
    assert_eq!(ready.size_bytes, data.len() as i64);
    assert_eq!(ready.content_type, "video/mp4");
    let keys = s3.keys();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].ends_with(&started.upload_id), "{keys:?}");
    // A second finalize finds nothing to do.
    let err = finalize(&app, &alice, &asset.name, &started.upload_id, vec![])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // REST raw downloads redirect to the store; another owner gets NOT_FOUND.
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let url = app.http(&format!("/v1/{}:download?alt=media", asset.name));
    let r = no_follow
        .get(&url)
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 307);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&s3.endpoint), "{location}");
    let got = reqwest::get(&location).await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap().as_ref(), data.as_slice());
    let r = no_follow.get(&url).bearer_auth(&bob).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // Following the redirect with a Range reads part of the object from the store.
    let r = reqwest::Client::new()
        .get(&url)
        .bearer_auth(&alice)
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[100..200]);
}

#[tokio::test]
async fn presigned_urls_expire_and_abandoned_uploads_are_removed() {
    let s3 = StrictS3::start().await;
    let app = TestApp::spawn_with(|s| {
        s3.configure(s);
        s.direct_upload_grace = Duration::from_secs(1);
    })
    .await;
    let t = token("alice");
    let p = create_project(&app, &t, "abandoned").await;
    let data = noise(200_000, 8);

    // A URL used after it expired is refused by the store.
    let late = pending(&app, &t, &p.name, "late.bin").await;
    let started = app
        .assets(&t)
        .start_upload(expiring(start(&late.name, &data), 1))
        .await
        .unwrap()
        .into_inner();
    // An upload whose PUT lands but is never finalized.
    let abandoned = pending(&app, &t, &p.name, "abandoned.bin").await;
    let never = app
        .assets(&t)
        .start_upload(expiring(start(&abandoned.name, &data), 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put(&never.parts[0], data.clone(), None).await.0, 200);
    assert_eq!(s3.keys().len(), 1);

    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, _) = put(&started.parts[0], data.clone(), None).await;
    assert!(
        status == 0 || status == 403,
        "an expired URL is refused: {status}"
    );

    // After expiry and the grace period the bytes go and the assets are FAILED.
    let get = |name: String| {
        let (app, t) = (&app, t.clone());
        async move {
            app.assets(&t)
                .get_asset(pb::GetAssetRequest { name })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let mut states = (0, 0);
    for _ in 0..100 {
        states = (
            get(late.name.clone()).await.state,
            get(abandoned.name.clone()).await.state,
        );
        if states == (State::Failed as i32, State::Failed as i32) && s3.keys().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(states, (State::Failed as i32, State::Failed as i32));
    assert!(s3.keys().is_empty(), "{:?}", s3.keys());
    let err = finalize(&app, &t, &abandoned.name, &never.upload_id, vec![])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn a_multipart_direct_upload_is_checked_against_its_parts_checksums() {
    let s3 = S3Server::start().await;
    let app = TestApp::spawn_with(|s| s3.configure(s)).await;
    let t = token("alice");
    let p = create_project(&app, &t, "multipart").await;
    let asset = pending(&app, &t, &p.name, "render.mp4").await;
    let part_size = 5 * 1024 * 1024;
    let data = noise(2 * part_size + 1234, 13);
    let hashes: Vec<String> = data
        .chunks(part_size)
        .map(|c| hex(&Sha256::digest(c)))
        .collect();

    let err = app
        .assets(&t)
        .start_upload(pb::StartUploadRequest {
            part_size_bytes: part_size as i64,
            part_sha256: hashes[..2].to_vec(),
            ..start(&asset.name, &data)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("part_sha256"), "{}", err.message());

    let started = app
        .assets(&t)
        .start_upload(pb::StartUploadRequest {
            part_size_bytes: part_size as i64,
            part_sha256: hashes.clone(),
            ..start(&asset.name, &data)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.parts.len(), 3);
    let mut etags = Vec::new();
    for part in &started.parts {
        let (from, len) = (part.offset as usize, part.size_bytes as usize);
        assert!(part.url.contains("partNumber") && part.url.contains("uploadId"));
        let (status, etag) = put(part, data[from..from + len].to_vec(), None).await;
        assert_eq!(status, 200);
        etags.push(etag);
    }
    assert_eq!(started.parts[2].size_bytes, 1234);

    // Parts missing: INVALID_ARGUMENT; a wrong ETag: the store refuses to complete.
    let err = finalize(
        &app,
        &t,
        &asset.name,
        &started.upload_id,
        etags[..2].to_vec(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut wrong = etags.clone();
    wrong[1] = "\"0000\"".into();
    let err = finalize(&app, &t, &asset.name, &started.upload_id, wrong)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let ready = finalize(&app, &t, &asset.name, &started.upload_id, etags)
        .await
        .unwrap();
    assert_eq!(ready.state, State::Ready as i32);
    assert_eq!(ready.size_bytes, data.len() as i64);
    let (_, bytes) = download(&app, &t, &asset.name, 0, 0).await.unwrap();
    assert_eq!(bytes, data);
}

#[tokio::test]
async fn direct_uploads_need_s3_compatible_storage() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "local").await;
    let asset = pending(&app, &t, &p.name, "x.bin").await;
    let err = app
        .assets(&t)
        .start_upload(start(&asset.name, b"abc"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("UploadAssetContent"),
        "{}",
        err.message()
    );
}

/// `mediaplane assets ARGS` against `app` with token `t`.
async fn cli(app: &TestApp, t: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_mediaplane"))
        .arg("assets")
        .args(args)
        .env("MEDIAPLANE_SERVER", app.http(""))
        .env("MEDIAPLANE_TOKEN", t)
        .output()
        .await
        .expect("runs")
}

#[tokio::test]
async fn the_cli_uploads_straight_to_s3_or_through_the_server_and_downloads() {
    let s3 = StrictS3::start().await;
    let on_s3 = TestApp::spawn_with(|s| s3.configure(s)).await;
    let local = TestApp::spawn().await;
    let t = token("alice");
    let dir = tempfile::tempdir().unwrap();
    // Over one 16 MiB part: a multipart direct upload on S3 (s3s-fs reports no
    // composite checksum, so a single part is shown there), streamed on local storage.
    for (app, data, direct) in [
        (&on_s3, noise(3 * 1024 * 1024 + 5, 31), true),
        (&local, noise(17 * 1024 * 1024 + 5, 32), false),
    ] {
        let p = create_project(app, &t, "cli").await;
        let file = dir.path().join("clip.bin");
        std::fs::write(&file, &data).unwrap();
        let out = cli(
            app,
            &t,
            &["upload", "--project", &p.name, file.to_str().unwrap()],
        )
        .await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let name = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let asset = app
            .assets(&t)
            .get_asset(pb::GetAssetRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(asset.state, State::Ready as i32);
        assert_eq!(asset.sha256, hex(&Sha256::digest(&data)));
        if direct {
            assert_eq!(s3.keys().len(), 1, "{:?}", s3.keys());
        }
        let copy = dir.path().join("copy.bin");
        let out = cli(app, &t, &["download", &name, "-o", copy.to_str().unwrap()]).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::read(&copy).unwrap(), data);
    }
    // Another owner's asset is refused with the server's word for it.
    let p = create_project(&local, &t, "mine").await;
    let file = dir.path().join("x.bin");
    std::fs::write(&file, b"abc").unwrap();
    let out = cli(
        &local,
        &t,
        &["upload", "--project", &p.name, file.to_str().unwrap()],
    )
    .await;
    let name = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let out = cli(&local, &token("bob"), &["download", &name, "-o", "-"]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NotFound")
            || String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_direct_upload_works_over_rest_json_as_over_grpc() {
    let s3 = StrictS3::start().await;
    let app = TestApp::spawn_with(|s| s3.configure(s)).await;
    let t = token("alice");
    let p = create_project(&app, &t, "rest").await;
    let asset = pending(&app, &t, &p.name, "rest.bin").await;
    let data = noise(1_000_003, 41);
    let http = reqwest::Client::new();
    let started: serde_json::Value = http
        .post(app.http(&format!("/v1/{}:startUpload", asset.name)))
        .bearer_auth(&t)
        .json(&serde_json::json!({
            "sizeBytes": data.len().to_string(),
            "sha256": hex(&Sha256::digest(&data)),
            "ttl": "60s",
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let part = &started["parts"][0];
    let mut put = http.put(part["url"].as_str().unwrap()).body(data.clone());
    for (k, v) in part["headers"].as_object().unwrap() {
        put = put.header(k, v.as_str().unwrap());
    }
    assert_eq!(put.send().await.unwrap().status(), 200);
    // A bad upload id is a 400 naming the field; the right one makes the asset READY.
    let r = http
        .post(app.http(&format!("/v1/{}:finalizeUpload", asset.name)))
        .bearer_auth(&t)
        .json(&serde_json::json!({"uploadId": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let ready: serde_json::Value = http
        .post(app.http(&format!("/v1/{}:finalizeUpload", asset.name)))
        .bearer_auth(&t)
        .json(&serde_json::json!({"uploadId": started["uploadId"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["state"], "READY", "{ready}");
    assert_eq!(ready["sizeBytes"], data.len().to_string());
}
