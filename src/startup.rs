//! Building and running the server: one listener serving gRPC (h2c), grpc-web
//! (HTTP/1.1 and h2), reflection, health and the HTTP routes.
use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use axum::Router;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::Routes;

use crate::{
    api::{assets::AssetsApi, jobs::JobsApi, projects::ProjectsApi},
    assets::{AssetLimits, Assets},
    auth::Verifier,
    config::Settings,
    db,
    domain::job::Backoff,
    edge::{self, calls::CallContext},
    engine::{Engine, EngineSettings, Hub, reaper},
    guard::{self, ClientIp, Guard, Limiter, connections},
    health::{Health, HealthApi},
    metrics::Metrics,
    proto::{self, server},
    quotas::Quotas,
    redis::{self, RedisPool},
    storage::Storage,
};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// How long start-up waits for Postgres before giving up.
const STARTUP_DB_WAIT: Duration = Duration::from_secs(30);

/// HTTP/2 flow control and framing (see `serve`).
const H2_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const H2_CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
const H2_MAX_FRAME: u32 = 256 * 1024;
const H2_SEND_BUFFER: usize = 2 * 1024 * 1024;

pub struct Application {
    listener: TcpListener,
    /// The admin listener (`/metrics`), apart from the public port; `None`: metrics off.
    admin: Option<TcpListener>,
    metrics: Metrics,
    router: Router,
    settings: Arc<Settings>,
    health: Health,
    db: db::Pool,
    redis: RedisPool,
    draining: CancellationToken,
    engine: Engine,
    assets: Assets,
    /// Stops the event hub, the reaper and the prober after the drain.
    background: CancellationToken,
}

impl Application {
    /// Creates the database if needed, migrates it, builds the pools and binds the port.
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        let verifier =
            Verifier::new(&settings.jwt).map_err(|e| StartError::Config(e.to_string()))?;
        prepare_database(settings.database_url.expose()).await?;

        // A statement may run a little past the call's deadline, never much longer.
        let db = db::pool(
            settings.database_url.expose(),
            settings.db_pool_size,
            settings.request_timeout + Duration::from_secs(5),
        );
        let redis = redis::pool(settings.redis_url.expose()).map_err(StartError::Config)?;
        let reporter = tonic_health::server::HealthReporter::new();
        let health_service = HealthApi::new(reporter.clone());
        let health = Health::new(reporter).await;
        health.probe(&db, &redis).await;

