//! S3-compatible storage: round trip, presigned GET and PUT, cleanup.
use super::*;

#[tokio::test]
async fn s3_compatible_storage_round_trip_presigned_get_and_cleanup() {
    let s3 = S3Server::start().await;
    let app = TestApp::spawn_with(|s| s3.configure(s)).await;
    let t = token("alice");
    let p = create_project(&app, &t, "s3").await;
    let data = noise(6 * 1024 * 1024 + 7, 21);
    let asset = upload(&app, &t, &p.name, &data).await.unwrap();
    assert_eq!(asset.sha256, hex(&Sha256::digest(&data)));
    let keys = s3.keys().await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(
        keys[0].starts_with(&format!(
            "assets/projects/{}/assets/",
            p.name.trim_start_matches("projects/")
        )),
        "{keys:?}"
    );

    let (_, bytes) = download(&app, &t, &asset.name, 0, 0).await.unwrap();
    assert_eq!(bytes, data);
    let (_, range) = download(&app, &t, &asset.name, 5_000_000, 100)
        .await
        .unwrap();
    assert_eq!(range, &data[5_000_000..5_000_100]);

    // GET URLs are presigned by the store itself.
    let url = app
        .assets(&t)
        .create_signed_url(pb::CreateSignedUrlRequest {
            name: asset.name.clone(),
            method: Method::Get as i32,
            ttl: None,
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    assert!(
        url.starts_with(&s3.endpoint) && url.contains("X-Amz-Signature"),
        "{url}"
    );
    let got = reqwest::get(&url).await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(
        hex(&Sha256::digest(got.bytes().await.unwrap())),
        asset.sha256
    );

    // A bad checksum leaves nothing in the bucket; delete removes the object.
    let wrong = hex(&Sha256::digest(b"no"));
    let err = app
        .assets(&t)
        .upload_asset_content(tokio_stream::iter(messages(
            header_create(&p.name, "x", &wrong, 0),
            &noise(100_000, 4),
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(s3.keys().await.len(), 1);
    app.assets(&t)
        .delete_asset(pb::DeleteAssetRequest {
            name: asset.name.clone(),
            etag: String::new(),
        })
        .await
        .unwrap();
    assert!(s3.keys().await.is_empty());
}

#[tokio::test]
async fn s3_presigned_put_is_verified_before_the_asset_is_ready() {
    let s3 = S3Server::start().await;
    let app = TestApp::spawn_with(|s| {
        s3.configure(s);
        s.max_asset_bytes = 4 * 1024 * 1024;
    })
    .await;
    let t = token("alice");
    let p = create_project(&app, &t, "direct").await;
    let pending = |display: &str| {
        let (app, t, parent) = (&app, t.clone(), p.name.clone());
        let display = display.to_owned();
        async move {
            app.assets(&t)
                .create_asset(pb::CreateAssetRequest {
                    parent,
                    asset: Some(pb::Asset {
                        display_name: display,
                        ..Default::default()
                    }),
                    request_id: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let sign_put = |name: String| {
        let (app, t) = (&app, t.clone());
        async move {
            app.assets(&t)
                .create_signed_url(pb::CreateSignedUrlRequest {
                    name,
                    method: Method::Put as i32,
                    ttl: None,
                })
                .await
                .unwrap()
                .into_inner()
                .url
        }
    };
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
    let http = reqwest::Client::new();

    // The PUT URL is S3's own; the bytes go straight to the bucket.
    let asset = pending("direct.png").await;
    let url = sign_put(asset.name.clone()).await;
    assert!(
        url.starts_with(&s3.endpoint) && url.contains("X-Amz-Signature"),
        "{url}"
    );
    let data = png(3 * 1024 * 1024 + 5);
    let r = http.put(&url).body(data.clone()).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());

    // The verifier finds the object, hashes and sniffs it: then, and only then, READY.
    let mut ready = get(asset.name.clone()).await;
    for _ in 0..200 {
        if ready.state == State::Ready as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        ready = get(asset.name.clone()).await;
    }
    assert_eq!(ready.state, State::Ready as i32, "{ready:?}");
    assert_eq!(ready.sha256, hex(&Sha256::digest(&data)));
    assert_eq!(ready.size_bytes, data.len() as i64);
    assert_eq!(ready.content_type, "image/png");
    let (_, bytes) = download(&app, &t, &asset.name, 0, 0).await.unwrap();
    assert_eq!(bytes, data);

    // The URL is still valid, but a second PUT cannot change a READY asset's bytes:
    // they were copied to a key only the server writes.
    let r = http.put(&url).body(noise(1000, 3)).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let (_, bytes) = download(&app, &t, &asset.name, 0, 0).await.unwrap();
    assert_eq!(bytes, data);
    assert_eq!(get(asset.name.clone()).await.sha256, ready.sha256);

    // Bytes over the size limit are discarded and the asset stays PENDING.
    let big = pending("big.bin").await;
    let big_url = sign_put(big.name.clone()).await;
    let big_prefix = format!("assets/{}/", big.name);
    let r = http
        .put(&big_url)
        .body(noise(4 * 1024 * 1024 + 1, 9))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let mut gone = false;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !s3.keys().await.iter().any(|k| k.starts_with(&big_prefix)) {
            gone = true;
            break;
        }
    }
    assert!(
        gone,
        "the oversized upload was removed: {:?}",
        s3.keys().await
    );
    assert_eq!(get(big.name.clone()).await.state, State::Pending as i32);

    // Deleting the READY asset removes its bytes; what the second PUT left at the
    // upload key goes once the URL has expired (the collector's queue holds it).
    app.assets(&t)
        .delete_asset(pb::DeleteAssetRequest {
            name: asset.name.clone(),
            etag: String::new(),
        })
        .await
        .unwrap();
    let ready_key = format!("assets/{}/", asset.name);
    let left: Vec<String> = s3
        .keys()
        .await
        .into_iter()
        .filter(|k| k.starts_with(&ready_key))
        .collect();
    assert_eq!(left.len(), 1, "only the re-PUT object is left: {left:?}");
}
