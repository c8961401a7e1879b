//! Health over gRPC and HTTP, following Postgres.
use std::time::Duration;

use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

use crate::helpers::*;

async fn status(app: &TestApp, service: &str) -> ServingStatus {
    let r = app
        .health()
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check");
    r.into_inner().status()
}

#[tokio::test]
async fn every_name_serves_and_needs_no_token() {
    let app = TestApp::spawn().await;
    for name in [
        "",
        "liveness",
        "readiness",
        "mediaplane.v1.ProjectsService",
        "mediaplane.v1.JobsService",
        "mediaplane.v1.AssetsService",
    ] {
        assert_eq!(status(&app, name).await, ServingStatus::Serving, "{name:?}");
    }
    let unknown = app
        .health()
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let body: serde_json::Value = reqwest::get(app.http("/healthz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["status"], "SERVING");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert!(body["uptime_seconds"].is_u64());
    for dep in ["postgres", "redis"] {
        assert_eq!(body["checks"][dep]["status"], "up", "{body}");
        assert!(body["checks"][dep]["latency_ms"].is_number());
    }
    for path in ["/livez", "/readyz"] {
        assert_eq!(
            reqwest::get(app.http(path)).await.unwrap().status(),
            200,
            "{path}"
        );
    }
}

/// The health protocol: Watch of a name the server does not know sends SERVICE_UNKNOWN
/// and keeps the call open (Check answers NOT_FOUND, above).
#[tokio::test]
async fn watch_of_an_unknown_name_streams_service_unknown_and_stays_open() {
    let app = TestApp::spawn().await;
    let mut watch = app
        .health()
        .watch(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .expect("watch of an unknown name is accepted")
        .into_inner();
    let first = watch.message().await.unwrap().expect("a first status");
    assert_eq!(first.status(), ServingStatus::ServiceUnknown);
    let next = tokio::time::timeout(Duration::from_millis(500), watch.message()).await;
    assert!(next.is_err(), "the call stays open: {next:?}");
}

#[tokio::test]
async fn readiness_follows_postgres_and_liveness_does_not() {
    let proxy = ChaosProxy::start(PG_HOST).await;
    let db = ScratchDb::reserve().await;
    let mut settings = test_settings(&db);
    settings.database_url = mediaplane::config::Secret::new(db.url_via(&proxy.addr.to_string()));
    let app = TestApp::spawn_on(db, settings).await;
    let t = token("alice");
    create_project(&app, &t, "before").await;

    let mut watch = app
        .health()
        .watch(HealthCheckRequest {
            service: "readiness".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    proxy.cut().await;
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("watch sees the flip");
    assert_eq!(next.unwrap().unwrap().status(), ServingStatus::NotServing);
    for name in ["readiness", "mediaplane.v1.ProjectsService"] {
        assert_eq!(
            status(&app, name).await,
            ServingStatus::NotServing,
            "{name}"
        );
    }
    for name in ["", "liveness"] {
        assert_eq!(
            status(&app, name).await,
            ServingStatus::Serving,
            "{name} depends on the process only"
        );
    }
    let healthz = reqwest::get(app.http("/healthz")).await.unwrap();
    assert_eq!(healthz.status(), 503);
    let body: serde_json::Value = healthz.json().await.unwrap();
    assert_eq!(body["checks"]["postgres"]["status"], "down");
    assert_eq!(
        reqwest::get(app.http("/readyz")).await.unwrap().status(),
        503
    );
    assert_eq!(
        reqwest::get(app.http("/livez")).await.unwrap().status(),
        200
    );
    // Calls fail fast (not after the pool's timeout) and retryably, without
    // internals in the message.
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let err = app
            .projects(&t)
            .list_projects(mediaplane::proto::v1::ListProjectsRequest::default())
            .await
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert!(!err.message().contains("127.0.0.1"), "{}", err.message());
        use tonic_types::StatusExt;
        assert!(err.get_details_retry_info().is_some(), "a retry hint");
    }

    proxy.restore();
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("watch sees the recovery");
    assert_eq!(next.unwrap().unwrap().status(), ServingStatus::Serving);
    assert_eq!(
        reqwest::get(app.http("/readyz")).await.unwrap().status(),
        200
    );
    eventually(Duration::from_secs(10), "projects work again", || {
        let mut c = app.projects(&t);
        async move {
            c.list_projects(mediaplane::proto::v1::ListProjectsRequest::default())
                .await
                .is_ok()
        }
    })
    .await;
}

#[tokio::test]
async fn redis_outage_is_reported_and_recovered_from_without_losing_readiness() {
    let (app, proxy) = app_behind_redis_proxy().await;
    let redis_status = || async {
        let body: serde_json::Value = reqwest::get(app.http("/healthz"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["checks"]["redis"]["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(redis_status().await, "up");
    proxy.cut().await;
    eventually(Duration::from_secs(10), "redis reported down", || async {
        redis_status().await == "down"
    })
    .await;
    assert_eq!(status(&app, "readiness").await, ServingStatus::Serving);
    create_project(&app, &token("alice"), "redis is optional for projects").await;
    proxy.restore();
    eventually(
        Duration::from_secs(10),
        "the pool reconnects by itself",
        || async { redis_status().await == "up" },
    )
    .await;
}

#[tokio::test]
async fn redis_down_is_reported_but_not_fatal() {
    // A Redis that is not there: the server starts, serves Projects and says so.
    let app = TestApp::spawn_with(|s| {
        s.redis_url = mediaplane::config::Secret::new("redis://127.0.0.1:1")
    })
    .await;
    create_project(&app, &token("alice"), "works without redis").await;
    let r = reqwest::get(app.http("/healthz")).await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["checks"]["redis"]["status"], "down", "{body}");
    assert_eq!(status(&app, "readiness").await, ServingStatus::Serving);
}