        let metrics = Metrics::new(known_paths()?);
        let draining = CancellationToken::new();
        let background = CancellationToken::new();
        let hub = Hub::start(
            settings.redis_url.expose(),
            &settings.redis_prefix,
            metrics.clone(),
            background.clone(),
        )
        .map_err(StartError::Config)?;
        let engine_settings = EngineSettings {
            backoff: Backoff {
                base: settings.retry_base,
                max: settings.retry_max,
            },
            poll_interval: settings.poll_interval,
            reap_interval: settings.reap_interval,
            watch_resync: settings.watch_resync,
            job_retention: settings.job_retention,
            event_retention: settings.event_retention,
            leases: crate::auth::LeaseBinding::new(&lease_key(&settings)),
            metrics: metrics.clone(),
            draining: draining.clone(),
        };
        let engine = Engine::new(
            db.clone(),
            redis.clone(),
            hub,
            &settings.redis_prefix,
            engine_settings,
        );
        let listener =
            TcpListener::bind(settings.addr)
                .await
                .map_err(|source| StartError::Bind {
                    addr: settings.addr,
                    source,
                })?;
        let bound = listener.local_addr().map_err(|source| StartError::Bind {
            addr: settings.addr,
            source,
        })?;
        let admin = match settings.admin_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind { addr, source })?,
            ),
            None => None,
        };
        let storage =
            Storage::open(&settings.storage).map_err(|e| StartError::Config(e.to_string()))?;
        let limits = AssetLimits {
            max_asset_bytes: settings.max_asset_bytes,
            project_quota_bytes: settings.project_quota_bytes,
            signed_url_max_ttl: settings.signed_url_max_ttl,
            direct_upload_grace: settings.direct_upload_grace,
        };
        let public_url = settings
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{bound}"));
        let quotas = Quotas::new(db.clone(), settings.limits.quotas);
        let assets = Assets::new(
            db.clone(),
            quotas.clone(),
            metrics.clone(),
            storage,
            limits,
            signing_key(&settings),
            &public_url,
        );
        let limiter = settings.limits.rates.map(|rates| {
            Limiter::new(
                rates,
                redis.clone(),
                &settings.redis_prefix,
                background.clone(),
            )
        });
        let connections = &settings.limits.connections;
        let guard = Guard::new(
            verifier,
            limiter,
            [
                connections.max_watch_streams,
                connections.max_uploads,
                connections.max_worker_sessions,
            ],
            health.clone(),
            settings.health_interval,
        );
        let storage_origin = assets.storage.presign_origin().await;
        let router = router(
            &settings,
            guard,
            metrics.clone(),
            Services {
                engine: engine.clone(),
                assets: assets.clone(),
                quotas,
                storage_origin,
            },
            health.clone(),
            health_service,
            draining.clone(),
        )?;
        Ok(Self {
            listener,
            admin,
            metrics,
            router,
            settings: Arc::new(settings),
            health,
            db,
            redis,
            draining,
            engine,
            assets,
            background,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.settings.addr)
    }

    /// Where `/metrics` is served, unless metrics are off.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        let admin = self.admin.as_ref()?;
        admin.local_addr().ok().or(self.settings.admin_addr)
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Serves until `shutdown` resolves, then drains: health goes NOT_SERVING, new
    /// calls are refused, open streams end with UNAVAILABLE, in-flight calls get the
    /// configured drain period.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let Self {
            listener,
            admin,
            metrics,
            router,
            settings,
            health,
            db,
            redis,
            draining,
            engine,
            assets,
            background,
        } = self;
        assets.spawn_collector(settings.reap_interval * 5, background.clone());
        assets.spawn_verifier(Duration::from_secs(1), background.clone());
        health.spawn_prober(db, redis, settings.health_interval, background.clone());
        let hub = engine.hub.clone();
        metrics.watch_dependencies(crate::metrics::Dependencies::new(
            engine.db.clone(),
            settings.db_pool_size,
            Box::new(move || hub.connected()),
        ));
        crate::metrics::admin::spawn_queue_figures(
            metrics.clone(),
            engine.db.clone(),
            settings.queue_figures_interval,
            background.clone(),
        );
        reaper::spawn(engine, background.clone());
        if let Some(admin) = admin {
            crate::metrics::admin::spawn_admin(admin, metrics, background.clone());
        }

        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http2()
            .timer(hyper_util::rt::TokioTimer::new())
            .max_concurrent_streams(settings.max_concurrent_streams)
            // Flow control sized for 1 MiB asset chunks: with hyper's 1 MiB windows and
            // 16 KiB frames a sender stalls on every chunk. The windows bound what one
            // connection can make the server buffer.
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_frame_size(H2_MAX_FRAME)
            .max_send_buf_size(H2_SEND_BUFFER)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        let limits = settings.limits.connections;
        builder
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(limits.handshake_timeout);

        let admission = connections::Admission::new(&limits);
        let connections = TaskTracker::new();
        tokio::pin!(shutdown);
        tracing::info!(
            addr = %listener.local_addr()?,
            max_connections = admission.max_total(),
            "serving gRPC, grpc-web and HTTP"
        );
        let serve = |stream: tokio::net::TcpStream, peer: std::net::SocketAddr| {
            let admitted = match admission.admit(peer.ip()) {
                Ok(admitted) => admitted,
                Err(why) => {
                    tracing::debug!(%peer, ?why, "connection refused");
                    return;
                }
            };
            let _ = stream.set_nodelay(true);
            connections.spawn(serve_connection(
                connections::Lingering::new(stream, connections.clone()),
                ClientIp(peer.ip()),
                router.clone(),
                builder.clone(),
                limits,
                draining.clone(),
                admitted,
            ));
        };
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => serve(stream, peer),
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                () = &mut shutdown => break,
            }
        }
        // Stop listening before any connection is told to go away: a client told so
        // reconnects at once, and must then be refused at connect (UNAVAILABLE), not
        // accepted by the kernel and reset when the listener closes under its request
        // (a broken pipe, which a client cannot tell from a lost answer). Connections
        // the kernel has already completed are taken and drained like the others.
        while let Some(Ok((stream, peer))) = futures::FutureExt::now_or_never(listener.accept()) {
            serve(stream, peer);
        }
        drop(listener);

        tracing::info!(drain_timeout = ?settings.drain_timeout, "shutting down: draining calls");
        health.shutting_down().await;
        draining.cancel();
        connections.close();
        tokio::select! {
            () = connections.wait() => tracing::info!("all connections closed"),
            () = tokio::time::sleep(settings.drain_timeout) => tracing::warn!("drain period over; closing remaining connections"),
        }
        background.cancel();
        Ok(())
    }
}

