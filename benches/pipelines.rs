//! Pipelines and fair queues benchmark: prints figures, asserts nothing about speed.
//!
//!     cargo bench --bench pipelines                  (needs Postgres and Redis on localhost)
//!     bash scripts/baseline.sh d447a43               (builds the engine before pipelines)
//!     MP_BENCH_BASELINE_BIN=target/baseline/d447a43/mediaplane cargo bench --bench pipelines
//!
//! Sections (`cargo bench --bench pipelines -- plain chains fairness`):
//! - plain: jobs with no dependencies, no key and no queue limits, end to end (64
//!   CreateJob callers, 16 workers leasing 10 at a time, a CompleteJob per job), this
//!   build against the baseline binary, alternated round by round in one run.
//! - chains: 1,000 three-stage pipelines end to end: jobs/s, and the time from a stage's
//!   completion (its CompleteJob answered) to its dependent's lease (AcquireJobs answered).
//! - fairness: one key with 10,000 queued jobs drained by busy workers while single jobs of
//!   other keys arrive: the wait of each from its CreateJob's answer to its lease.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{Bearer, Server, channel, machine_busy_secs, start_server_bin, token};
use mediaplane::proto::v1::{
    self as pb, jobs_service_client::JobsServiceClient,
    projects_service_client::ProjectsServiceClient,
};
use tonic::{service::interceptor::InterceptedService, transport::Channel};

mod common;

type Jobs = JobsServiceClient<InterceptedService<Channel, Bearer>>;
/// Told of each leased job, with when AcquireJobs answered.
type OnLease = Arc<dyn Fn(&pb::LeasedJob, Instant) + Send + Sync>;
/// Told of each completed job's name, with when CompleteJob answered.
type OnComplete = Arc<dyn Fn(String, Instant) + Send + Sync>;

const THIS_BUILD: &str = env!("CARGO_BIN_EXE_mediaplane");

fn wanted(section: &str) -> bool {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    args.is_empty() || args.iter().any(|a| a == section)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn p50_p99(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (percentile(&v, 0.5), percentile(&v, 0.99))
}

fn dur(d: Duration) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    })
}

/// A server with `channels` connections and a project of its own.
struct Rig {
    server: Server,
    channels: Vec<Channel>,
    project: String,
    owner: String,
}

impl Rig {
    async fn start(bin: &str, name: &str) -> Self {
        let server = start_server_bin(bin, name, &[]);
        let channels: Vec<Channel> =
            futures::future::join_all((0..8).map(|_| channel(&server.addr))).await;
        let owner = token("bench", &[]);
        let project =
            ProjectsServiceClient::with_interceptor(channels[0].clone(), Bearer(owner.clone()))
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
        Self {
            server,
            channels,
            project,
            owner,
        }
    }

    fn client(&self, i: usize) -> Jobs {
        JobsServiceClient::with_interceptor(
            self.channels[i % self.channels.len()].clone(),
            Bearer(self.owner.clone()),
        )
    }

    fn worker(&self, i: usize) -> Jobs {
        JobsServiceClient::with_interceptor(
            self.channels[i % self.channels.len()].clone(),
            Bearer(token("bench-worker", &["worker"])),
        )
    }
}

