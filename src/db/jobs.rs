//! Job queries. Every UPDATE bumps `sequence` (a row trigger), and every INSERT or
//! UPDATE of jobs records its events in the same statement (statement triggers).
use chrono::{DateTime, Utc};
use diesel::{
    IntoSql, OptionalExtension,
    dsl::sql,
    prelude::*,
    sql_types::{Bool, Integer, Nullable, Timestamptz},
    upsert::DecoratableTarget,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::schema::{job_events, jobs, projects};
use crate::{
    AppError, AppResult,
    domain::job::{Fenced, Job, JobError, JobFilter, JobState, NewJob},
};

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

#[derive(Insertable)]
#[diesel(table_name = jobs)]
struct NewJobRow<'a> {
    id: Uuid,
    project_id: Uuid,
    owner: &'a str,
    kind: &'a str,
    input: serde_json::Value,
    labels: serde_json::Value,
    priority: i32,
    max_attempts: i32,
    schedule_time: Option<DateTime<Utc>>,
    request_id: Option<&'a str>,
    request_hash: Option<Vec<u8>>,
    traceparent: Option<&'a str>,
}

/// A job to insert into a project whose owner is known (and locked).
pub struct Insert<'a> {
    pub owner: &'a str,
    pub project: Uuid,
    pub job: &'a NewJob,
    pub request_id: Option<&'a str>,
    /// The creating call's trace context, for the job's workers.
    pub traceparent: Option<&'a str>,
}

/// Inserts jobs with one statement. Per job: the job and whether it is new; with a
/// request id, a repeat gives the first job (`false`), and a different payload under
/// the same id is ALREADY_EXISTS (nothing is written for that job).
pub async fn insert_many(
    conn: &mut AsyncPgConnection,
    inserts: &[Insert<'_>],
) -> AppResult<Vec<AppResult<(Job, bool)>>> {
    let rows: Vec<NewJobRow> = inserts
        .iter()
        .map(|i| NewJobRow {
            id: Uuid::now_v7(),
            project_id: i.project,
            owner: i.owner,
            kind: &i.job.kind,
            input: serde_json::Value::Object(i.job.input.clone()),
            labels: labels_json(&i.job.labels),
            priority: i.job.priority,
            max_attempts: i.job.max_attempts,
            schedule_time: i.job.schedule_time,
            request_id: i.request_id,
            request_hash: i.request_id.map(|_| i.job.digest()),
            traceparent: i.traceparent,
        })
        .collect();
    let mut inserted: std::collections::HashMap<Uuid, JobRow> = std::collections::HashMap::new();
    // Bind parameters are limited to 65,535 per statement.
    for chunk in rows.chunks(2000) {
        let returned: Vec<JobRow> = if let [one] = chunk {
            // One row: a statement diesel prepares once per connection (multi-row
            // inserts vary in shape and are planned on every call).
            diesel::insert_into(jobs::table)
                .values(one)
                .on_conflict((jobs::owner, jobs::request_id))
                .filter_target(jobs::request_id.is_not_null())
                .do_nothing()
                .returning(JobRow::as_returning())
                .get_results(conn)
                .await?
        } else {
            diesel::insert_into(jobs::table)
                .values(chunk)
                .on_conflict((jobs::owner, jobs::request_id))
                .filter_target(jobs::request_id.is_not_null())
                .do_nothing()
                .returning(JobRow::as_returning())
                .get_results(conn)
                .await?
        };
        inserted.extend(returned.into_iter().map(|r| (r.id, r)));
    }
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        if let Some(r) = inserted.remove(&row.id) {
            out.push(r.try_into().map(|job| (job, true)));
            continue;
        }
        out.push(existing(conn, row).await);
    }
    Ok(out)
}

/// A job for [`insert_visible`]: its caller's scope (`None`: any owner), project, fields,
/// request id and trace context.
pub struct VisibleInsert<'a> {
    pub scope: Option<&'a str>,
    pub project: Uuid,
    pub job: &'a NewJob,
    pub request_id: Option<&'a str>,
    pub traceparent: Option<&'a str>,
}

