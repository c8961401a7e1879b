//! Background duties every instance runs: expired leases and retention.
use std::time::Duration;

use chrono::Utc;
use diesel_async::AsyncConnection;
use tokio_util::sync::CancellationToken;

use super::{Engine, Wake, to_publish};
use crate::{
    AppError, AppResult, db,
    domain::{
        job::{AfterFailure, JobError, JobState, after_failure},
        names::JobName,
    },
    proto::v1::job_event::Type as EventType,
};

/// Rows a retention statement deletes at most (jobs, and events by age): a few seconds
/// of work at worst, far under `statement_timeout`.
const PRUNE_BATCH: i64 = 5_000;

/// Retention runs once per this many reap ticks (a minute at the default 1s).
const PRUNE_EVERY_TICKS: u32 = 60;

/// Expired leases handled per transaction; a full batch means more may be waiting.
pub(super) const REAP_BATCH: usize = 100;

/// Reaping and pruning run as two tasks: a long prune (a backlog after a shorter
/// retention, or a statement waiting on a lock) never holds up expired leases.
pub fn spawn(engine: Engine, stop: CancellationToken) {
    let reaper = engine.clone();
    let reaping = stop.clone();
    tokio::spawn(async move {
        let mut reap = tokio::time::interval(reaper.settings.reap_interval);
        reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = reaping.cancelled() => return,
                _ = reap.tick() => loop {
                    // Drain in batches when many leases expired at once.
                    match reaper.reap_expired().await {
                        Ok(n) if n >= REAP_BATCH => continue,
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "reaping expired leases failed");
                            break;
                        }
                    }
                },
            }
        }
    });
    tokio::spawn(async move {
        let mut prune = tokio::time::interval(engine.settings.reap_interval * PRUNE_EVERY_TICKS);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = prune.tick() => match engine.prune().await {
                    Ok((0, 0)) => {}
                    Ok((jobs, events)) => tracing::info!(jobs, events, "pruned finished jobs and old events"),
                    Err(e) => tracing::warn!(error = %e, "pruning failed"),
                },
            }
        }
    });
}

impl Engine {
    /// Expired leases: requeue with backoff, fail when attempts are used up, cancel when
    /// cancellation was asked. Safe on every instance at once (SKIP LOCKED).
    pub async fn reap_expired(&self) -> AppResult<usize> {
        let backoff = self.settings.backoff;
        let mut conn = self.conn().await?;
        let (count, published, kinds) = conn
            .transaction(async |conn| {
                let expired = db::jobs::lock_expired(conn, REAP_BATCH as i64).await?;
                let mut changes = Vec::with_capacity(expired.len());
                let mut kinds = Wake::new();
                for job in expired {
                    let worker = job.worker_id.clone().unwrap_or_default();
                    let next = after_failure(job.attempt, job.max_attempts, job.cancel_requested, true, None, &backoff);
                    let (state, retry_in, code, message) = match next {
                        AfterFailure::Retry { not_before } => {
                            (JobState::Queued, Some(not_before), tonic::Code::Unavailable, format!("lease expired: worker {worker:?} stopped reporting; retrying"))
                        }
                        AfterFailure::Fail => (
                            JobState::Failed,
                            None,
                            tonic::Code::DeadlineExceeded,
                            format!("lease expired on attempt {} of {}: worker {worker:?} stopped reporting", job.attempt, job.max_attempts),
                        ),
                        AfterFailure::Cancel => (JobState::Cancelled, None, tonic::Code::Cancelled, "cancelled; the worker stopped reporting".into()),
                    };
                    let error = JobError { code: code as i32, message };
                    let job = db::jobs::end_attempt(conn, job.id, state, retry_in, &error).await?;
                    tracing::info!(job = %JobName { project: job.project_id, job: job.id }, state = job.state.as_str(), "lease expired");
                    *kinds.entry(job.kind.clone()).or_default() += 1;
                    changes.push((job, EventType::StateChanged));
                }
                let expired: Vec<String> = changes.iter().map(|(j, _)| j.kind.clone()).collect();
                super::settle_ended(conn, &mut changes, &mut kinds).await?;
                let published = to_publish(&changes);
                Ok::<_, AppError>((expired, published, kinds))
            })
            .await?;
        for kind in &count {
            self.settings
                .metrics
                .job_event(crate::metrics::JobEvent::LeaseExpired, kind);
        }
        self.publish(published, kinds);
        Ok(count.len())
    }

    /// Deletes what the retention settings let go, a batch per statement (each its own
    /// transaction), until nothing is left.
    pub async fn prune(&self) -> AppResult<(usize, usize)> {
        let mut conn = self.conn().await?;
        let now = Utc::now();
        let age =
            |d: Duration| now - chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        let (jobs_before, events_before) = (
            age(self.settings.job_retention),
            age(self.settings.event_retention),
        );
        let (mut jobs, mut events) = (0, 0);
        loop {
            let (j, e) =
                db::jobs::prune(&mut conn, jobs_before, events_before, PRUNE_BATCH).await?;
            jobs += j;
            events += e;
            if j < PRUNE_BATCH as usize && e < PRUNE_BATCH as usize {
                return Ok((jobs, events));
            }
        }
    }
}
