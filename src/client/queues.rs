//! `mediaplane queues list | get | pause | resume | set`: operators' view of
//! QueuesService.
use std::{process::ExitCode, time::Duration};

use crate::{client::ClientArgs, proto::v1 as pb};

#[derive(Debug, clap::Subcommand)]
pub enum QueuesCommand {
    /// Every queue with jobs or settings: what it holds and how it is set.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One queue (`render` or `queues/render`).
    Get {
        #[command(flatten)]
        client: ClientArgs,
        queue: String,
    },
    /// Stop leasing jobs of a kind (running jobs finish).
    Pause {
        #[command(flatten)]
        client: ClientArgs,
        queue: String,
    },
    /// Lease jobs of a kind again.
    Resume {
        #[command(flatten)]
        client: ClientArgs,
        queue: String,
    },
    /// Set a queue's limits; only the options given change.
    Set {
        #[command(flatten)]
        client: ClientArgs,
        queue: String,
        /// Jobs of the kind running at once across every worker (0: no limit).
        #[arg(long)]
        max_running: Option<i32>,
        /// Jobs running at once per concurrency key (0: no limit).
        #[arg(long)]
        max_running_per_key: Option<i32>,
        /// Starts per interval, as JOBS/INTERVAL (`10/1s`, `600/1m`); `none` removes it.
        #[arg(long)]
        start_rate: Option<String>,
    },
}

fn queue_name(q: &str) -> String {
    if q.starts_with("queues/") {
        q.to_owned()
    } else {
        format!("queues/{q}")
    }
}

fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", s.code(), s.message())
}

fn parse_rate(text: &str) -> anyhow::Result<Option<pb::StartRate>> {
    if text == "none" {
        return Ok(None);
    }
    let (jobs, interval) = text
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("--start-rate: expected JOBS/INTERVAL, like 10/1s"))?;
    let jobs: i32 = jobs
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("--start-rate: {jobs:?} is not a number of jobs"))?;
    let interval = humantime::parse_duration(interval.trim())
        .map_err(|e| anyhow::anyhow!("--start-rate: {interval:?}: {e}"))?;
    Ok(Some(pb::StartRate {
        jobs,
        interval: Some(prost_types::Duration {
            seconds: interval.as_secs() as i64,
            nanos: interval.subsec_nanos() as i32,
        }),
    }))
}

fn rate_text(r: &Option<pb::StartRate>) -> String {
    match r {
        Some(r) => {
            let d = r.interval.as_ref().map_or(Duration::ZERO, |d| {
                Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
            });
            format!("{}/{}", r.jobs, humantime::format_duration(d))
        }
        None => "-".into(),
    }
}

fn limit_text(n: i32) -> String {
    if n == 0 { "-".into() } else { n.to_string() }
}

fn age_text(d: &Option<prost_types::Duration>) -> String {
    d.as_ref().map_or("-".into(), |d| {
        format!("{:.1}s", d.seconds as f64 + f64::from(d.nanos) / 1e9)
    })
}

fn print_header() {
    println!(
        "{:<24} {:>7} {:>8} {:>8} {:>8} {:>9} {:>7} {:>7} {:>8} {:>8} {:>10}",
        "QUEUE",
        "STATE",
        "WAITING",
        "QUEUED",
        "RUNNING",
        "OLDEST",
        "OK/MIN",
        "ERR/MIN",
        "MAX",
        "PER-KEY",
        "RATE"
    );
}

fn print_row(q: &pb::Queue) {
    println!(
        "{:<24} {:>7} {:>8} {:>8} {:>8} {:>9} {:>7} {:>7} {:>8} {:>8} {:>10}",
        q.name.trim_start_matches("queues/"),
        if q.paused { "paused" } else { "active" },
        q.waiting_jobs,
        q.queued_jobs,
        q.running_jobs,
        age_text(&q.oldest_queued_age),
        q.completions_per_minute,
        q.failures_per_minute,
        limit_text(q.max_running),
        limit_text(q.max_running_per_key),
        rate_text(&q.start_rate),
    );
}

pub async fn run(command: QueuesCommand) -> anyhow::Result<ExitCode> {
    match command {
        QueuesCommand::List { client } => {
            let mut c = client.connect().await?;
            let list = c
                .queues
                .list_queues(pb::ListQueuesRequest {})
                .await
                .map_err(status)?
                .into_inner();
            print_header();
            for q in &list.queues {
                print_row(q);
            }
        }
        QueuesCommand::Get { client, queue } => {
            let mut c = client.connect().await?;
            let q = c
                .queues
                .get_queue(pb::GetQueueRequest {
                    name: queue_name(&queue),
                })
                .await
                .map_err(status)?
                .into_inner();
            print_header();
            print_row(&q);
        }
        QueuesCommand::Pause { client, queue } => return set_paused(&client, &queue, true).await,
        QueuesCommand::Resume { client, queue } => {
            return set_paused(&client, &queue, false).await;
        }
        QueuesCommand::Set {
            client,
            queue,
            max_running,
            max_running_per_key,
            start_rate,
        } => {
            let mut paths = Vec::new();
            let mut q = pb::Queue {
                name: queue_name(&queue),
                ..Default::default()
            };
            if let Some(n) = max_running {
                q.max_running = n;
                paths.push("max_running".to_owned());
            }
            if let Some(n) = max_running_per_key {
                q.max_running_per_key = n;
                paths.push("max_running_per_key".to_owned());
            }
            if let Some(rate) = start_rate {
                q.start_rate = parse_rate(&rate)?;
                paths.push("start_rate".to_owned());
            }
            if paths.is_empty() {
                anyhow::bail!(
                    "nothing to set: give --max-running, --max-running-per-key or --start-rate"
                );
            }
            return update(&client, q, paths).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn set_paused(client: &ClientArgs, queue: &str, paused: bool) -> anyhow::Result<ExitCode> {
    let q = pb::Queue {
        name: queue_name(queue),
        paused,
        ..Default::default()
    };
    update(client, q, vec!["paused".to_owned()]).await
}

/// Updates the fields `paths` names and prints the queue as it is now.
async fn update(client: &ClientArgs, q: pb::Queue, paths: Vec<String>) -> anyhow::Result<ExitCode> {
    let mut c = client.connect().await?;
    let q = c
        .queues
        .update_queue(pb::UpdateQueueRequest {
            queue: Some(q),
            update_mask: Some(prost_types::FieldMask { paths }),
        })
        .await
        .map_err(status)?
        .into_inner();
    print_header();
    print_row(&q);
    Ok(ExitCode::SUCCESS)
}