/// Inserts jobs in one statement, each only if its project exists, is visible to its
/// scope (`None`: any) and is not being deleted, and its request id is new. Runs as its
/// own transaction: the jobs it returns (by their position in `inserts`) are committed,
/// with their events. The others wrote nothing; `insert_many` in a transaction tells why.
pub async fn insert_visible(
    conn: &mut AsyncPgConnection,
    inserts: &[VisibleInsert<'_>],
) -> AppResult<Vec<(usize, Job)>> {
    use diesel::sql_types::{Array, Bytea, Int4, Jsonb, Nullable as N, Text};
    struct InsertVisible {
        ids: Vec<Uuid>,
        projects: Vec<Uuid>,
        scopes: Vec<Option<String>>,
        kinds: Vec<String>,
        inputs: Vec<serde_json::Value>,
        labels: Vec<serde_json::Value>,
        priorities: Vec<i32>,
        max_attempts: Vec<i32>,
        schedule_times: Vec<Option<DateTime<Utc>>>,
        request_ids: Vec<Option<String>>,
        request_hashes: Vec<Option<Vec<u8>>>,
        traceparents: Vec<Option<String>>,
    }
    impl super::Statement for InsertVisible {
        fn walk<'b>(
            &'b self,
            mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
        ) -> QueryResult<()> {
            // The projects are locked first, skipping any that a deletion holds: their
            // jobs are left out (the caller retries them alone, waiting for the deletion's
            // outcome) instead of the whole group waiting on the foreign key's check.
            out.push_sql("WITH p AS MATERIALIZED (SELECT id, owner FROM projects WHERE id = ANY(");
            out.push_bind_param::<Array<diesel::sql_types::Uuid>, _>(&self.projects)?;
            out.push_sql(
                ") FOR KEY SHARE SKIP LOCKED) \
                 INSERT INTO jobs (id, project_id, owner, kind, input, labels, priority, \
                 max_attempts, schedule_time, request_id, request_hash, traceparent) \
                 SELECT c.id, p.id, p.owner, c.kind, c.input, c.labels, c.priority, \
                 c.max_attempts, COALESCE(c.schedule_time, now()), c.request_id, c.request_hash, \
                 c.traceparent \
                 FROM unnest(",
            );
            out.push_bind_param::<Array<diesel::sql_types::Uuid>, _>(&self.ids)?;
            out.push_sql(", ");
            out.push_bind_param::<Array<diesel::sql_types::Uuid>, _>(&self.projects)?;
            out.push_sql(", ");
            out.push_bind_param::<Array<N<Text>>, _>(&self.scopes)?;
            out.push_sql(", ");
            out.push_bind_param::<Array<Text>, _>(&self.kinds)?;
            out.push_sql(", ");
            out.push_bind_param::<Array<Jsonb>, _>(&self.inputs)?;
            out.push_sql(", ");
            out.push_bind_param::<Array<Jsonb>, _>(&self.labels)?;
            out.push_sql(", ");
            out.push_bind_param::<Array<Int4>, _>(&self.priorities)?;
            out.push_sql(", ");
            out.push_bind_param::<Array<Int4>, _>(&self.max_attempts)?;
            out.push_sql(", ");
            out.push_bind_param::<Array<N<Timestamptz>>, _>(&self.schedule_times)?;
            out.push_sql(", ");
            out.push_bind_param::<Array<N<Text>>, _>(&self.request_ids)?;
            out.push_sql(", ");
            out.push_bind_param::<Array<N<Bytea>>, _>(&self.request_hashes)?;
            out.push_sql(", ");
            out.push_bind_param::<Array<N<Text>>, _>(&self.traceparents)?;
            out.push_sql(
                ") AS c(id, project, scope, kind, input, labels, priority, max_attempts, \
                 schedule_time, request_id, request_hash, traceparent) \
                 JOIN p ON p.id = c.project WHERE c.scope IS NULL OR p.owner = c.scope \
                 ON CONFLICT (owner, request_id) WHERE request_id IS NOT NULL DO NOTHING RETURNING *");
            Ok(())
        }
    }
    let ids: Vec<Uuid> = inserts.iter().map(|_| Uuid::now_v7()).collect();
    let statement = InsertVisible {
        ids: ids.clone(),
        projects: inserts.iter().map(|i| i.project).collect(),
        scopes: inserts.iter().map(|i| i.scope.map(str::to_owned)).collect(),
        kinds: inserts.iter().map(|i| i.job.kind.clone()).collect(),
        inputs: inserts
            .iter()
            .map(|i| serde_json::Value::Object(i.job.input.clone()))
            .collect(),
        labels: inserts.iter().map(|i| labels_json(&i.job.labels)).collect(),
        priorities: inserts.iter().map(|i| i.job.priority).collect(),
        max_attempts: inserts.iter().map(|i| i.job.max_attempts).collect(),
        schedule_times: inserts.iter().map(|i| i.job.schedule_time).collect(),
        request_ids: inserts
            .iter()
            .map(|i| i.request_id.map(str::to_owned))
            .collect(),
        request_hashes: inserts
            .iter()
            .map(|i| i.request_id.map(|_| i.job.digest()))
            .collect(),
        traceparents: inserts
            .iter()
            .map(|i| i.traceparent.map(str::to_owned))
            .collect(),
    };
    let rows: Vec<JobRow> = match super::Prepared(statement).load(conn).await {
        Ok(rows) => rows,
        // A project deleted while the jobs went in: nothing was written.
        Err(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::ForeignKeyViolation,
            _,
        )) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let position: std::collections::HashMap<Uuid, usize> =
        ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    rows.into_iter()
        .map(|r| {
            let at = position
                .get(&r.id)
                .copied()
                .ok_or_else(|| AppError::internal("inserted a job nobody asked for"))?;
            Ok((at, Job::try_from(r)?))
        })
        .collect()
}

