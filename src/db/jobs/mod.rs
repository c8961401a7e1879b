//! Job queries. Every UPDATE bumps `sequence` (a row trigger, or the hot statements
//! themselves), and every INSERT or UPDATE of jobs records its events in the same
//! statement (statement triggers).
use chrono::{DateTime, Utc};
use diesel::{
    IntoSql, OptionalExtension,
    dsl::sql,
    prelude::*,
    sql_types::{Bool, Integer, Nullable, Timestamptz},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::schema::{jobs, projects};
use crate::{
    AppError, AppResult,
    domain::job::{Job, JobError, JobFilter, JobState},
};

mod create;
mod events;
mod leases;
mod pipelines;

pub use create::*;
pub use events::*;
pub use leases::*;
pub use pipelines::*;

/// `JobRow`'s columns, for statements written as SQL: what they return of each job (not
/// `*`: the others are the engine's bookkeeping, sent and decoded for nothing).
pub(crate) const JOB_COLUMNS: &str = "jobs.id, jobs.project_id, jobs.owner, jobs.kind, jobs.input, jobs.labels, \
    jobs.state, jobs.priority, jobs.max_attempts, jobs.attempt, \
    jobs.schedule_time, jobs.progress_percent, jobs.current_step, jobs.message, \
    jobs.cancel_requested, jobs.worker_id, jobs.lease_id, jobs.lease_expire_time, \
    jobs.result, jobs.output_assets, jobs.error, jobs.sequence, jobs.create_time, \
    jobs.start_time, jobs.end_time, jobs.update_time, jobs.traceparent, \
    jobs.depends_on, jobs.run_anyway, jobs.has_dependents, jobs.concurrency_key";

/// `statement` (an INSERT or UPDATE of `jobs`) returning `JOB_COLUMNS`.
pub(crate) fn returning_jobs(statement: &str) -> String {
    format!("{statement} RETURNING {JOB_COLUMNS}")
}

/// The columns the engine reads of a job. The `jobs_lease` function returns exactly
/// these (a field added here is added to its result in a migration).
#[derive(Queryable, Selectable, QueryableByName)]
#[diesel(table_name = jobs, check_for_backend(diesel::pg::Pg))]
pub struct JobRow {
    id: Uuid,
    project_id: Uuid,
    owner: String,
    kind: String,
    input: serde_json::Value,
    labels: serde_json::Value,
    state: JobState,
    priority: i32,
    max_attempts: i32,
    attempt: i32,
    schedule_time: DateTime<Utc>,
    progress_percent: i32,
    current_step: String,
    message: String,
    cancel_requested: bool,
    worker_id: Option<String>,
    lease_id: Option<Uuid>,
    lease_expire_time: Option<DateTime<Utc>>,
    result: Option<serde_json::Value>,
    output_assets: Vec<Option<String>>,
    error: Option<serde_json::Value>,
    sequence: i64,
    create_time: DateTime<Utc>,
    start_time: Option<DateTime<Utc>>,
    end_time: Option<DateTime<Utc>>,
    update_time: DateTime<Utc>,
    traceparent: Option<String>,
    depends_on: Vec<Option<Uuid>>,
    run_anyway: bool,
    has_dependents: bool,
    concurrency_key: String,
}

fn object(
    id: Uuid,
    what: &str,
    v: serde_json::Value,
) -> AppResult<serde_json::Map<String, serde_json::Value>> {
    match v {
        serde_json::Value::Object(m) => Ok(m),
        _ => Err(AppError::internal(format!(
            "job {id} {what} is not an object"
        ))),
    }
}

impl TryFrom<JobRow> for Job {
    type Error = AppError;

    fn try_from(r: JobRow) -> AppResult<Self> {
        let JobRow {
            id,
            project_id,
            owner,
            kind,
            input,
            labels,
            state,
            priority,
            max_attempts,
            attempt,
            schedule_time,
            progress_percent,
            current_step,
            message,
            cancel_requested,
            worker_id,
            lease_id,
            lease_expire_time,
            result,
            output_assets,
            error,
            sequence,
            create_time,
            start_time,
            end_time,
            update_time,
            traceparent,
            depends_on,
            run_anyway,
            has_dependents,
            concurrency_key,
        } = r;
        Ok(Job {
            id,
            project_id,
            owner,
            kind,
            input: object(id, "input", input)?,
            labels: serde_json::from_value(labels)
                .map_err(|e| AppError::internal(format!("job {id} labels: {e}")))?,
            state,
            priority,
            max_attempts,
            attempt,
            schedule_time,
            progress_percent,
            current_step,
            message,
            cancel_requested,
            worker_id,
            lease_id,
            lease_expire_time,
            result: result.map(|r| object(id, "result", r)).transpose()?,
            output_assets: output_assets.into_iter().flatten().collect(),
            error: error
                .map(serde_json::from_value::<JobError>)
                .transpose()
                .map_err(|e| AppError::internal(format!("job {id} error: {e}")))?,
            sequence,
            create_time,
            start_time,
            end_time,
            update_time,
            traceparent,
            depends_on: depends_on.into_iter().flatten().collect(),
            run_anyway,
            has_dependents,
            concurrency_key,
        })
    }
}

fn jobs_from(rows: Vec<JobRow>) -> AppResult<Vec<Job>> {
    rows.into_iter().map(Job::try_from).collect()
}

fn labels_json(labels: &std::collections::BTreeMap<String, String>) -> serde_json::Value {
    serde_json::Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into()))
            .collect(),
    )
}