/// Leases jobs of `kinds` in a loop until `stop`, calling `on_lease` for each leased
/// job (when it was leased) and completing it after `work`; `on_complete` gets each
/// completed job's name and when its CompleteJob was answered.
#[allow(clippy::too_many_arguments)]
fn spawn_workers(
    rig: &Rig,
    workers: usize,
    kinds: &[&str],
    max_jobs: i32,
    work: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
    on_lease: OnLease,
    on_complete: OnComplete,
) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let mut c = rig.worker(w);
        let kinds: Vec<String> = kinds.iter().map(|k| k.to_string()).collect();
        let (stop, on_lease, on_complete) = (stop.clone(), on_lease.clone(), on_complete.clone());
        tasks.spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let leased = c
                    .acquire_jobs(pb::AcquireJobsRequest {
                        worker_id: format!("w{w}"),
                        kinds: kinds.clone(),
                        max_jobs,
                        lease_duration: dur(Duration::from_secs(60)),
                        wait_timeout: dur(Duration::from_millis(500)),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .jobs;
                let at = Instant::now();
                for l in &leased {
                    on_lease(l, at);
                }
                if !work.is_zero() && !leased.is_empty() {
                    tokio::time::sleep(work).await;
                }
                futures::future::join_all(leased.into_iter().map(|l| {
                    let (mut c, on_complete) = (c.clone(), on_complete.clone());
                    async move {
                        let name = l.job.unwrap().name;
                        c.complete_job(pb::CompleteJobRequest {
                            name: name.clone(),
                            lease_id: l.lease_id,
                            ..Default::default()
                        })
                        .await
                        .unwrap();
                        on_complete(name, Instant::now());
                    }
                }))
                .await;
            }
        });
    }
    tasks
}