/// The job a repeated request id refers to, if the request is the same.
async fn existing(conn: &mut AsyncPgConnection, row: &NewJobRow<'_>) -> AppResult<(Job, bool)> {
    let (Some(request_id), Some(digest)) = (row.request_id, row.request_hash.as_deref()) else {
        return Err(AppError::internal(
            "job insert without request_id returned no row",
        ));
    };
    let (existing, hash, existing_project): (JobRow, Option<Vec<u8>>, Uuid) = jobs::table
        .filter(jobs::owner.eq(row.owner))
        .filter(jobs::request_id.eq(request_id))
        .select((JobRow::as_select(), jobs::request_hash, jobs::project_id))
        .first(conn)
        .await?;
    if hash.as_deref() == Some(digest) && existing_project == row.project_id {
        Ok((existing.try_into()?, false))
    } else {
        Err(AppError::AlreadyExists(format!(
            "request_id {request_id:?} was already used to create a different job"
        )))
    }
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
    if !q.filter.states.is_empty() {
        query = query.filter(jobs::state.eq_any(q.filter.states.clone()));
    }
    if !q.filter.kinds.is_empty() {
        query = query.filter(jobs::kind.eq_any(q.filter.kinds.clone()));
    }
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
    if !filter.states.is_empty() {
        query = query.filter(jobs::state.eq_any(filter.states.clone()));
    }
    if !filter.kinds.is_empty() {
        query = query.filter(jobs::kind.eq_any(filter.kinds.clone()));
    }
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

/// FAILED or CANCELLED -> QUEUED as a new attempt (one more attempt is always allowed).
pub async fn requeue(conn: &mut AsyncPgConnection, id: Uuid) -> AppResult<Job> {
    let row: JobRow = diesel::update(jobs::table.filter(jobs::id.eq(id)))
        .set((
            jobs::state.eq(JobState::Queued),
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

/// Leased jobs back to QUEUED as if never leased (the attempt is not counted): the
/// `(id, lease)` pairs that an AcquireJobs call leased but could not hand out. A job
/// whose lease changed meanwhile is left alone.
pub async fn release(conn: &mut AsyncPgConnection, leases: &[(Uuid, Uuid)]) -> AppResult<Vec<Job>> {
    let (ids, lease_ids): (Vec<Uuid>, Vec<Uuid>) = leases.iter().copied().unzip();
    let rows: Vec<JobRow> = diesel::update(
        jobs::table
            .filter(jobs::id.eq_any(ids))
            .filter(jobs::lease_id.eq_any(lease_ids))
            .filter(jobs::state.eq(JobState::Running)),
    )
    .set((
        jobs::state.eq(JobState::Queued),
        jobs::attempt.eq(jobs::attempt - 1),
        jobs::worker_id.eq(None::<String>),
        jobs::lease_id.eq(None::<Uuid>),
        jobs::lease_duration_ms.eq(None::<i64>),
        jobs::lease_expire_time.eq(None::<DateTime<Utc>>),
        // The lease set it if this was the first attempt.
        jobs::start_time.eq(sql::<
            diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>,
        >(
            "CASE WHEN attempt = 1 THEN NULL ELSE start_time END"
        )),
    ))
    .returning(JobRow::as_returning())
    .get_results(conn)
    .await?;
    jobs_from(rows)
}

/// One AcquireJobs call of a group that shares a leasing statement.
pub struct Taker<'a> {
    pub worker_id: &'a str,
    pub max: i64,
    pub lease_ms: i64,
}

/// Leases queued jobs of `kinds` that are due for one or several AcquireJobs calls, in
/// one statement (its own transaction): the best due jobs, the first `takers[0].max` of
/// them to the first call, the next ones to the second, and so on (each job with its
/// caller's worker id and lease). One list of jobs per taker. Each kind is read in the
/// fetch index's order (one index scan per kind: `kind = ANY(..)` cannot use the index
/// order and sorts the whole queue), locked FOR UPDATE SKIP LOCKED so concurrent
/// statements skip each other's rows instead of waiting or double-leasing; the best
/// across kinds are leased, and the locks on the others end with the statement. Calls
/// that arrive together share a statement rather than each locking its way past the
/// rows the others hold at the head of the same index.
pub async fn acquire_for(
    conn: &mut AsyncPgConnection,
    kinds: &[String],
    takers: &[Taker<'_>],
) -> AppResult<Vec<Vec<Job>>> {
    use diesel::sql_types::{Array, BigInt, Text};
    struct Acquire {
        kinds: Vec<String>,
        total: i64,
        workers: Vec<String>,
        lease_ms: Vec<i64>,
        /// Per taker, the first job number it takes (job numbers start at 1).
        firsts: Vec<i64>,
    }
    impl super::Statement for Acquire {
        fn walk<'b>(
            &'b self,
            mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
        ) -> QueryResult<()> {
            // `state = 'queued'` is a literal: the planner must see it to use the
            // partial fetch index in the generic plan. The locked rows are updated by
            // their tuple ids (a TID scan driven by the locked rows: by `id`, the generic
            // plan depends on the table's size when it was made, and one made on a fresh
            // table scans the whole table on every call). The row locks keep those tuples
            // in place until the statement ends. Job number `n` (in fetch order) goes to
            // the taker whose range of numbers holds it, found by binary search over the
            // ranges' first numbers (`width_bucket`): a join with the takers cost jobs
            // times takers, and a `ctid = ANY` list per row jobs times jobs (together
            // about 90 of 110-185 ms for 3,200 jobs and 64 takers).
            out.push_sql(
                "WITH due AS (SELECT f.tid, row_number() OVER \
                 (ORDER BY f.priority DESC, f.schedule_time, f.create_time) AS n FROM \
                 (SELECT q.* FROM unnest(",
            );
            out.push_bind_param::<Array<Text>, _>(&self.kinds)?;
            out.push_sql(
                ") AS k(kind) CROSS JOIN LATERAL (\
                 SELECT ctid AS tid, priority, schedule_time, create_time FROM jobs \
                 WHERE state = 'queued' AND kind = k.kind AND schedule_time <= now() \
                 ORDER BY priority DESC, schedule_time, create_time LIMIT ",
            );
            out.push_bind_param::<BigInt, _>(&self.total)?;
            out.push_sql(
                " FOR UPDATE SKIP LOCKED) q \
                 ORDER BY q.priority DESC, q.schedule_time, q.create_time LIMIT ",
            );
            out.push_bind_param::<BigInt, _>(&self.total)?;
            out.push_sql(") f), assigned AS (SELECT d.tid, width_bucket(d.n, ");
            out.push_bind_param::<Array<BigInt>, _>(&self.firsts)?;
            out.push_sql(") AS taker FROM due d) UPDATE jobs SET state = 'running', attempt = attempt + 1, worker_id = (");
            out.push_bind_param::<Array<Text>, _>(&self.workers)?;
            out.push_sql(")[a.taker], lease_id = gen_random_uuid(), lease_duration_ms = (");
            out.push_bind_param::<Array<BigInt>, _>(&self.lease_ms)?;
            out.push_sql(")[a.taker], lease_expire_time = now() + (");
            out.push_bind_param::<Array<BigInt>, _>(&self.lease_ms)?;
            out.push_sql(
                ")[a.taker] * interval '1 millisecond', \
                 start_time = COALESCE(start_time, now()), \
                 progress_percent = 0, current_step = '', message = '' \
                 FROM assigned a WHERE jobs.ctid = a.tid AND jobs.state = 'queued' \
                 RETURNING jobs.*, a.taker::bigint",
            );
            Ok(())
        }
    }
    #[derive(QueryableByName)]
    struct Taken {
        #[diesel(embed)]
        job: JobRow,
        #[diesel(sql_type = BigInt)]
        taker: i64,
    }
    let mut out: Vec<Vec<Job>> = takers.iter().map(|_| Vec::new()).collect();
    // A taker wanting none has the same first number as the next and never gets a job.
    let firsts: Vec<i64> = takers
        .iter()
        .scan(1i64, |next, t| {
            let first = *next;
            *next += t.max.max(0);
            Some(first)
        })
        .collect();
    let total: i64 = takers.iter().map(|t| t.max.max(0)).sum();
    if kinds.is_empty() || total <= 0 {
        return Ok(out);
    }
    let rows: Vec<Taken> = super::Prepared(Acquire {
        kinds: kinds.to_vec(),
        total,
        workers: takers.iter().map(|t| t.worker_id.to_owned()).collect(),
        lease_ms: takers.iter().map(|t| t.lease_ms).collect(),
        firsts,
    })
    .load(conn)
    .await?;
    for row in rows {
        let slot = usize::try_from(row.taker - 1)
            .ok()
            .and_then(|i| out.get_mut(i))
            .ok_or_else(|| AppError::internal("leased job without its taker"))?;
        slot.push(Job::try_from(row.job)?);
    }
    // RETURNING does not keep the fetch order.
    for jobs in &mut out {
        jobs.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then(a.schedule_time.cmp(&b.schedule_time))
                .then(a.create_time.cmp(&b.create_time))
        });
    }
    Ok(out)
}

/// Jobs by id, locked in id order (so two batches never wait on each other in a cycle).
/// `wait`: whether to wait for jobs another transaction holds; if not, they are left out.
pub async fn lock_many(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
    wait: bool,
) -> AppResult<std::collections::HashMap<Uuid, Job>> {
    let locked = jobs::table
        .filter(jobs::id.eq_any(ids))
        .order(jobs::id)
        .select(JobRow::as_select())
        .for_update();
    let rows = if wait {
        locked.load::<JobRow>(conn).await?
    } else {
        locked.skip_locked().load::<JobRow>(conn).await?
    };
    rows.into_iter()
        .map(|r| Job::try_from(r).map(|j| (j.id, j)))
        .collect()
}

/// Heartbeat: progress and a fresh lease expiry.
pub async fn progress(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    percent: i32,
    step: &str,
    message: &str,
) -> AppResult<Job> {
    let row: JobRow = diesel::update(jobs::table.filter(jobs::id.eq(id)))
        .set((
            jobs::progress_percent.eq(percent),
            jobs::current_step.eq(step),
            jobs::message.eq(message),
            jobs::lease_expire_time.eq(sql::<Nullable<Timestamptz>>(
                "now() + lease_duration_ms * interval '1 millisecond'",
            )),
        ))
        .returning(JobRow::as_returning())
        .get_result(conn)
        .await?;
    row.try_into()
}

/// One worker write: applied only if the job is `id` in `project`, RUNNING under
/// `lease`, and of one of `kinds` (when the worker's token is limited to some).
pub struct FencedWrite<'a> {
    pub project: Uuid,
    pub id: Uuid,
    pub lease: Uuid,
    pub kinds: &'a [String],
    pub op: &'a Fenced,
}

