//! `mediaplane worker`: runs jobs by executing a command, speaking the worker protocol
//! (AcquireJobs, ReportProgress as heartbeat, FailJob, and BatchCompleteJobs, which
//! completes a job and leases the next one for its slot in the same call), over one
//! WorkerSession stream unless told otherwise (`calls.rs`).
//!
//! The command runs under `sh -c` with the job's input as JSON on stdin and in
//! `MEDIAPLANE_JOB_INPUT`, plus `MEDIAPLANE_JOB_NAME`, `MEDIAPLANE_JOB_KIND` and
//! `MEDIAPLANE_JOB_ATTEMPT`, `MEDIAPLANE_DEPENDENCIES` (the job's dependencies as they
//! ended, a JSON array of `{name, kind, state, result, output_assets}` in the order of
//! `depends_on`; `[]` for a job without any), and `TRACEPARENT` (W3C trace context of
//! the request that created the job, when it had one; the worker's own calls about the
//! job carry it too). It reports by printing lines on stdout:
//! - `PROGRESS <percent> [step]`            progress, and the current step
//! - `MESSAGE <text>`                        a human-readable status line
//! - `RESULT <json object>`                  the job's result
//! - `OUTPUT <projects/p/assets/a>`          an output asset (repeatable)
//!
//! Exit code 0 completes the job; any other fails the attempt (retryable, so the
//! server's retry policy applies). A cancel request kills the command.
use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::Command,
    sync::Mutex,
};
use tonic::Code;

use crate::{
    client::{ClientArgs, calls::WorkerCalls},
    convert::{json_to_struct, struct_to_json},
    proto::v1 as pb,
};

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Job kinds to run (comma-separated or repeated).
    #[arg(long, required = true, value_delimiter = ',')]
    pub kinds: Vec<String>,
    /// Shell command that runs one job.
    #[arg(long)]
    pub command: String,
    /// Jobs run at once.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Lease length; heartbeats are sent every third of it.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub lease: Duration,
    /// Name shown in `Job.worker_id` [default: hostname-pid].
    #[arg(long)]
    pub worker_id: Option<String>,
    /// Exit after this many jobs (0: run until stopped).
    #[arg(long, default_value_t = 0)]
    pub max_jobs: u64,
    /// Make each worker call on its own instead of over one WorkerSession stream (for a
    /// proxy on the way that cannot carry bidirectional gRPC streams).
    #[arg(long)]
    pub no_session: bool,
}

/// A leased job as its calls name it.
struct Held {
    name: String,
    lease_id: String,
    /// Sent as `traceparent` with every call about the job.
    traceparent: Option<tonic::metadata::AsciiMetadataValue>,
}

impl Held {
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(tp) = &self.traceparent {
            request.metadata_mut().insert("traceparent", tp.clone());
        }
        request
    }
}

#[derive(Default)]
struct Report {
    percent: i32,
    step: String,
    message: String,
    result: Option<serde_json::Map<String, serde_json::Value>>,
    outputs: Vec<String>,
    dirty: bool,
}

