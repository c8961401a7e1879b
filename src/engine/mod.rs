//! The job engine: every change to a job happens here, in one transaction with the
//! event it produces; events are published to Redis only after commit.
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use chrono::Utc;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use prost::Message;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::{
    AppError, AppResult,
    auth::Caller,
    db,
    domain::{
        job::{AfterFailure, Backoff, Job, JobError, JobState, NewJob, after_failure},
        names::{AssetName, JobName, ProjectName},
    },
    proto::v1::{self as pb, job_event::Type as EventType},
    redis::RedisPool,
};

pub mod hub;
pub mod reaper;
pub mod watch;

pub use hub::Hub;

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

/// Per job kind, how many jobs just became available.
pub type Wake = BTreeMap<String, usize>;

/// A committed event, ready to publish.
pub struct Published {
    project: Uuid,
    job: Uuid,
    payload: Vec<u8>,
    /// What the event counts as in the job metrics, with the job's kind.
    counted: Option<(crate::metrics::JobEvent, String)>,
    /// A leased job's wait since it was ready, or an ended job's run time (seconds).
    took: Option<Took>,
}

#[derive(Clone, Copy)]
enum Took {
    Waited(f64),
    Ran(f64),
}

/// The wait (on lease) or run time (on success or failure) an event closes.
fn took(job: &Job, ty: EventType) -> Option<Took> {
    let seconds = |from: chrono::DateTime<chrono::Utc>, to: chrono::DateTime<chrono::Utc>| {
        ((to - from).num_microseconds().unwrap_or(0).max(0)) as f64 / 1e6
    };
    if ty != EventType::StateChanged {
        return None;
    }
    match job.state {
        JobState::Running => Some(Took::Waited(seconds(job.schedule_time, job.update_time))),
        JobState::Succeeded | JobState::Failed => {
            let (start, end) = (job.start_time?, job.end_time.unwrap_or(job.update_time));
            Some(Took::Ran(seconds(start, end)))
        }
        _ => None,
    }
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
}

/// One AcquireJobs attempt (no waiting).
pub struct AcquireCall {
    kinds: Vec<String>,
    worker_id: String,
    max: i64,
    lease_ms: i64,
}

/// One job to create for a caller (`scope` is the owner, `None` for admins).
#[derive(Clone)]
pub struct CreateCall {
    scope: Option<String>,
    project: ProjectName,
    job: NewJob,
    request_id: Option<String>,
    /// The creating call's trace context (captured in its task: groups commit elsewhere).
    traceparent: Option<String>,
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

/// One worker write under a lease.
#[derive(Clone)]
pub struct LeaseCall {
    kinds: Vec<String>,
    name: JobName,
    lease: Uuid,
    op: LeaseOp,
}

pub fn event(job: &Job, ty: EventType) -> pb::JobEvent {
    pb::JobEvent {
        sequence: job.sequence,
        r#type: ty as i32,
        job: Some(job.clone().into()),
        event_time: Some(crate::convert::timestamp(job.update_time)),
    }
}

/// Per kind, how many of `jobs` became available: the wake-up for them.
fn wake_for<'a>(jobs: impl IntoIterator<Item = &'a Job>) -> Wake {
    let mut kinds = Wake::new();
    for job in jobs {
        *kinds.entry(job.kind.clone()).or_default() += 1;
    }
    kinds
}

/// What to publish after commit for `changes` (the database recorded them already).
fn to_publish(changes: &[(Job, EventType)]) -> Vec<Published> {
    changes
        .iter()
        .map(|(job, ty)| Published {
            project: job.project_id,
            job: job.id,
            payload: event(job, *ty).encode_to_vec(),
            counted: counted_as(job, *ty).map(|e| (e, job.kind.clone())),
            took: took(job, *ty),
        })
        .collect()
}

/// The job metric an event adds to, if any.
fn counted_as(job: &Job, ty: EventType) -> Option<crate::metrics::JobEvent> {
    use crate::metrics::JobEvent as E;
    match ty {
        EventType::Created => Some(E::Created),
        EventType::StateChanged => Some(match job.state {
            JobState::Running => E::Leased,
            JobState::Succeeded => E::Succeeded,
            JobState::Failed => E::Failed,
            JobState::Cancelled => E::Cancelled,
            JobState::Queued => E::Retried,
        }),
        _ => None,
    }
}

