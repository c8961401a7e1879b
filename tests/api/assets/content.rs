//! Bytes up and down: round trips, ranges, checksums, cut streams, paging.
use super::*;

#[tokio::test]
async fn a_page_of_large_assets_is_cut_to_fit_one_response() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "large metadata").await;
    // 80 assets of ~60 KB of metadata: about 4.8 MB, past the 4 MiB message limit.
    let metadata = sized_struct("notes", 60_000);
    for i in 0..80 {
        app.assets(&t)
            .create_asset(pb::CreateAssetRequest {
                parent: p.name.clone(),
                asset: Some(pb::Asset {
                    display_name: format!("take {i}.mp4"),
                    metadata: Some(metadata.clone()),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .unwrap();
    }
    let mut names = std::collections::HashSet::new();
    let mut pages = 0;
    let mut page_token = String::new();
    loop {
        let page = app
            .assets(&t)
            .list_assets(pb::ListAssetsRequest {
                parent: p.name.clone(),
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .expect("a page that fits, not the whole list refused")
            .into_inner();
        pages += 1;
        for a in page.assets {
            assert!(names.insert(a.name), "no asset twice");
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert!(pages > 1);
    assert_eq!(names.len(), 80);
}

#[tokio::test]
async fn upload_and_download_round_trip_with_ranges_and_sniffing() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "media").await;
    let data = png(5 * 1024 * 1024 + 123);
    let asset = upload(&app, &t, &p.name, &data).await.unwrap();
    assert_eq!(State::try_from(asset.state).unwrap(), State::Ready);
    assert_eq!(asset.size_bytes, data.len() as i64);
    assert_eq!(asset.sha256, hex(&Sha256::digest(&data)));
    assert_eq!(
        asset.content_type, "image/png",
        "sniffed from the bytes over the declared type"
    );
    assert_eq!(stored_files(&app).len(), 1);

    let (meta, bytes) = download(&app, &t, &asset.name, 0, 0).await.unwrap();
    assert_eq!(meta.name, asset.name);
    assert_eq!(
        hex(&Sha256::digest(&bytes)),
        asset.sha256,
        "download matches the upload"
    );
    let (_, middle) = download(&app, &t, &asset.name, 1_000_000, 2_500_000)
        .await
        .unwrap();
    assert_eq!(middle, &data[1_000_000..3_500_000]);
    let (_, tail) = download(&app, &t, &asset.name, data.len() as i64 - 10, 0)
        .await
        .unwrap();
    assert_eq!(tail, &data[data.len() - 10..]);
    let err = download(&app, &t, &asset.name, data.len() as i64 + 1, 0)
        .await
        .unwrap_err();
    assert_eq!(violations(&err), vec!["offset"]);

    // Metadata CRUD alongside.
    let updated = app
        .assets(&t)
        .update_asset(pb::UpdateAssetRequest {
            asset: Some(pb::Asset {
                name: asset.name.clone(),
                display_name: "hero.png".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (updated.display_name.as_str(), updated.sha256.as_str()),
        ("hero.png", asset.sha256.as_str())
    );
    let err = app
        .assets(&t)
        .update_asset(pb::UpdateAssetRequest {
            asset: Some(pb::Asset {
                name: asset.name.clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["sha256".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err), vec!["update_mask"]);
    let listed = app
        .assets(&t)
        .list_assets(pb::ListAssetsRequest {
            parent: p.name.clone(),
            filter: r#"state = READY AND content_type = "image/*""#.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.assets.len(), 1);
    let none = app
        .assets(&t)
        .list_assets(pb::ListAssetsRequest {
            parent: p.name.clone(),
            filter: r#"content_type = "video/*""#.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.assets.is_empty());

    // Reading a PENDING asset is FAILED_PRECONDITION; content goes only to PENDING assets.
    let pending = app
        .assets(&t)
        .create_asset(pb::CreateAssetRequest {
            parent: p.name.clone(),
            asset: Some(pb::Asset {
                display_name: "later.mp4".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(State::try_from(pending.state).unwrap(), State::Pending);
    assert_eq!(
        download(&app, &t, &pending.name, 0, 0)
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    let again = vec![
        pb::UploadAssetContentRequest {
            payload: Some(Payload::Header(pb::UploadAssetHeader {
                name: asset.name.clone(),
                ..Default::default()
            })),
        },
        pb::UploadAssetContentRequest {
            payload: Some(Payload::Chunk(bytes::Bytes::from_static(b"x"))),
        },
    ];
    let err = app
        .assets(&t)
        .upload_asset_content(tokio_stream::iter(again))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn a_checksum_mismatch_fails_and_leaves_nothing_behind() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "mismatch").await;
    let data = noise(3 * 1024 * 1024, 1);
    let wrong = hex(&Sha256::digest(b"something else"));
    let err = app
        .assets(&t)
        .upload_asset_content(tokio_stream::iter(messages(
            header_create(&p.name, "x", &wrong, 0),
            &data,
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("sha256"), "{}", err.message());
    let err = app
        .assets(&t)
        .upload_asset_content(tokio_stream::iter(messages(
            header_create(&p.name, "x", "", 5),
            &data,
        )))
        .await
        .unwrap_err();
    assert_eq!(violations(&err), vec!["size_bytes"]);
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
    assert!(
        assets
            .iter()
            .all(|a| State::try_from(a.state) == Ok(State::Pending)),
        "nothing READY"
    );
    assert!(
        stored_files(&app).is_empty(),
        "no orphaned bytes: {:?}",
        stored_files(&app)
    );
}

#[tokio::test]
async fn a_stream_cut_in_the_middle_leaves_no_ready_asset_and_no_bytes() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "cut").await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    // Through a proxy that can cut the connection, as when the client's host goes away.
    let proxy = ChaosProxy::start(Box::leak(app.addr.to_string().into_boxed_str())).await;
    let own = tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client =
        pb::assets_service_client::AssetsServiceClient::with_interceptor(own, Bearer::new(&t));
    let call = tokio::spawn(async move {
        client
            .upload_asset_content(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tx.send(header_create(&p.name, "partial.mov", "", 0))
        .await
        .unwrap();
    for i in 0..12 {
        tx.send(pb::UploadAssetContentRequest {
            payload: Some(Payload::Chunk(noise(1024 * 1024, i).into())),
        })
        .await
        .unwrap();
    }
    // Bytes have reached storage (the upload is really under way) when the cut comes.
    eventually(Duration::from_secs(10), "bytes written", || async {
        stored_files(&app)
            .iter()
            .any(|f| std::fs::metadata(f).is_ok_and(|m| m.len() > 0))
    })
    .await;
    // The connection goes away mid-upload, the request stream still open (ending the
    // stream would make it a complete upload).
    proxy.cut().await;
    call.abort();
    eventually(
        Duration::from_secs(10),
        "bytes of the broken upload removed",
        || async { stored_files(&app).is_empty() },
    )
    .await;
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
    assert_eq!(assets.len(), 1);
    assert_eq!(
        State::try_from(assets[0].state).unwrap(),
        State::Pending,
        "nothing READY"
    );
    drop(tx);
}