/// Narrows a boxed jobs query to a `JobFilter`'s terms (a macro: each query's boxed
/// type differs by what it selects).
macro_rules! filtered {
    ($query:ident, $filter:expr) => {{
        let filter: &JobFilter = $filter;
        if !filter.states.is_empty() {
            $query = $query.filter(jobs::state.eq_any(filter.states.clone()));
        }
        if !filter.kinds.is_empty() {
            $query = $query.filter(jobs::kind.eq_any(filter.kinds.clone()));
        }
        if !filter.labels.is_empty() {
            // `labels @> {...}`: every label of the filter.
            $query = $query.filter(
                sql::<Bool>("labels @> ")
                    .bind::<diesel::sql_types::Jsonb, _>(labels_json(&filter.labels)),
            );
        }
        if let Some(dependency) = filter.dependency {
            // The cardinality term matches the GIN index's predicate.
            $query = $query.filter(
                sql::<Bool>("cardinality(depends_on) > 0 AND depends_on @> ARRAY[")
                    .bind::<diesel::sql_types::Uuid, _>(dependency)
                    .sql("]"),
            );
        }
    }};
}

type VisibleTo =
    diesel::dsl::Or<diesel::dsl::Eq<jobs::owner, String>, diesel::dsl::AsExprOf<bool, Bool>>;

/// `owner = $sub OR $admin`.
fn visible_to(owner: Option<&str>) -> VisibleTo {
    jobs::owner
        .eq(owner.unwrap_or_default().to_owned())
        .or(owner.is_none().into_sql::<Bool>())
}

/// Owners of the projects in `ids` that exist, locked like `projects::Lock::KeyShare`.
pub async fn lock_projects(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
) -> AppResult<std::collections::HashMap<Uuid, String>> {
    Ok(projects::table
        .filter(projects::id.eq_any(ids))
        .select((projects::id, projects::owner))
        .order(projects::id)
        .for_key_share()
        .load::<(Uuid, String)>(conn)
        .await?
        .into_iter()
        .collect())
}

pub async fn get(
    conn: &mut AsyncPgConnection,
    owner: Option<&str>,
    project: Uuid,
    id: Uuid,
) -> AppResult<Option<Job>> {
    jobs::table
        .filter(jobs::id.eq(id))
        .filter(jobs::project_id.eq(project))
        .filter(visible_to(owner))
        .select(JobRow::as_select())
        .first(conn)
        .await
        .optional()?
        .map(Job::try_from)
        .transpose()
}

/// For workers, who are not scoped by owner.
pub async fn get_any(
    conn: &mut AsyncPgConnection,
    project: Uuid,
    id: Uuid,
) -> AppResult<Option<Job>> {
    get(conn, None, project, id).await
}

