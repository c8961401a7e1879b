//! `GET /healthz`, `/livez`, `/readyz`: the gRPC health facts over plain HTTP, no token.
use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use serde_json::json;

use crate::health::Health;

pub fn router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(health)
}

fn code(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn healthz(State(health): State<Health>) -> impl IntoResponse {
    let s = health.snapshot();
    let ready = s.ready();
    let body = json!({
        "status": if ready { "SERVING" } else { "NOT_SERVING" },
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": health.started.elapsed().as_secs(),
        "checks": { "postgres": s.postgres, "redis": s.redis },
    });
    (code(ready), Json(body))
}

async fn livez(State(health): State<Health>) -> impl IntoResponse {
    let alive = !health.snapshot().shutting_down;
    (code(alive), if alive { "ok" } else { "shutting down" })
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    let ready = health.snapshot().ready();
    (code(ready), if ready { "ready" } else { "not ready" })
}
