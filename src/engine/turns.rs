//! A worker's turn: its completions committed and its next jobs leased in one
//! transaction (BatchCompleteJobs with `acquire`), as BullMQ's worker moves a job to
//! completed and fetches the next in one script. Turns that arrive together share the
//! transaction (group commit): one fenced statement for all their plain completions,
//! the rest in order under row locks, then one leasing statement per set of kinds.
//! A completion that frees a slot of a limited queue frees it for this same lease.
use std::{collections::BTreeMap, time::Duration};

use diesel_async::AsyncConnection;
use uuid::Uuid;

use crate::{
    AppError, AppResult,
    auth::Caller,
    db,
    domain::{job::Job, names::JobName},
    proto::v1::job_event::Type as EventType,
};

use super::{
    AcquireCall, Engine, Handled, LeaseCall, LeaseOp,
    leases::{Applied, fenced_of, lease_on, write_fenced},
    to_publish,
};

/// One turn: writes under their leases, then a lease of the worker's next jobs.
pub struct TurnCall {
    writes: Vec<LeaseCall>,
    acquire: AcquireCall,
}

/// What a turn did, as its group committed it.
pub struct TurnDone {
    /// One per write; `Alone` for a write whose job another transaction held, which its
    /// caller then applies on its own.
    written: Vec<AppResult<Handled<LeaseCall>>>,
    leased: Vec<Job>,
}

/// A turn's outcome: one result per write, in order, and the jobs leased.
pub struct Turn {
    pub written: Vec<AppResult<Job>>,
    pub leased: Vec<Job>,
}

impl Engine {
    /// Applies `caller`'s writes and leases up to `max` jobs of `kinds` for `worker_id`
    /// in the same transaction. An error means nothing was written (the transaction
    /// did not commit); the caller may then take the two steps apart.
    pub async fn turn(
        &self,
        caller: &Caller,
        writes: Vec<(JobName, Uuid, LeaseOp)>,
        worker_id: &str,
        kinds: &[String],
        max: i64,
        lease: Duration,
    ) -> AppResult<Turn> {
        let call = TurnCall {
            writes: self.lease_calls(caller, writes),
            acquire: AcquireCall {
                kinds: kinds.to_vec(),
                worker_id: worker_id.to_owned(),
                max,
                lease_ms: lease.as_millis() as i64,
            },
        };
        let done = match &self.groups {
            Some(groups) => groups.turns.call(call).await?,
            None => self
                .turn_tx(std::slice::from_ref(&call))
                .await?
                .pop()
                .unwrap_or_else(|| Err(AppError::internal("no result")))?,
        };
        let mut written = Vec::with_capacity(done.written.len());
        for w in done.written {
            written.push(match w {
                Ok(Handled::Done(job)) => Ok(job),
                Ok(Handled::Alone(call)) => Box::pin(self.lease_alone(call)).await,
                Err(e) => Err(e),
            });
        }
        Ok(Turn {
            written,
            leased: done.leased,
        })
    }

    /// One transaction for a group of turns; what it changed is published after it
    /// commits. A failure fails the whole group (nothing of it committed), which the
    /// group commit then splits to find the turn that fails.
    pub(super) async fn turn_tx(&self, calls: &[TurnCall]) -> AppResult<Vec<AppResult<TurnDone>>> {
        // Turns that lease the same kinds share a statement, in their order.
        let mut by_kinds = BTreeMap::<Vec<&str>, Vec<usize>>::new();
        for (i, c) in calls.iter().enumerate() {
            let mut key: Vec<&str> = c.acquire.kinds.iter().map(String::as_str).collect();
            key.sort_unstable();
            key.dedup();
            by_kinds.entry(key).or_default().push(i);
        }
        let mut statements = Vec::with_capacity(by_kinds.len());
        for members in by_kinds.into_values() {
            let kinds = &calls[members[0]].acquire.kinds;
            statements.push((members, self.restricted_among(kinds).await?));
        }
        let writes: Vec<&LeaseCall> = calls.iter().flat_map(|c| &c.writes).collect();
        let mut conn = self.conn().await?;
        let (mut applied, leased) = conn
            .transaction(async |conn| {
                let applied = self.writes_on(conn, &writes).await?;
                let mut leased: Vec<Vec<Job>> = calls.iter().map(|_| Vec::new()).collect();
                for (members, restricted) in &statements {
                    let takers: Vec<db::jobs::Taker> = members
                        .iter()
                        .map(|&i| db::jobs::Taker {
                            worker_id: &calls[i].acquire.worker_id,
                            max: calls[i].acquire.max,
                            lease_ms: calls[i].acquire.lease_ms,
                        })
                        .collect();
                    let kinds = &calls[members[0]].acquire.kinds;
                    let got = lease_on(conn, kinds, &takers, restricted, true).await?;
                    for (&i, jobs) in members.iter().zip(got) {
                        leased[i] = jobs;
                    }
                }
                Ok::<_, AppError>((applied, leased))
            })
            .await?;
        applied.changes.extend(
            leased
                .iter()
                .flatten()
                .map(|j| (j.clone(), EventType::StateChanged)),
        );
        self.publish(to_publish(&applied.changes), applied.wake);
        let mut results = applied.results.into_iter();
        Ok(calls
            .iter()
            .zip(leased)
            .map(|(c, leased)| {
                Ok(TurnDone {
                    written: results.by_ref().take(c.writes.len()).collect(),
                    leased,
                })
            })
            .collect())
    }

    /// `writes` on `conn`, inside the caller's transaction: the plain ones in one
    /// fenced statement, the rest (and the refused, to tell why) in order under row
    /// locks, not waiting for rows another transaction holds.
    async fn writes_on(
        &self,
        conn: &mut diesel_async::AsyncPgConnection,
        writes: &[&LeaseCall],
    ) -> AppResult<Applied> {
        let mut results: Vec<Option<AppResult<Handled<LeaseCall>>>> =
            writes.iter().map(|_| None).collect();
        let mut changes = Vec::new();
        let fenced = fenced_of(writes);
        if !fenced.is_empty() {
            for (at, job, ty) in write_fenced(conn, writes, &fenced).await? {
                changes.push((job.clone(), ty));
                results[at] = Some(Ok(Handled::Done(job)));
            }
        }
        let mut wake = self.freed(changes.iter().map(|(j, _)| j));
        let rest: Vec<&LeaseCall> = writes
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_none())
            .map(|(c, _)| *c)
            .collect();
        if !rest.is_empty() {
            let locked = self.apply_locked(conn, &rest, false).await?;
            changes.extend(locked.changes);
            for (kind, n) in locked.wake {
                *wake.entry(kind).or_default() += n;
            }
            let mut locked = locked.results.into_iter();
            for r in results.iter_mut().filter(|r| r.is_none()) {
                *r = locked.next();
            }
        }
        Ok(Applied {
            results: results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Err(AppError::internal("write left out of its turn"))))
                .collect(),
            changes,
            wake,
        })
    }
}

/// How many turns share a transaction: each may carry up to `job::MAX_BATCH` writes
/// and lease up to `job::MAX_ACQUIRE` jobs, held locked until it commits.
pub(super) const TURN_GROUP_MAX: usize = 64;
/// Turn transactions in flight at once. A turn does what two lanes (writes, leases)
/// do apart, in one transaction: with one lane, draining a full queue ran at 0.80x
/// the two-step rate (19,190 against 23,868 jobs/s in one run).
pub(super) const TURN_LANES: usize = 2;