pub async fn list(
    conn: &mut AsyncPgConnection,
    q: &crate::domain::job::ListJobs,
) -> AppResult<(Vec<Job>, bool)> {
    let mut query = jobs::table
        .filter(jobs::project_id.eq(q.project))
        .filter(visible_to(q.owner.as_deref()))
        .select(JobRow::as_select())
        .into_boxed();
    filtered!(query, &q.filter);
    if let Some(after) = q.after {
        query = query.filter(super::after_cursor(after, q.descending));
    }
    query = if q.descending {
        query.order((jobs::create_time.desc(), jobs::id.desc()))
    } else {
        query.order((jobs::create_time.asc(), jobs::id.asc()))
    };
    let mut rows: Vec<JobRow> = query.limit(q.limit + 1).load(conn).await?;
    let more = rows.len() as i64 > q.limit;
    rows.truncate(q.limit as usize);
    Ok((jobs_from(rows)?, more))
}

/// Per state, how many of a project's jobs match `filter` and the sum of their
/// progress (a SUCCEEDED job counts 100).
pub async fn summarize(
    conn: &mut AsyncPgConnection,
    owner: Option<&str>,
    project: Uuid,
    filter: &JobFilter,
) -> AppResult<Vec<(JobState, i64, i64)>> {
    let mut query = jobs::table
        .filter(jobs::project_id.eq(project))
        .filter(visible_to(owner))
        .group_by(jobs::state)
        .select((
            jobs::state,
            diesel::dsl::count_star(),
            sql::<diesel::sql_types::BigInt>(
                "COALESCE(sum(CASE WHEN state = 'succeeded' THEN 100 ELSE progress_percent END), 0)::bigint",
            ),
        ))
        .into_boxed();
    filtered!(query, filter);
    Ok(query.load(conn).await?)
}

/// A time no change still to come can be older than: the start of the oldest
/// transaction open on this database, or now. A job's `update_time` is its writer's
/// transaction start (`now()`), so changes read from this time on include every one
/// that was not yet visible when it was taken, whatever the clocks of the servers
/// say and however long a writer's transaction runs.
pub async fn change_horizon(conn: &mut AsyncPgConnection) -> AppResult<DateTime<Utc>> {
    #[derive(diesel::QueryableByName)]
    struct Horizon {
        #[diesel(sql_type = diesel::sql_types::Timestamptz)]
        horizon: DateTime<Utc>,
    }
    let h: Horizon = diesel::sql_query(
        "SELECT least(statement_timestamp(), \
           (SELECT min(xact_start) FROM pg_stat_activity \
             WHERE datname = current_database() AND backend_type = 'client backend' \
               AND pid <> pg_backend_pid())) AS horizon",
    )
    .get_result(conn)
    .await?;
    Ok(h.horizon)
}

/// Ids and sequences of the jobs of a project that match `filter` and changed after
/// `since` (dashboards catching up), newest first; the rows are read a page at a time
/// with `get_many`. The filter is applied here, not by the caller: a dashboard of the
/// running jobs must get them even when more than `limit` other jobs changed since, and
/// a state filter lets the project-and-state index bound what is read.
pub async fn changed_since(
    conn: &mut AsyncPgConnection,
    owner: Option<&str>,
    project: Uuid,
    filter: &JobFilter,
    since: Option<DateTime<Utc>>,
    limit: i64,
) -> AppResult<Vec<(Uuid, i64)>> {
    let mut query = jobs::table
        .filter(jobs::project_id.eq(project))
        .filter(visible_to(owner))
        .select((jobs::id, jobs::sequence))
        .order(jobs::update_time.desc())
        .limit(limit)
        .into_boxed();
    filtered!(query, filter);
    if let Some(since) = since {
        query = query.filter(jobs::update_time.ge(since));
    }
    Ok(query.load(conn).await?)
}

