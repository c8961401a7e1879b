//! Signed URLs: valid until they expire, only for their asset and method.
use super::*;

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