/// Applies `writes` (each job named once) in one statement, its own transaction: the
/// lease check and the change together, so no lock is held across a round trip.
/// Returns the jobs written, by position in `writes`; the others wrote nothing.
pub async fn write_fenced(
    conn: &mut AsyncPgConnection,
    writes: &[FencedWrite<'_>],
) -> AppResult<Vec<(usize, Job)>> {
    use diesel::sql_types::{Array, Int4, Jsonb, Nullable as N, Text};
    struct WriteFenced {
        at: Vec<i32>,
        ids: Vec<Uuid>,
        projects: Vec<Uuid>,
        leases: Vec<Uuid>,
        done: Vec<bool>,
        percents: Vec<i32>,
        steps: Vec<String>,
        messages: Vec<String>,
        results: Vec<Option<serde_json::Value>>,
        /// Per call, the kinds its worker's token allows, separated by spaces (which no
        /// kind contains), or `None` when the token allows all.
        kinds: Vec<Option<String>>,
        deletion_locks: Vec<i32>,
    }
    impl super::Statement for WriteFenced {
        fn walk<'b>(
            &'b self,
            mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
        ) -> QueryResult<()> {
            // No join with the calls: a job finds its call by binary search over the
            // calls' ids (sorted; `width_bucket` gives the position of the one it equals)
            // and reads the call's fields at that position. Joined with `unnest` of the
            // calls, the generic plan (made for an estimated 10 calls) was a nested loop,
            // a merge or a hash join depending on the statistics when it was made; the
            // nested loop read every call for each job: 400 ms for 1,000 calls, where
            // this takes 18. Each array is bound once; later uses name its placeholder.
            out.push_sql(
                "UPDATE jobs SET (state, progress_percent, current_step, message, result, \
                 output_assets, error, lease_id, lease_expire_time, end_time) = (SELECT \
                 CASE WHEN c.done THEN 'succeeded'::job_state ELSE jobs.state END, \
                 CASE WHEN c.done THEN 100 ELSE c.percent END, \
                 CASE WHEN c.done THEN jobs.current_step ELSE c.step END, \
                 CASE WHEN c.done THEN jobs.message ELSE c.message END, \
                 CASE WHEN c.done THEN c.result ELSE jobs.result END, \
                 CASE WHEN c.done THEN '{}' ELSE jobs.output_assets END, \
                 CASE WHEN c.done THEN NULL ELSE jobs.error END, \
                 CASE WHEN c.done THEN NULL ELSE jobs.lease_id END, \
                 CASE WHEN c.done THEN NULL \
                     ELSE now() + jobs.lease_duration_ms * interval '1 millisecond' END, \
                 CASE WHEN c.done THEN now() ELSE jobs.end_time END \
                 FROM (SELECT (",
            );
            out.push_bind_param::<Array<Bool>, _>(&self.done)?;
            out.push_sql(")[w.i] AS done, (");
            out.push_bind_param::<Array<Int4>, _>(&self.percents)?;
            out.push_sql(")[w.i] AS percent, (");
            out.push_bind_param::<Array<Text>, _>(&self.steps)?;
            out.push_sql(")[w.i] AS step, (");
            out.push_bind_param::<Array<Text>, _>(&self.messages)?;
            out.push_sql(")[w.i] AS message, (");
            out.push_bind_param::<Array<N<Jsonb>>, _>(&self.results)?;
            out.push_sql(")[w.i] AS result FROM (SELECT width_bucket(jobs.id, ");
            out.push_bind_param::<Array<diesel::sql_types::Uuid>, _>(&self.ids)?;
            // Placeholders are numbered in the order binds are pushed: five arrays, then
            // the ids; the kinds are the ninth.
            let ids = "$6";
            let at = format!("width_bucket(jobs.id, {ids})");
            // The literal state and `id = ANY`: the plan probes the index of running
            // jobs by id whatever the statistics (by tuple id instead, the plan made on a
            // fresh table scanned every running job per statement).
            out.push_sql(&format!(
                ") AS i) w) c) WHERE jobs.id = ANY({ids}) AND jobs.state = 'running' \
                 AND jobs.project_id = ("
            ));
            out.push_bind_param::<Array<diesel::sql_types::Uuid>, _>(&self.projects)?;
            out.push_sql(&format!(")[{at}] AND jobs.lease_id = ("));
            out.push_bind_param::<Array<diesel::sql_types::Uuid>, _>(&self.leases)?;
            out.push_sql(&format!(")[{at}] AND (("));
            out.push_bind_param::<Array<N<Text>>, _>(&self.kinds)?;
            let kinds = "$9";
            // A call whose project a deletion may hold (its bucket's lock is taken) is
            // skipped, not waited for: an UPDATE cannot skip a locked row, and the
            // deletion keeps its jobs locked until it commits, which would hold up every
            // write in the statement. A skipped call goes the slow way, which hands it
            // back to its caller if its job is locked. Holding the shared lock to the end
            // keeps a deletion from starting under the statement.
            out.push_sql(&format!(
                ")[{at}] IS NULL OR jobs.kind = ANY(string_to_array(({kinds})[{at}], ' '))) \
                 AND pg_try_advisory_xact_lock_shared({}, (",
                super::DELETION_LOCK_CLASS
            ));
            out.push_bind_param::<Array<Int4>, _>(&self.deletion_locks)?;
            out.push_sql(&format!(")[{at}]) RETURNING ("));
            out.push_bind_param::<Array<Int4>, _>(&self.at)?;
            out.push_sql(&format!(")[{at}] AS at, jobs.*"));
            Ok(())
        }
    }
    #[derive(QueryableByName)]
    struct Written {
        #[diesel(sql_type = Integer)]
        at: i32,
        #[diesel(embed)]
        job: JobRow,
    }
    // By id: the statement finds a job's call by binary search, and locks rows in id order, as
    // everywhere jobs are locked in bulk.
    let mut order: Vec<usize> = (0..writes.len()).collect();
    order.sort_by_key(|&i| writes[i].id);
    let mut st = WriteFenced {
        at: Vec::new(),
        ids: Vec::new(),
        projects: Vec::new(),
        leases: Vec::new(),
        done: Vec::new(),
        percents: Vec::new(),
        steps: Vec::new(),
        messages: Vec::new(),
        results: Vec::new(),
        kinds: Vec::new(),
        deletion_locks: Vec::new(),
    };
    for i in order {
        let w = &writes[i];
        st.at.push(i as i32);
        st.ids.push(w.id);
        st.projects.push(w.project);
        st.leases.push(w.lease);
        st.deletion_locks.push(super::deletion_lock(w.project));
        // A kind with a space could never match a job's (kinds are validated), so
        // leaving it out changes nothing.
        st.kinds.push((!w.kinds.is_empty()).then(|| {
            w.kinds
                .iter()
                .filter(|k| !k.contains(' '))
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        }));
        match w.op {
            Fenced::Progress {
                percent,
                step,
                message,
            } => {
                st.done.push(false);
                st.percents.push(*percent);
                st.steps.push(step.clone());
                st.messages.push(message.clone());
                st.results.push(None);
            }
            Fenced::Complete { result } => {
                st.done.push(true);
                st.percents.push(100);
                st.steps.push(String::new());
                st.messages.push(String::new());
                st.results.push(result.clone());
            }
        }
    }
    let rows: Vec<Written> = super::Prepared(st).load(conn).await?;
    rows.into_iter()
        .map(|r| Ok((r.at as usize, Job::try_from(r.job)?)))
        .collect()
}

