//! The job engine: every change to a job happens here, in one transaction with the
//! event it produces; events are published to Redis only after commit.
//!
//! Here: the engine, its group-commit lanes, and the client's reads and controls (get,
//! list, cancel, retry). `create.rs`: creating jobs. `leases.rs`: the worker protocol
//! (acquire, progress, complete, fail, release) under fencing. `reaper.rs`: expired
//! leases and retention. `fanout/`: committed events to every watcher on every instance.
//! `watch.rs`: WatchJob and WatchJobs streams.
use std::{sync::Arc, time::Duration};

use diesel_async::AsyncConnection;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::{
    AppError, AppResult,
    auth::Caller,
    db,
    domain::{
        job::{Backoff, Job, JobState},
        names::JobName,
    },
    proto::v1::job_event::Type as EventType,
    redis::RedisPool,
};

mod create;
pub mod fanout;
mod leases;
mod queues;
pub mod reaper;
mod turns;
pub mod watch;

pub use create::CreateCall;
pub use fanout::{Published, Wake, event, hub, hub::Hub};
use fanout::{spawn_publisher, to_publish, wake_for};
pub use leases::{AcquireCall, LeaseCall, LeaseOp};
pub use queues::QueueView;
pub use turns::Turn;

#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub backoff: Backoff,
    /// Fallback poll of idle AcquireJobs calls, for wake-ups lost with Redis.
    pub poll_interval: Duration,
    /// How often each instance looks for expired leases.
    pub reap_interval: Duration,
    /// Watchers re-read Postgres this often even when Redis is quiet.
    pub watch_resync: Duration,
    pub job_retention: Duration,
    pub event_retention: Duration,
    /// Lease ids are bound to the subject of the token that acquired them.
    pub leases: crate::auth::LeaseBinding,
    pub metrics: crate::metrics::Metrics,
    /// Cancelled when the server starts to shut down: waiting AcquireJobs calls
    /// answer at once (with nothing) instead of holding the drain.
    pub draining: tokio_util::sync::CancellationToken,
}

#[derive(Clone)]
pub struct Engine {
    pub db: db::Pool,
    publisher: mpsc::Sender<(Vec<Published>, Wake)>,
    pub hub: Hub,
    pub settings: Arc<EngineSettings>,
    /// Group commit for the hot single-job writes; `None` in the engine the lanes
    /// themselves use, which runs each group directly.
    groups: Option<Arc<Groups>>,
    /// Which kinds' queues restrict leasing, as read last (see `queues.rs`).
    restricted: Arc<queues::Restricted>,
}

/// Group transactions in flight at once per kind of write, and calls per transaction.
/// One lane: calls that queue behind a commit share the next one. Measured end to end
/// (two alternating sweeps in one hour): with 2 lanes, 13 of 14 rows cost 12-55% more
/// machine CPU per job than with 1 (smaller groups: more statements, each planned and
/// committed); with 4, three groups in four held a single call. Batched completes on
/// a full queue were about 5% faster with 2, the one place a second lane paid.
const GROUP_LANES: usize = 1;
/// With one lane a group takes everything queued: 256 calls made a full queue's
/// completions wait for several statements in turn (per-job completes 5% slower).
const GROUP_MAX: usize = 1024;
/// Leasing calls per statement: each takes up to `job::MAX_ACQUIRE` jobs, and a statement
/// holds its rows locked until it ends.
const ACQUIRE_GROUP_MAX: usize = 256;

struct Groups {
    creates: crate::batch::Batcher<CreateCall, Handled<CreateCall>>,
    leases: crate::batch::Batcher<LeaseCall, Handled<LeaseCall>>,
    acquires: crate::batch::Batcher<AcquireCall, Vec<Job>>,
    turns: crate::batch::Batcher<turns::TurnCall, turns::Turned>,
}

/// What a lane did with a call `C`.
// The large variant is the common one: boxing it would cost an allocation per call.
#[allow(clippy::large_enum_variant)]
pub enum Handled<C> {
    Done(Job),
    /// Left out of the group because it would have to wait (its project or job is
    /// locked by a deletion, say), or because it needs telling apart (a repeated request
    /// id, a missing project): the caller runs it alone, so whatever it waits for holds
    /// up that caller only, not the lane and every call behind it.
    Alone(C),
}

/// A lease id from the wire (`field` names it in the error); anything else can never
/// be current.
pub fn parse_lease(field: &str, lease_id: &str) -> AppResult<Uuid> {
    Uuid::try_parse(lease_id)
        .map_err(|_| AppError::invalid(field, "not a lease id issued by AcquireJobs"))
}

