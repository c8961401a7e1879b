//! Assets: metadata, streamed bytes, signed URLs, isolation, limits, job outputs.
use std::time::Duration;

use mediaplane::proto::v1::{
    self as pb, asset::State, create_signed_url_request::Method,
    upload_asset_content_request::Payload,
};
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::helpers::*;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Deterministic pseudo-random bytes (incompressible, no recognizable header).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn png(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&[
        0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13, b'I', b'H', b'D', b'R',
    ]);
    v.extend(noise(len - v.len(), 7));
    v
}

fn header_create(
    parent: &str,
    display_name: &str,
    sha256: &str,
    size: i64,
) -> pb::UploadAssetContentRequest {
    pb::UploadAssetContentRequest {
        payload: Some(Payload::Header(pb::UploadAssetHeader {
            name: String::new(),
            create: Some(pb::CreateAssetRequest {
                parent: parent.into(),
                asset: Some(pb::Asset {
                    display_name: display_name.into(),
                    content_type: "application/octet-stream".into(),
                    ..Default::default()
                }),
                request_id: String::new(),
            }),
            sha256: sha256.into(),
            size_bytes: size,
        })),
    }
}

fn messages(
    header: pb::UploadAssetContentRequest,
    data: &[u8],
) -> Vec<pb::UploadAssetContentRequest> {
    let mut out = vec![header];
    out.extend(
        data.chunks(1024 * 1024)
            .map(|c| pb::UploadAssetContentRequest {
                payload: Some(Payload::Chunk(bytes::Bytes::copy_from_slice(c))),
            }),
    );
    out
}

