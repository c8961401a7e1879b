//! What instrumentation costs, and a scrape over a deep queue.
//!
//! 1. End-to-end jobs/s (64 creates in flight, 16 workers completing each job) and
//!    GetProject req/s (64 callers), with metrics and tracing **on** (`/metrics`
//!    scraped every second, every span exported over OTLP/gRPC to a receiver in this
//!    process) against **off** (`MEDIAPLANE_ADMIN_ADDR=off`, no OTLP endpoint), two
//!    release servers measured in alternating rounds of one run. Trace context is
//!    propagated in both: it is behaviour (workers get their job's trace), not
//!    instrumentation. Target: on at most 3% below off.
//! 2. A scrape with 100 job kinds and 1,000,000 queued jobs: its time (target under
//!    100 ms), the time of the refresh statement behind it (read in the background,
//!    never by a scrape), and scrapes while a lock blocks that statement.
//!
//! `cargo bench --bench telemetry`; `MP_BENCH_ONLY=cost` or `=scrape` runs one part.
mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Bearer, channel, start_server, token};
use mediaplane::proto::v1::{
    self as pb, jobs_service_client::JobsServiceClient,
    projects_service_client::ProjectsServiceClient,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use tonic::{
    Request, Response, Status, service::interceptor::InterceptedService, transport::Channel,
};

type Jobs = JobsServiceClient<InterceptedService<Channel, Bearer>>;
type Projects = ProjectsServiceClient<InterceptedService<Channel, Bearer>>;

const ROUNDS: usize = 3;
const RUN: Duration = Duration::from_secs(5);

/// An OTLP receiver that counts the spans it is sent.
#[derive(Clone, Default)]
struct Sink(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(Response::new(ExportTraceServiceResponse::default()))
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
async fn jobs_rate(channels: &[Channel], project: &str, kind: &str) -> f64 {
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
    completed.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// GetProject calls per second from 64 callers for `RUN`.
async fn get_rate(channels: &[Channel], project: &str) -> f64 {
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
    done.load(Ordering::Relaxed) as f64 / RUN.as_secs_f64()
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
    let mut c: Projects =
        ProjectsServiceClient::with_interceptor(channels[0].clone(), Bearer(token("bench", &[])));
    c.create_project(pb::CreateProjectRequest {
        project: Some(pb::Project {
            display_name: "telemetry".into(),
            ..Default::default()
        }),
        request_id: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .name
}

async fn cost() {
    let sink = Sink::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(sink.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let on = start_server(
        "telemetry_on",
        &[
            ("MEDIAPLANE_OTLP_ENDPOINT", format!("http://{sink_addr}")),
            // Export every span: the SDK's default queue (2,048) would drop most of them
            // at these rates, which would make tracing look cheaper than it is.
            ("OTEL_BSP_MAX_QUEUE_SIZE", "1000000".to_owned()),
            ("OTEL_BSP_SCHEDULE_DELAY", "1000".to_owned()),
        ],
    );
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
    scrape_every_second(on.admin.clone(), scraping.clone());

    println!(
        "Instrumentation: metrics scraped every second + every span exported over OTLP (on) \
         against metrics and export off, median of {ROUNDS} alternating {}s runs\n",
        RUN.as_secs()
    );
    println!(
        "{:<28} {:>12} {:>12} {:>8}",
        "workload", "on/s", "off/s", "on/off"
    );
    let (mut jobs_on, mut jobs_off, mut gets_on, mut gets_off) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let spans_before = sink.0.load(Ordering::Relaxed);
    let mut jobs_done_on = 0.0;
    for round in 0..ROUNDS {
        let kind = format!("noop{round}");
        jobs_off.push(jobs_rate(&c_off, &p_off, &kind).await);
        let r = jobs_rate(&c_on, &p_on, &kind).await;
        jobs_done_on += r * RUN.as_secs_f64();
        jobs_on.push(r);
        gets_off.push(get_rate(&c_off, &p_off).await);
        gets_on.push(get_rate(&c_on, &p_on).await);
    }
    scraping.store(true, Ordering::Relaxed);
    let (a, b) = (median(jobs_on), median(jobs_off));
    println!(
        "{:<28} {a:>12.0} {b:>12.0} {:>7.1}%",
        "jobs end to end (64 in flight)",
        100.0 * a / b
    );
    let (a, b) = (median(gets_on), median(gets_off));
    println!(
        "{:<28} {a:>12.0} {b:>12.0} {:>7.1}%",
        "GetProject (64 callers)",
        100.0 * a / b
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spans = sink.0.load(Ordering::Relaxed) - spans_before;
    println!(
        "\nspans received by the OTLP receiver: {spans} (about {:.1} per job of the on server's runs, GetProject calls included)",
        spans as f64 / jobs_done_on.max(1.0)
    );
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
         FROM generate_series(1, {JOBS}) AS i; VACUUM ANALYZE jobs;"
    ));
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
        let figures = mediaplane::db::queues::figures(&mut conn).await.unwrap();
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
