//! Prometheus metrics (OpenMetrics text), served on the admin listener only
//! (`MEDIAPLANE_ADMIN_ADDR`, `GET /metrics`), never on the public port.
//!
//! prometheus-client rather than the `metrics` facade: each server owns its registry,
//! so two instances in one process (the tests run many) never mix their figures.
//!
//! Label values are bounded: a method is named only if the server has it (every
//! other path is `unknown`), so no client can grow the registry.
//!
//! Long on purpose: every metric's name, help text and type is declared in one place
//! (`Metrics::new`), the list docs/operations.md mirrors (a test compares them), with
//! the few methods that record each; splitting the list would scatter the one thing an
//! operator needs read together.
pub mod admin;
mod calls;
mod process;

pub use calls::{CallMetricsLayer, CallTimer, known_paths};
use process::process_figures;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use chrono::Utc;
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

/// The door a call came in by.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    GrpcWeb,
    Rest,
    /// Plain HTTP routes that are no RPC (health, signed URLs, OpenAPI).
    Http,
    /// A request on a WorkerSession stream, counted as a call of the method it names.
    WorkerSession,
}

impl Transport {
    const COUNT: usize = 5;
}

impl EncodeLabelValue for Transport {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            Transport::Grpc => "grpc",
            Transport::GrpcWeb => "grpc-web",
            Transport::Rest => "rest",
            Transport::Http => "http",
            Transport::WorkerSession => "worker-session",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub grpc_service: &'static str,
    pub grpc_method: &'static str,
    pub transport: Transport,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandledLabels {
    pub grpc_service: &'static str,
    pub grpc_method: &'static str,
    pub transport: Transport,
    pub grpc_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    pub transport: Transport,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// The pools and the Redis subscriber, read at each scrape; counters advance by what
/// the pool's own statistics moved since the last one.
pub struct Dependencies {
    pub db: crate::db::Pool,
    pub db_size: u32,
    pub redis_connected: Box<dyn Fn() -> bool + Send + Sync>,
    seen: (u64, u64, u64, f64, u64),
}

impl Dependencies {
    pub fn new(
        db: crate::db::Pool,
        db_size: u32,
        redis_connected: Box<dyn Fn() -> bool + Send + Sync>,
    ) -> Self {
        Self {
            db,
            db_size,
            redis_connected,
            seen: (0, 0, 0, 0.0, 0),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// What happened to a job, for `mediaplane_job_events_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum JobEvent {
    Created,
    Leased,
    Succeeded,
    Failed,
    Cancelled,
    /// Back to QUEUED for another attempt (a failure or an expired lease that
    /// retries, RetryJob).
    Retried,
    LeaseExpired,
}

impl EncodeLabelValue for JobEvent {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            JobEvent::Created => "created",
            JobEvent::Leased => "leased",
            JobEvent::Succeeded => "succeeded",
            JobEvent::Failed => "failed",
            JobEvent::Cancelled => "cancelled",
            JobEvent::Retried => "retried",
            JobEvent::LeaseExpired => "lease_expired",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobEventLabels {
    pub kind: String,
    pub event: JobEvent,
}

/// What one queue holds, read from Postgres (every instance reports the same).
pub use crate::domain::queue::QueueFigures;

fn handling_histogram() -> Histogram {
    // 0.5 ms to ~33 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

struct Inner {
    registry: Registry,
    started: Family<CallLabels, Counter>,
    handled: Family<HandledLabels, Counter>,
    handling: Family<CallLabels, Histogram, fn() -> Histogram>,
    in_flight: Family<TransportLabels, Gauge>,
    job_events: Family<JobEventLabels, Counter>,
    queued: Family<KindLabels, Gauge>,
    waiting: Family<KindLabels, Gauge>,
    running: Family<KindLabels, Gauge>,
    oldest_age: Family<KindLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// The last queue figures read, with the time they were read.
    queues: Mutex<(Vec<QueueFigures>, Option<SystemTime>)>,
    queue_refresh_errors: Counter,
    /// What dependency figures are read from at scrape time.
    dependencies: Mutex<Option<Dependencies>>,
    db_connections: Gauge,
    db_idle: Gauge,
    db_max: Gauge,
    db_acquires: Family<OutcomeLabels, Counter>,
    db_wait: Counter<f64, std::sync::atomic::AtomicU64>,
    redis_connected: Gauge,
    redis_reconnects: Counter,
    group_failures: Counter,
    group_size: Family<LaneLabels, Histogram, fn() -> Histogram>,
    job_wait: Family<KindLabels, Histogram, fn() -> Histogram>,
    job_run: Family<KindLabels, Histogram, fn() -> Histogram>,
    live: Live,
    streams_open: Family<CallLabels, Gauge>,
    messages_sent: Family<CallLabels, Counter>,
    asset_bytes: Family<DirectionLabels, Counter>,
    uploads: Gauge,
    resident: Gauge,
    cpu: Gauge<f64, std::sync::atomic::AtomicU64>,
    open_fds: Gauge,
    /// Every method this server serves, then one for every other path (`unknown`).
    paths: Vec<KnownPath>,
    /// `/package.Service/Method` -> its index in `paths`.
    by_path: HashMap<String, usize>,
    /// `in_flight`'s series by [`Transport`], resolved at first use.
    in_flight_by: [std::sync::OnceLock<Gauge>; Transport::COUNT],
}

/// A path's service and method, whether it streams, and its call series per door. The
/// names are leaked once at start (the descriptor sets' few dozen methods), so a call's
/// labels are built and hashed without allocating.
struct KnownPath {
    service: &'static str,
    method: &'static str,
    streaming: bool,
    series: [calls::CallSeries; Transport::COUNT],
}

/// Live progress: what watchers are sent.
struct Live {
    watch_streams: Gauge,
    published: Counter,
    delivered: Counter,
    superseded: Counter,
    lag: Histogram,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabels {
    pub lane: &'static str,
}

fn job_time_histogram() -> Histogram {
    // 10 ms to ~1.5 h.
    Histogram::new(exponential_buckets(0.01, 2.0, 20))
}

fn group_size_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

impl Metrics {
    /// `known`: every `/package.Service/Method` path served.
    pub fn new(known: HashMap<String, bool>) -> Self {
        let mut registry = Registry::default();
        let started = Family::<CallLabels, Counter>::default();
        registry.register(
            "grpc_server_started",
            "Calls started, by service, method and transport (REST and grpc-web calls by the RPC they reach)",
            started.clone(),
        );
        let handled = Family::<HandledLabels, Counter>::default();
        registry.register(
            "grpc_server_handled",
            "Calls finished, by service, method, transport and gRPC code (CANCELLED when the client went away)",
            handled.clone(),
        );
        let handling = Family::<CallLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            handling_histogram,
        );
        registry.register_with_unit(
            "grpc_server_handling",
            "Time from a call's start to the end of its response (streams: until they end)",
            Unit::Seconds,
            handling.clone(),
        );
        let in_flight = Family::<TransportLabels, Gauge>::default();
        registry.register(
            "mediaplane_calls_in_flight",
            "Calls started and not finished, open streams included",
            in_flight.clone(),
        );
        let job_events = Family::<JobEventLabels, Counter>::default();
        registry.register(
            "mediaplane_job_events",
            "Jobs created, leased, succeeded, failed, cancelled, retried and whose lease expired, by kind, as committed by this instance",
            job_events.clone(),
        );
        let queued = Family::<KindLabels, Gauge>::default();
        registry.register(
            "mediaplane_jobs_queued",
            "Jobs queued, by kind (from Postgres; the same on every instance)",
            queued.clone(),
        );
        let waiting = Family::<KindLabels, Gauge>::default();
        registry.register(
            "mediaplane_jobs_waiting",
            "Jobs waiting for their dependencies, by kind (from Postgres)",
            waiting.clone(),
        );
        let running = Family::<KindLabels, Gauge>::default();
        registry.register(
            "mediaplane_jobs_running",
            "Jobs running (leased), by kind (from Postgres)",
            running.clone(),
        );
        let oldest_age = Family::<KindLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register_with_unit(
            "mediaplane_jobs_oldest_queued_age",
            "How long the longest-waiting ready job of a kind has waited (0 for an empty queue)",
            Unit::Seconds,
            oldest_age.clone(),
        );
        let queue_refresh_errors = Counter::default();
        registry.register(
            "mediaplane_queue_figures_errors",
            "Failed reads of the queue figures from Postgres (the last figures stay served)",
            queue_refresh_errors.clone(),
        );
        let db_connections = Gauge::default();
        registry.register(
            "mediaplane_db_pool_connections",
            "Postgres connections open in this instance's pool (in use = this - idle)",
            db_connections.clone(),
        );
        let db_idle = Gauge::default();
        registry.register(
            "mediaplane_db_pool_idle_connections",
            "Postgres connections open and idle",
            db_idle.clone(),
        );
        let db_max = Gauge::default();
        registry.register(
            "mediaplane_db_pool_max_connections",
            "The pool's size (MEDIAPLANE_DB_POOL_SIZE)",
            db_max.clone(),
        );
        let db_acquires = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "mediaplane_db_pool_acquires",
            "Connections taken from the pool: `direct`, `waited` (a waiter), `timed_out`",
            db_acquires.clone(),
        );
        let db_wait = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register_with_unit(
            "mediaplane_db_pool_wait",
            "Time calls spent waiting for a Postgres connection",
            Unit::Seconds,
            db_wait.clone(),
        );
        let redis_connected = Gauge::default();
        registry.register(
            "mediaplane_redis_connected",
            "1 while the Redis subscriber (job events, wake-ups) is connected",
            redis_connected.clone(),
        );
        let group_failures = Counter::default();
        registry.register(
            "mediaplane_group_commit_failures",
            "Group commits whose statement failed as a whole and were split to find the failing call (process-wide)",
            group_failures.clone(),
        );
        let asset_bytes = Family::<DirectionLabels, Counter>::default();
        registry.register_with_unit(
            "mediaplane_asset",
            "Asset bytes through this instance: `uploaded` (received, stored or not) and `downloaded` (sent)",
            Unit::Bytes,
            asset_bytes.clone(),
        );
        // Known label values start at zero, so the series exist before the first byte.
        for direction in ["uploaded", "downloaded"] {
            asset_bytes
                .get_or_create(&DirectionLabels { direction })
                .inc_by(0);
        }
        let uploads = Gauge::default();
        registry.register(
            "mediaplane_uploads_in_progress",
            "Asset uploads receiving bytes on this instance",
            uploads.clone(),
        );
        let resident = Gauge::default();
        registry.register_with_unit(
            "process_resident_memory",
            "Resident memory of the server process",
            Unit::Bytes,
            resident.clone(),
        );
        let cpu = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register_with_unit(
            "process_cpu",
            "CPU time (user and system) the server process has used",
            Unit::Seconds,
            cpu.clone(),
        );
        let open_fds = Gauge::default();
        registry.register(
            "process_open_fds",
            "File descriptors the server process holds open",
            open_fds.clone(),
        );
        let redis_reconnects = Counter::default();
        registry.register(
            "mediaplane_redis_reconnects",
            "Times the job event subscription to Redis was re-established after a loss",
            redis_reconnects.clone(),
        );
        let group_size = Family::<LaneLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            group_size_histogram,
        );
        registry.register(
            "mediaplane_group_commit_size",
            "Calls committed together in one transaction, by lane (create: CreateJob; write: worker reports and completions; acquire: AcquireJobs)",
            group_size.clone(),
        );
        let job_wait = Family::<KindLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            job_time_histogram,
        );
        registry.register_with_unit(
            "mediaplane_job_wait",
            "Time from a job being ready (its schedule time) to its lease, by kind",
            Unit::Seconds,
            job_wait.clone(),
        );
        let job_run = Family::<KindLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            job_time_histogram,
        );
        registry.register_with_unit(
            "mediaplane_job_run",
            "Time from a job's first lease to its success or failure, by kind",
            Unit::Seconds,
            job_run.clone(),
        );
        let live = Live {
            watch_streams: Gauge::default(),
            published: Counter::default(),
            delivered: Counter::default(),
            superseded: Counter::default(),
            lag: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
        };
        registry.register(
            "mediaplane_watch_streams_open",
            "WatchJob and WatchJobs streams open on this instance, on every door",
            live.watch_streams.clone(),
        );
        registry.register(
            "mediaplane_job_events_published",
            "Job events this instance handed to Redis for every instance's watchers",
            live.published.clone(),
        );
        registry.register(
            "mediaplane_job_events_delivered",
            "Job events sent to watchers on this instance (one per watcher)",
            live.delivered.clone(),
        );
        registry.register(
            "mediaplane_job_events_superseded",
            "Job events a slow watcher was not sent because a newer snapshot replaced them",
            live.superseded.clone(),
        );
        registry.register_with_unit(
            "mediaplane_job_event_lag",
            "Time from a change's commit to its event's receipt from Redis on this instance",
            Unit::Seconds,
            live.lag.clone(),
        );
        let streams_open = Family::<CallLabels, Gauge>::default();
        registry.register(
            "grpc_server_streams_open",
            "Streaming calls open, by service, method and transport",
            streams_open.clone(),
        );
        let messages_sent = Family::<CallLabels, Counter>::default();
        registry.register(
            "grpc_server_msg_sent",
            "Messages sent on streaming calls, by service, method and transport",
            messages_sent.clone(),
        );
        let (mut paths, mut by_path) = (Vec::new(), HashMap::new());
        for (path, streaming) in known {
            let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/'))
            else {
                continue;
            };
            let known = KnownPath {
                service: leak(service),
                method: leak(method),
                streaming,
                series: Default::default(),
            };
            by_path.insert(path, paths.len());
            paths.push(known);
        }
        paths.push(KnownPath {
            service: "",
            method: "unknown",
            streaming: false,
            series: Default::default(),
        });
        Self {
            inner: Arc::new(Inner {
                registry,
                started,
                handled,
                handling,
                in_flight,
                job_events,
                queued,
                waiting,
                running,
                oldest_age,
                queues: Mutex::new((Vec::new(), None)),
                queue_refresh_errors,
                dependencies: Mutex::new(None),
                db_connections,
                db_idle,
                db_max,
                db_acquires,
                db_wait,
                redis_connected,
                redis_reconnects,
                group_failures,
                group_size,
                job_wait,
                job_run,
                live,
                streams_open,
                messages_sent,
                asset_bytes,
                uploads,
                resident,
                cpu,
                open_fds,
                paths,
                by_path,
                in_flight_by: Default::default(),
            }),
        }
    }

    /// Reads `dependencies` at every scrape from now on.
    pub fn watch_dependencies(&self, dependencies: Dependencies) {
        *self
            .inner
            .dependencies
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(dependencies);
    }

    fn sample_dependencies(&self) {
        let inner = &self.inner;
        let mut guard = inner.dependencies.lock().unwrap_or_else(|p| p.into_inner());
        let failures = crate::batch::group_failures();
        let Some(d) = guard.as_mut() else {
            return;
        };
        let state = d.db.state();
        inner.db_connections.set(i64::from(state.connections));
        inner.db_idle.set(i64::from(state.idle_connections));
        inner.db_max.set(i64::from(d.db_size));
        let st = state.statistics;
        let now = (
            st.get_direct,
            st.get_waited,
            st.get_timed_out,
            st.get_wait_time.as_secs_f64(),
            failures,
        );
        let (direct, waited, timed_out, wait, groups) = d.seen;
        let acquires = |outcome: &'static str, by: u64| {
            inner
                .db_acquires
                .get_or_create(&OutcomeLabels { outcome })
                .inc_by(by);
        };
        acquires("direct", now.0.saturating_sub(direct));
        acquires("waited", now.1.saturating_sub(waited));
        acquires("timed_out", now.2.saturating_sub(timed_out));
        inner.db_wait.inc_by((now.3 - wait).max(0.0));
        inner.group_failures.inc_by(now.4.saturating_sub(groups));
        d.seen = now;
        inner.redis_connected.set(i64::from((d.redis_connected)()));
    }

    /// Bytes of asset content received (`uploaded`) or sent (`downloaded`).
    pub fn asset_bytes(&self, direction: &'static str, bytes: u64) {
        self.inner
            .asset_bytes
            .get_or_create(&DirectionLabels { direction })
            .inc_by(bytes);
    }

    /// An upload in progress until the value is dropped.
    pub fn upload_started(&self) -> UploadInProgress {
        self.inner.uploads.inc();
        UploadInProgress(self.clone())
    }

    /// Counts a committed change of a job of `kind`.
    pub fn job_event(&self, event: JobEvent, kind: &str) {
        self.inner
            .job_events
            .get_or_create(&JobEventLabels {
                kind: kind.to_owned(),
                event,
            })
            .inc();
    }

    /// A job of `kind` waited `seconds` from ready to leased.
    pub fn job_waited(&self, kind: &str, seconds: f64) {
        self.inner
            .job_wait
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .observe(seconds);
    }

    /// A job of `kind` ran `seconds` from its first lease to its end.
    pub fn job_ran(&self, kind: &str, seconds: f64) {
        self.inner
            .job_run
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .observe(seconds);
    }

    /// A group of `calls` committed together in `lane`.
    pub fn group_committed(&self, lane: &'static str, calls: usize) {
        self.inner
            .group_size
            .get_or_create(&LaneLabels { lane })
            .observe(calls as f64);
    }

    pub fn redis_reconnected(&self) {
        self.inner.redis_reconnects.inc();
    }

    /// A watch stream open until the value is dropped.
    pub fn watch_opened(&self) -> WatchOpen {
        self.inner.live.watch_streams.inc();
        WatchOpen(self.clone())
    }

    pub fn events_published(&self, n: usize) {
        self.inner.live.published.inc_by(n as u64);
    }

    pub fn event_delivered(&self) {
        self.inner.live.delivered.inc();
    }

    pub fn events_superseded(&self, n: u64) {
        self.inner.live.superseded.inc_by(n);
    }

    /// An event committed at `committed` was received from Redis now.
    pub fn event_received(&self, committed: SystemTime) {
        if let Ok(lag) = SystemTime::now().duration_since(committed) {
            self.inner.live.lag.observe(lag.as_secs_f64());
        }
    }

    /// The latest queue figures read from Postgres.
    pub fn set_queues(&self, figures: Vec<QueueFigures>) {
        let inner = &self.inner;
        let mut queues = inner.queues.lock().unwrap_or_else(|p| p.into_inner());
        for gone in queues
            .0
            .iter()
            .filter(|q| !figures.iter().any(|f| f.kind == q.kind))
        {
            let labels = KindLabels {
                kind: gone.kind.clone(),
            };
            inner.queued.get_or_create(&labels).set(0);
            inner.waiting.get_or_create(&labels).set(0);
            inner.running.get_or_create(&labels).set(0);
            inner.oldest_age.get_or_create(&labels).set(0.0);
        }
        for f in &figures {
            let labels = KindLabels {
                kind: f.kind.clone(),
            };
            inner.queued.get_or_create(&labels).set(f.queued);
            inner.waiting.get_or_create(&labels).set(f.waiting);
            inner.running.get_or_create(&labels).set(f.running);
        }
        *queues = (figures, Some(SystemTime::now()));
    }

    pub fn queue_refresh_failed(&self) {
        self.inner.queue_refresh_errors.inc();
    }

    /// The text a scrape gets: queue ages and process figures as of now.
    pub fn render(&self) -> String {
        let inner = &self.inner;
        {
            let queues = inner.queues.lock().unwrap_or_else(|p| p.into_inner());
            let now = Utc::now();
            for q in &queues.0 {
                // Computed at scrape time from the stored ready time, so the age keeps
                // growing between reads while a queue is stuck.
                let age = q
                    .oldest_ready
                    .map_or(0.0, |t| (now - t).num_milliseconds().max(0) as f64 / 1000.0);
                inner
                    .oldest_age
                    .get_or_create(&KindLabels {
                        kind: q.kind.clone(),
                    })
                    .set(age);
            }
        }
        self.sample_dependencies();
        let process = process_figures();
        inner.resident.set(process.resident_bytes);
        inner.cpu.set(process.cpu_seconds);
        inner.open_fds.set(process.open_fds);
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &inner.registry).is_err() {
            tracing::error!("metrics could not be rendered");
        }
        out
    }
}

pub struct WatchOpen(pub Metrics);

impl Drop for WatchOpen {
    fn drop(&mut self) {
        self.0.inner.live.watch_streams.dec();
    }
}

pub struct UploadInProgress(Metrics);

impl Drop for UploadInProgress {
    fn drop(&mut self) {
        self.0.inner.uploads.dec();
    }
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_owned().into_boxed_str())
}
