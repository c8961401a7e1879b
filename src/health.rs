//! Health: `grpc.health.v1` statuses and the probe results behind them.
//!
//! `""` and `liveness` report the process only. `readiness` and each service name
//! follow Postgres (the source of truth): NOT_SERVING while it is unreachable. Redis is
//! probed and reported, but does not gate readiness: every RPC that exists works
//! without it. Shutdown flips everything to NOT_SERVING first.
use std::{
    pin::Pin,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, server::NamedService};
use tonic_health::{
    ServingStatus,
    pb::{
        HealthCheckRequest, HealthCheckResponse, health_check_response,
        health_server::{self, HealthServer},
    },
    server::{HealthReporter, HealthService},
};

use crate::{
    db,
    proto::server::{
        assets_service_server::AssetsServiceServer, jobs_service_server::JobsServiceServer,
        projects_service_server::ProjectsServiceServer, queues_service_server::QueuesServiceServer,
    },
    redis::RedisPool,
};

/// `grpc.health.v1.Health` as the protocol states it: tonic-health's service, except
/// that `Watch` for a name it does not know sends SERVICE_UNKNOWN and keeps the call
/// open (tonic-health answers NOT_FOUND, which clients that watch treat as an error
/// and retry in a loop). The names are fixed at start, so that status never changes;
/// the stream ends like every other at shutdown. `Check` keeps NOT_FOUND, as specified.
pub struct HealthApi(HealthService);

impl HealthApi {
    pub fn new(reporter: HealthReporter) -> HealthServer<Self> {
        HealthServer::new(Self(HealthService::from_health_reporter(reporter)))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl health_server::Health for HealthApi {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.0.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        match self.0.watch(request).await {
            Ok(known) => Ok(Response::new(Box::pin(known.into_inner()) as WatchStream)),
            Err(status) if status.code() == Code::NotFound => {
                let unknown = HealthCheckResponse {
                    status: health_check_response::ServingStatus::ServiceUnknown.into(),
                };
                let stream = tokio_stream::once(Ok(unknown)).chain(tokio_stream::pending());
                Ok(Response::new(Box::pin(stream) as WatchStream))
            }
            Err(status) => Err(status),
        }
    }
}

pub const LIVENESS: &str = "liveness";
pub const READINESS: &str = "readiness";
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Names that follow Postgres.
pub fn gated_names() -> [&'static str; 5] {
    [
        READINESS,
        <ProjectsServiceServer<crate::api::projects::ProjectsApi> as NamedService>::NAME,
        <JobsServiceServer<crate::api::jobs::JobsApi> as NamedService>::NAME,
        <AssetsServiceServer<crate::api::assets::AssetsApi> as NamedService>::NAME,
        <QueuesServiceServer<crate::api::queues::QueuesApi> as NamedService>::NAME,
    ]
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Check {
    pub status: &'static str,
    pub latency_ms: f64,
    /// Logged, not served: /healthz is public and errors can name hosts.
    #[serde(skip)]
    pub error: Option<String>,
}

impl Check {
    fn unknown() -> Self {
        Self {
            status: "unknown",
            latency_ms: 0.0,
            error: None,
        }
    }
    pub fn is_up(&self) -> bool {
        self.status == "up"
    }
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub postgres: Check,
    pub redis: Check,
    pub shutting_down: bool,
}

impl Snapshot {
    pub fn ready(&self) -> bool {
        self.postgres.is_up() && !self.shutting_down
    }
}

/// Shared health state: the gRPC reporter plus the last probe results.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    snapshot: Arc<RwLock<Snapshot>>,
    /// What was last published, so Watch streams see changes only, not every probe.
    published: Arc<tokio::sync::Mutex<Option<(bool, bool)>>>,
    pub started: Instant,
}

impl Health {
    pub async fn new(reporter: HealthReporter) -> Self {
        reporter
            .set_service_status("", ServingStatus::Serving)
            .await;
        reporter
            .set_service_status(LIVENESS, ServingStatus::Serving)
            .await;
        for name in gated_names() {
            reporter
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        let snapshot = Snapshot {
            postgres: Check::unknown(),
            redis: Check::unknown(),
            shutting_down: false,
        };
        Self {
            reporter,
            snapshot: Arc::new(RwLock::new(snapshot)),
            published: Arc::default(),
            started: Instant::now(),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        self.snapshot
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// True while the last probe found Postgres unreachable (not before the first).
    pub fn postgres_down(&self) -> bool {
        self.snapshot
            .read()
            .map(|s| s.postgres.status == "down")
            .unwrap_or(false)
    }

    fn update(&self, f: impl FnOnce(&mut Snapshot)) -> Snapshot {
        let mut guard = self.snapshot.write().unwrap_or_else(|p| p.into_inner());
        f(&mut guard);
        guard.clone()
    }

    /// Probes once and publishes the result.
    pub async fn probe(&self, pool: &db::Pool, redis: &RedisPool) {
        let (postgres, redis) =
            tokio::join!(timed(db::ping(pool)), timed(crate::redis::ping(redis)));
        let before = self.snapshot();
        if before.postgres.is_up() != postgres.is_up() || before.postgres.status == "unknown" {
            match &postgres.error {
                None => tracing::info!(latency_ms = postgres.latency_ms, "postgres reachable"),
                Some(e) => {
                    tracing::warn!(error = %e, "postgres unreachable: readiness NOT_SERVING")
                }
            }
        }
        if before.redis.is_up() != redis.is_up() || before.redis.status == "unknown" {
            match &redis.error {
                None => tracing::info!(latency_ms = redis.latency_ms, "redis reachable"),
                Some(e) => {
                    tracing::warn!(redis = "down", error = %e, "redis unreachable (degraded; still ready)")
                }
            }
        }
        let after = self.update(|s| {
            s.postgres = postgres;
            s.redis = redis;
        });
        self.publish(&after).await;
    }

    async fn publish(&self, s: &Snapshot) {
        let mut published = self.published.lock().await;
        if *published == Some((s.ready(), s.shutting_down)) {
            return;
        }
        *published = Some((s.ready(), s.shutting_down));
        let status = if s.ready() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in gated_names() {
            self.reporter.set_service_status(name, status).await;
        }
        if s.shutting_down {
            self.reporter
                .set_service_status("", ServingStatus::NotServing)
                .await;
            self.reporter
                .set_service_status(LIVENESS, ServingStatus::NotServing)
                .await;
        }
    }

    /// First step of a graceful shutdown.
    pub async fn shutting_down(&self) {
        let s = self.update(|s| s.shutting_down = true);
        self.publish(&s).await;
    }

    /// Probes every `interval` until `stop` fires.
    pub fn spawn_prober(
        &self,
        pool: db::Pool,
        redis: RedisPool,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let health = self.clone();
        tokio::spawn(async move {
            loop {
                health.probe(&pool, &redis).await;
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        });
    }
}

async fn timed(probe: impl Future<Output = Result<(), String>>) -> Check {
    let start = Instant::now();
    let result = tokio::time::timeout(PROBE_TIMEOUT, probe)
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
    let latency_ms = (start.elapsed().as_secs_f64() * 1000.0 * 100.0).round() / 100.0;
    match result {
        Ok(()) => Check {
            status: "up",
            latency_ms,
            error: None,
        },
        Err(e) => Check {
            status: "down",
            latency_ms,
            error: Some(e),
        },
    }
}