/// Plain jobs end to end on `bin`: jobs/s, and whole-machine and server CPU µs per job.
async fn plain_round(bin: &str, name: &str, total: usize) -> (f64, f64, f64) {
    let rig = Rig::start(bin, name).await;
    let pid = rig.server.child.id();
    let server_cpu = common::cpu_secs(pid);
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let last = Arc::new(tokio::sync::Notify::new());
    let (start, cpu) = (Instant::now(), machine_busy_secs());
    let on_complete: OnComplete = {
        let (done, last) = (done.clone(), last.clone());
        Arc::new(move |_, _| {
            if done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == total {
                last.notify_one();
            }
        })
    };
    let mut workers = spawn_workers(
        &rig,
        16,
        &["plain"],
        10,
        Duration::ZERO,
        stop.clone(),
        Arc::new(|_, _| {}),
        on_complete,
    );
    let producers: Vec<_> = (0..64)
        .map(|p| {
            let mut c = rig.client(p);
            let project = rig.project.clone();
            tokio::spawn(async move {
                for _ in 0..total / 64 + usize::from(p < total % 64) {
                    c.create_job(pb::CreateJobRequest {
                        parent: project.clone(),
                        job: Some(pb::Job {
                            kind: "plain".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    last.notified().await;
    let (took, cpu) = (start.elapsed(), machine_busy_secs() - cpu);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in producers {
        p.await.unwrap();
    }
    workers.abort_all();
    while workers.join_next().await.is_some() {}
    (
        total as f64 / took.as_secs_f64(),
        cpu * 1e6 / total as f64,
        (common::cpu_secs(pid) - server_cpu) * 1e6 / total as f64,
    )
}

async fn plain(baseline: Option<String>) {
    let total = std::env::var("MP_BENCH_TOTAL")
        .ok()
        .and_then(|v| v.parse().ok())
        // Rounds of 8,000 jobs were mostly warm-up: the same builds varied by 15% a round.
        .unwrap_or(30_000);
    let rounds = 6;
    println!(
        "plain jobs end to end (no dependencies, no key, no queue limits): 64 CreateJob callers, 16 workers x 10, {total} jobs per round, {rounds} rounds alternated"
    );
    let Some(baseline) = baseline else {
        let (rate, cpu, server) = plain_round(THIS_BUILD, "plain", total).await;
        println!(
            "  this build: {rate:.0} jobs/s, {cpu:.0} machine µs/job, {server:.0} server µs/job (set MP_BENCH_BASELINE_BIN to compare; see the top of this file)\n"
        );
        return;
    };
    // One uncounted round of each first: the run's very first round met a cold machine
    // (Postgres's caches, the page cache) and ran 15% below every later round of the
    // same build, always to the cost of whichever went first.
    for (bin, who) in [(THIS_BUILD, "this"), (baseline.as_str(), "baseline")] {
        let (rate, _, _) = plain_round(bin, &format!("plainwarm{who}"), total / 4).await;
        println!("  warm-up {who:>9}: {rate:>7.0} jobs/s (not counted)");
    }
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for round in 0..rounds {
        // Alternate which goes first, so neither always meets a warmer machine.
        let order: [(&str, bool); 2] = if round % 2 == 0 {
            [(THIS_BUILD, true), (&baseline, false)]
        } else {
            [(&baseline, false), (THIS_BUILD, true)]
        };
        for (bin, is_ours) in order {
            let name = format!("plain{round}{}", if is_ours { "a" } else { "b" });
            let (rate, cpu, server) = plain_round(bin, &name, total).await;
            println!(
                "  round {round} {:>9}: {rate:>7.0} jobs/s {cpu:>6.0} machine µs/job {server:>6.0} server µs/job",
                if is_ours { "this" } else { "baseline" }
            );
            if is_ours {
                ours.push((rate, cpu));
            } else {
                theirs.push((rate, cpu));
            }
        }
    }
    let median = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (x[(x.len() - 1) / 2] + x[x.len() / 2]) / 2.0
    };
    let (r1, r0) = (median(&ours, |x| x.0), median(&theirs, |x| x.0));
    let (c1, c0) = (median(&ours, |x| x.1), median(&theirs, |x| x.1));
    println!(
        "  median: this {r1:.0} jobs/s ({c1:.0} µs/job), baseline {r0:.0} jobs/s ({c0:.0} µs/job): {:.1}% of the baseline's rate, {:+.1}% CPU per job (target: at least 97%)\n",
        100.0 * r1 / r0,
        100.0 * (c1 / c0 - 1.0)
    );
}

/// 1,000 script -> speech -> render pipelines, ten per BatchCreateJobs: all at once for
/// the rate, then one batch every `pace` for the hand-over latency (at a load the
/// workers keep up with, so it measures the engine, not a queue of work).
async fn chains() {
    let (rate, _) = chains_run("chains", None).await;
    // Half the rate measured above, ten pipelines (30 jobs) per batch.
    let pace = Duration::from_secs_f64(30.0 / (rate / 2.0));
    let (_, (n, p50, p99)) = chains_run("chainspaced", Some(pace)).await;
    println!(
        "1,000 three-stage pipelines (ten per BatchCreateJobs, 8 workers x 10 per stage): {rate:.0} jobs/s end to end, all created at once; at half that rate (a batch every {:.0} ms), a stage's completion to its dependent's lease ({n} hand-overs): p50 {p50:.1} ms, p99 {p99:.1} ms (target p99: under 20 ms)\n",
        pace.as_secs_f64() * 1000.0
    );
}

/// One run of `chains`: jobs/s, and (hand-overs, p50, p99 ms).
async fn chains_run(name: &str, pace: Option<Duration>) -> (f64, (usize, f64, f64)) {
    let rig = Rig::start(THIS_BUILD, name).await;
    let pipelines = 1000;
    let total = pipelines * 3;
    let completed: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let waits: Arc<Mutex<Vec<f64>>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let last = Arc::new(tokio::sync::Notify::new());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on_lease: OnLease = {
        let (completed, waits) = (completed.clone(), waits.clone());
        Arc::new(move |l, at| {
            if let Some(dep) = l.job.as_ref().and_then(|j| j.depends_on.first())
                && let Some(t) = completed.lock().unwrap().get(dep)
            {
                waits
                    .lock()
                    .unwrap()
                    .push(at.saturating_duration_since(*t).as_secs_f64() * 1000.0);
            }
        })
    };
    let on_complete: OnComplete = {
        let (completed, done, last) = (completed.clone(), done.clone(), last.clone());
        Arc::new(move |name, at| {
            completed.lock().unwrap().insert(name, at);
            if done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == total {
                last.notify_one();
            }
        })
    };
    let start = Instant::now();
    // One worker pool per stage, as fleets are (a TTS fleet, a GPU fleet).
    let mut pools = Vec::new();
    for kind in ["script", "speech", "render"] {
        pools.push(spawn_workers(
            &rig,
            8,
            &[kind],
            10,
            Duration::ZERO,
            stop.clone(),
            on_lease.clone(),
            on_complete.clone(),
        ));
    }
    let producers: Vec<_> = (0..10)
        .map(|p| {
            let mut c = rig.client(p);
            let project = rig.project.clone();
            tokio::spawn(async move {
                if let Some(pace) = pace {
                    tokio::time::sleep(pace * p as u32).await;
                }
                for _ in 0..pipelines / 100 {
                    let mut requests = Vec::new();
                    for i in 0..10 {
                        let step =
                            |kind: &str, key: String, deps: Vec<String>| pb::CreateJobRequest {
                                job: Some(pb::Job {
                                    kind: kind.into(),
                                    depends_on: deps,
                                    ..Default::default()
                                }),
                                key,
                                ..Default::default()
                            };
                        requests.push(step("script", format!("s{i}"), vec![]));
                        requests.push(step("speech", format!("t{i}"), vec![format!("@s{i}")]));
                        requests.push(step("render", String::new(), vec![format!("@t{i}")]));
                    }
                    c.batch_create_jobs(pb::BatchCreateJobsRequest {
                        parent: project.clone(),
                        requests,
                    })
                    .await
                    .unwrap();
                    if let Some(pace) = pace {
                        // Ten producers: each sends every tenth batch.
                        tokio::time::sleep(pace * 10).await;
                    }
                }
            })
        })
        .collect();
    last.notified().await;
    let took = start.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in producers {
        p.await.unwrap();
    }
    for mut pool in pools {
        pool.abort_all();
        while pool.join_next().await.is_some() {}
    }
    let waits = waits.lock().unwrap().clone();
    let n = waits.len();
    let (p50, p99) = p50_p99(waits);
    (total as f64 / took.as_secs_f64(), (n, p50, p99))
}

/// One key with 10,000 queued jobs, drained by 8 busy workers (2 ms per job), while a
/// job of a new key arrives every 20 ms.
async fn fairness() {
    let rig = Rig::start(THIS_BUILD, "fairness").await;
    let mut c = rig.client(0);
    for _ in 0..10 {
        let requests = (0..1000)
            .map(|_| pb::CreateJobRequest {
                job: Some(pb::Job {
                    kind: "render".into(),
                    concurrency_key: "big".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect();
        c.batch_create_jobs(pb::BatchCreateJobsRequest {
            parent: rig.project.clone(),
            requests,
        })
        .await
        .unwrap();
    }
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let waits: Arc<Mutex<Vec<f64>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on_lease: OnLease = {
        let (created, waits) = (created.clone(), waits.clone());
        Arc::new(move |l, at| {
            let name = &l.job.as_ref().unwrap().name;
            if let Some(t) = created.lock().unwrap().remove(name) {
                waits
                    .lock()
                    .unwrap()
                    .push(at.saturating_duration_since(t).as_secs_f64() * 1000.0);
            }
        })
    };
    let mut workers = spawn_workers(
        &rig,
        8,
        &["render"],
        1,
        Duration::from_millis(2),
        stop.clone(),
        on_lease,
        Arc::new(|_, _| {}),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lone = 100;
    for i in 0..lone {
        let job = c
            .create_job(pb::CreateJobRequest {
                parent: rig.project.clone(),
                job: Some(pb::Job {
                    kind: "render".into(),
                    concurrency_key: format!("customer-{i}"),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        created.lock().unwrap().insert(job.name, Instant::now());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    workers.abort_all();
    while workers.join_next().await.is_some() {}
    let waits = waits.lock().unwrap().clone();
    let n = waits.len();
    let (p50, p99) = p50_p99(waits);
    println!(
        "fairness: one key with 10,000 queued jobs, 8 workers busy 2 ms per job; {n} of {lone} lone-key jobs leased, wait from created to leased: p50 {p50:.1} ms, p99 {p99:.1} ms (target p99: under 100 ms)\n"
    );
}

#[tokio::main]
async fn main() {
    println!(
        "mediaplane pipelines and fair queues benchmark (2-core machine shared with Postgres and Redis)\n"
    );
    if wanted("plain") {
        plain(std::env::var("MP_BENCH_BASELINE_BIN").ok()).await;
    }
    if wanted("chains") {
        chains().await;
    }
    if wanted("fairness") {
        fairness().await;
    }
}
