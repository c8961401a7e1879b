//! Leasing a worker's jobs, as AcquireJobs does it, and as BatchCompleteJobs does it
//! after its completions when asked (the next jobs in the same call, as BullMQ's
//! worker fetches its next job when it moves one to finished): the same checks, the
//! same long-poll, the same answer.
use std::time::Duration;

use tonic::Status;

use crate::{
    AppError,
    auth::Caller,
    convert::duration,
    domain::names::JobName,
    domain::{
        Violations,
        job::{self, Job},
        text,
    },
    engine::{Engine, LeaseOp},
    proto::v1 as pb,
};

/// A checked AcquireJobsRequest.
pub struct Acquire {
    worker_id: String,
    kinds: Vec<String>,
    max: i64,
    lease: Duration,
    wait: Duration,
}

impl Acquire {
    /// Checks `r` for `caller`; `prefix` names the request's place in a larger one
    /// (`acquire.` in BatchCompleteJobs) in the violations.
    pub fn check(
        caller: &Caller,
        r: &pb::AcquireJobsRequest,
        prefix: &str,
    ) -> Result<Self, Status> {
        let mut v = Violations::default();
        if r.worker_id.is_empty()
            || r.worker_id.chars().count() > 128
            || !text::storable(&r.worker_id)
        {
            v.add(
                format!("{prefix}worker_id"),
                "required, at most 128 characters, without NUL",
            );
        }
        if r.kinds.is_empty() || r.kinds.len() > 64 {
            v.add(format!("{prefix}kinds"), "1 to 64 kinds");
        }
        for (i, kind) in r.kinds.iter().enumerate() {
            if !job::valid_kind(kind) {
                v.add(format!("{prefix}kinds[{i}]"), "not a valid kind");
            }
        }
        let max = match r.max_jobs {
            0 => 1,
            n if (1..=job::MAX_ACQUIRE).contains(&n) => n,
            _ => {
                v.add(
                    format!("{prefix}max_jobs"),
                    format!("from 1 to {}", job::MAX_ACQUIRE),
                );
                1
            }
        };
        let lease = super::jobs::positive_duration(
            r.lease_duration,
            &format!("{prefix}lease_duration"),
            job::DEFAULT_LEASE,
            job::MIN_LEASE,
            job::MAX_LEASE,
            &mut v,
        );
        let wait = match r.wait_timeout {
            None => Duration::ZERO,
            Some(d) => match duration(&d) {
                Some(d) if d <= job::MAX_WAIT => d,
                _ => {
                    v.add(
                        format!("{prefix}wait_timeout"),
                        format!("from 0s to {:?}", job::MAX_WAIT),
                    );
                    Duration::ZERO
                }
            },
        };
        v.into_result(())?;
        if !caller.kinds.is_empty() {
            if let Some(kind) = r.kinds.iter().find(|k| !caller.kinds.contains(k)) {
                return Err(AppError::PermissionDenied(format!(
                    "this worker token may not run jobs of kind {kind:?}"
                ))
                .into());
            }
        }
        Ok(Self {
            worker_id: r.worker_id.clone(),
            kinds: r.kinds.clone(),
            max: i64::from(max),
            lease,
            wait,
        })
    }

    /// Leases the jobs (waiting up to the request's `wait_timeout` for some) and answers
    /// as many as `budget` bytes hold; the rest go back to the queue at once.
    pub async fn run(
        &self,
        engine: &Engine,
        caller: &Caller,
        budget: usize,
    ) -> Result<Vec<pb::LeasedJob>, AppError> {
        let jobs = engine
            .acquire(
                &self.worker_id,
                &self.kinds,
                self.max,
                self.lease,
                self.wait,
            )
            .await?;
        answer(engine, caller, jobs, budget).await
    }

    /// `writes` (a BatchCompleteJobs's completions) and this lease in one transaction:
    /// one result per write, and the jobs leased (`None` if leasing is yet to be done:
    /// the transaction failed, so the writes were applied on their own instead).
    pub async fn after(
        &self,
        engine: &Engine,
        caller: &Caller,
        writes: Vec<(JobName, uuid::Uuid, LeaseOp)>,
    ) -> (Vec<Result<Job, AppError>>, Option<Vec<Job>>) {
        let turn = engine
            .turn(
                caller,
                writes,
                &self.worker_id,
                &self.kinds,
                self.max,
                self.lease,
            )
            .await;
        (turn.written, turn.leased)
    }

    /// The answer for the jobs `after` leased; with none (or none leased yet), the
    /// long-poll `run` makes for the request's `wait_timeout`.
    pub async fn answer_leased(
        &self,
        engine: &Engine,
        caller: &Caller,
        leased: Option<Vec<Job>>,
        budget: usize,
    ) -> Result<Vec<pb::LeasedJob>, AppError> {
        match leased {
            Some(jobs) if !jobs.is_empty() || self.wait.is_zero() => {
                answer(engine, caller, jobs, budget).await
            }
            _ => self.run(engine, caller, budget).await,
        }
    }
}

async fn answer(
    engine: &Engine,
    caller: &Caller,
    jobs: Vec<Job>,
    budget: usize,
) -> Result<Vec<pb::LeasedJob>, AppError> {
    let leases: Vec<(uuid::Uuid, Option<uuid::Uuid>)> =
        jobs.iter().map(|j| (j.id, j.lease_id)).collect();
    // Their dependencies as they ended, read once for all of them.
    let dependencies = match engine.dependencies_of(&jobs).await {
        Ok(d) => d,
        Err(e) => {
            // Leased but never answered: back to the queue now, not after the lease.
            release(engine, &leases).await;
            return Err(e);
        }
    };
    let mut jobs: Vec<pb::LeasedJob> = jobs
        .into_iter()
        .map(|j| {
            let mut leased = pb::LeasedJob {
                lease_id: j
                    .lease_id
                    .map(|l| engine.settings.leases.seal(&caller.sub, l).to_string())
                    .unwrap_or_default(),
                lease_expire_time: j.lease_expire_time.map(crate::convert::timestamp),
                traceparent: j.traceparent.clone().unwrap_or_default(),
                dependencies: j
                    .depends_on
                    .iter()
                    .filter_map(|d| dependencies.get(d).cloned().map(Into::into))
                    .collect(),
                job: None,
            };
            leased.job = Some(j.into());
            // Results too large to come along (100 dependencies of 256 KiB each):
            // names, states and outputs only; the worker reads results with GetJob.
            if !leased.dependencies.is_empty() && prost::Message::encoded_len(&leased) > budget {
                for d in &mut leased.dependencies {
                    d.result = None;
                }
            }
            leased
        })
        .collect();
    // Jobs with large inputs: as many as one response holds; the rest go back to the
    // queue at once rather than sit leased to a worker who never heard of them.
    let n = super::fitting(&jobs, budget);
    if n < jobs.len() {
        jobs.truncate(n);
        release(engine, &leases[n..]).await;
    }
    Ok(jobs)
}

/// Hands leased jobs back. The jobs sent are the worker's either way; if the release
/// fails, the reaper requeues the others when their leases expire.
async fn release(engine: &Engine, leases: &[(uuid::Uuid, Option<uuid::Uuid>)]) {
    let unsent: Vec<_> = leases
        .iter()
        .filter_map(|(id, lease)| lease.map(|l| (*id, l)))
        .collect();
    if let Err(error) = engine.release(&unsent).await {
        tracing::warn!(%error, jobs = unsent.len(), "could not release unsent leases");
    }
}
