//! What instrumentation costs, and a scrape over a deep queue.
//!
//! 1. End-to-end jobs/s (64 creates in flight, 16 workers completing each job) and
//!    GetProject req/s (64 callers), with metrics and tracing **on** (`/metrics`
//!    scraped every second, every span exported over OTLP/gRPC to a receiver in this
//!    process, which counts spans without decoding them) against **off**
//!    (`MEDIAPLANE_ADMIN_ADDR=off`, no OTLP endpoint), two release servers loaded at
//!    once in each of 15 rounds of one run, with each server's CPU time per operation
//!    (`/proc/<pid>/stat`, read around each run). Trace context is
//!    propagated in both: it is behaviour (workers get their job's trace), not
//!    instrumentation. Target: on at most 3% below off.
//! 2. A scrape with 100 job kinds and 1,000,000 queued jobs: its time (target under
//!    100 ms), the time of the refresh statement behind it (read in the background,
//!    never by a scrape), and scrapes while a lock blocks that statement.
//!
//! `cargo bench --bench telemetry`; `MP_BENCH_ONLY=cost` or `=scrape` runs one part;
//! `MP_BENCH_ON=metrics` or `=traces` turns on only that half in the first, `=none`
//! neither (two identical servers: the bench's own resolution). `MP_BENCH_TOGETHER=0`
//! loads the two servers one after the other in each round instead of at once.
mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Bearer, channel, cpu_secs, start_server, token};
use mediaplane::proto::v1::{
    self as pb, jobs_service_client::JobsServiceClient,
    projects_service_client::ProjectsServiceClient,
};
use tonic::{
    Request, Response, Status, service::interceptor::InterceptedService, transport::Channel,
};

type Jobs = JobsServiceClient<InterceptedService<Channel, Bearer>>;
type Projects = ProjectsServiceClient<InterceptedService<Channel, Bearer>>;

// 3 s runs were tried: the on server fell further behind (85% on GetProject), its span
// batches exported after one run reaching into the next.
const ROUNDS: usize = 15;