/// One connection from its first byte to its end: closed gracefully when the server
/// drains or the connection idles, dropped when its handshake is late.
async fn serve_connection(
    stream: connections::Lingering,
    client: ClientIp,
    router: Router,
    builder: auto::Builder<TokioExecutor>,
    limits: crate::config::ConnectionLimits,
    draining: CancellationToken,
    _admitted: connections::Admitted,
) {
    if !connections::first_bytes(&stream, limits.first_byte_timeout).await {
        return;
    }
    let open = edge::coalesce::OpenCalls::default();
    let seen = connections::BytesSeen::default();
    let stream = stream.counting(open.clone());
    let io = TokioIo::new(connections::Counted::new(stream, seen.clone()));
    let service = tower::ServiceBuilder::new()
        .layer(axum::Extension(client))
        .service(router);
    let service = TowerToHyperService::new(edge::coalesce::CountCalls::new(service, open.clone()));
    let conn = builder
        .serve_connection_with_upgrades(io, service)
        .into_owned();
    let conn = edge::coalesce::coalesced(conn, open.clone());
    tokio::pin!(conn);
    let closing = connections::close_when(&open, &seen, &limits, &draining);
    tokio::pin!(closing);
    let mut closed = false;
    loop {
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            why = &mut closing, if !closed => {
                closed = true;
                match why {
                    connections::Close::Handshake => return,
                    connections::Close::Drain | connections::Close::Idle => {
                        conn.as_mut().conn().graceful_shutdown();
                    }
                }
            }
        }
    }
}

/// Every RPC path served: the label values call metrics may take.
fn known_paths() -> Result<std::collections::HashMap<String, bool>, StartError> {
    let decode = |bytes: &[u8]| {
        <prost_types::FileDescriptorSet as prost::Message>::decode(bytes)
            .map_err(|e| StartError::Config(format!("descriptor set: {e}")))
    };
    let ours = decode(proto::FILE_DESCRIPTOR_SET)?;
    let health = decode(tonic_health::pb::FILE_DESCRIPTOR_SET)?;
    Ok(crate::metrics::known_paths(&[&ours, &health]))
}

/// Key of signed asset URLs: configured, else derived from the JWT secret (so every
/// instance sharing the secret agrees), else random for this process.
fn signing_key(settings: &Settings) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    if let Some(key) = &settings.url_signing_key {
        return key.expose().as_bytes().to_vec();
    }
    if let Some(secret) = &settings.jwt.secret {
        return Sha256::new()
            .chain_update(b"mediaplane signed urls\0")
            .chain_update(secret.expose())
            .finalize()
            .to_vec();
    }
    let mut key = vec![0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
    key
}

/// Key that binds leases to their subject. It must be the same on every instance (a
/// worker's writes may reach any of them): the signed-URL key when there is one, else
/// one derived from the database URL, which every instance shares.
fn lease_key(settings: &Settings) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    if settings.url_signing_key.is_some() || settings.jwt.secret.is_some() {
        return signing_key(settings);
    }
    tracing::warn!(
        "no MEDIAPLANE_URL_SIGNING_KEY or JWT secret: leases are bound with a key derived from DATABASE_URL; set MEDIAPLANE_URL_SIGNING_KEY"
    );
    Sha256::new()
        .chain_update(b"mediaplane leases\0")
        .chain_update(settings.database_url.expose())
        .finalize()
        .to_vec()
}

