//! The admin side of metrics: the listener that serves `GET /metrics` (never on the
//! public port), and the background read of queue figures it renders.
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Metrics;
use crate::db;

/// The admin listener: `GET /metrics` until the background work stops.
pub fn spawn_admin(listener: TcpListener, metrics: Metrics, stop: CancellationToken) {
    let app = Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "admin listener stopped");
        }
    });
}

/// Reads the queue figures from Postgres now and every `every`: scrapes never
/// wait on the database.
pub fn spawn_queue_figures(
    metrics: Metrics,
    db: db::Pool,
    every: Duration,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let read = async {
                let mut conn = db.get().await?;
                db::queues::figures(&mut conn, None).await
            };
            match read.await {
                Ok(figures) => metrics.set_queues(figures),
                Err(e) => {
                    metrics.queue_refresh_failed();
                    tracing::debug!(error = %e, "queue figures not read");
                }
            }
        }
    });
}