/// `MP_BENCH_ROUNDS` overrides [`ROUNDS`]: one round's ratio spreads a few percent
/// even with both servers loaded at once (and ±10-20% one after the other), so the
/// median needs many rounds.
fn rounds() -> usize {
    std::env::var("MP_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(ROUNDS)
}
const RUN: Duration = Duration::from_secs(5);

// The receiver skims each OTLP export request: it walks down to the spans and counts
// them without decoding one. In production the collector's decoding happens on
// another machine; on this 2-core one it would be charged to the server's "on" runs.
#[derive(Clone, PartialEq, prost::Message)]
struct SkimExport {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    resource_spans: Vec<bytes::Bytes>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct SkimResourceSpans {
    #[prost(bytes = "bytes", repeated, tag = "2")]
    scope_spans: Vec<bytes::Bytes>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct SkimScopeSpans {
    #[prost(bytes = "bytes", repeated, tag = "2")]
    spans: Vec<bytes::Bytes>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct ExportResponse {}

/// An OTLP/gRPC trace receiver that counts the spans it is sent.
#[derive(Clone, Default)]
struct Sink(Arc<AtomicU64>);

impl tonic::server::NamedService for Sink {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

impl tonic::server::UnaryService<SkimExport> for Sink {
    type Response = ExportResponse;
    type Future = std::future::Ready<Result<Response<ExportResponse>, Status>>;

    fn call(&mut self, request: Request<SkimExport>) -> Self::Future {
        use prost::Message;
        let mut spans = 0;
        for r in &request.get_ref().resource_spans {
            let Ok(r) = SkimResourceSpans::decode(r.clone()) else {
                continue;
            };
            for s in r.scope_spans {
                spans += SkimScopeSpans::decode(s).map_or(0, |s| s.spans.len());
            }
        }
        self.0.fetch_add(spans as u64, Ordering::Relaxed);
        std::future::ready(Ok(Response::new(ExportResponse {})))
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Sink {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let sink = self.clone();
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<ExportResponse, SkimExport>::default();
            Ok(tonic::server::Grpc::new(codec).unary(sink, request).await)
        })
    }
}

/// Each round's rates and server CPU per operation, on and off.
#[derive(Default)]
struct Figures {
    rate_on: Vec<f64>,
    rate_off: Vec<f64>,
    rate_ratio: Vec<f64>,
    cpu_on: Vec<f64>,
    cpu_off: Vec<f64>,
    cpu_ratio: Vec<f64>,
}

impl Figures {
    fn push(&mut self, (rate_on, cpu_on): (f64, f64), (rate_off, cpu_off): (f64, f64)) {
        self.rate_on.push(rate_on);
        self.rate_off.push(rate_off);
        self.rate_ratio.push(rate_on / rate_off);
        self.cpu_on.push(cpu_on);
        self.cpu_off.push(cpu_off);
        self.cpu_ratio.push(cpu_on / cpu_off);
    }

    fn print(self, what: &str) {
        println!(
            "{what:<32} {:>9.0} {:>9.0} {:>7.1}% {:>10.1} {:>10.1} {:>7.1}%",
            median(self.rate_on),
            median(self.rate_off),
            100.0 * median(self.rate_ratio.clone()),
            median(self.cpu_on),
            median(self.cpu_off),
            100.0 * median(self.cpu_ratio.clone()),
        );
        // The spread behind the median: what this machine's drift does to one round.
        let each = |v: &[f64]| {
            v.iter()
                .map(|r| format!("{:.0}", 100.0 * r))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "  rounds' on/off %: rate {}; CPU {}",
            each(&self.rate_ratio),
            each(&self.cpu_ratio)
        );
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn dur(secs: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: secs,
        nanos: 0,
    })
}

/// Jobs per second end to end: 64 producers create for `RUN`, 16 workers lease and
/// complete; the rate counts jobs completed, over the time until the last one was.
async fn jobs_run(channels: &[Channel], project: &str, kind: &str) -> (f64, f64) {
    let creating = Instant::now() + RUN;
    let created = Arc::new(AtomicUsize::new(0));
    let completed = Arc::new(AtomicUsize::new(0));
    let producing_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let start = Instant::now();
    let mut producers = tokio::task::JoinSet::new();
    for i in 0..64 {
        let mut c: Jobs = JobsServiceClient::with_interceptor(
            channels[i % channels.len()].clone(),
            Bearer(token("bench", &[])),
        );
        let (project, kind, created) = (project.to_owned(), kind.to_owned(), created.clone());
        producers.spawn(async move {
            while Instant::now() < creating {
                c.create_job(pb::CreateJobRequest {
                    parent: project.clone(),
                    job: Some(pb::Job {
                        kind: kind.clone(),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                    key: String::new(),
                })
                .await
                .unwrap();
                created.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..16 {
        let mut c: Jobs = JobsServiceClient::with_interceptor(
            channels[w % channels.len()].clone(),
            Bearer(token("bench-worker", &["worker"])),
        );
        let (kind, created, completed, producing_done) = (
            kind.to_owned(),
            created.clone(),
            completed.clone(),
            producing_done.clone(),
        );
        workers.spawn(async move {
            loop {
                if producing_done.load(Ordering::Relaxed)
                    && completed.load(Ordering::Relaxed) >= created.load(Ordering::Relaxed)
                {
                    return;
                }
                let leased = c
                    .acquire_jobs(pb::AcquireJobsRequest {
                        worker_id: format!("w{w}"),
                        kinds: vec![kind.clone()],
                        max_jobs: 32,
                        lease_duration: dur(60),
                        wait_timeout: dur(1),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .jobs;
                futures::future::join_all(leased.into_iter().map(|l| {
                    let (mut c, completed) = (c.clone(), completed.clone());
                    async move {
                        c.complete_job(pb::CompleteJobRequest {
                            name: l.job.unwrap().name,
                            lease_id: l.lease_id,
                            result: None,
                            output_assets: vec![],
                        })
                        .await
                        .unwrap();
                        completed.fetch_add(1, Ordering::Relaxed);
                    }
                }))
                .await;
            }
        });
    }
    while producers.join_next().await.is_some() {}
    producing_done.store(true, Ordering::Relaxed);
    while workers.join_next().await.is_some() {}
    (
        completed.load(Ordering::Relaxed) as f64,
        start.elapsed().as_secs_f64(),
    )
}

/// GetProject calls from 64 callers for `RUN`, and the seconds they took.
async fn get_run(channels: &[Channel], project: &str) -> (f64, f64) {
    let stop = Instant::now() + RUN;
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64 {
        let mut c: Projects = ProjectsServiceClient::with_interceptor(
            channels[i % channels.len()].clone(),
            Bearer(token("bench", &[])),
        );
        let (project, done) = (project.to_owned(), done.clone());
        tasks.spawn(async move {
            while Instant::now() < stop {
                c.get_project(pb::GetProjectRequest {
                    name: project.clone(),
                })
                .await
                .unwrap();
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    (done.load(Ordering::Relaxed) as f64, RUN.as_secs_f64())
}

/// One measured run against `server`: (operations per second, server CPU µs per
/// operation). The pause after it lets the server's background work (a span batch
/// exported after the load stops) land in its own CPU figure, not the next run.
async fn measured(
    server: &common::Server,
    run: impl std::future::Future<Output = (f64, f64)>,
) -> (f64, f64) {
    let pid = server.child.id();
    let cpu = cpu_secs(pid);
    let (ops, secs) = run.await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let used = cpu_secs(pid) - cpu;
    (ops / secs, 1e6 * used / ops.max(1.0))
}

/// One round's two measured runs, (on, off): both at once (`together`), or one after
/// the other, `on` first when `on_first`. The runs start only when awaited here.
async fn pair<T>(
    on: impl std::future::Future<Output = T>,
    off: impl std::future::Future<Output = T>,
    together: bool,
    on_first: bool,
) -> (T, T) {
    if together {
        tokio::join!(on, off)
    } else if on_first {
        let a = on.await;
        (a, off.await)
    } else {
        let b = off.await;
        (on.await, b)
    }
}

/// Scrapes `admin` every second until `stop` (as a demanding Prometheus would).
fn scrape_every_second(admin: String, stop: Arc<std::sync::atomic::AtomicBool>) {
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        while !stop.load(Ordering::Relaxed) {
            let _ = http.get(format!("http://{admin}/metrics")).send().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

async fn project(channels: &[Channel]) -> String {
    common::create_project(channels[0].clone(), &token("bench", &[]), "telemetry").await
}

async fn cost() {
    let sink = Sink::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(sink.clone())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // `MP_BENCH_ON=metrics` or `=traces` turns on only that half, to see which costs
    // what; `=none` neither.
    let half = std::env::var("MP_BENCH_ON").unwrap_or_else(|_| "both".into());
    let mut on_env = Vec::new();
    if half != "metrics" && half != "none" {
        // The SDK's export settings as an operator gets them (a queue of 2,048 spans,
        // exported 512 at a time). A queue of a million spans was used before: its ring
        // (~350 MB of span data) took a cache miss on every slot written and read,
        // a cost of the setting, not of tracing. Whether every span was still exported
        // is checked at the end against the calls the server counted.
        on_env.push(("MEDIAPLANE_OTLP_ENDPOINT", format!("http://{sink_addr}")));
    }
    if half == "traces" || half == "none" {
        on_env.push(("MEDIAPLANE_ADMIN_ADDR", "off".to_owned()));
    }
    let on = start_server("telemetry_on", &on_env);
    let off = start_server(
        "telemetry_off",
        &[("MEDIAPLANE_ADMIN_ADDR", "off".to_owned())],
    );
    let mut c_on = Vec::new();
    let mut c_off = Vec::new();
    for _ in 0..8 {
        c_on.push(channel(&on.addr).await);
        c_off.push(channel(&off.addr).await);
    }
    let (p_on, p_off) = (project(&c_on).await, project(&c_off).await);
    let scraping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if half != "traces" && half != "none" {
        scrape_every_second(on.admin.clone(), scraping.clone());
    }
    let what = match half.as_str() {
        "metrics" => "metrics scraped every second",
        "traces" => "every span exported over OTLP",
        // Two identical servers: how far apart this bench puts servers that do not differ.
        "none" => "nothing (both servers off, a calibration)",
        _ => "metrics scraped every second + every span exported over OTLP",
    };
    // Both servers loaded at once in each round, each with its own clients, so whatever
    // the machine does in that round (its speed drifts ±10-20% between 5 s runs here)
    // falls on both alike; the price is that they share it. Two identical servers'
    // rounds so measured spread about half as far as one after the other (87-125%).
    // `MP_BENCH_TOGETHER=0` runs them in turn.
    let together = std::env::var("MP_BENCH_TOGETHER").map_or(true, |v| v != "0");
    println!(
        "Instrumentation: {what} (on) against metrics and export off, \
         median of {} rounds' ratios, {}s runs {}\n",
        rounds(),
        RUN.as_secs(),
        if together {
            "of both at once"
        } else {
            "in turn first"
        }
    );
    println!(
        "{:<32} {:>9} {:>9} {:>8} {:>10} {:>10} {:>8}",
        "workload", "on/s", "off/s", "on/off", "on µs CPU", "off µs CPU", "on/off"
    );
    let spans_before = sink.0.load(Ordering::Relaxed);
    let mut jobs_done_on = 0.0;
    // Each round measures both servers, at once or back to back in turn first (a server
    // that goes second finds the machine warmer, the database's caches fuller); the
    // ratio is the median of the rounds' ratios, which drift of the machine between
    // rounds cancels.
    let mut jobs = Figures::default();
    let mut gets = Figures::default();
    for round in 0..rounds() {
        let kind = format!("noop{round}");
        let on_first = round % 2 == 1;
        let (on_run, off_run) = pair(
            measured(&on, jobs_run(&c_on, &p_on, &kind)),
            measured(&off, jobs_run(&c_off, &p_off, &kind)),
            together,
            on_first,
        )
        .await;
        jobs_done_on += on_run.0 * RUN.as_secs_f64();
        jobs.push(on_run, off_run);
        let (on_run, off_run) = pair(
            measured(&on, get_run(&c_on, &p_on)),
            measured(&off, get_run(&c_off, &p_off)),
            together,
            on_first,
        )
        .await;
        gets.push(on_run, off_run);
    }
    scraping.store(true, Ordering::Relaxed);
    jobs.print("jobs end to end (64 in flight)");
    gets.print("GetProject (64 callers)");
    // The SDK exports what is left every 5 s.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let all_spans = sink.0.load(Ordering::Relaxed);
    let spans = all_spans - spans_before;
    println!(
        "\nspans received by the OTLP receiver: {spans} (about {:.1} per job of the on server's runs, GetProject calls included)",
        spans as f64 / jobs_done_on.max(1.0)
    );
    // Each call is one span: a span the SDK dropped (its queue full) would make tracing
    // look cheaper than it is.
    if !matches!(half.as_str(), "metrics" | "traces" | "none") {
        if let Some(calls) = calls_handled(&on.admin).await {
            println!(
                "calls the on server handled: {calls}; spans received: {all_spans} ({} dropped)",
                calls.saturating_sub(all_spans)
            );
        }
    }
}

/// The server's count of handled calls (every door, every code), from `/metrics`.
async fn calls_handled(admin: &str) -> Option<u64> {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let total = text
        .lines()
        .filter(|l| l.starts_with("grpc_server_handled_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    Some(total as u64)
}

async fn scrape() {
    const KINDS: usize = 100;
    const JOBS: usize = 1_000_000;
    let server = start_server(
        "telemetry_scrape",
        &[("MEDIAPLANE_QUEUE_FIGURES_INTERVAL", "1s".to_owned())],
    );
    let channels = vec![channel(&server.addr).await];
    let project = project(&channels).await;
    let id = project.trim_start_matches("projects/").to_owned();
    let url = format!("postgres://postgres@127.0.0.1:5432/{}", server.db);
    let psql = |sql: String| {
        let out = std::process::Command::new("psql")
            .args(["-q", "-X", "-v", "ON_ERROR_STOP=1", &url, "-c", &sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let t = Instant::now();
    // Straight into the table (triggers off: no million events), as a backlog would be.
    psql(format!(
        "SET session_replication_role = replica; \
         INSERT INTO jobs (id, project_id, owner, kind, schedule_time) \
         SELECT gen_random_uuid(), '{id}', 'bench', 'kind' || (i % {KINDS}), \
                now() - (i % 600) * interval '1 second' \
         FROM generate_series(1, {JOBS}) AS i;"
    ));
    psql("VACUUM ANALYZE jobs".to_owned());
    println!(
        "\nA deep queue: {JOBS} queued jobs of {KINDS} kinds (inserted and vacuumed in {:.0} s)\n",
        t.elapsed().as_secs_f64()
    );

    // The refresh statement, timed as the background task runs it.
    let mut conn =
        <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(&url)
            .await
            .unwrap();
    let mut refresh = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let figures = mediaplane::db::queues::figures(&mut conn, None)
            .await
            .unwrap();
        refresh.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(figures.len(), KINDS);
        assert_eq!(figures.iter().map(|f| f.queued).sum::<i64>(), JOBS as i64);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let http = reqwest::Client::new();
    let scrape_once = || async {
        let t = Instant::now();
        let text = http
            .get(format!("http://{}/metrics", server.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        (t.elapsed().as_secs_f64() * 1000.0, text)
    };
    let (mut times, mut text) = (Vec::new(), String::new());
    for _ in 0..20 {
        let (ms, body) = scrape_once().await;
        times.push(ms);
        text = body;
    }
    let queued: f64 = text
        .lines()
        .filter(|l| l.starts_with("mediaplane_jobs_queued{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(queued as usize, JOBS, "the scrape reports the whole queue");
    let max = times.iter().cloned().fold(0.0, f64::max);
    println!("{:<44} {:>10} {:>10}", "", "median ms", "max ms");
    println!(
        "{:<44} {:>10.1} {:>10.1}",
        "refresh statement (in the background)",
        median(refresh.clone()),
        refresh.iter().cloned().fold(0.0, f64::max)
    );
    println!(
        "{:<44} {:>10.1} {:>10.1}",
        "scrape (20 in a row)",
        median(times),
        max
    );

    // A statement that cannot finish: the refresh waits on a lock, scrapes do not.
    let locker = std::thread::spawn({
        let url = url.clone();
        move || {
            std::process::Command::new("psql")
                .args([
                    "-q",
                    "-X",
                    &url,
                    "-c",
                    "BEGIN; LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(4); COMMIT;",
                ])
                .output()
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut blocked = Vec::new();
    for _ in 0..10 {
        blocked.push(scrape_once().await.0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    locker.join().unwrap();
    println!(
        "{:<44} {:>10.1} {:>10.1}",
        "scrape while the jobs table is locked",
        median(blocked.clone()),
        blocked.iter().cloned().fold(0.0, f64::max)
    );
}

#[tokio::main]
async fn main() {
    let only = std::env::var("MP_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "cost" {
        cost().await;
    }
    if only.is_empty() || only == "scrape" {
        scrape().await;
    }
}