/// Batches of events (and wake-ups) queued for Redis; beyond this, new ones are dropped.
const PUBLISH_QUEUE: usize = 8192;
/// Rows a retention statement deletes at most (jobs, and events by age): a few seconds
/// of work at worst, far under `statement_timeout`.
const PRUNE_BATCH: i64 = 5_000;
/// Bytes of events per Redis message (a message may pass it by one event).
const EVENTS_MESSAGE_MAX: usize = 256 * 1024;

/// The task that sends committed events to Redis: everything queued goes in one
/// message (and the wake-ups in the same pipeline), in the order the writes handed it
/// over (watchers order events by sequence and fill any gap from Postgres).
fn spawn_publisher(
    redis: RedisPool,
    prefix: Arc<str>,
    metrics: crate::metrics::Metrics,
) -> mpsc::Sender<(Vec<Published>, Wake)> {
    let (tx, mut rx) = mpsc::channel::<(Vec<Published>, Wake)>(PUBLISH_QUEUE);
    tokio::spawn(async move {
        let mut batch = Vec::new();
        while rx.recv_many(&mut batch, PUBLISH_QUEUE).await > 0 {
            let mut pipe = redis::pipe();
            let channel = hub::events_channel(&prefix);
            let mut message = hub::EventsMessage::default();
            let mut events = 0;
            for (published, wake) in batch.drain(..) {
                events += published.len();
                for e in &published {
                    message.push(e.project, e.job, &e.payload);
                    // Bounded messages: Redis drops a subscriber whose output buffer
                    // passes its limit (32 MiB for pub/sub by default).
                    if message.bytes() >= EVENTS_MESSAGE_MAX
                        && let Some(full) = message.take()
                    {
                        pipe.cmd("PUBLISH").arg(&channel).arg(full).ignore();
                    }
                }
                for (kind, jobs) in &wake {
                    pipe.cmd("PUBLISH")
                        .arg(hub::wake_channel(&prefix, kind))
                        .arg(*jobs)
                        .ignore();
                }
            }
            if let Some(rest) = message.take() {
                pipe.cmd("PUBLISH").arg(&channel).arg(rest).ignore();
            }
            let sent = async {
                let mut conn = redis.get().await.map_err(|e| e.to_string())?;
                pipe.query_async::<()>(&mut *conn)
                    .await
                    .map_err(|e| e.to_string())
            };
            match tokio::time::timeout(Duration::from_secs(2), sent).await {
                Ok(Ok(())) => metrics.events_published(events),
                Ok(Err(e)) => {
                    tracing::warn!(redis = "down", error = %e, events, "publish failed; watchers will resync")
                }
                Err(_) => tracing::warn!(
                    redis = "down",
                    events,
                    "publish timed out; watchers will resync"
                ),
            }
        }
    });
    tx
}

