//! The worker protocol's writes: leasing (grouped), progress, completion and
//! failure under a lease (fenced), and releases.
use std::{collections::BTreeMap, time::Duration};

use diesel_async::{AsyncConnection, AsyncPgConnection};
use uuid::Uuid;

use crate::{
    AppError, AppResult,
    auth::Caller,
    db,
    domain::{
        job::{AfterFailure, Backoff, Job, JobError, JobState, after_failure},
        names::{AssetName, JobName},
    },
    proto::v1::job_event::Type as EventType,
};

use super::{Engine, Handled, Wake, parse_lease, stale_lease, to_publish, wake_for};

/// One AcquireJobs attempt (no waiting).
pub struct AcquireCall {
    pub(super) kinds: Vec<String>,
    pub(super) worker_id: String,
    pub(super) max: i64,
    pub(super) lease_ms: i64,
}

/// One worker write under a lease.
#[derive(Clone)]
pub struct LeaseCall {
    pub(super) kinds: Vec<String>,
    pub(super) name: JobName,
    pub(super) lease: Uuid,
    pub(super) op: LeaseOp,
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

impl Engine {
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
    pub(super) async fn acquire_group(&self, calls: &[AcquireCall]) -> Vec<AppResult<Vec<Job>>> {
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
        let restricted = self.restricted_among(&calls[first].kinds).await?;
        let leased = {
            let mut conn = self.conn().await?;
            lease_on(&mut conn, &calls[first].kinds, &takers, &restricted, false).await?
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
            let mut nap = (deadline - now).min(self.settings.poll_interval);
            // A restricted kind frees slots without a wake-up (a start rate's window
            // moving on, a wake-up lost with Redis): look again soon, still without
            // spinning.
            if kinds.iter().any(|k| self.is_restricted(k)) {
                nap = nap.min(super::queues::RESTRICTED_POLL);
            }
            tokio::select! {
                () = idle.woken() => {}
                () = tokio::time::sleep(nap) => {}
                () = self.settings.draining.cancelled() => return Ok(Vec::new()),
            }
        }
    }

    /// The dependencies of `jobs` (leased), by id: what their workers get with them.
    pub async fn dependencies_of(
        &self,
        jobs: &[Job],
    ) -> AppResult<std::collections::HashMap<Uuid, Job>> {
        let mut ids: Vec<Uuid> = jobs
            .iter()
            .flat_map(|j| j.depends_on.iter().copied())
            .collect();
        if ids.is_empty() {
            return Ok(Default::default());
        }
        ids.sort_unstable();
        ids.dedup();
        let mut conn = self.conn().await?;
        Ok(db::jobs::get_by_ids(&mut conn, &ids)
            .await?
            .into_iter()
            .map(|j| (j.id, j))
            .collect())
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
    pub(super) async fn lease_alone(&self, call: LeaseCall) -> AppResult<Job> {
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

    /// `caller`'s writes, each under the lease it names (as sealed for the caller).
    pub(super) fn lease_calls(
        &self,
        caller: &Caller,
        writes: Vec<(JobName, Uuid, LeaseOp)>,
    ) -> Vec<LeaseCall> {
        writes
            .into_iter()
            .map(|(name, lease, op)| LeaseCall {
                kinds: caller.kinds.clone(),
                name,
                lease: self.settings.leases.open(&caller.sub, lease),
                op,
            })
            .collect()
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
        self.apply_many(self.lease_calls(caller, writes)).await
    }

    /// `leased_many` for writes already bound to their leases.
    pub(super) async fn apply_many(&self, calls: Vec<LeaseCall>) -> Vec<AppResult<Job>> {
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
    pub(super) async fn lease_tx(
        &self,
        calls: &[LeaseCall],
        wait: bool,
    ) -> AppResult<Vec<AppResult<Handled<LeaseCall>>>> {
        let refs: Vec<&LeaseCall> = calls.iter().collect();
        let (results, changes) = {
            let mut conn = self.conn().await?;
            write_fenced(&mut conn, &refs).await?
        };
        if !changes.is_empty() {
            let freed = self.freed(changes.iter().map(|(j, _)| j));
            self.publish(to_publish(&changes), freed);
        }
        let rest = unwritten(&refs, &results);
        let locked = crate::batch::shared_or_alone(&rest, |c| self.lease_locked(c, wait)).await;
        Ok(filled(results, locked))
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
        let mut conn = self.conn().await?;
        let applied = conn
            .transaction(async |conn| self.apply_locked(conn, calls, wait).await)
            .await?;
        self.publish(to_publish(&applied.changes), applied.wake);
        Ok(applied.results)
    }

    /// `lease_locked`'s writes on `conn`, inside the caller's transaction; what they
    /// changed is published once it commits.
    pub(super) async fn apply_locked(
        &self,
        conn: &mut AsyncPgConnection,
        calls: &[&LeaseCall],
        wait: bool,
    ) -> AppResult<Applied> {
        let backoff = self.settings.backoff;
        let mut ids: Vec<Uuid> = calls.iter().map(|c| c.name.job).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut current = db::jobs::lock_many(conn, &ids, wait).await?;
        let mut results = Vec::with_capacity(calls.len());
        let mut changes = Vec::new();
        let mut wake = Wake::new();
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
                    *wake.entry(job.kind.clone()).or_default() += 1;
                }
                current.insert(job.id, job.clone());
                changes.push((job.clone(), ty));
                Handled::Done(job)
            }));
        }
        for (kind, n) in self.freed(changes.iter().map(|(j, _)| j)) {
            *wake.entry(kind).or_default() += n;
        }
        // Jobs that ended here release or cancel the jobs waiting on them, in this
        // transaction.
        super::settle_ended(conn, &mut changes, &mut wake).await?;
        Ok(Applied {
            results,
            changes,
            wake,
        })
    }
}