fn parse_line(line: &str, report: &mut Report) {
    let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
    match word {
        "PROGRESS" => {
            let (pct, step) = rest.trim().split_once(' ').unwrap_or((rest.trim(), ""));
            if let Ok(p) = pct.trim_end_matches('%').parse::<f64>() {
                report.percent = p.clamp(0.0, 100.0) as i32;
                if !step.is_empty() {
                    report.step = step.trim().chars().take(1024).collect();
                }
                report.dirty = true;
            }
        }
        "MESSAGE" => {
            report.message = rest.trim().chars().take(1024).collect();
            report.dirty = true;
        }
        "RESULT" => match serde_json::from_str(rest) {
            Ok(serde_json::Value::Object(m)) => report.result = Some(m),
            _ => tracing::warn!(line, "RESULT is not a JSON object; ignored"),
        },
        "OUTPUT" => report.outputs.push(rest.trim().to_owned()),
        _ => tracing::info!(target: "job_output", "{line}"),
    }
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let client = args.client.connect().await?;
    let calls = if args.no_session {
        WorkerCalls::Unary(client.jobs.clone())
    } else {
        WorkerCalls::Session(super::calls::Session::new(client.jobs.clone()))
    };
    let worker_id = args.worker_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "worker".into());
        format!("{host}-{}", std::process::id())
    });
    let args = Arc::new(args);
    let concurrency = args.concurrency.max(1);
    let slots = Arc::new(Slots {
        left: std::sync::atomic::AtomicU64::new(if args.max_jobs > 0 {
            args.max_jobs
        } else {
            u64::MAX
        }),
        stopping: std::sync::atomic::AtomicBool::new(false),
        worker_id: worker_id.clone(),
    });
    let mut tasks = tokio::task::JoinSet::new();
    let spawn = |tasks: &mut tokio::task::JoinSet<Vec<pb::LeasedJob>>, leased| {
        let (jobs, args, slots) = (calls.clone(), args.clone(), slots.clone());
        tasks.spawn(async move { run_job(jobs, &args, &slots, leased).await });
    };
    tracing::info!(%worker_id, kinds = ?args.kinds, "worker started");
    // SIGINT or SIGTERM: take no more jobs, let the running ones finish, then exit.
    let stop = crate::cli::shutdown_signal();
    tokio::pin!(stop);
    loop {
        // Jobs leased along with a completion run in the slot it freed.
        while let Some(next) = tasks.try_join_next() {
            for leased in next.unwrap_or_default() {
                spawn(&mut tasks, leased);
            }
        }
        // Starts this round may make: none while every slot is busy or --max-jobs is
        // reached; then wait for a running job (or a signal), or end once none runs.
        let free = concurrency.saturating_sub(tasks.len()) as u64;
        let want = if free == 0 {
            0
        } else {
            slots.take(free.min(100))
        };
        if want == 0 {
            if tasks.is_empty() {
                break;
            }
            tokio::select! {
                next = tasks.join_next() => {
                    for leased in next.and_then(Result::ok).unwrap_or_default() {
                        spawn(&mut tasks, leased);
                    }
                    continue;
                }
                () = &mut stop => break,
            }
        }
        let request = pb::AcquireJobsRequest {
            wait_timeout: Some(prost_types::Duration {
                seconds: 20,
                nanos: 0,
            }),
            ..slots.acquire(&args, want)
        };
        let mut acquiring = calls.clone();
        let leased = tokio::select! {
            r = acquiring.acquire_jobs(tonic::Request::new(request)) => r,
            () = &mut stop => break,
        };
        let leased = match leased {
            Ok(r) => r.jobs,
            Err(e)
                if matches!(
                    e.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Unknown
                ) =>
            {
                slots.give_back(want);
                tracing::warn!(error = %e, "acquire failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "acquire failed: {} {}",
                    e.code(),
                    e.message()
                ));
            }
        };
        slots.give_back(want.saturating_sub(leased.len() as u64));
        for job in leased {
            spawn(&mut tasks, job);
        }
    }
    slots
        .stopping
        .store(true, std::sync::atomic::Ordering::Relaxed);
    // Jobs already started run to their end (and any leased with their completions).
    if !tasks.is_empty() {
        tracing::info!(
            running = tasks.len(),
            "stopping: finishing the running jobs"
        );
    }
    while let Some(next) = tasks.join_next().await {
        for leased in next.unwrap_or_default() {
            spawn(&mut tasks, leased);
        }
    }
    Ok(())
}

/// How many more jobs this worker may start (`--max-jobs`), shared by the loop that
/// calls AcquireJobs and the jobs that lease their successor with their completion.
struct Slots {
    left: std::sync::atomic::AtomicU64,
    stopping: std::sync::atomic::AtomicBool,
    worker_id: String,
}

