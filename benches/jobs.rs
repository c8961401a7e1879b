//! Job engine benchmark: prints figures, asserts nothing about speed.
//!
//!     cargo bench --bench jobs            (needs Postgres and Redis on localhost)
//!
//! Starts the release server as its own process against a scratch database, then
//! measures end-to-end throughput (create -> acquire -> complete), draining a full
//! queue, progress latency to 1/100/1000 watchers, and the server's RSS with 10,000
//! idle WatchJob streams.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use common::{
    Bearer, channel, cpu_secs, cpu_secs_of, machine_busy_secs, rss_mib, start_server, token,
};
use mediaplane::proto::v1::{
    self as pb, jobs_service_client::JobsServiceClient,
    projects_service_client::ProjectsServiceClient,
};
use tokio_stream::StreamExt;
use tonic::{service::interceptor::InterceptedService, transport::Channel};

mod common;

type Jobs = JobsServiceClient<InterceptedService<Channel, Bearer>>;

fn job(kind: &str) -> pb::Job {
    pb::Job {
        kind: kind.into(),
        ..Default::default()
    }
}

fn dur(secs: u64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: secs as i64,
        nanos: 0,
    })
}

/// Call latencies in ms, per RPC, for the table (where the time of a job goes).
#[derive(Default)]
struct Latencies {
    create: std::sync::Mutex<Vec<f64>>,
    acquire: std::sync::Mutex<Vec<f64>>,
    complete: std::sync::Mutex<Vec<f64>>,
}

impl Latencies {
    fn record(v: &std::sync::Mutex<Vec<f64>>, since: Instant) {
        v.lock()
            .unwrap()
            .push(since.elapsed().as_secs_f64() * 1000.0);
    }

    fn p50_p99(v: &std::sync::Mutex<Vec<f64>>) -> String {
        let mut v = v.lock().unwrap().clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        format!("{:.1}/{:.1}", percentile(&v, 0.5), percentile(&v, 0.99))
    }
}

/// The completion of a leased job, with an empty result.
fn completion(leased: pb::LeasedJob) -> pb::CompleteJobRequest {
    pb::CompleteJobRequest {
        name: leased.job.unwrap().name,
        lease_id: leased.lease_id,
        result: None,
        output_assets: vec![],
    }
}

/// How a worker reports the jobs it leased as done.
#[derive(Clone, Copy, PartialEq)]
enum Completes {
    /// One CompleteJob per job, all at once (as `mediaplane worker` does).
    Each,
    /// One BatchCompleteJobs for everything one AcquireJobs returned.
    Batched,
    /// As `Batched`, the call also leasing the worker's next jobs (`acquire`):
    /// AcquireJobs only when none came with the completions.
    Next,
    /// One WorkerSession stream per worker: a CompleteJob request per job, all sent at
    /// once, and AcquireJobs on the same stream.
    Session,
    /// One WorkerSession stream per worker, each turn one BatchCompleteJobs request that
    /// also leases the next jobs (`Next` over the stream).
    SessionNext,
}

impl Completes {
    fn label(self) -> &'static str {
        match self {
            Self::Each => "each",
            Self::Batched => "batch",
            Self::Next => "next",
            Self::Session => "session",
            Self::SessionNext => "session-next",
        }
    }
}