async fn upload(
    app: &TestApp,
    t: &str,
    parent: &str,
    data: &[u8],
) -> Result<pb::Asset, tonic::Status> {
    let sha = hex(&Sha256::digest(data));
    let msgs = messages(
        header_create(parent, "clip.bin", &sha, data.len() as i64),
        data,
    );
    app.assets(t)
        .upload_asset_content(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

async fn download(
    app: &TestApp,
    t: &str,
    name: &str,
    offset: i64,
    length: i64,
) -> Result<(pb::Asset, Vec<u8>), tonic::Status> {
    let mut stream = app
        .assets(t)
        .download_asset_content(pb::DownloadAssetContentRequest {
            name: name.into(),
            offset,
            length,
        })
        .await?
        .into_inner();
    let mut meta = None;
    let mut bytes = Vec::new();
    while let Some(msg) = stream.next().await {
        match msg?.payload {
            Some(pb::download_asset_content_response::Payload::Asset(a)) => meta = Some(a),
            Some(pb::download_asset_content_response::Payload::Chunk(c)) => {
                assert!(c.len() <= 1024 * 1024, "chunks are at most 1 MiB");
                bytes.extend(c);
            }
            None => {}
        }
    }
    Ok((meta.expect("metadata comes first"), bytes))
}

/// Files under the test's storage directory (the bytes of every asset).
fn stored_files(app: &TestApp) -> Vec<std::path::PathBuf> {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out)
                } else {
                    out.push(p)
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(&app.db.storage_dir(), &mut out);
    out
}

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

#[tokio::test]
async fn signed_urls_work_until_they_expire_and_only_for_their_asset_and_method() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "signed").await;
    let data = noise(2 * 1024 * 1024, 3);
    let asset = upload(&app, &t, &p.name, &data).await.unwrap();
    let sign = |name: &str, method: Method, ttl: i64| {
        let mut c = app.assets(&t);
        let name = name.to_owned();
        async move {
            c.create_signed_url(pb::CreateSignedUrlRequest {
                name,
                method: method as i32,
                ttl: Some(prost_types::Duration {
                    seconds: ttl,
                    nanos: 0,
                }),
            })
            .await
            .map(|r| r.into_inner())
        }
    };
    let get = sign(&asset.name, Method::Get, 60).await.unwrap();
    let http = reqwest::Client::new();
    let full = http.get(&get.url).send().await.unwrap();
    assert_eq!(full.status(), 200);
    assert_eq!(
        full.headers()["content-length"],
        data.len().to_string().as_str()
    );
    assert_eq!(
        full.headers()["etag"],
        format!("\"{}\"", asset.sha256).as_str()
    );
    assert_eq!(full.bytes().await.unwrap().as_ref(), data.as_slice());
    let part = http
        .get(&get.url)
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"],
        format!("bytes 100-199/{}", data.len()).as_str()
    );
    assert_eq!(part.bytes().await.unwrap().as_ref(), &data[100..200]);
    let suffix = http
        .get(&get.url)
        .header("range", "bytes=-5")
        .send()
        .await
        .unwrap();
    assert_eq!(
        suffix.bytes().await.unwrap().as_ref(),
        &data[data.len() - 5..]
    );
    let bad = http
        .get(&get.url)
        .header("range", format!("bytes={}-", data.len() + 5))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 416);

    // Tampered signature, another asset's id, another method: refused.
    let tampered = get.url.replace("signature=", "signature=00");
    assert_eq!(http.get(&tampered).send().await.unwrap().status(), 403);
    let other = upload(&app, &t, &p.name, &noise(10, 9)).await.unwrap();
    let other_id = other.name.rsplit('/').next().unwrap();
    let asset_id = asset.name.rsplit('/').next().unwrap();
    assert_eq!(
        http.get(get.url.replace(asset_id, other_id))
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        http.put(&get.url).body("x").send().await.unwrap().status(),
        403
    );

    // PUT: a browser uploads the raw body to a PENDING asset.
    let pending = app
        .assets(&t)
        .create_asset(pb::CreateAssetRequest {
            parent: p.name.clone(),
            asset: Some(pb::Asset {
                display_name: "upload.bin".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        sign(&pending.name, Method::Get, 60)
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    let put = sign(&pending.name, Method::Put, 60).await.unwrap();
    let body = noise(1_500_000, 11);
    let r = http.put(&put.url).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let (meta, bytes) = download(&app, &t, &pending.name, 0, 0).await.unwrap();
    assert_eq!(State::try_from(meta.state).unwrap(), State::Ready);
    assert_eq!(bytes, body);
    assert_eq!(
        http.put(&put.url)
            .body("again")
            .send()
            .await
            .unwrap()
            .status(),
        400,
        "content is set once"
    );

    // Expiry, and the configured maximum.
    let short = sign(&asset.name, Method::Get, 1).await.unwrap();
    assert_eq!(http.get(&short.url).send().await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = http.get(&short.url).send().await.unwrap();
    assert_eq!(expired.status(), 403);
    assert!(expired.text().await.unwrap().contains("expired"));
    let err = sign(&asset.name, Method::Get, 40 * 86400)
        .await
        .unwrap_err();
    assert_eq!(violations(&err), vec!["ttl"]);
}

#[tokio::test]
async fn another_owners_assets_are_invisible_everywhere() {
    let app = TestApp::spawn().await;
    let (alice, bob) = (token("alice"), token("bob"));
    let p = create_project(&app, &alice, "private media").await;
    let asset = upload(&app, &alice, &p.name, &noise(1000, 5))
        .await
        .unwrap();
    let mut c = app.assets(&bob);
    let codes = [
        c.get_asset(pb::GetAssetRequest {
            name: asset.name.clone(),
        })
        .await
        .unwrap_err()
        .code(),
        c.list_assets(pb::ListAssetsRequest {
            parent: p.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .code(),
        download(&app, &bob, &asset.name, 0, 0)
            .await
            .unwrap_err()
            .code(),
        c.create_signed_url(pb::CreateSignedUrlRequest {
            name: asset.name.clone(),
            method: Method::Get as i32,
            ttl: None,
        })
        .await
        .unwrap_err()
        .code(),
        c.delete_asset(pb::DeleteAssetRequest {
            name: asset.name.clone(),
            etag: String::new(),
        })
        .await
        .unwrap_err()
        .code(),
        upload(&app, &bob, &p.name, b"x").await.unwrap_err().code(),
    ];
    assert_eq!(codes, [Code::NotFound; 6]);
}

#[tokio::test]
async fn delete_removes_bytes_and_project_delete_cascades() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "cleanup").await;
    let a = upload(&app, &t, &p.name, &noise(100_000, 1)).await.unwrap();
    let b = upload(&app, &t, &p.name, &noise(100_000, 2)).await.unwrap();
    assert_eq!(stored_files(&app).len(), 2);
    app.assets(&t)
        .delete_asset(pb::DeleteAssetRequest {
            name: a.name.clone(),
            etag: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(stored_files(&app).len(), 1, "bytes removed with the asset");
    assert_eq!(
        app.assets(&t)
            .get_asset(pb::GetAssetRequest {
                name: a.name.clone()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    app.projects(&t)
        .delete_project(pb::DeleteProjectRequest {
            name: p.name.clone(),
            etag: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        app.assets(&admin_token("root"))
            .get_asset(pb::GetAssetRequest {
                name: b.name.clone()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    eventually(
        Duration::from_secs(15),
        "the collector removes a deleted project's bytes",
        || async { stored_files(&app).is_empty() },
    )
    .await;
}

#[tokio::test]
async fn size_limit_and_project_quota_are_resource_exhausted() {
    let app = TestApp::spawn_with(|s| {
        s.max_asset_bytes = 2 * 1024 * 1024;
        s.project_quota_bytes = 3 * 1024 * 1024;
    })
    .await;
    let t = token("alice");
    let p = create_project(&app, &t, "limits").await;
    let err = upload(&app, &t, &p.name, &noise(2 * 1024 * 1024 + 1, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("2097152"), "{}", err.message());
    upload(&app, &t, &p.name, &noise(2 * 1024 * 1024, 2))
        .await
        .unwrap();
    let err = upload(&app, &t, &p.name, &noise(1024 * 1024 + 1, 3))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("3145728"), "{}", err.message());
    assert_eq!(
        stored_files(&app).len(),
        1,
        "rejected uploads leave no bytes"
    );
}

#[tokio::test]
async fn job_outputs_must_be_ready_assets_of_the_project_and_link_back() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "renders").await;
    let out = upload(&app, &t, &p.name, &noise(5000, 4)).await.unwrap();
    let pending = app
        .assets(&t)
        .create_asset(pb::CreateAssetRequest {
            parent: p.name.clone(),
            asset: Some(pb::Asset::default()),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
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
    let complete = |assets: Vec<String>| pb::CompleteJobRequest {
        name: job.name.clone(),
        lease_id: leased.lease_id.clone(),
        result: None,
        output_assets: assets,
    };
    let err = app
        .jobs(&worker)
        .complete_job(complete(vec![pending.name.clone()]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let done = app
        .jobs(&worker)
        .complete_job(complete(vec![out.name.clone()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.output_assets, vec![out.name.clone()]);
    let linked = app
        .assets(&t)
        .get_asset(pb::GetAssetRequest {
            name: out.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(linked.source_job, job.name);
}

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