impl Slots {
    /// Reserves up to `n` starts; how many were reserved.
    fn take(&self, n: u64) -> u64 {
        use std::sync::atomic::Ordering;
        if self.stopping.load(Ordering::Relaxed) {
            return 0;
        }
        let mut took = 0;
        let _ = self
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                took = left.min(n);
                Some(left - took)
            });
        took
    }

    /// Returns reservations that leased nothing.
    fn give_back(&self, n: u64) {
        if n > 0 {
            self.left.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn acquire(&self, args: &WorkerArgs, max: u64) -> pb::AcquireJobsRequest {
        pb::AcquireJobsRequest {
            worker_id: self.worker_id.clone(),
            kinds: args.kinds.clone(),
            max_jobs: max as i32,
            lease_duration: Some(prost_types::Duration {
                seconds: args.lease.as_secs().max(1) as i64,
                nanos: 0,
            }),
            wait_timeout: None,
        }
    }
}

/// A leased job's dependencies for its command, as JSON.
fn dependencies_json(deps: &[pb::Dependency]) -> String {
    let deps: Vec<serde_json::Value> = deps
        .iter()
        .map(|d| {
            serde_json::json!({
                "name": d.name,
                "kind": d.kind,
                "state": pb::job::State::try_from(d.state)
                    .map(|s| s.as_str_name())
                    .unwrap_or("STATE_UNSPECIFIED"),
                "result": d.result.clone().map(struct_to_json).transpose().ok().flatten(),
                "output_assets": d.output_assets,
            })
        })
        .collect();
    serde_json::Value::Array(deps).to_string()
}

/// Runs one job; the jobs leased with its completion, which run next.
async fn run_job(
    mut jobs: WorkerCalls,
    args: &WorkerArgs,
    slots: &Slots,
    leased: pb::LeasedJob,
) -> Vec<pb::LeasedJob> {
    let Some(job) = leased.job else {
        return Vec::new();
    };
    // Only a well-formed context is passed on: the command may parse it.
    let traceparent = crate::telemetry::trace_id_of(&leased.traceparent)
        .and_then(|_| leased.traceparent.parse().ok());
    let held = Held {
        name: job.name.clone(),
        lease_id: leased.lease_id,
        traceparent,
    };
    let input = job
        .input
        .clone()
        .map(struct_to_json)
        .transpose()
        .ok()
        .flatten()
        .unwrap_or_default();
    let input = serde_json::Value::Object(input).to_string();
    let dependencies = dependencies_json(&leased.dependencies);
    tracing::info!(job = %job.name, attempt = job.attempt, "running");

    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(&args.command)
        .env("MEDIAPLANE_JOB_NAME", &job.name)
        .env("MEDIAPLANE_JOB_KIND", &job.kind)
        .env("MEDIAPLANE_JOB_ATTEMPT", job.attempt.to_string())
        .env("MEDIAPLANE_JOB_INPUT", &input)
        .env("MEDIAPLANE_DEPENDENCIES", &dependencies)
        .env_remove("TRACEPARENT");
    if let Some(tp) = held.traceparent.as_ref().and_then(|v| v.to_str().ok()) {
        command.env("TRACEPARENT", tp);
    }
    let spawned = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            fail(
                &mut jobs,
                &held,
                Code::FailedPrecondition,
                format!("cannot start command: {e}"),
                false,
            )
            .await;
            return Vec::new();
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes()).await;
    }
    let report = Arc::new(Mutex::new(Report::default()));
    let stdout = child.stdout.take().map(|s| {
        let report = report.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(s).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                parse_line(&line, &mut *report.lock().await);
            }
        })
    });
    let stderr_tail = child.stderr.take().map(|s| {
        tokio::spawn(async move {
            let mut tail = std::collections::VecDeque::new();
            let mut lines = BufReader::new(s).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::info!(target: "job_stderr", "{line}");
                if tail.len() == 5 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            Vec::from(tail).join("\n")
        })
    });

    let mut heartbeat = tokio::time::interval((args.lease / 3).max(Duration::from_millis(200)));
    let mut flush = tokio::time::interval(Duration::from_millis(250));
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            _ = heartbeat.tick() => {
                if !beat(&mut jobs, &held, &report, true).await {
                    let _ = child.kill().await;
                    return Vec::new();
                }
            }
            _ = flush.tick() => {
                if !beat(&mut jobs, &held, &report, false).await {
                    let _ = child.kill().await;
                    return Vec::new();
                }
            }
        }
    };
    if let Some(t) = stdout {
        let _ = t.await;
    }
    let stderr = match stderr_tail {
        Some(t) => t.await.unwrap_or_default(),
        None => String::new(),
    };
    // Last progress before the verdict, so watchers see it.
    beat(&mut jobs, &held, &report, false).await;
    let report = std::mem::take(&mut *report.lock().await);
    match status {
        Ok(s) if s.success() => {
            // The completion leases this slot's next job in the same call (one call
            // per job saved); no wait, the main loop long-polls when none came.
            let want = slots.take(1);
            let request = held.request(pb::BatchCompleteJobsRequest {
                requests: vec![pb::CompleteJobRequest {
                    name: job.name.clone(),
                    lease_id: held.lease_id.clone(),
                    result: report.result.map(json_to_struct),
                    output_assets: report.outputs,
                }],
                acquire: (want > 0).then(|| slots.acquire(args, want)),
            });
            let answer = match jobs.batch_complete_jobs(request).await {
                Ok(answer) => answer,
                Err(e) => {
                    slots.give_back(want);
                    tracing::warn!(job = %job.name, error = %e.message(), "completion failed");
                    return Vec::new();
                }
            };
            match answer.results.into_iter().next().and_then(|r| r.outcome) {
                Some(pb::complete_job_result::Outcome::Job(_)) => {
                    tracing::info!(job = %job.name, "succeeded")
                }
                Some(pb::complete_job_result::Outcome::Error(e)) => {
                    tracing::warn!(job = %job.name, error = %e.message, "completion rejected")
                }
                None => tracing::warn!(job = %job.name, "completion unanswered"),
            }
            if let Some(e) = answer.acquire_error {
                tracing::warn!(error = %e.message, "leasing with the completion failed");
            }
            slots.give_back(want.saturating_sub(answer.acquired.len() as u64));
            return answer.acquired;
        }
        Ok(s) => {
            let message = format!(
                "command exited with {s}{}{stderr}",
                if stderr.is_empty() { "" } else { ": " }
            );
            fail(&mut jobs, &held, Code::Unknown, message, true).await;
        }
        Err(e) => {
            fail(
                &mut jobs,
                &held,
                Code::Internal,
                format!("waiting for the command: {e}"),
                true,
            )
            .await
        }
    }
    Vec::new()
}