/// What worker writes did in a transaction: one result per call, and what to publish
/// (and whom to wake) once it commits.
pub(super) struct Applied {
    pub results: Vec<AppResult<Handled<LeaseCall>>>,
    pub changes: Vec<(Job, EventType)>,
    pub wake: Wake,
}

/// Leases jobs of `kinds` for `takers` on `conn`, in their order: the plain statement,
/// then what it left wanting from `restricted` (those of the kinds whose queues limit
/// leasing), in a transaction of its own unless `conn` is in one (`in_tx`). One list
/// per taker.
pub(super) async fn lease_on(
    conn: &mut AsyncPgConnection,
    kinds: &[String],
    takers: &[db::jobs::Taker<'_>],
    restricted: &[String],
    in_tx: bool,
) -> AppResult<Vec<Vec<Job>>> {
    let mut leased = db::jobs::acquire_for(conn, kinds, takers).await?;
    if !restricted.is_empty() {
        let wanting: Vec<db::jobs::Taker> = takers
            .iter()
            .zip(&leased)
            .map(|(t, got)| db::jobs::Taker {
                max: t.max - got.len() as i64,
                ..*t
            })
            .collect();
        let more = if in_tx {
            db::queues::lease_limited_in(conn, restricted, &wanting).await?
        } else {
            db::queues::lease_limited(conn, restricted, &wanting).await?
        };
        for (got, more) in leased.iter_mut().zip(more) {
            got.extend(more);
        }
    }
    Ok(leased)
}

/// The writes among `calls` that one fenced statement can apply (progress, and plain
/// completes of jobs named once): their places and ops.
fn fenced_of<'a>(calls: &[&'a LeaseCall]) -> Vec<(usize, &'a crate::domain::job::Fenced)> {
    let mut named = std::collections::HashMap::<Uuid, usize>::new();
    for c in calls {
        *named.entry(c.name.job).or_default() += 1;
    }
    calls
        .iter()
        .enumerate()
        .filter(|(_, c)| named.get(&c.name.job) == Some(&1))
        .filter_map(|(i, c)| match &c.op {
            LeaseOp::Fenced(op) => Some((i, op)),
            _ => None,
        })
        .collect()
}

/// Applies the writes among `calls` that one statement can apply (`fenced_of`), the
/// statement checking each lease as it writes: per call, its result if written, and
/// the changes made. The others were refused or need the locked path (`unwritten`);
/// they wrote nothing.
pub(super) async fn write_fenced(
    conn: &mut AsyncPgConnection,
    calls: &[&LeaseCall],
) -> AppResult<(Written, Vec<(Job, EventType)>)> {
    let mut results: Written = calls.iter().map(|_| None).collect();
    let mut changes = Vec::new();
    let fenced = fenced_of(calls);
    if fenced.is_empty() {
        return Ok((results, changes));
    }
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
    for (w, job) in db::jobs::write_fenced(conn, &writes).await? {
        let (at, op) = &fenced[w];
        let ty = match op {
            crate::domain::job::Fenced::Progress { .. } => EventType::Progress,
            crate::domain::job::Fenced::Complete { .. } => EventType::StateChanged,
        };
        changes.push((job.clone(), ty));
        results[*at] = Some(Ok(Handled::Done(job)));
    }
    Ok((results, changes))
}

/// Per call of a group, its result once one is known.
pub(super) type Written = Vec<Option<AppResult<Handled<LeaseCall>>>>;

/// The calls of `results` still without one.
pub(super) fn unwritten<'a>(calls: &[&'a LeaseCall], results: &Written) -> Vec<&'a LeaseCall> {
    calls
        .iter()
        .zip(results)
        .filter(|(_, r)| r.is_none())
        .map(|(c, _)| *c)
        .collect()
}

/// `results` with the calls still without one given `rest`'s, in order.
pub(super) fn filled(
    results: Written,
    rest: Vec<AppResult<Handled<LeaseCall>>>,
) -> Vec<AppResult<Handled<LeaseCall>>> {
    let mut rest = rest.into_iter();
    results
        .into_iter()
        .map(|r| {
            r.or_else(|| rest.next())
                .unwrap_or_else(|| Err(AppError::internal("call left out of its group")))
        })
        .collect()
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