/// RUNNING -> SUCCEEDED with `result` and `output_assets`.
pub async fn succeed(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    result: Option<serde_json::Value>,
    output_assets: &[String],
) -> AppResult<Job> {
    succeed_many(conn, &[id], result, output_assets)
        .await?
        .remove(&id)
        .ok_or_else(|| AppError::internal(format!("job {id} vanished while locked")))
}

/// RUNNING -> SUCCEEDED for all of `ids`, with the same result and outputs, in one
/// statement.
pub async fn succeed_many(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
    result: Option<serde_json::Value>,
    output_assets: &[String],
) -> AppResult<std::collections::HashMap<Uuid, Job>> {
    if ids.is_empty() {
        return Ok(Default::default());
    }
    let assets: Vec<Option<String>> = output_assets.iter().cloned().map(Some).collect();
    diesel::update(jobs::table.filter(jobs::id.eq_any(ids)))
        .set((
            jobs::state.eq(JobState::Succeeded),
            jobs::progress_percent.eq(100),
            jobs::result.eq(result),
            jobs::output_assets.eq(assets),
            jobs::error.eq(None::<serde_json::Value>),
            jobs::lease_id.eq(None::<Uuid>),
            jobs::lease_expire_time.eq(None::<DateTime<Utc>>),
            jobs::end_time.eq(sql::<Nullable<Timestamptz>>("now()")),
        ))
        .returning(JobRow::as_returning())
        .get_results::<JobRow>(conn)
        .await?
        .into_iter()
        .map(|r| Job::try_from(r).map(|j| (j.id, j)))
        .collect()
}

