//! The studio page under load: a project with 10,000 jobs, 100 of them running and each
//! reporting progress 5 times a second, followed in headless Chromium. Prints the time
//! from a `ReportProgress` returning to its row showing it (p50/p99, the page's clock
//! against the reporter's, same machine), the page's main-thread busy share over the
//! run (Chromium's TaskDuration) and the first load of the project page.
//!
//! `cargo bench --bench studio` (needs `/usr/bin/chromium` and `npm ci` in
//! tests/browser, which `bash scripts/test.sh` installs). Targets: p99 under 250 ms,
//! main thread under 50% busy, first load under 1 s.
mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{Bearer, channel, start_server, token};
use mediaplane::proto::v1::{self as pb, jobs_service_client::JobsServiceClient};
use tokio::io::AsyncBufReadExt;

const JOBS: usize = 10_000;
const RUNNING: usize = 100;
const REPORTS_PER_SEC: u64 = 5;
const RUN_SECS: u64 = 30;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    if !std::path::Path::new(&format!("{dir}/node_modules/playwright-core")).exists()
        || !std::path::Path::new("/usr/bin/chromium").exists()
    {
        eprintln!(
            "needs /usr/bin/chromium and tests/browser/node_modules: run `bash scripts/test.sh` once"
        );
        std::process::exit(2);
    }
    let server = start_server("studio", &[]);
    let ch = channel(&server.addr).await;
    let t = token("bench", &[]);
    let mut projects = pb::projects_service_client::ProjectsServiceClient::with_interceptor(
        ch.clone(),
        Bearer(t.clone()),
    );
    let project = projects
        .create_project(pb::CreateProjectRequest {
            project: Some(pb::Project {
                display_name: "Studio bench".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut jobs = JobsServiceClient::with_interceptor(ch.clone(), Bearer(t.clone()));
    for _ in 0..JOBS / 1000 {
        let requests = (0..1000)
            .map(|_| pb::CreateJobRequest {
                parent: String::new(),
                job: Some(pb::Job {
                    kind: "render".into(),
                    ..Default::default()
                }),
                request_id: String::new(),
                key: String::new(),
            })
            .collect();
        jobs.batch_create_jobs(pb::BatchCreateJobsRequest {
            parent: project.name.clone(),
            requests,
        })
        .await
        .unwrap();
    }
    let mut worker =
        JobsServiceClient::with_interceptor(ch.clone(), Bearer(token("gpu", &["worker"])));
    let leased = worker
        .acquire_jobs(pb::AcquireJobsRequest {
            worker_id: "bench".into(),
            kinds: vec!["render".into()],
            max_jobs: RUNNING as i32,
            lease_duration: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            wait_timeout: None,
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(leased.len(), RUNNING);

    let mut node = tokio::process::Command::new("node")
        .arg(format!("{dir}/studio_bench.mjs"))
        .env("SERVER", &server.addr)
        .env("TOKEN", &t)
        .env("PROJECT", &project.name)
        .env("RUN_SECS", RUN_SECS.to_string())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(node.stdout.take().unwrap()).lines();
    while let Some(line) = lines.next_line().await.unwrap() {
        if line == "ready" {
            break;
        }
    }

    // Each running job reports 5 times a second; every report carries a unique tag.
    let returned: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let stop = tokio::time::Instant::now() + Duration::from_secs(RUN_SECS);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, l) in leased.into_iter().enumerate() {
        let (mut c, returned) = (worker.clone(), returned.clone());
        tasks.spawn(async move {
            let name = l.job.unwrap().name;
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / REPORTS_PER_SEC));
            let mut n = 0;
            while tokio::time::Instant::now() < stop {
                tick.tick().await;
                n += 1;
                let tag = format!("j{i}r{n}");
                c.report_progress(pb::ReportProgressRequest {
                    name: name.clone(),
                    lease_id: l.lease_id.clone(),
                    progress_percent: n % 100,
                    current_step: tag.clone(),
                    message: String::new(),
                })
                .await
                .unwrap();
                returned.lock().unwrap().insert(tag, now_ms());
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let mut last = String::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        last = line;
    }
    node.wait().await.unwrap();
    let seen: serde_json::Value = serde_json::from_str(&last).expect("the page's figures");
    let returned = returned.lock().unwrap();
    let mut lag: Vec<u64> = seen["tags"]
        .as_object()
        .unwrap()
        .iter()
        .filter_map(|(tag, at)| {
            let sent = returned.get(tag)?;
            Some(at.as_u64()?.saturating_sub(*sent))
        })
        .collect();
    lag.sort_unstable();
    println!(
        "Studio page: {JOBS} jobs, {RUNNING} running, each reporting {REPORTS_PER_SEC}/s for {RUN_SECS} s\n"
    );
    println!(
        "reports {:>7}   shown {:>7} ({:.0}%; a row shows the newest of the reports one frame brings)",
        returned.len(),
        lag.len(),
        100.0 * lag.len() as f64 / returned.len().max(1) as f64
    );
    println!(
        "report returned -> row shows: p50 {} ms, p99 {} ms (target p99 under 250 ms)",
        percentile(&lag, 0.5),
        percentile(&lag, 0.99)
    );
    println!(
        "main thread busy: {:.0}% (target under 50%)",
        100.0 * seen["mainThreadBusy"].as_f64().unwrap()
    );
    println!(
        "first load of the project page: {} ms (target under 1,000 ms)",
        seen["firstLoadMs"]
    );
}
