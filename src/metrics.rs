//! Prometheus metrics (OpenMetrics text), served on the admin listener only
//! (`MEDIAPLANE_ADMIN_ADDR`, `GET /metrics`), never on the public port.
//!
//! prometheus-client rather than the `metrics` facade: each server owns its registry,
//! so two instances in one process (the tests run many) never mix their figures.
//!
//! Label values are bounded: a method is named only if the server has it (every
//! other path is `unknown`), so no client can grow the registry.
use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use chrono::{DateTime, Utc};
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
}

impl EncodeLabelValue for Transport {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            Transport::Grpc => "grpc",
            Transport::GrpcWeb => "grpc-web",
            Transport::Rest => "rest",
            Transport::Http => "http",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub grpc_service: String,
    pub grpc_method: String,
    pub transport: Transport,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandledLabels {
    pub grpc_service: String,
    pub grpc_method: String,
    pub transport: Transport,
    pub grpc_code: String,
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
#[derive(Debug, Clone, PartialEq)]
pub struct QueueFigures {
    pub kind: String,
    pub queued: i64,
    pub running: i64,
    /// When the longest-waiting queued job became ready (its schedule time).
    pub oldest_ready: Option<DateTime<Utc>>,
}

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
    group_failures: Counter,
    asset_bytes: Family<DirectionLabels, Counter>,
    uploads: Gauge,
    resident: Gauge,
    cpu: Gauge<f64, std::sync::atomic::AtomicU64>,
    open_fds: Gauge,
    /// `/package.Service/Method` paths this server serves.
    known: HashSet<String>,
}

impl Metrics {
    /// `known`: every `/package.Service/Method` path served.
    pub fn new(known: HashSet<String>) -> Self {
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
        Self {
            inner: Arc::new(Inner {
                registry,
                started,
                handled,
                handling,
                in_flight,
                job_events,
                queued,
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
                group_failures,
                asset_bytes,
                uploads,
                resident,
                cpu,
                open_fds,
                known,
            }),
        }
    }

    /// The labels of a call to `path` (`/package.Service/Method`); unknown paths share one.
    pub fn call_labels(&self, path: &str, transport: Transport) -> CallLabels {
        let known = self.inner.known.contains(path);
        let (service, method) = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .filter(|_| known)
            .unwrap_or(("", "unknown"));
        CallLabels {
            grpc_service: service.to_owned(),
            grpc_method: method.to_owned(),
            transport,
        }
    }

    /// A call starts; the returned value records its end when told or dropped.
    pub fn start(&self, labels: CallLabels) -> CallTimer {
        self.inner.started.get_or_create(&labels).inc();
        self.inner
            .in_flight
            .get_or_create(&TransportLabels {
                transport: labels.transport,
            })
            .inc();
        CallTimer {
            metrics: self.clone(),
            labels: Some(labels),
            start: std::time::Instant::now(),
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
            inner.running.get_or_create(&labels).set(0);
            inner.oldest_age.get_or_create(&labels).set(0.0);
        }
        for f in &figures {
            let labels = KindLabels {
                kind: f.kind.clone(),
            };
            inner.queued.get_or_create(&labels).set(f.queued);
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

/// One call's end, recorded once: when `finish` is called, else when dropped (the
/// client went away first: CANCELLED).
pub struct CallTimer {
    metrics: Metrics,
    labels: Option<CallLabels>,
    start: std::time::Instant,
}

impl CallTimer {
    pub fn finish(&mut self, code: &str) {
        let Some(labels) = self.labels.take() else {
            return;
        };
        let inner = &self.metrics.inner;
        inner
            .handling
            .get_or_create(&labels)
            .observe(self.start.elapsed().as_secs_f64());
        inner
            .in_flight
            .get_or_create(&TransportLabels {
                transport: labels.transport,
            })
            .dec();
        inner
            .handled
            .get_or_create(&HandledLabels {
                grpc_service: labels.grpc_service,
                grpc_method: labels.grpc_method,
                transport: labels.transport,
                grpc_code: code.to_owned(),
            })
            .inc();
    }
}

impl Drop for CallTimer {
    fn drop(&mut self) {
        self.finish("CANCELLED");
    }
}

pub struct UploadInProgress(Metrics);

impl Drop for UploadInProgress {
    fn drop(&mut self) {
        self.0.inner.uploads.dec();
    }
}

struct ProcessFigures {
    resident_bytes: i64,
    cpu_seconds: f64,
    open_fds: i64,
}

/// From /proc (Linux); zeros elsewhere.
fn process_figures() -> ProcessFigures {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let resident_kib: i64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as i64);
    ProcessFigures {
        resident_bytes: resident_kib * 1024,
        cpu_seconds: (ticks(11) + ticks(12)) / hz,
        open_fds,
    }
}

/// Every `/package.Service/Method` in the descriptor sets.
pub fn known_paths(sets: &[&prost_types::FileDescriptorSet]) -> HashSet<String> {
    let mut out = HashSet::new();
    for set in sets {
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    out.insert(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
    }
    out
}

/// Counts every call that reaches the gRPC services, whatever its door: it sits inside
/// tonic-web (grpc-web is gRPC by then) and the edge's REST calls come through it too;
/// the door is the [`Transport`] the per-call middleware or the edge put on the request.
pub async fn record_calls(
    axum::extract::State(metrics): axum::extract::State<Metrics>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let transport = request
        .extensions()
        .get::<Transport>()
        .copied()
        .unwrap_or(Transport::Grpc);
    let mut timer = metrics.start(metrics.call_labels(request.uri().path(), transport));
    let response = next.run(request).await;
    if let Some(code) = grpc_code(response.headers()) {
        timer.finish(code);
        return response;
    }
    response.map(|body| axum::body::Body::new(TimedBody { inner: body, timer }))
}

fn grpc_code(headers: &http::HeaderMap) -> Option<&'static str> {
    let code: i32 = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    Some(crate::edge::calls::code_name(tonic::Code::from_i32(code)))
}

pin_project_lite::pin_project! {
    /// A response body that records its call's code from the trailers.
    struct TimedBody {
        #[pin]
        inner: axum::body::Body,
        timer: CallTimer,
    }
}

impl http_body::Body for TimedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(code) = f.trailers_ref().and_then(grpc_code) {
                    this.timer.finish(code);
                }
            }
            // A body that ended without trailers is not a complete gRPC answer.
            None => this.timer.finish("UNKNOWN"),
            Some(Err(_)) => {}
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