fn stale_lease(name: JobName) -> AppError {
    AppError::Aborted(format!(
        "lease is not the current lease of {name}: the job was re-leased, finished or cancelled; stop working on it"
    ))
}

impl Engine {
    pub fn new(
        db: db::Pool,
        redis: RedisPool,
        hub: Hub,
        prefix: &str,
        settings: EngineSettings,
    ) -> Self {
        let mut engine = Self {
            db,
            publisher: spawn_publisher(redis, prefix.into(), settings.metrics.clone()),
            hub,
            settings: Arc::new(settings),
            groups: None,
            restricted: Arc::default(),
        };
        let (a, b, c, d) = (
            engine.clone(),
            engine.clone(),
            engine.clone(),
            engine.clone(),
        );
        engine.groups = Some(Arc::new(Groups {
            creates: crate::batch::Batcher::spawn(GROUP_LANES, GROUP_MAX, move |calls| {
                let engine = a.clone();
                engine
                    .settings
                    .metrics
                    .group_committed("create", calls.len());
                async move { crate::batch::shared_or_alone(&calls, |c| engine.create_each(c)).await }
            }),
            leases: crate::batch::Batcher::spawn(GROUP_LANES, GROUP_MAX, move |calls| {
                let engine = b.clone();
                engine
                    .settings
                    .metrics
                    .group_committed("write", calls.len());
                async move { crate::batch::shared_or_alone(&calls, |c| engine.lease_tx(c, false)).await }
            }),
            acquires: crate::batch::Batcher::spawn(GROUP_LANES, ACQUIRE_GROUP_MAX, move |calls| {
                let engine = c.clone();
                engine
                    .settings
                    .metrics
                    .group_committed("acquire", calls.len());
                async move { engine.acquire_group(&calls).await }
            }),
            turns: crate::batch::Batcher::spawn(
                turns::TURN_LANES,
                turns::TURN_GROUP_MAX,
                move |calls| {
                    let engine = d.clone();
                    engine.settings.metrics.group_committed("turn", calls.len());
                    async move {
                        let results =
                            crate::batch::shared_or_alone(&calls, |c| engine.turn_tx(c)).await;
                        Engine::turned(calls, results)
                    }
                },
            ),
        }));
        engine
    }

    async fn conn(&self) -> AppResult<db::PooledConn<'_>> {
        Ok(self.db.get().await?)
    }

    pub async fn get(&self, caller: &Caller, name: JobName) -> AppResult<Job> {
        let mut conn = self.conn().await?;
        db::jobs::get(&mut conn, caller.owner_scope(), name.project, name.job)
            .await?
            .ok_or_else(|| AppError::NotFound(format!("job {name}")))
    }

    /// One page of a project's jobs and whether more follow; a project the caller
    /// cannot see is NOT_FOUND, not an empty list.
    pub async fn list(&self, query: &crate::domain::job::ListJobs) -> AppResult<(Vec<Job>, bool)> {
        let mut conn = self.conn().await?;
        let project = crate::domain::names::ProjectName(query.project);
        db::projects::owner_of(
            &mut conn,
            query.owner.as_deref(),
            query.project,
            db::projects::Lock::None,
        )
        .await?
        .ok_or_else(|| AppError::NotFound(format!("project {project}")))?;
        db::jobs::list(&mut conn, query).await
    }

    /// How far a project's jobs that match `filter` have come.
    pub async fn summarize(
        &self,
        caller: &Caller,
        project: crate::domain::names::ProjectName,
        filter: &crate::domain::job::JobFilter,
    ) -> AppResult<crate::domain::job::JobsSummary> {
        let mut conn = self.conn().await?;
        let owner = caller.owner_scope();
        db::projects::owner_of(&mut conn, owner, project.0, db::projects::Lock::None)
            .await?
            .ok_or_else(|| AppError::NotFound(format!("project {project}")))?;
        let rows = db::jobs::summarize(&mut conn, owner, project.0, filter).await?;
        Ok(crate::domain::job::JobsSummary::from_counts(&rows))
    }

    pub async fn cancel(&self, caller: &Caller, name: JobName) -> AppResult<Job> {
        let mut conn = self.conn().await?;
        let scope = caller.owner_scope().map(str::to_owned);
        let (job, published, wake) = conn
            .transaction(async |conn| {
                let job = db::jobs::lock(conn, scope.as_deref(), name.project, name.job)
                    .await?
                    .ok_or_else(|| AppError::NotFound(format!("job {name}")))?;
                let (job, ty) = match job.state {
                    JobState::Waiting | JobState::Queued => (db::jobs::cancel_queued(conn, job.id).await?, EventType::StateChanged),
                    JobState::Running if job.cancel_requested => return Ok((job, Vec::new(), Wake::new())),
                    JobState::Running => (db::jobs::request_cancel(conn, job.id).await?, EventType::CancelRequested),
                    state => {
                        return Err(AppError::FailedPrecondition(format!(
                            "job {name} is already {}; only WAITING, QUEUED or RUNNING jobs can be cancelled",
                            state.as_str().to_uppercase()
                        )));
                    }
                };
                // Its waiting dependents go with it: at once when it ended, and when it
                // runs, now rather than when its worker stops (except those that run
                // anyway, which wait for its end).
                let dependents = match (job.has_dependents, job.state) {
                    (false, _) => Vec::new(),
                    (true, JobState::Cancelled) => db::jobs::settle_dependents(conn, &[job.id]).await?,
                    (true, _) => db::jobs::cancel_dependents(conn, &[job.id]).await?,
                };
                let wake = wake_for(&dependents);
                let mut changes = vec![(job.clone(), ty)];
                changes.extend(dependents.into_iter().map(|j| (j, EventType::StateChanged)));
                let published = to_publish(&changes);
                Ok((job, published, wake))
            })
            .await?;
        self.publish(published, wake);
        Ok(job)
    }

    pub async fn retry(&self, caller: &Caller, name: JobName) -> AppResult<Job> {
        let mut conn = self.conn().await?;
        let scope = caller.owner_scope().map(str::to_owned);
        let (job, published, wake) = conn
            .transaction(async |conn| {
                let job = db::jobs::lock(conn, scope.as_deref(), name.project, name.job)
                    .await?
                    .ok_or_else(|| AppError::NotFound(format!("job {name}")))?;
                if !matches!(job.state, JobState::Failed | JobState::Cancelled) {
                    return Err(AppError::FailedPrecondition(format!(
                        "job {name} is {}; only FAILED or CANCELLED jobs can be retried",
                        job.state.as_str().to_uppercase()
                    )));
                }
                let state = dependencies_allow(conn, &job).await?;
                let job = db::jobs::requeue(conn, job.id, state).await?;
                let mut changes = vec![(job.clone(), EventType::StateChanged)];
                if job.has_dependents {
                    let rearmed = db::jobs::rearm_dependents(conn, job.id).await?;
                    changes.extend(rearmed.into_iter().map(|j| (j, EventType::StateChanged)));
                }
                let wake = wake_for(changes.iter().map(|(j, _)| j));
                let published = to_publish(&changes);
                Ok::<_, AppError>((job, published, wake))
            })
            .await?;
        self.publish(published, wake);
        Ok(job)
    }
}