/// Those of the jobs `ids` (of one project) that changed after `since`, whatever their
/// state, as ids and sequences: a dashboard's check of the jobs it shows, which may have
/// left its filter.
pub async fn changed_among(
    conn: &mut AsyncPgConnection,
    owner: Option<&str>,
    project: Uuid,
    ids: &[Uuid],
    since: DateTime<Utc>,
) -> AppResult<Vec<(Uuid, i64)>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(jobs::table
        .filter(jobs::id.eq_any(ids))
        .filter(jobs::project_id.eq(project))
        .filter(visible_to(owner))
        .filter(jobs::update_time.ge(since))
        .select((jobs::id, jobs::sequence))
        .load(conn)
        .await?)
}

/// The jobs `ids` of one project that still exist, in no particular order.
pub async fn get_many(
    conn: &mut AsyncPgConnection,
    owner: Option<&str>,
    project: Uuid,
    ids: &[Uuid],
) -> AppResult<Vec<Job>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = jobs::table
        .filter(jobs::id.eq_any(ids))
        .filter(jobs::project_id.eq(project))
        .filter(visible_to(owner))
        .select(JobRow::as_select())
        .load(conn)
        .await?;
    jobs_from(rows)
}

/// Locks one job for a state change by a client.
pub async fn lock(
    conn: &mut AsyncPgConnection,
    owner: Option<&str>,
    project: Uuid,
    id: Uuid,
) -> AppResult<Option<Job>> {
    jobs::table
        .filter(jobs::id.eq(id))
        .filter(jobs::project_id.eq(project))
        .filter(visible_to(owner))
        .select(JobRow::as_select())
        .for_update()
        .first(conn)
        .await
        .optional()?
        .map(Job::try_from)
        .transpose()
}

/// QUEUED -> CANCELLED.
pub async fn cancel_queued(conn: &mut AsyncPgConnection, id: Uuid) -> AppResult<Job> {
    let row: JobRow = diesel::update(jobs::table.filter(jobs::id.eq(id)))
        .set((
            jobs::state.eq(JobState::Cancelled),
            jobs::cancel_requested.eq(true),
            jobs::end_time.eq(sql::<Nullable<Timestamptz>>("now()")),
        ))
        .returning(JobRow::as_returning())
        .get_result(conn)
        .await?;
    row.try_into()
}

/// RUNNING: ask the worker to stop.
pub async fn request_cancel(conn: &mut AsyncPgConnection, id: Uuid) -> AppResult<Job> {
    let row: JobRow = diesel::update(jobs::table.filter(jobs::id.eq(id)))
        .set(jobs::cancel_requested.eq(true))
        .returning(JobRow::as_returning())
        .get_result(conn)
        .await?;
    row.try_into()
}

/// FAILED or CANCELLED -> QUEUED (or WAITING for its dependencies) as a new attempt
/// (one more attempt is always allowed).
pub async fn requeue(conn: &mut AsyncPgConnection, id: Uuid, state: JobState) -> AppResult<Job> {
    let row: JobRow = diesel::update(jobs::table.filter(jobs::id.eq(id)))
        .set((
            jobs::state.eq(state),
            jobs::cancelled_by.eq(None::<Uuid>),
            jobs::max_attempts.eq(sql::<Integer>("GREATEST(max_attempts, attempt + 1)")),
            jobs::schedule_time.eq(diesel::dsl::now),
            jobs::cancel_requested.eq(false),
            jobs::progress_percent.eq(0),
            jobs::current_step.eq(""),
            jobs::message.eq(""),
            jobs::result.eq(None::<serde_json::Value>),
            jobs::error.eq(None::<serde_json::Value>),
            jobs::output_assets.eq(Vec::<Option<String>>::new()),
            jobs::end_time.eq(None::<DateTime<Utc>>),
        ))
        .returning(JobRow::as_returning())
        .get_result(conn)
        .await?;
    row.try_into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_columns_are_the_columns_job_row_selects() {
        let query = jobs::table.select(JobRow::as_select());
        let sql = diesel::debug_query::<diesel::pg::Pg, _>(&query).to_string();
        let selected = sql
            .trim_start_matches("SELECT ")
            .split(" FROM ")
            .next()
            .unwrap_or_default()
            .replace('"', "");
        assert_eq!(selected, JOB_COLUMNS);
    }
}