/// Output assets must be READY assets of the job's project; they record the job.
/// The inner error is a refusal, made before anything is written.
async fn link_outputs(
    conn: &mut AsyncPgConnection,
    job: &Job,
    names: &[String],
) -> AppResult<AppResult<()>> {
    if names.is_empty() {
        return Ok(Ok(()));
    }
    let mut ids = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let a = match AssetName::parse(&format!("output_assets[{i}]"), name) {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        if a.project != job.project_id {
            return Ok(Err(AppError::invalid(
                format!("output_assets[{i}]"),
                "must be an asset of the job's project",
            )));
        }
        ids.push(a.asset);
    }
    let ready = db::assets::ready_in_project(conn, job.project_id, &ids).await?;
    if let Some(missing) = names
        .iter()
        .zip(&ids)
        .find(|(_, id)| !ready.contains(id))
        .map(|(n, _)| n)
    {
        return Ok(Err(AppError::FailedPrecondition(format!(
            "output asset {missing} is not a READY asset of this project"
        ))));
    }
    db::assets::set_source_job(conn, &ids, job.id).await?;
    Ok(Ok(()))
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
        };
        let (a, b, c) = (engine.clone(), engine.clone(), engine.clone());
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
        }));
        engine
    }

    async fn conn(&self) -> AppResult<db::PooledConn<'_>> {
        Ok(self.db.get().await?)
    }

    /// Fan-out after commit, without waiting: the publisher sends it to Redis with
    /// whatever else is queued. Failure only costs latency (watchers resync from
    /// Postgres), so a write never waits for Redis, nor fails when it is away.
    /// `wake`: per kind, how many jobs became available (that many idle workers are woken).
    pub fn publish(&self, events: Vec<Published>, wake: Wake) {
        if events.is_empty() && wake.is_empty() {
            return;
        }
        let metrics = &self.settings.metrics;
        for e in &events {
            if let Some((event, kind)) = &e.counted {
                metrics.job_event(*event, kind);
                match e.took {
                    Some(Took::Waited(s)) => metrics.job_waited(kind, s),
                    Some(Took::Ran(s)) => metrics.job_ran(kind, s),
                    None => {}
                }
            }
        }
        let n = events.len();
        if let Err(e) = self.publisher.try_send((events, wake)) {
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "publisher queue full",
                mpsc::error::TrySendError::Closed(_) => "publisher stopped",
            };
            tracing::warn!(events = n, "{why}; events dropped, watchers will resync");
        }
    }

    /// Creates jobs in one transaction: all of them or none.
    pub async fn create(
        &self,
        caller: &Caller,
        project: ProjectName,
        jobs: Vec<(NewJob, Option<String>)>,
    ) -> AppResult<Vec<Job>> {
        let scope = caller.owner_scope().map(str::to_owned);
        let traceparent = crate::telemetry::current_traceparent();
        let calls: Vec<CreateCall> = jobs
            .into_iter()
            .map(|(job, request_id)| CreateCall {
                scope: scope.clone(),
                project,
                job,
                request_id,
                traceparent: traceparent.clone(),
            })
            .collect();
        if let (Some(groups), [_]) = (&self.groups, calls.as_slice()) {
            let call = calls
                .into_iter()
                .next()
                .ok_or_else(|| AppError::internal("no job"))?;
            return match groups.creates.call(call).await? {
                Handled::Done(job) => Ok(vec![job]),
                // Boxed: the rare hand-back path would otherwise make every call's
                // future as big as a whole transaction's.
                Handled::Alone(call) => Box::pin(self.create_tx(&[call]))
                    .await?
                    .into_iter()
                    .collect(),
            };
        }
        self.create_tx(&calls).await?.into_iter().collect()
    }

    /// Inserts `calls` in one transaction, all or none: the first failed call fails (and
    /// rolls back) all of them.
    async fn create_tx(&self, calls: &[CreateCall]) -> AppResult<Vec<AppResult<Job>>> {
        let mut conn = self.conn().await?;
        let (results, published, kinds) = conn
            .transaction(async |conn| {
                let mut projects: Vec<Uuid> = calls.iter().map(|c| c.project.0).collect();
                projects.sort_unstable();
                projects.dedup();
                let owners = db::jobs::lock_projects(conn, &projects).await?;
                let mut results: Vec<Option<AppResult<Job>>> = Vec::with_capacity(calls.len());
                let mut inserts = Vec::with_capacity(calls.len());
                let mut slots = Vec::with_capacity(calls.len());
                for (i, c) in calls.iter().enumerate() {
                    match owners.get(&c.project.0) {
                        Some(owner) if c.scope.as_deref().is_none_or(|s| s == owner) => {
                            inserts.push(db::jobs::Insert {
                                owner,
                                project: c.project.0,
                                job: &c.job,
                                request_id: c.request_id.as_deref(),
                                traceparent: c.traceparent.as_deref(),
                            });
                            slots.push(i);
                            results.push(None);
                        }
                        _ => results.push(Some(Err(AppError::NotFound(format!(
                            "project {}",
                            c.project
                        ))))),
                    }
                }
                let mut changes = Vec::new();
                for (slot, outcome) in slots
                    .into_iter()
                    .zip(db::jobs::insert_many(conn, &inserts).await?)
                {
                    results[slot] = Some(outcome.map(|(job, fresh)| {
                        if fresh {
                            changes.push((job.clone(), EventType::Created));
                        }
                        job
                    }));
                }
                let results: Vec<AppResult<Job>> = results
                    .into_iter()
                    .map(|r| {
                        r.unwrap_or_else(|| Err(AppError::internal("job left out of its group")))
                    })
                    .collect();
                if let Some(i) = results.iter().position(Result::is_err) {
                    return Err(results
                        .into_iter()
                        .nth(i)
                        .and_then(Result::err)
                        .unwrap_or_else(|| AppError::internal("no error")));
                }
                let kinds = wake_for(changes.iter().map(|(job, _)| job));
                let published = to_publish(&changes);
                Ok::<_, AppError>((results, published, kinds))
            })
            .await?;
        self.publish(published, kinds);
        Ok(results)
    }

    /// Independent creates (a CreateJob group): one statement, its own transaction, for
    /// every call whose project is visible and not being deleted and whose request id
    /// is new; the calls it left out (refused, repeated or waiting on a deletion) go
    /// back to their callers, which run them through the transactional path, which
    /// tells them apart.
    async fn create_each(
        &self,
        calls: &[CreateCall],
    ) -> AppResult<Vec<AppResult<Handled<CreateCall>>>> {
        let inserts: Vec<_> = calls
            .iter()
            .map(|c| db::jobs::VisibleInsert {
                scope: c.scope.as_deref(),
                project: c.project.0,
                job: &c.job,
                request_id: c.request_id.as_deref(),
                traceparent: c.traceparent.as_deref(),
            })
            .collect();
        let inserted = {
            let mut conn = self.conn().await?;
            db::jobs::insert_visible(&mut conn, &inserts).await?
        };
        let mut results: Vec<Option<Job>> = calls.iter().map(|_| None).collect();
        let mut changes = Vec::with_capacity(inserted.len());
        for (at, job) in inserted {
            changes.push((job.clone(), EventType::Created));
            results[at] = Some(job);
        }
        let kinds = wake_for(changes.iter().map(|(job, _)| job));
        self.publish(to_publish(&changes), kinds);
        Ok(results
            .into_iter()
            .zip(calls)
            .map(
                |(done, call)| Ok(done.map_or_else(|| Handled::Alone(call.clone()), Handled::Done)),
            )
            .collect())
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

    pub async fn cancel(&self, caller: &Caller, name: JobName) -> AppResult<Job> {
        let mut conn = self.conn().await?;
        let scope = caller.owner_scope().map(str::to_owned);
        let (job, published) = conn
            .transaction(async |conn| {
                let job = db::jobs::lock(conn, scope.as_deref(), name.project, name.job)
                    .await?
                    .ok_or_else(|| AppError::NotFound(format!("job {name}")))?;
                let (job, ty) = match job.state {
                    JobState::Queued => (db::jobs::cancel_queued(conn, job.id).await?, EventType::StateChanged),
                    JobState::Running if job.cancel_requested => return Ok((job, Vec::new())),
                    JobState::Running => (db::jobs::request_cancel(conn, job.id).await?, EventType::CancelRequested),
                    state => {
                        return Err(AppError::FailedPrecondition(format!(
                            "job {name} is already {}; only QUEUED or RUNNING jobs can be cancelled",
                            state.as_str().to_uppercase()
                        )));
                    }
                };
                let published = to_publish(&[(job.clone(), ty)]);
                Ok((job, published))
            })
            .await?;
        self.publish(published, Wake::new());
        Ok(job)
    }

    pub async fn retry(&self, caller: &Caller, name: JobName) -> AppResult<Job> {
        let mut conn = self.conn().await?;
        let scope = caller.owner_scope().map(str::to_owned);
        let (job, published) = conn
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
                let job = db::jobs::requeue(conn, job.id).await?;
                let published = to_publish(&[(job.clone(), EventType::StateChanged)]);
                Ok::<_, AppError>((job, published))
            })
            .await?;
        self.publish(published, Wake::from([(job.kind.clone(), 1)]));
        Ok(job)
    }

    /// One attempt to lease jobs (no waiting). Concurrent attempts for the same kinds
    /// share one leasing statement (group commit).
    pub async fn try_acquire(
        &self,
        worker_id: &str,
        kinds: &[String],
        max: i64,
        lease: Duration,
    ) -> AppResult<Vec<Job>> {
        let call = AcquireCall {
            kinds: kinds.to_vec(),
            worker_id: worker_id.to_owned(),
            max,
            lease_ms: lease.as_millis() as i64,
        };
        match &self.groups {
            Some(groups) => groups.acquires.call(call).await,
            None => self
                .acquire_group(std::slice::from_ref(&call))
                .await
                .pop()
                .unwrap_or_else(|| Err(AppError::internal("no result"))),
        }
    }

    /// Leases jobs for a group of attempts: one statement per distinct set of kinds,
    /// jobs handed out in the callers' order. A statement that fails leased nothing, so
    /// its calls are tried again one by one (one call's failure is not another's).
    async fn acquire_group(&self, calls: &[AcquireCall]) -> Vec<AppResult<Vec<Job>>> {
        let mut by_kinds = BTreeMap::<Vec<&str>, Vec<usize>>::new();
        for (i, c) in calls.iter().enumerate() {
            let mut key: Vec<&str> = c.kinds.iter().map(String::as_str).collect();
            key.sort_unstable();
            key.dedup();
            by_kinds.entry(key).or_default().push(i);
        }
        let mut results: Vec<Option<AppResult<Vec<Job>>>> = calls.iter().map(|_| None).collect();
        for members in by_kinds.into_values() {
            let together = self.acquire_for(calls, &members).await;
            match together {
                Ok(leased) => {
                    for (i, jobs) in members.iter().zip(leased) {
                        results[*i] = Some(Ok(jobs));
                    }
                }
                Err(e) if members.len() == 1 => results[members[0]] = Some(Err(e)),
                Err(e) => {
                    tracing::debug!(error = %e, calls = members.len(), "acquire group failed; retrying one by one");
                    for i in members {
                        results[i] = Some(
                            self.acquire_for(calls, &[i])
                                .await
                                .map(|mut one| one.pop().unwrap_or_default()),
                        );
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(AppError::internal("call left out of its group"))))
            .collect()
    }

    /// One leasing statement for `calls[members]` (same kinds); publishes the leases.
    async fn acquire_for(
        &self,
        calls: &[AcquireCall],
        members: &[usize],
    ) -> AppResult<Vec<Vec<Job>>> {
        let takers: Vec<db::jobs::Taker> = members
            .iter()
            .map(|&i| db::jobs::Taker {
                worker_id: &calls[i].worker_id,
                max: calls[i].max,
                lease_ms: calls[i].lease_ms,
            })
            .collect();
        let Some(&first) = members.first() else {
            return Ok(Vec::new());
        };
        let leased = {
            let mut conn = self.conn().await?;
            db::jobs::acquire_for(&mut conn, &calls[first].kinds, &takers).await?
        };
        let changes: Vec<_> = leased
            .iter()
            .flatten()
            .map(|j| (j.clone(), EventType::StateChanged))
            .collect();
        self.publish(to_publish(&changes), Wake::new());
        Ok(leased)
    }

    /// Long-polls until jobs are leased or `wait` is over. Wake-ups come through Redis;
    /// the poll interval bounds what a lost wake-up costs.
    pub async fn acquire(
        &self,
        worker_id: &str,
        kinds: &[String],
        max: i64,
        lease: Duration,
        wait: Duration,
    ) -> AppResult<Vec<Job>> {
        let deadline = tokio::time::Instant::now() + wait;
        let want = usize::try_from(max).unwrap_or(1);
        loop {
            // Register before looking, so a wake-up between the two is not lost.
            let idle = self.hub.idle(kinds, want);
            let jobs = self.try_acquire(worker_id, kinds, max, lease).await?;
            let now = tokio::time::Instant::now();
            if !jobs.is_empty() || now >= deadline {
                return Ok(jobs);
            }
            let nap = (deadline - now).min(self.settings.poll_interval);
            tokio::select! {
                () = idle.woken() => {}
                () = tokio::time::sleep(nap) => {}
                () = self.settings.draining.cancelled() => return Ok(Vec::new()),
            }
        }
    }

    /// Puts jobs that an AcquireJobs call leased but could not return back in the
    /// queue, the attempt not counted, and wakes workers for them.
    pub async fn release(&self, leases: &[(Uuid, Uuid)]) -> AppResult<()> {
        if leases.is_empty() {
            return Ok(());
        }
        let released = {
            let mut conn = self.conn().await?;
            db::jobs::release(&mut conn, leases).await?
        };
        let kinds = wake_for(&released);
        let changes: Vec<_> = released
            .into_iter()
            .map(|job| (job, EventType::StateChanged))
            .collect();
        self.publish(to_publish(&changes), kinds);
        Ok(())
    }

    /// Applies a worker's write if `lease_id` is the job's current lease (fencing).
    pub async fn leased(
        &self,
        caller: &Caller,
        name: JobName,
        lease_id: &str,
        op: LeaseOp,
    ) -> AppResult<Job> {
        let lease = parse_lease("lease_id", lease_id)?;
        let call = LeaseCall {
            kinds: caller.kinds.clone(),
            name,
            lease: self.settings.leases.open(&caller.sub, lease),
            op,
        };
        match &self.groups {
            Some(groups) => match groups.leases.call(call).await? {
                Handled::Done(job) => Ok(job),
                // Boxed like the create's hand-back: rare, and large.
                Handled::Alone(call) => Box::pin(self.lease_alone(call)).await,
            },
            None => self.lease_alone(call).await,
        }
    }

    /// One worker write in a transaction of its own, waiting for its job's lock.
    async fn lease_alone(&self, call: LeaseCall) -> AppResult<Job> {
        match self
            .lease_tx(std::slice::from_ref(&call), true)
            .await?
            .pop()
        {
            Some(Ok(Handled::Done(job))) => Ok(job),
            Some(Err(e)) => Err(e),
            Some(Ok(Handled::Alone(_))) | None => Err(AppError::internal("no result")),
        }
    }

    /// Applies several worker writes, each under its own lease (BatchCompleteJobs): one
    /// result per write, in order; a refused write takes nothing else back. They join
    /// the group commit like single writes, so a batch costs a few transactions, and
    /// the lanes still bound how many run at once.
    pub async fn leased_many(
        &self,
        caller: &Caller,
        writes: Vec<(JobName, Uuid, LeaseOp)>,
    ) -> Vec<AppResult<Job>> {
        let calls: Vec<LeaseCall> = writes
            .into_iter()
            .map(|(name, lease, op)| LeaseCall {
                kinds: caller.kinds.clone(),
                name,
                lease: self.settings.leases.open(&caller.sub, lease),
                op,
            })
            .collect();
        match &self.groups {
            Some(groups) => {
                futures::future::join_all(calls.into_iter().map(async |c| {
                    match groups.leases.call(c).await? {
                        Handled::Done(job) => Ok(job),
                        Handled::Alone(call) => Box::pin(self.lease_alone(call)).await,
                    }
                }))
                .await
            }
            None => crate::batch::shared_or_alone(&calls, |c| self.lease_tx(c, true))
                .await
                .into_iter()
                .map(|r| match r? {
                    Handled::Done(job) => Ok(job),
                    Handled::Alone(_) => Err(AppError::internal("a write left undone")),
                })
                .collect(),
        }
    }

    /// Applies a group of worker writes. Progress and plain completes of jobs named
    /// once in the group go in one statement that checks the lease as it writes; the
    /// rest (fails, completes with outputs, a job named twice, and fenced writes that
    /// were refused, to tell why) are applied in order in a transaction. Once the fast
    /// statement committed, every call gets its own result: an error here would have
    /// the group retried and committed writes applied twice.
    ///
    /// `wait`: whether to wait for jobs locked by another transaction (a project's
    /// deletion, say); if not, their calls come back `Alone`.
    async fn lease_tx(
        &self,
        calls: &[LeaseCall],
        wait: bool,
    ) -> AppResult<Vec<AppResult<Handled<LeaseCall>>>> {
        let mut named = std::collections::HashMap::<Uuid, usize>::new();
        for c in calls {
            *named.entry(c.name.job).or_default() += 1;
        }
        let fenced: Vec<(usize, &crate::domain::job::Fenced)> = calls
            .iter()
            .enumerate()
            .filter(|(_, c)| named.get(&c.name.job) == Some(&1))
            .filter_map(|(i, c)| match &c.op {
                LeaseOp::Fenced(op) => Some((i, op)),
                _ => None,
            })
            .collect();
        let mut results: Vec<Option<AppResult<Handled<LeaseCall>>>> =
            calls.iter().map(|_| None).collect();
        if !fenced.is_empty() {
            let writes: Vec<_> = fenced
                .iter()
                .map(|(i, op)| db::jobs::FencedWrite {
                    project: calls[*i].name.project,
                    id: calls[*i].name.job,
                    lease: calls[*i].lease,
                    kinds: &calls[*i].kinds,
                    op,
                })
                .collect();
            let written = {
                let mut conn = self.conn().await?;
                db::jobs::write_fenced(&mut conn, &writes).await?
            };
            let mut changes = Vec::with_capacity(written.len());
            for (w, job) in written {
                let (at, op) = &fenced[w];
                let ty = match op {
                    crate::domain::job::Fenced::Progress { .. } => EventType::Progress,
                    crate::domain::job::Fenced::Complete { .. } => EventType::StateChanged,
                };
                changes.push((job.clone(), ty));
                results[*at] = Some(Ok(Handled::Done(job)));
            }
            self.publish(to_publish(&changes), Wake::new());
        }
        let rest: Vec<&LeaseCall> = calls
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_none())
            .map(|(c, _)| c)
            .collect();
        let mut locked = crate::batch::shared_or_alone(&rest, |c| self.lease_locked(c, wait))
            .await
            .into_iter();
        Ok(results
            .into_iter()
            .map(|r| {
                r.or_else(|| locked.next())
                    .unwrap_or_else(|| Err(AppError::internal("call left out of its group")))
            })
            .collect())
    }

    /// Applies worker writes in order in one transaction, each after locking its job
    /// and checking the lease. A call whose lease is not current (or that is refused
    /// for another reason) writes nothing.
    /// `wait`: as in `lease_tx`.
    async fn lease_locked(
        &self,
        calls: &[&LeaseCall],
        wait: bool,
    ) -> AppResult<Vec<AppResult<Handled<LeaseCall>>>> {
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        let backoff = self.settings.backoff;
        let mut conn = self.conn().await?;
        let (results, published, kinds) = conn
            .transaction(async |conn| {
                let mut ids: Vec<Uuid> = calls.iter().map(|c| c.name.job).collect();
                ids.sort_unstable();
                ids.dedup();
                let mut current = db::jobs::lock_many(conn, &ids, wait).await?;
                let mut results = Vec::with_capacity(calls.len());
                let mut changes = Vec::new();
                let mut kinds = Wake::new();
                for call in calls {
                    let outcome = match current.get(&call.name.job) {
                        Some(job) if job.project_id == call.name.project => {
                            apply(conn, job, call, &backoff).await?
                        }
                        // Locked elsewhere (or missing, which its caller finds out alone).
                        None if !wait => {
                            results.push(Ok(Handled::Alone((*call).clone())));
                            continue;
                        }
                        _ => Err(AppError::NotFound(format!("job {}", call.name))),
                    };
                    results.push(outcome.map(|(job, ty)| {
                        if job.state == JobState::Queued {
                            *kinds.entry(job.kind.clone()).or_default() += 1;
                        }
                        current.insert(job.id, job.clone());
                        changes.push((job.clone(), ty));
                        Handled::Done(job)
                    }));
                }
                let published = to_publish(&changes);
                Ok::<_, AppError>((results, published, kinds))
            })
            .await?;
        self.publish(published, kinds);
        Ok(results)
    }

    /// Expired leases: requeue with backoff, fail when attempts are used up, cancel when
    /// cancellation was asked. Safe on every instance at once (SKIP LOCKED).
    pub async fn reap_expired(&self) -> AppResult<usize> {
        let backoff = self.settings.backoff;
        let mut conn = self.conn().await?;
        let (count, published, kinds) = conn
            .transaction(async |conn| {
                let expired = db::jobs::lock_expired(conn, reaper::REAP_BATCH as i64).await?;
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
                let published = to_publish(&changes);
                let expired: Vec<String> = changes.iter().map(|(j, _)| j.kind.clone()).collect();
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

/// Why `call` may not write `job`, if it may not: a lease that is not current, or a
/// kind the worker's token does not allow.
fn refusal(job: &Job, call: &LeaseCall) -> Option<AppError> {
    if job.state != JobState::Running || job.lease_id != Some(call.lease) {
        return Some(stale_lease(call.name));
    }
    if !call.kinds.is_empty() && !call.kinds.contains(&job.kind) {
        return Some(AppError::PermissionDenied(format!(
            "this worker token may not run jobs of kind {:?}",
            job.kind
        )));
    }
    None
}

/// One worker write on `job` (locked, current state). The outer result fails the
/// whole transaction (a database error); the inner one is this call's refusal, made
/// before anything was written for it.
async fn apply(
    conn: &mut AsyncPgConnection,
    job: &Job,
    call: &LeaseCall,
    backoff: &Backoff,
) -> AppResult<AppResult<(Job, EventType)>> {
    if let Some(refused) = refusal(job, call) {
        return Ok(Err(refused));
    }
    Ok(Ok(match &call.op {
        LeaseOp::Fenced(crate::domain::job::Fenced::Progress {
            percent,
            step,
            message,
        }) => (
            db::jobs::progress(conn, job.id, *percent, step, message).await?,
            EventType::Progress,
        ),
        LeaseOp::Fenced(crate::domain::job::Fenced::Complete { result }) => (
            db::jobs::succeed(conn, job.id, result.clone(), &[]).await?,
            EventType::StateChanged,
        ),
        LeaseOp::CompleteWithOutputs {
            result,
            output_assets,
        } => {
            if let Err(refused) = link_outputs(conn, job, output_assets).await? {
                return Ok(Err(refused));
            }
            (
                db::jobs::succeed(conn, job.id, result.clone(), output_assets).await?,
                EventType::StateChanged,
            )
        }
        LeaseOp::Fail {
            error,
            retryable,
            retry_after,
        } => {
            let next = after_failure(
                job.attempt,
                job.max_attempts,
                job.cancel_requested,
                *retryable,
                *retry_after,
                backoff,
            );
            let (state, retry_in) = match next {
                AfterFailure::Retry { not_before } => (JobState::Queued, Some(not_before)),
                AfterFailure::Fail => (JobState::Failed, None),
                AfterFailure::Cancel => (JobState::Cancelled, None),
            };
            (
                db::jobs::end_attempt(conn, job.id, state, retry_in, error).await?,
                EventType::StateChanged,
            )
        }
    }))
}

/// A worker's write about a leased job.
#[derive(Clone)]
pub enum LeaseOp {
    /// Progress, or a complete without outputs: the database checks the lease as it
    /// writes (one statement for a whole group).
    Fenced(crate::domain::job::Fenced),
    /// A complete whose output assets are checked and linked first.
    CompleteWithOutputs {
        result: Option<serde_json::Value>,
        output_assets: Vec<String>,
    },
    Fail {
        error: JobError,
        retryable: bool,
        retry_after: Option<Duration>,
    },
}

impl LeaseOp {
    pub fn complete(result: Option<serde_json::Value>, output_assets: Vec<String>) -> Self {
        if output_assets.is_empty() {
            Self::Fenced(crate::domain::job::Fenced::Complete { result })
        } else {
            Self::CompleteWithOutputs {
                result,
                output_assets,
            }
        }
    }
}
