//! Limits against abuse: request rates shared by every door and every instance (and
//! kept locally while Redis is away), connection caps and deadlines, caps on open
//! streams and uploads, and quotas per owner.
//!
//! Just over 600 lines: each limit's test sits beside the others so their shared
//! settings (tight limits on one test app) read as one table.
use std::time::Duration;

use mediaplane::{
    config::{Rate, RateLimits},
    proto::v1 as pb,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::*;

/// Reads: 4 at once, then one per 10 s (so a test never sees a refill).
fn tight(s: &mut mediaplane::config::Settings) {
    s.limits.rates = Some(RateLimits {
        reads: Rate {
            interval: Duration::from_secs(10),
            burst: 4,
        },
        anonymous: Rate {
            interval: Duration::from_secs(10),
            burst: 3,
        },
        ..RateLimits::default()
    });
}

fn list() -> pb::ListProjectsRequest {
    pb::ListProjectsRequest::default()
}

fn retry_delay(status: &tonic::Status) -> Duration {
    status
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .unwrap_or_else(|| panic!("no RetryInfo in {status:?}"))
}

#[tokio::test]
async fn a_principals_budget_is_shared_by_every_door_and_every_instance() {
    let a = TestApp::spawn_with(tight).await;
    let b = a.spawn_peer().await;
    let t = token("alice");
    // Two reads on each instance: the whole burst of 4.
    for app in [&a, &b, &a, &b] {
        app.projects(&t)
            .list_projects(list())
            .await
            .expect("within the burst");
    }
    // gRPC on either instance is now refused, with a retry hint.
    for app in [&a, &b] {
        let err = app.projects(&t).list_projects(list()).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        let wait = retry_delay(&err);
        assert!(
            wait > Duration::from_secs(5) && wait <= Duration::from_secs(10),
            "{wait:?}"
        );
    }
    // REST: 429 with Retry-After and RateLimit-* headers, and the same JSON details.
    let http = reqwest::Client::new();
    let r = http
        .get(b.http("/v1/projects"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((6..=10).contains(&retry_after), "{retry_after}");
    assert_eq!(r.headers()["ratelimit-limit"], "4");
    assert_eq!(r.headers()["ratelimit-remaining"], "0");
    assert!(r.headers().contains_key("ratelimit-reset"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["status"], "RESOURCE_EXHAUSTED");
    assert!(
        body["error"]["details"][0]["@type"]
            .as_str()
            .unwrap()
            .ends_with("google.rpc.RetryInfo"),
        "{body}"
    );
    // grpc-web over HTTP/1.1: the same refusal.
    let r = reqwest::Client::builder()
        .http1_only()
        .build()
        .unwrap()
        .post(a.http("/mediaplane.v1.ProjectsService/ListProjects"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .bearer_auth(&t)
        .body(grpc_web_frame(&list()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let status = r.headers().get("grpc-status").cloned();
    assert!(r.headers().contains_key("retry-after"));
    let body = r.bytes().await.unwrap();
    let (_, trailers) = parse_grpc_web(&body);
    let code = status
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_else(|| trailers.clone());
    assert!(
        code.contains('8'),
        "grpc-status 8 expected: {code} / {trailers}"
    );

    // Another principal's budget is untouched, and writes are a budget of their own.
    b.projects(&token("bob"))
        .list_projects(list())
        .await
        .expect("bob reads");
    create_project(&a, &t, "writes are counted apart").await;
}

#[tokio::test]
async fn failed_authentications_spend_the_client_ips_budget() {
    let app = TestApp::spawn_with(tight).await;
    let forged = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.bm90LWEtc2lnbmF0dXJl";
    for _ in 0..3 {
        let err = app
            .projects(forged)
            .list_projects(list())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    let err = app
        .projects(forged)
        .list_projects(list())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    retry_delay(&err);
    // A valid token is judged by its own budget, not the IP's.
    app.projects(&token("alice"))
        .list_projects(list())
        .await
        .expect("a real user from the same address");
}

#[tokio::test]
async fn limits_hold_locally_while_redis_is_away_and_never_refuse_everyone() {
    let proxy = ChaosProxy::start("127.0.0.1:6379").await;
    let addr = proxy.addr;
    let app = TestApp::spawn_with(|s| {
        tight(s);
        s.redis_url = mediaplane::config::Secret::new(format!("redis://{addr}"));
    })
    .await;
    proxy.cut().await;
    let t = token("alice");
    let started = std::time::Instant::now();
    for i in 0..4 {
        app.projects(&t)
            .list_projects(list())
            .await
            .unwrap_or_else(|e| panic!("call {i} within the local budget: {e:?}"));
    }
    let err = app.projects(&t).list_projects(list()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    retry_delay(&err);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "decided without waiting on Redis: {:?}",
        started.elapsed()
    );
    app.projects(&token("bob"))
        .list_projects(list())
        .await
        .expect("others still get through");
}

/// A connection from `ip` (any 127/8 address reaches the server on loopback).
async fn connect_from(ip: [u8; 4], to: std::net::SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::from((ip, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

/// True when the server closed the connection within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn silent_and_trickling_connections_are_closed_by_their_deadlines() {
    let app = TestApp::spawn_with(|s| {
        s.limits.connections.first_byte_timeout = Duration::from_millis(500);
        s.limits.connections.handshake_timeout = Duration::from_millis(1500);
        s.limits.connections.idle_timeout = Duration::from_millis(1500);
    })
    .await;
    // The test's channel holds a watch open all along: a connection with a call open
    // is never idle.
    let t = token("alice");
    let p = create_project(&app, &t, "busy").await;
    let _watch = app
        .jobs(&t)
        .watch_jobs(pb::WatchJobsRequest {
            parent: p.name.clone(),
            filter: String::new(),
        })
        .await
        .expect("watch");
    let mut silent = connect_from([127, 0, 0, 1], app.addr).await;
    let mut trickling = connect_from([127, 0, 0, 1], app.addr).await;
    trickling.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut idle = connect_from([127, 0, 0, 1], app.addr).await;
    idle.write_all(b"GET /livez HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();

    assert!(
        closed_within(&mut silent, Duration::from_secs(2)).await,
        "silent"
    );
    assert!(
        closed_within(&mut trickling, Duration::from_secs(3)).await,
        "trickling"
    );
    assert!(
        closed_within(&mut idle, Duration::from_secs(4)).await,
        "idle"
    );
    // The busy connection was left open: a call on it still works.
    create_project(&app, &t, "still served").await;
}

#[tokio::test]
async fn connection_caps_hold_while_other_clients_keep_working() {
    let app = TestApp::spawn_with(|s| {
        s.limits.connections.max_connections_per_ip = 5;
        s.limits.connections.max_connections = 8;
        s.limits.connections.first_byte_timeout = Duration::from_secs(30);
    })
    .await;
    // The test's own channel holds one connection from 127.0.0.1.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from([127, 0, 0, 1], app.addr).await);
    }
    let mut over = connect_from([127, 0, 0, 1], app.addr).await;
    assert!(
        closed_within(&mut over, Duration::from_secs(2)).await,
        "a sixth connection from one IP is closed at once"
    );
    // Another address still gets in and is served.
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let r = other.get(app.http("/livez")).send().await.unwrap();
    assert!(r.status().is_success());
    // The existing channel keeps working.
    create_project(&app, &token("alice"), "still served").await;

    // The total cap: 8 in all (5 from .1, now fill from .3).
    let mut more = Vec::new();
    for _ in 0..3 {
        more.push(connect_from([127, 0, 0, 3], app.addr).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut ninth = connect_from([127, 0, 0, 4], app.addr).await;
    assert!(
        closed_within(&mut ninth, Duration::from_secs(2)).await,
        "past the total cap, a connection is closed at once"
    );
    drop(more);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = other.get(app.http("/livez")).send().await.unwrap();
    assert!(r.status().is_success(), "places are given back");
}

#[tokio::test]
async fn open_watch_streams_and_uploads_are_capped_per_principal() {
    let app = TestApp::spawn_with(|s| {
        s.limits.connections.max_watch_streams = 2;
        s.limits.connections.max_uploads = 1;
    })
    .await;
    let t = token("alice");
    let p = create_project(&app, &t, "streams").await;
    let watch = || {
        let mut jobs = app.jobs(&t);
        let parent = p.name.clone();
        async move {
            jobs.watch_jobs(pb::WatchJobsRequest {
                parent,
                filter: String::new(),
            })
            .await
        }
    };
    let first = watch().await.expect("first watch");
    let second = watch().await.expect("second watch");
    let err = watch().await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let quota = err.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations[0].subject, "open_watch_streams");
    // Another principal has its own streams.
    app.jobs(&token("bob"))
        .watch_jobs(pb::WatchJobsRequest {
            parent: create_project(&app, &token("bob"), "b").await.name,
            filter: String::new(),
        })
        .await
        .expect("bob's watch");
    drop(first);
    eventually(
        Duration::from_secs(5),
        "a closed watch gives its place back",
        || async { watch().await.is_ok() },
    )
    .await;
    drop(second);

    // Uploads: one in progress (its request stream held open), the second refused.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::UploadAssetContentRequest {
        payload: Some(pb::upload_asset_content_request::Payload::Header(
            pb::UploadAssetHeader {
                create: Some(pb::CreateAssetRequest {
                    parent: p.name.clone(),
                    asset: Some(pb::Asset {
                        display_name: "slow".into(),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                }),
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    let mut assets = app.assets(&t);
    let slow = tokio::spawn(async move {
        assets
            .upload_asset_content(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = app
        .assets(&t)
        .upload_asset_content(tokio_stream::iter(
            Vec::<pb::UploadAssetContentRequest>::new(),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(
        err.get_details_quota_failure().unwrap().violations[0].subject,
        "uploads_in_progress"
    );
    drop(tx);
    let _ = slow.await;
}

fn quota_subject(err: &tonic::Status) -> String {
    let q = err
        .get_details_quota_failure()
        .unwrap_or_else(|| panic!("no QuotaFailure in {err:?}"));
    format!(
        "{} {}",
        q.violations[0].subject, q.violations[0].description
    )
}

async fn usage(app: &TestApp, t: &str) -> Vec<(String, i64, i64)> {
    app.projects(t)
        .get_usage(pb::GetUsageRequest {})
        .await
        .unwrap()
        .into_inner()
        .quotas
        .into_iter()
        .map(|q| (q.quota, q.used, q.limit))
        .collect()
}

#[tokio::test]
async fn quotas_per_owner_refuse_with_quota_failure_and_usage_tells() {
    let app = TestApp::spawn_with(|s| {
        s.limits.quotas.projects = 2;
        s.limits.quotas.active_jobs = 3;
        s.limits.quotas.storage_bytes = 1000;
    })
    .await;
    let t = token("alice");
    let p = create_project(&app, &t, "one").await;
    create_project(&app, &t, "two").await;
    let err = app
        .projects(&t)
        .create_project(pb::CreateProjectRequest {
            project: Some(new_project("three")),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(quota_subject(&err), "projects limit 2");
    // Over REST: 429 with the QuotaFailure in the JSON details.
    let r = reqwest::Client::new()
        .post(app.http("/v1/projects"))
        .bearer_auth(&t)
        .json(&serde_json::json!({"displayName": "three"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body["error"]["details"][0]["violations"][0]["subject"],
        "projects"
    );
    // Another owner is not affected.
    create_project(&app, &token("bob"), "bob's").await;

    // Jobs not yet finished: a batch past the quota writes nothing.
    let job = |kind: &str| pb::Job {
        kind: kind.into(),
        ..Default::default()
    };
    let err = app
        .jobs(&t)
        .batch_create_jobs(pb::BatchCreateJobsRequest {
            parent: p.name.clone(),
            requests: (0..4)
                .map(|_| pb::CreateJobRequest {
                    parent: p.name.clone(),
                    job: Some(job("render")),
                    request_id: String::new(),
                    key: String::new(),
                })
                .collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(quota_subject(&err), "active_jobs limit 3");
    for _ in 0..3 {
        app.jobs(&t)
            .create_job(pb::CreateJobRequest {
                parent: p.name.clone(),
                job: Some(job("render")),
                request_id: String::new(),
                key: String::new(),
            })
            .await
            .expect("within the quota");
    }
    let err = app
        .jobs(&t)
        .create_job(pb::CreateJobRequest {
            parent: p.name.clone(),
            job: Some(job("render")),
            request_id: String::new(),
            key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(quota_subject(&err), "active_jobs limit 3");

    // Storage: READY bytes count; an upload past the quota leaves nothing READY.
    let data = vec![7u8; 600];
    let upload = |data: Vec<u8>| {
        let mut assets = app.assets(&t);
        let parent = p.name.clone();
        async move {
            let msgs = vec![
                pb::UploadAssetContentRequest {
                    payload: Some(pb::upload_asset_content_request::Payload::Header(
                        pb::UploadAssetHeader {
                            create: Some(pb::CreateAssetRequest {
                                parent,
                                asset: Some(pb::Asset {
                                    display_name: "bytes".into(),
                                    ..Default::default()
                                }),
                                request_id: String::new(),
                            }),
                            ..Default::default()
                        },
                    )),
                },
                pb::UploadAssetContentRequest {
                    payload: Some(pb::upload_asset_content_request::Payload::Chunk(
                        data.into(),
                    )),
                },
            ];
            assets.upload_asset_content(tokio_stream::iter(msgs)).await
        }
    };
    upload(data.clone()).await.expect("600 of 1000 bytes");
    let err = upload(data.clone()).await.unwrap_err();
    assert_eq!(quota_subject(&err), "storage_bytes limit 1000");
    let ready = app
        .assets(&t)
        .list_assets(pb::ListAssetsRequest {
            parent: p.name.clone(),
            filter: "state = READY".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .assets;
    assert_eq!(ready.len(), 1, "the refused upload is not READY");

    assert_eq!(
        usage(&app, &t).await,
        vec![
            ("projects".to_owned(), 2, 2),
            ("active_jobs".to_owned(), 3, 3),
            ("storage_bytes".to_owned(), 600, 1000),
        ]
    );
    // Freed room is usable at once: a deleted project makes room for a new one.
    let second = app
        .projects(&t)
        .list_projects(list())
        .await
        .unwrap()
        .into_inner()
        .projects
        .into_iter()
        .find(|x| x.name != p.name)
        .unwrap();
    app.projects(&t)
        .delete_project(pb::DeleteProjectRequest {
            name: second.name,
            etag: String::new(),
        })
        .await
        .unwrap();
    create_project(&app, &t, "three, now").await;
}

/// A count an instance has cached admits for a while without reading again, but not
/// near the limit: there, what another instance admitted since is seen.
#[tokio::test]
async fn near_the_limit_jobs_created_on_another_instance_are_counted() {
    let a = TestApp::spawn_with(|s| s.limits.quotas.active_jobs = 4).await;
    let b = a.spawn_peer().await;
    let t = token("carol");
    let p = create_project(&a, &t, "shared").await;
    // `a` counts 0, admits 2 (it holds 2); `b` counts 2, admits 2 (the owner holds 4).
    for app in [&a, &a, &b, &b] {
        create_job_of(app, &t, &p.name, "render").await;
    }
    // `a`'s count, a second old, says 2 of 4: past half the limit it is read again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let err = a
        .jobs(&t)
        .create_job(job_request(&p.name, "render"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(quota_subject(&err), "active_jobs limit 4");
    assert_eq!(usage(&a, &t).await[1], ("active_jobs".to_owned(), 4, 4));
}

#[tokio::test]
async fn the_cli_shows_usage_against_each_quota() {
    let app = TestApp::spawn().await;
    let t = token("carol");
    create_project(&app, &t, "counted").await;
    // tokio's Command: the server runs on this test's runtime while the CLI waits.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mediaplane"))
        .args(["usage", "--server", &app.http(""), "--token", &t])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("owner: carol"), "{text}");
    let projects = text.lines().find(|l| l.starts_with("projects")).unwrap();
    let words: Vec<&str> = projects.split_whitespace().collect();
    assert_eq!(words, ["projects", "1", "1000"], "{text}");
}

#[tokio::test]
async fn instances_taking_calls_in_chunks_never_exceed_the_shared_burst() {
    // A burst of 32 is asked of Redis 4 calls at a time.
    let chunked = |s: &mut mediaplane::config::Settings| {
        s.limits.rates = Some(RateLimits {
            reads: Rate {
                interval: Duration::from_secs(60),
                burst: 32,
            },
            ..RateLimits::default()
        });
    };
    let a = TestApp::spawn_with(chunked).await;
    let b = a.spawn_peer().await;
    let t = token("alice");
    let mut allowed = 0;
    for i in 0..48 {
        let app = if i % 3 == 0 { &b } else { &a };
        match app.projects(&t).list_projects(list()).await {
            Ok(_) => allowed += 1,
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted),
        }
    }
    // At most the burst; at most a chunk per instance left unspent.
    assert!((24..=32).contains(&allowed), "{allowed} allowed");
}