/// Ends a running attempt: back to QUEUED after `retry_in`, or FAILED / CANCELLED.
pub async fn end_attempt(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    next: JobState,
    retry_in: Option<std::time::Duration>,
    error: &JobError,
) -> AppResult<Job> {
    let error = serde_json::to_value(error).map_err(AppError::internal)?;
    let retry_ms = retry_in.map_or(0, |d| d.as_millis() as i64);
    let row: JobRow = diesel::update(jobs::table.filter(jobs::id.eq(id)))
        .set((
            jobs::state.eq(next),
            jobs::error.eq(Some(error)),
            jobs::lease_id.eq(None::<Uuid>),
            jobs::lease_expire_time.eq(None::<DateTime<Utc>>),
            jobs::schedule_time.eq(super::now_plus::<Timestamptz>(retry_ms)),
            jobs::end_time.eq(sql::<Nullable<Timestamptz>>("CASE WHEN ")
                .bind::<Bool, _>(next.is_terminal())
                .sql(" THEN now() END")),
        ))
        .returning(JobRow::as_returning())
        .get_result(conn)
        .await?;
    row.try_into()
}

/// Running jobs whose lease has expired, locked; other reapers skip them. Call it in a
/// transaction (it changes a planner setting for the rest of that transaction).
pub async fn lock_expired(conn: &mut AsyncPgConnection, limit: i64) -> AppResult<Vec<Job>> {
    // Every finished job leaves a dead entry in the index of running jobs until vacuum
    // runs. A bitmap scan (the planner's choice) visits them all on every reap and never
    // marks them: after 100,000 jobs, 10-50 ms of Postgres each second, which delayed
    // progress events by a few milliseconds. A plain index scan marks the dead entries
    // it meets, so the next reap skips them (psql: 10 ms every time -> 28 ms once, then 1 ms).
    diesel::sql_query("SET LOCAL enable_bitmapscan = off")
        .execute(conn)
        .await?;
    jobs_from(
        jobs::table
            .filter(sql::<Bool>("state = 'running'")) // literal: matches the partial index
            .filter(jobs::lease_expire_time.lt(diesel::dsl::now))
            .order(jobs::lease_expire_time.asc())
            .limit(limit)
            .select(JobRow::as_select())
            .for_update()
            .skip_locked()
            .load(conn)
            .await?,
    )
}