/// Creates and migrates the database, waiting a while for Postgres to come up.
async fn prepare_database(url: &str) -> Result<(), db::DbError> {
    let start = tokio::time::Instant::now();
    loop {
        let attempt = async {
            db::create_database_if_missing(url).await?;
            db::migrate(url).await
        };
        match attempt.await {
            Ok(applied) => {
                if applied > 0 {
                    tracing::info!(applied, "database migrations applied");
                }
                return Ok(());
            }
            Err(e @ db::DbError::Connect(_)) if start.elapsed() < STARTUP_DB_WAIT => {
                tracing::warn!(error = %e, "waiting for Postgres");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// What the API services are built on.
struct Services {
    engine: Engine,
    assets: Assets,
    quotas: Quotas,
    /// Where the store's signed URLs point (S3), for the studio page's CSP.
    storage_origin: Option<String>,
}

fn router(
    settings: &Settings,
    guard: Guard,
    metrics: Metrics,
    services: Services,
    health: Health,
    health_service: tonic_health::pb::health_server::HealthServer<HealthApi>,
    draining: CancellationToken,
) -> Result<Router, StartError> {
    let limit = settings.max_message_bytes;
    let Services {
        engine,
        assets,
        quotas,
        storage_origin,
    } = services;
    let projects = server::projects_service_server::ProjectsServiceServer::new(ProjectsApi::new(
        crate::projects::Projects::new(
            engine.db.clone(),
            quotas.clone(),
            engine.settings.metrics.clone(),
        ),
        limit,
    ))
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);
    let queues = server::queues_service_server::QueuesServiceServer::new(
        crate::api::queues::QueuesApi::new(engine.clone()),
    )
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);
    let jobs = server::jobs_service_server::JobsServiceServer::new(JobsApi::new(
        engine,
        quotas.clone(),
        limit,
        settings.request_timeout,
    ))
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);
    let assets_service = server::assets_service_server::AssetsServiceServer::new(AssetsApi::new(
        assets.clone(),
        limit,
    ))
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);

    // Decoded once here; tonic-reflection gets descriptor sets, not bytes.
    let decode = |bytes: &[u8]| {
        <prost_types::FileDescriptorSet as prost::Message>::decode(bytes)
            .map_err(|e| StartError::Config(format!("descriptor set: {e}")))
    };
    let ours = decode(proto::FILE_DESCRIPTOR_SET)?;
    let health_fds = decode(tonic_health::pb::FILE_DESCRIPTOR_SET)?;
    let reflection = |builder: tonic_reflection::server::Builder<'static>| {
        builder
            .register_file_descriptor_set(ours.clone())
            .register_file_descriptor_set(health_fds.clone())
    };
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|e| StartError::Config(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|e| StartError::Config(format!("reflection: {e}")))?;

    let grpc = Routes::new(projects)
        .add_service(jobs)
        .add_service(assets_service)
        .add_service(queues)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .prepare()
        .into_axum_router()
        // Authentication, rate limits and stream caps: inside tonic-web, so they see
        // every door's calls as gRPC (the edge calls this router too). Call metrics
        // count before the guard, so refused calls count too. One stack in one
        // `Router::layer`: each call of it boxes every route once more, a cost per call
        // that showed in `cargo bench --bench telemetry`.
        .layer(
            tower::ServiceBuilder::new()
                .option_layer(
                    settings
                        .admin_addr
                        .is_some()
                        .then(|| crate::metrics::CallMetricsLayer(metrics)),
                )
                .layer(axum::middleware::from_fn_with_state(
                    guard,
                    guard::middleware,
                )),
        );
    // grpc-web only on the gRPC routes: on the whole router it would answer 400 to plain HTTP.
    let grpc = grpc.layer(tonic_web::GrpcWebLayer::new());

    // REST/JSON: health, signed asset URLs, then every google.api.http binding,
    // transcoded onto the same services (through the same authentication).
    let transcoder = edge::transcode::Edge::new(grpc.clone(), settings.max_message_bytes, true)
        .map_err(StartError::Config)?
        .with_download_redirects(storage_origin.is_some());
    let http = edge::health::router(health)
        .merge(edge::signed::router(assets))
        .merge(edge::studio::router(storage_origin.as_deref()))
        .fallback_service(transcoder.router());
    // Both routers have fallbacks (gRPC answers UNIMPLEMENTED, HTTP a JSON 404), so
    // dispatch by content type rather than merging them.
    let dispatch = tower::service_fn(move |request: axum::extract::Request| {
        let is_grpc = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let target = if is_grpc { grpc.clone() } else { http.clone() };
        tower::ServiceExt::oneshot(target, request)
    });
    let ctx = CallContext {
        request_timeout: settings.request_timeout,
        draining,
        max_message_bytes: settings.max_message_bytes,
    };
    let mut app =
        Router::new()
            .fallback_service(dispatch)
            .layer(axum::middleware::from_fn_with_state(
                ctx,
                edge::calls::middleware,
            ));
    if let Some(cors) = edge::cors::layer(settings) {
        app = app.layer(cors);
    }
    Ok(app)
}