/// Workers acquire `max_jobs` at a time and complete them; returns the moment the last
/// of `total` was completed.
async fn run_workers(
    channels: &[Channel],
    kind: &str,
    (workers, max_jobs, completes): (usize, i32, Completes),
    total: usize,
    lat: Arc<Latencies>,
) -> Instant {
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // The run ends when its last job is completed, not when every worker has returned:
    // the others are then long-polling for jobs that will never come (up to their
    // wait_timeout, which is not the engine's time).
    let finished = Arc::new(std::sync::OnceLock::<Instant>::new());
    let last_done = Arc::new(tokio::sync::Notify::new());
    let count = {
        let (done, finished, last_done) = (done.clone(), finished.clone(), last_done.clone());
        move |n: usize| {
            let before = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            if before < total && before + n >= total {
                let _ = finished.set(Instant::now());
                last_done.notify_one();
            }
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let mut c: Jobs = JobsServiceClient::with_interceptor(
            channels[w % channels.len()].clone(),
            Bearer(token("bench-worker", &["worker"])),
        );
        let (done, kind, lat, count) = (done.clone(), kind.to_owned(), lat.clone(), count.clone());
        tasks.spawn(async move {
            let acquire = pb::AcquireJobsRequest {
                worker_id: format!("w{w}"),
                kinds: vec![kind.clone()],
                max_jobs,
                lease_duration: dur(60),
                wait_timeout: None,
            };
            if matches!(completes, Completes::Session | Completes::SessionNext) {
                let enough = move || done.load(std::sync::atomic::Ordering::Relaxed) >= total;
                let next = completes == Completes::SessionNext;
                return session_worker(c, acquire, next, enough, lat, count).await;
            }
            // Jobs leased with the last completions.
            let mut carried = Vec::new();
            while done.load(std::sync::atomic::Ordering::Relaxed) < total {
                let leased = if carried.is_empty() {
                    let t = Instant::now();
                    let leased = c
                        .acquire_jobs(pb::AcquireJobsRequest {
                            wait_timeout: dur(1),
                            ..acquire.clone()
                        })
                        .await
                        .unwrap()
                        .into_inner()
                        .jobs;
                    if leased.is_empty() {
                        continue;
                    }
                    Latencies::record(&lat.acquire, t);
                    leased
                } else {
                    std::mem::take(&mut carried)
                };
                let n = leased.len();
                if completes != Completes::Each {
                    let t = Instant::now();
                    let answer = c
                        .batch_complete_jobs(pb::BatchCompleteJobsRequest {
                            requests: leased.into_iter().map(completion).collect(),
                            acquire: (completes == Completes::Next).then(|| acquire.clone()),
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    carried = accepted(answer);
                    Latencies::record(&lat.complete, t);
                    count(n);
                    continue;
                }
                // A worker runs the jobs it leased at once (as `mediaplane worker`
                // does with --concurrency), so their completes overlap.
                futures::future::join_all(leased.into_iter().map(|l| {
                    let (mut c, lat, count) = (c.clone(), lat.clone(), count.clone());
                    async move {
                        let t = Instant::now();
                        c.complete_job(completion(l)).await.unwrap();
                        Latencies::record(&lat.complete, t);
                        count(1);
                    }
                }))
                .await;
            }
        });
    }
    loop {
        tokio::select! {
            _ = last_done.notified() => break,
            joined = tasks.join_next() => match joined {
                Some(Ok(())) => {}
                Some(Err(e)) => panic!("a bench worker failed: {e}"),
                None => break,
            },
        }
    }
    // Every job is done: the workers still waiting would only time out.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    *finished.get().expect("the run ended with its last job")
}

/// The jobs leased with a batch of completions, every completion and the lease
/// having been accepted.
fn accepted(answer: pb::BatchCompleteJobsResponse) -> Vec<pb::LeasedJob> {
    assert!(answer.acquire_error.is_none(), "leasing with completions");
    assert!(
        answer
            .results
            .iter()
            .all(|r| matches!(r.outcome, Some(pb::complete_job_result::Outcome::Job(_)))),
        "every completion accepted"
    );
    answer.acquired
}

/// A worker on one WorkerSession stream: leases `acquire.max_jobs`, sends a CompleteJob
/// request per job without waiting (or, with `next`, one BatchCompleteJobs that leases
/// the next jobs too), reads their answers, and again until `enough`.
async fn session_worker(
    mut c: Jobs,
    acquire: pb::AcquireJobsRequest,
    next: bool,
    enough: impl Fn() -> bool,
    lat: Arc<Latencies>,
    count: impl Fn(usize),
) {
    use pb::{worker_session_request::Request as Ask, worker_session_response::Response as Answer};
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let mut answers = c
        .worker_session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut id = 0;
    let mut send = move |request| {
        id += 1;
        tx.try_send(pb::WorkerSessionRequest {
            id,
            request: Some(request),
            traceparent: String::new(),
        })
        .expect("room for every request in flight")
    };
    let mut carried = Vec::new();
    while !enough() {
        let leased = if carried.is_empty() {
            let t = Instant::now();
            send(Ask::AcquireJobs(pb::AcquireJobsRequest {
                wait_timeout: dur(1),
                ..acquire.clone()
            }));
            let leased = match answers.message().await.unwrap().unwrap().response {
                Some(Answer::AcquireJobs(r)) => r.jobs,
                other => panic!("expected leased jobs, got {other:?}"),
            };
            if leased.is_empty() {
                continue;
            }
            Latencies::record(&lat.acquire, t);
            leased
        } else {
            std::mem::take(&mut carried)
        };
        let n = leased.len();
        let t = Instant::now();
        if next {
            send(Ask::BatchCompleteJobs(pb::BatchCompleteJobsRequest {
                requests: leased.into_iter().map(completion).collect(),
                acquire: Some(acquire.clone()),
            }));
            match answers.message().await.unwrap().unwrap().response {
                Some(Answer::BatchCompleteJobs(r)) => carried = accepted(r),
                other => panic!("completions refused: {other:?}"),
            }
        } else {
            for l in leased {
                send(Ask::CompleteJob(completion(l)));
            }
            for _ in 0..n {
                match answers.message().await.unwrap().unwrap().response {
                    Some(Answer::CompleteJob(_)) => {}
                    other => panic!("a completion refused: {other:?}"),
                }
            }
        }
        Latencies::record(&lat.complete, t);
        count(n);
    }
}

/// BullMQ end to end (`benches/peers/peers.mjs bull-e2e`, worker concurrency 50, as
/// many jobs as the rows) with `producers` adds in flight, and each of this run's rows
/// at that load against it. `MP_BENCH_PEERS=off` skips it; without Node.js it says so.
fn peer_ratios(producers: usize, rates: &[(usize, String, f64, f64)]) {
    if std::env::var("MP_BENCH_PEERS").is_ok_and(|v| v == "off") {
        return;
    }
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/peers");
    let run = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .current_dir(dir)
            .env("REDIS_URL", "redis://127.0.0.1:6379")
            .output()
    };
    if !std::path::Path::new(dir).join("node_modules").exists() {
        let installed = run(
            "npm",
            &["install", "--no-audit", "--no-fund", "--loglevel=error"],
        );
        if !installed.is_ok_and(|o| o.status.success()) {
            println!("  BullMQ: not run (npm install failed in {dir}; Node.js and npm needed)");
            return;
        }
    }
    let total = env_count("MP_BENCH_TOTAL", 20_000).to_string();
    let out = match run(
        "node",
        &[
            "peers.mjs",
            "bull-e2e",
            &producers.to_string(),
            "50",
            &total,
        ],
    ) {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => {
            println!(
                "  BullMQ: failed: {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            return;
        }
        Err(e) => {
            println!("  BullMQ: not run (node: {e})");
            return;
        }
    };
    let Some(result) = out
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
    else {
        println!("  BullMQ: no result in its output:\n{out}");
        return;
    };
    let bull_rate = result["jobs_per_sec"].as_f64().unwrap_or(f64::NAN);
    let bull_cpu = result["machine_us_per_job"].as_f64().unwrap_or(f64::NAN);
    println!(
        "  BullMQ 6.7, {producers} adds in flight, worker concurrency 50: {bull_rate:.0} jobs/s, machine {bull_cpu:.0} µs per job"
    );
    for (_, row, rate, machine) in rates.iter().filter(|r| r.0 == producers) {
        println!(
            "    mediaplane {row:<22} / BullMQ: {:.2}x the rate, {:.2}x the machine CPU per job",
            rate / bull_rate,
            machine / bull_cpu
        );
    }
}

/// A count from the environment, or `default` when unset or not a number.
fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Sections to run: all, or those named on the command line
/// (`cargo bench --bench jobs -- e2e latency`; names: e2e batch prefilled latency idle).
fn wanted(section: &str) -> bool {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    args.is_empty() || args.iter().any(|a| a == section)
}

#[tokio::main]
async fn main() {
    // MP_BENCH_SERVER_BIN: another build's binary (`scripts/baseline.sh REV`), to compare
    // engines in the same hour.
    let server = match std::env::var("MP_BENCH_SERVER_BIN") {
        Ok(bin) => common::start_server_bin(&bin, "jobs", &[]),
        Err(_) => start_server("jobs", &[]),
    };
    let pid = server.child.id();
    // HTTP/2 connections the load shares (MP_BENCH_CHANNELS; 1, 2, 4 and 8 measured
    // within the noise of each other end to end).
    let channels: Vec<Channel> = futures::future::join_all(
        (0..env_count("MP_BENCH_CHANNELS", 8).max(1)).map(|_| channel(&server.addr)),
    )
    .await;
    let owner = token("bench", &[]);
    let mut projects =
        ProjectsServiceClient::with_interceptor(channels[0].clone(), Bearer(owner.clone()));
    let project = projects
        .create_project(pb::CreateProjectRequest {
            project: Some(pb::Project {
                display_name: "bench".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .name;
    let client = |i: usize| -> Jobs {
        JobsServiceClient::with_interceptor(
            channels[i % channels.len()].clone(),
            Bearer(owner.clone()),
        )
    };
    println!(
        "mediaplane job engine benchmark (server pid {pid}, 2-core machine shared with Postgres and Redis)\n"
    );

    // 1. End to end, one CreateJob per job, producers and workers running together.
    if wanted("e2e") {
        println!(
            "end to end: CreateJob per job -> AcquireJobs -> CompleteJob per job, or one BatchCompleteJobs per acquire (-batch), or one that also leases the next jobs (-next), or a CompleteJob per job on one WorkerSession stream per worker (-session), or -next on a WorkerSession (-session-next) (CPU per job: the server, this load generator, Postgres, Redis, the whole machine)"
        );
        println!(
            "{:>9} {:>8} {:>9} {:>9} {:>8} {:>10} {:>10} {:>10} {:>10} {:>8} {:>10}   p50/p99 ms: create, acquire (non-empty), complete",
            "producers",
            "workers",
            "max_jobs",
            "complete",
            "jobs",
            "jobs/s",
            "server µs",
            "load µs",
            "pg µs",
            "redis µs",
            "machine µs"
        );
        let only = std::env::var("MP_BENCH_E2E").ok();
        // Producers are concurrent CreateJob callers (each waits for its call); more of
        // them means bigger write groups on the server.
        let rows = [
            (16, 1, 1, Completes::Each),
            (16, 4, 1, Completes::Each),
            (16, 16, 1, Completes::Each),
            (16, 4, 10, Completes::Each),
            (16, 16, 10, Completes::Each),
            (64, 16, 10, Completes::Each),
            // One job per lease (a worker running jobs one after another): where leasing
            // the next job with the completion saves a call per job.
            (64, 32, 1, Completes::Each),
            (64, 32, 1, Completes::Next),
            (64, 32, 50, Completes::Each),
            (64, 32, 50, Completes::Batched),
            (64, 32, 50, Completes::Next),
            (64, 32, 50, Completes::Session),
            (64, 32, 50, Completes::SessionNext),
            // With one statement in flight per kind of write, 64 waiting producers left
            // a third of the machine idle: more concurrent callers, bigger groups.
            (256, 32, 50, Completes::Each),
            (256, 32, 50, Completes::Batched),
            (256, 32, 50, Completes::Next),
            (256, 32, 50, Completes::Session),
            (256, 32, 50, Completes::SessionNext),
        ];
        // Rates of this run's rows, for the ratios against BullMQ.
        let mut rates: Vec<(usize, String, f64, f64)> = Vec::new();
        let name = |&(producers, workers, max_jobs, completes): &(usize, usize, i32, Completes)| {
            match completes {
                Completes::Each => format!("{producers}x{workers}x{max_jobs}"),
                other => format!("{producers}x{workers}x{max_jobs}-{}", other.label()),
            }
        };
        // MP_BENCH_E2E=64x32x50 (or 64x32x50-batch, or a comma-separated list) runs only
        // those rows.
        let rows: Vec<_> = rows
            .into_iter()
            .filter(|r| {
                only.as_deref()
                    .is_none_or(|o| o.split(',').any(|x| x == name(r)))
            })
            .collect();
        for (i, &(producers, workers, max_jobs, completes)) in rows.iter().enumerate() {
            let row = name(&rows[i]);
            // Long enough runs that start-up (connections, first plans) does not
            // dominate; the single-job configurations are slow.
            let total = env_count("MP_BENCH_TOTAL", if max_jobs == 1 { 4000 } else { 20_000 });
            let kind = format!("e2e-{row}");
            let start = Instant::now();
            let me = std::process::id();
            let (server_cpu, load_cpu, machine_cpu) =
                (cpu_secs(pid), cpu_secs(me), machine_busy_secs());
            let (pg_cpu, redis_cpu) = (cpu_secs_of("postgres"), cpu_secs_of("redis-server"));
            let lat = Arc::new(Latencies::default());
            let producer_tasks: Vec<_> = (0..producers)
                .map(|p| {
                    let mut c = client(p);
                    let (project, kind, lat) = (project.clone(), kind.clone(), lat.clone());
                    tokio::spawn(async move {
                        // Shares that add up to `total`.
                        let share = total / producers + usize::from(p < total % producers);
                        for _ in 0..share {
                            let t = Instant::now();
                            c.create_job(pb::CreateJobRequest {
                                parent: project.clone(),
                                job: Some(job(&kind)),
                                request_id: String::new(),
                                key: String::new(),
                            })
                            .await
                            .unwrap();
                            Latencies::record(&lat.create, t);
                        }
                    })
                })
                .collect();
            let finished = run_workers(
                &channels,
                &kind,
                (workers, max_jobs, completes),
                total,
                lat.clone(),
            )
            .await;
            for p in producer_tasks {
                p.await.unwrap();
            }
            // CPU per job: steadier than jobs/s for comparing changes on a shared machine.
            let per_job = |secs: f64| secs * 1e6 / total as f64;
            let rate = total as f64 / (finished - start).as_secs_f64();
            rates.push((
                producers,
                row.clone(),
                rate,
                per_job(machine_busy_secs() - machine_cpu),
            ));
            println!(
                "{producers:>9} {workers:>8} {max_jobs:>9} {:>9} {total:>8} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>8.0} {:>10.0}   {}, {}, {}",
                completes.label(),
                total as f64 / (finished - start).as_secs_f64(),
                per_job(cpu_secs(pid) - server_cpu),
                per_job(cpu_secs(me) - load_cpu),
                per_job(cpu_secs_of("postgres") - pg_cpu),
                per_job(cpu_secs_of("redis-server") - redis_cpu),
                per_job(machine_busy_secs() - machine_cpu),
                Latencies::p50_p99(&lat.create),
                Latencies::p50_p99(&lat.acquire),
                Latencies::p50_p99(&lat.complete),
            );
            // BullMQ with the same offered load right after this producer count's rows.
            let last_of_group = rows.get(i + 1).is_none_or(|r| r.0 != producers);
            if last_of_group && [64, 256].contains(&producers) {
                peer_ratios(producers, &rates);
            }
        }
    }
    // 2. End to end with BatchCreateJobs.
    if wanted("batch") {
        let total = 10_000;
        let kind = "e2e-batch";
        let start = Instant::now();
        let producer = {
            let mut c = client(0);
            let project = project.clone();
            tokio::spawn(async move {
                for _ in 0..total / 500 {
                    let requests = (0..500)
                        .map(|_| pb::CreateJobRequest {
                            parent: String::new(),
                            job: Some(job(kind)),
                            request_id: String::new(),
                            key: String::new(),
                        })
                        .collect();
                    c.batch_create_jobs(pb::BatchCreateJobsRequest {
                        parent: project.clone(),
                        requests,
                    })
                    .await
                    .unwrap();
                }
            })
        };
        let finished = run_workers(
            &channels,
            kind,
            (64, 50, Completes::Each),
            total,
            Arc::default(),
        )
        .await;
        producer.await.unwrap();
        println!(
            "\nend to end with BatchCreateJobs (500 per call), 64 workers, max_jobs 50: {:.0} jobs/s",
            total as f64 / (finished - start).as_secs_f64()
        );
    }
    // 3. Draining a pre-filled queue, completing per job and in batches.
    if wanted("prefilled") {
        // Big enough that the pipeline's fill and drain (workers x max_jobs in flight,
        // a few hundred ms) do not weigh on the rate.
        let total = env_count("MP_BENCH_PREFILLED_TOTAL", 100_000);
        let (workers, max_jobs) = std::env::var("MP_BENCH_PREFILLED")
            .ok()
            .and_then(|v| {
                let (w, m) = v.split_once('x')?;
                Some((w.parse().ok()?, m.parse().ok()?))
            })
            .unwrap_or((64, 50));
        println!();
        for completes in [
            Completes::Each,
            Completes::Batched,
            Completes::Next,
            Completes::Session,
            Completes::SessionNext,
        ] {
            let kind = format!("prefilled-{}", completes.label());
            for _ in 0..total / 1000 {
                let requests = (0..1000)
                    .map(|_| pb::CreateJobRequest {
                        parent: String::new(),
                        job: Some(job(&kind)),
                        request_id: String::new(),
                        key: String::new(),
                    })
                    .collect();
                client(0)
                    .batch_create_jobs(pb::BatchCreateJobsRequest {
                        parent: project.clone(),
                        requests,
                    })
                    .await
                    .unwrap();
            }
            let start = Instant::now();
            let me = std::process::id();
            let (server_cpu, load_cpu, machine_cpu) =
                (cpu_secs(pid), cpu_secs(me), machine_busy_secs());
            let lat = Arc::new(Latencies::default());
            let finished = run_workers(
                &channels,
                &kind,
                (workers, max_jobs, completes),
                total,
                lat.clone(),
            )
            .await;
            println!(
                "pre-filled queue of {total}, {workers} workers, max_jobs {max_jobs}, {}: {:.0} jobs/s \
                 (CPU per job: server {:.0} µs, load {:.0} µs, machine {:.0} µs; p50/p99 ms: acquire {}, complete {})",
                match completes {
                    Completes::Each => "CompleteJob per job",
                    Completes::Batched => "one BatchCompleteJobs per acquire",
                    Completes::Next => "BatchCompleteJobs leasing the next jobs",
                    Completes::Session => "a CompleteJob per job on a WorkerSession",
                    Completes::SessionNext => {
                        "BatchCompleteJobs leasing the next jobs on a WorkerSession"
                    }
                },
                total as f64 / (finished - start).as_secs_f64(),
                (cpu_secs(pid) - server_cpu) * 1e6 / total as f64,
                (cpu_secs(me) - load_cpu) * 1e6 / total as f64,
                (machine_busy_secs() - machine_cpu) * 1e6 / total as f64,
                Latencies::p50_p99(&lat.acquire),
                Latencies::p50_p99(&lat.complete),
            );
        }
    }
    // 4. Progress latency to N watchers.
    if wanted("latency") {
        println!("\nprogress latency, ReportProgress returned -> event received by every watcher");
        println!(
            "{:>9} {:>8} {:>9} {:>9} {:>9} {:>6} {:>10} {:>10}",
            "watchers", "reports", "p50 ms", "p99 ms", "max ms", "lost", "server µs", "load µs"
        );
        // MP_BENCH_WATCHERS=1000 (a comma-separated list) runs only those counts.
        let counts: Vec<usize> = std::env::var("MP_BENCH_WATCHERS")
            .ok()
            .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![1, 100, 1000]);
        for watchers in counts {
            let created = client(0)
                .create_job(pb::CreateJobRequest {
                    parent: project.clone(),
                    job: Some(job("latency")),
                    request_id: String::new(),
                    key: String::new(),
                })
                .await
                .unwrap()
                .into_inner();
            // Enough reports that a p99 is not just the slowest of a few (with 50 and
            // one watcher, the p99 would be the maximum). Each is numbered in its
            // message, which the watchers read back.
            let reports: usize = 250;
            let sent_at: Arc<std::sync::Mutex<Vec<Option<Instant>>>> =
                Arc::new(std::sync::Mutex::new(vec![None; reports + 1]));
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
            let mut streams = Vec::new();
            for w in 0..watchers {
                let mut s = client(w)
                    .watch_job(pb::WatchJobRequest {
                        name: created.name.clone(),
                        after_sequence: 0,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let tx = tx.clone();
                streams.push(tokio::spawn(async move {
                    let mut received = 0;
                    while let Some(Ok(e)) = s.next().await {
                        if pb::job_event::Type::try_from(e.r#type)
                            == Ok(pb::job_event::Type::Progress)
                        {
                            received += 1;
                            let n = e.job.and_then(|j| j.message.parse().ok()).unwrap_or(0);
                            let _ = tx.send((n, Instant::now()));
                        }
                    }
                    received
                }));
            }
            drop(tx);
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut wc: Jobs = JobsServiceClient::with_interceptor(
                channels[0].clone(),
                Bearer(token("bench-worker", &["worker"])),
            );
            let l = wc
                .acquire_jobs(pb::AcquireJobsRequest {
                    worker_id: "lat".into(),
                    kinds: vec!["latency".into()],
                    max_jobs: 1,
                    lease_duration: dur(60),
                    wait_timeout: dur(5),
                })
                .await
                .unwrap()
                .into_inner()
                .jobs
                .remove(0);
            let name = l.job.as_ref().unwrap().name.clone();
            // CPU per delivered event (one event to one watcher), during the reports only.
            let me = std::process::id();
            let (server_cpu, load_cpu) = (cpu_secs(pid), cpu_secs(me));
            for n in 1..=reports {
                wc.report_progress(pb::ReportProgressRequest {
                    name: name.clone(),
                    lease_id: l.lease_id.clone(),
                    progress_percent: (n * 100 / reports) as i32,
                    current_step: String::new(),
                    message: n.to_string(),
                })
                .await
                .unwrap();
                sent_at.lock().unwrap()[n] = Some(Instant::now());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let deliveries = (watchers * reports) as f64;
            let server_us = (cpu_secs(pid) - server_cpu) * 1e6 / deliveries;
            let load_us = (cpu_secs(me) - load_cpu) * 1e6 / deliveries;
            wc.complete_job(completion(l)).await.unwrap();
            let mut received = 0;
            for s in streams {
                received += s.await.unwrap();
            }
            let sent = sent_at.lock().unwrap().clone();
            let mut lat = Vec::new();
            while let Some((n, at)) = rx.recv().await {
                if let Some(Some(t)) = sent.get(n) {
                    lat.push(at.saturating_duration_since(*t).as_secs_f64() * 1000.0);
                }
            }
            lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let lost = watchers * reports - received;
            println!(
                "{watchers:>9} {reports:>8} {:>9.2} {:>9.2} {:>9.2} {lost:>6} {server_us:>10.1} {load_us:>10.1}",
                percentile(&lat, 0.5),
                percentile(&lat, 0.99),
                lat.last().copied().unwrap_or(f64::NAN)
            );
        }
    }
    // 5. Memory with 10,000 idle watch streams.
    if wanted("idle") {
        let idle = client(0)
            .create_job(pb::CreateJobRequest {
                parent: project.clone(),
                job: Some(job("idle")),
                request_id: String::new(),
                key: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let before = rss_mib(pid);
        let mut streams = Vec::new();
        let idle_channels: Vec<Channel> =
            futures::future::join_all((0..10).map(|_| channel(&server.addr))).await;
        for i in 0..10_000 {
            let mut c: Jobs = JobsServiceClient::with_interceptor(
                idle_channels[i % 10].clone(),
                Bearer(owner.clone()),
            );
            let mut s = c
                .watch_job(pb::WatchJobRequest {
                    name: idle.name.clone(),
                    after_sequence: 0,
                })
                .await
                .unwrap()
                .into_inner();
            let _ = s.next().await;
            streams.push(s);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = rss_mib(pid);
        println!(
            "\n10,000 idle WatchJob streams: server RSS {before:.1} MiB before, {after:.1} MiB with the streams open (+{:.1} MiB)",
            after - before
        );
        drop(streams);
    }
}