/// Up to `limit` events after `after`, in order, as (type, job as the event left it),
/// and the oldest sequence still kept. The triggers of migration 000005 write them; a
/// stored event keeps the changing columns, the rest comes from the job.
pub async fn events_after(
    conn: &mut AsyncPgConnection,
    job: Uuid,
    after: i64,
    limit: i64,
) -> AppResult<(Vec<(i16, Job)>, Option<i64>)> {
    #[derive(QueryableByName)]
    struct Replayed {
        #[diesel(sql_type = diesel::sql_types::SmallInt)]
        event_type: i16,
        #[diesel(embed)]
        job: JobRow,
    }
    let oldest: Option<i64> = job_events::table
        .filter(job_events::job_id.eq(job))
        .select(diesel::dsl::min(job_events::sequence))
        .first(conn)
        .await?;
    let rows: Vec<Replayed> = diesel::sql_query(
        "SELECT e.type AS event_type, r.* \
         FROM job_events e JOIN jobs j ON j.id = e.job_id, \
              LATERAL jsonb_populate_record(j, to_jsonb(e.snapshot)) AS r \
         WHERE e.job_id = $1 AND e.sequence > $2 ORDER BY e.sequence LIMIT $3",
    )
    .bind::<diesel::sql_types::Uuid, _>(job)
    .bind::<diesel::sql_types::BigInt, _>(after)
    .bind::<diesel::sql_types::BigInt, _>(limit)
    .load(conn)
    .await?;
    let events = rows
        .into_iter()
        .map(|r| Ok((r.event_type, Job::try_from(r.job)?)))
        .collect::<AppResult<_>>()?;
    Ok((events, oldest))
}