/// Sends progress (always when `force`, else only when it changed). Returns false
/// when the job must stop: cancellation asked, or the lease is gone.
async fn beat(jobs: &mut WorkerCalls, held: &Held, report: &Mutex<Report>, force: bool) -> bool {
    let name = held.name.as_str();
    let request = {
        let mut r = report.lock().await;
        if !force && !r.dirty {
            return true;
        }
        r.dirty = false;
        held.request(pb::ReportProgressRequest {
            name: name.to_owned(),
            lease_id: held.lease_id.clone(),
            progress_percent: r.percent,
            current_step: r.step.clone(),
            message: r.message.clone(),
        })
    };
    match jobs.report_progress(request).await {
        Ok(r) if r.cancel_requested => {
            tracing::info!(job = name, "cancel requested; stopping");
            fail(
                jobs,
                held,
                Code::Cancelled,
                "cancelled by request".into(),
                false,
            )
            .await;
            false
        }
        Ok(_) => true,
        Err(e) if matches!(e.code(), Code::Aborted | Code::NotFound) => {
            tracing::warn!(job = name, error = %e.message(), "lease lost; abandoning the job");
            false
        }
        Err(e) => {
            tracing::warn!(job = name, error = %e, "heartbeat failed; will retry");
            true
        }
    }
}

async fn fail(jobs: &mut WorkerCalls, held: &Held, code: Code, message: String, retryable: bool) {
    let name = held.name.as_str();
    let request = held.request(pb::FailJobRequest {
        name: name.to_owned(),
        lease_id: held.lease_id.clone(),
        error: Some(tonic_types::pb::Status {
            code: code as i32,
            message: message.chars().take(1024).collect(),
            details: vec![],
        }),
        retryable,
        retry_after: None,
    });
    match jobs.fail_job(request).await {
        Ok(r) => {
            tracing::info!(job = name, state = ?pb::job::State::try_from(r.state), "attempt failed")
        }
        Err(e) => tracing::warn!(job = name, error = %e.message(), "failure report rejected"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines() {
        let mut r = Report::default();
        for line in [
            "PROGRESS 42 encoding pass 1",
            "MESSAGE 3 of 7 frames",
            "RESULT {\"frames\": 7}",
            "OUTPUT projects/p/assets/a",
            "noise",
        ] {
            parse_line(line, &mut r);
        }
        assert_eq!(
            (r.percent, r.step.as_str(), r.message.as_str()),
            (42, "encoding pass 1", "3 of 7 frames")
        );
        assert_eq!(r.result.unwrap()["frames"], 7);
        assert_eq!(r.outputs, vec!["projects/p/assets/a"]);
    }
}