/// Settles, in the caller's transaction, the dependents of the jobs in `changes` that just
/// ended: what it releases or cancels is added to `changes`, and the released jobs'
/// kinds to `wake`.
async fn settle_ended(
    conn: &mut diesel_async::AsyncPgConnection,
    changes: &mut Vec<(Job, EventType)>,
    wake: &mut Wake,
) -> AppResult<()> {
    let ended: Vec<Uuid> = changes
        .iter()
        .filter(|(j, _)| j.has_dependents && j.state.is_terminal())
        .map(|(j, _)| j.id)
        .collect();
    let settled = db::jobs::settle_dependents(conn, &ended).await?;
    for (kind, n) in wake_for(&settled) {
        *wake.entry(kind).or_default() += n;
    }
    changes.extend(settled.into_iter().map(|j| (j, EventType::StateChanged)));
    Ok(())
}

/// The state a retried job goes back to: QUEUED, or WAITING while a dependency is
/// unfinished (marked so that its end settles this job). A dependency that failed
/// refuses the retry (unless the job runs anyway): it would be cancelled again at once.
async fn dependencies_allow(
    conn: &mut diesel_async::AsyncPgConnection,
    job: &Job,
) -> AppResult<JobState> {
    if job.depends_on.is_empty() {
        return Ok(JobState::Queued);
    }
    let states = db::jobs::lock_dependencies(conn, job.project_id, &job.depends_on).await?;
    let mut unfinished = Vec::new();
    for (id, (_, state)) in &states {
        match state {
            JobState::Succeeded => {}
            JobState::Failed | JobState::Cancelled if job.run_anyway => {}
            JobState::Failed | JobState::Cancelled => {
                return Err(AppError::FailedPrecondition(format!(
                    "dependency {} is {}: retry it first",
                    JobName {
                        project: job.project_id,
                        job: *id
                    },
                    state.as_str().to_uppercase()
                )));
            }
            _ => unfinished.push(*id),
        }
    }
    unfinished.sort_unstable();
    db::jobs::mark_has_dependents(conn, &unfinished).await?;
    Ok(if unfinished.is_empty() {
        JobState::Queued
    } else {
        JobState::Waiting
    })
}
