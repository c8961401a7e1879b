//! Creating jobs: group-committed creates, and the one-transaction batch.

use diesel_async::AsyncConnection;
use uuid::Uuid;

use crate::{
    AppError, AppResult,
    auth::Caller,
    db,
    domain::{
        job::{Dependency, Job, JobState, NewJob},
        names::{JobName, ProjectName},
    },
    proto::v1::job_event::Type as EventType,
};

use super::{Engine, Handled, to_publish, wake_for};

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

impl Engine {
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
        let pipeline = calls.iter().any(|c| !c.job.depends_on.is_empty());
        if let (Some(groups), [_], false) = (&self.groups, calls.as_slice(), pipeline) {
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
    pub(super) async fn create_tx(&self, calls: &[CreateCall]) -> AppResult<Vec<AppResult<Job>>> {
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
                                depends_on: &[],
                                state: JobState::Queued,
                                has_dependents: false,
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
                let inserted = if calls.iter().any(|c| !c.job.depends_on.is_empty()) {
                    insert_pipeline(conn, &inserts).await?
                } else {
                    db::jobs::insert_many(conn, &inserts).await?
                };
                for (slot, outcome) in slots.into_iter().zip(inserted) {
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
    pub(super) async fn create_each(
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
}

/// Inserts the jobs of a pipeline (one project; a job may depend on existing jobs and on
/// earlier jobs of the same call) one at a time, in order, so each later job names the
/// ids the earlier ones got (a repeated request id gives the first job's). Existing
/// dependencies are locked FOR SHARE first: none can end before this transaction
/// commits, and the one that ends them then sees these dependents. A job starts WAITING
/// unless its dependencies are already done. Refusals (a dependency missing, or failed
/// without `run_anyway`) fail the whole call.
async fn insert_pipeline(
    conn: &mut diesel_async::AsyncPgConnection,
    inserts: &[db::jobs::Insert<'_>],
) -> AppResult<Vec<AppResult<(Job, bool)>>> {
    let Some(first) = inserts.first() else {
        return Ok(Vec::new());
    };
    let project = first.project;
    let mut existing: Vec<Uuid> = inserts
        .iter()
        .flat_map(|i| i.job.depends_on.iter())
        .filter_map(|d| match d {
            Dependency::Job(id) => Some(*id),
            Dependency::Batch(_) => None,
        })
        .collect();
    existing.sort_unstable();
    existing.dedup();
    let states = db::jobs::lock_dependencies(conn, project, &existing).await?;
    if let Some(missing) = existing.iter().find(|id| !states.contains_key(id)) {
        return Err(AppError::NotFound(format!(
            "dependency: job {missing} is not a job of projects/{project}"
        )));
    }
    let unfinished: Vec<Uuid> = states
        .iter()
        .filter(|(_, (_, s))| !s.is_terminal())
        .map(|(id, _)| *id)
        .collect();
    db::jobs::mark_has_dependents(conn, &unfinished).await?;
    // Which jobs of the call a later one depends on.
    let mut depended = vec![false; inserts.len()];
    for i in inserts {
        for d in &i.job.depends_on {
            if let Dependency::Batch(j) = d
                && let Some(flag) = depended.get_mut(*j)
            {
                *flag = true;
            }
        }
    }
    let mut out: Vec<AppResult<(Job, bool)>> = Vec::with_capacity(inserts.len());
    let mut made: Vec<(Uuid, JobState)> = Vec::with_capacity(inserts.len());
    for (n, i) in inserts.iter().enumerate() {
        let mut ids = Vec::with_capacity(i.job.depends_on.len());
        let mut ready = true;
        for d in &i.job.depends_on {
            let (id, state) = match d {
                Dependency::Job(id) => (*id, states.get(id).map(|(_, s)| *s)),
                Dependency::Batch(j) => match made.get(*j) {
                    Some((id, state)) => (*id, Some(*state)),
                    None => return Err(AppError::internal("a batch reference ahead of its job")),
                },
            };
            let state = state.ok_or_else(|| AppError::internal("dependency without state"))?;
            match state {
                JobState::Succeeded => {}
                JobState::Failed | JobState::Cancelled if i.job.run_anyway => {}
                JobState::Failed | JobState::Cancelled => {
                    return Err(AppError::FailedPrecondition(format!(
                        "dependency {} is {}: retry it first, or set run_anyway",
                        JobName { project, job: id },
                        state.as_str().to_uppercase()
                    )));
                }
                _ => ready = false,
            }
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        let insert = db::jobs::Insert {
            depends_on: &ids,
            state: if ready {
                JobState::Queued
            } else {
                JobState::Waiting
            },
            has_dependents: depended[n],
            ..*i
        };
        let mut one = db::jobs::insert_many(conn, std::slice::from_ref(&insert)).await?;
        let result = one
            .pop()
            .ok_or_else(|| AppError::internal("insert returned nothing"))?;
        let (id, state) = match &result {
            Ok((job, _)) => (job.id, job.state),
            Err(_) => (Uuid::nil(), JobState::Queued),
        };
        // A replayed job that later jobs depend on: its end must settle them.
        if depended[n]
            && let Ok((job, false)) = &result
            && !job.has_dependents
        {
            db::jobs::mark_has_dependents(conn, &[job.id]).await?;
        }
        made.push((id, state));
        out.push(result);
    }
    Ok(out)
}
