//! Who sees what, deletes and cascades, size and quota limits, job outputs.
use super::*;

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
            key: String::new(),
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