/// Deletes up to `batch` finished jobs (with their events) older than `finished_before`,
/// and up to `batch` events older than `events_before`. Returns (jobs, events) deleted;
/// the caller repeats while either is `batch`. Bounded so a backlog (a shorter retention,
/// an instance that was down) never becomes one statement that outlives
/// `statement_timeout` and deletes nothing; rows another instance is pruning are skipped.
pub async fn prune(
    conn: &mut AsyncPgConnection,
    finished_before: DateTime<Utc>,
    events_before: DateTime<Utc>,
    batch: i64,
) -> AppResult<(usize, usize)> {
    let jobs_deleted = diesel::sql_query(
        // The state list is literal: it matches the partial index on finished jobs.
        "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs \
         WHERE state IN ('succeeded', 'failed', 'cancelled') AND end_time < $1 \
         LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind::<Timestamptz, _>(finished_before)
    .bind::<diesel::sql_types::BigInt, _>(batch)
    .execute(conn)
    .await?;
    let events_deleted = diesel::sql_query(
        "DELETE FROM job_events WHERE ctid = ANY(ARRAY(SELECT ctid FROM job_events \
         WHERE event_time < $1 LIMIT $2 FOR UPDATE SKIP LOCKED))",
    )
    .bind::<Timestamptz, _>(events_before)
    .bind::<diesel::sql_types::BigInt, _>(batch)
    .execute(conn)
    .await?;
    Ok((jobs_deleted, events_deleted))
}
