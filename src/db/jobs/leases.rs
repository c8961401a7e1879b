//! The worker protocol's statements: leasing, fenced writes under a lease, ends of
//! attempts, releases and expired leases.
use chrono::{DateTime, Utc};
use diesel::{
    dsl::sql,
    prelude::*,
    sql_types::{Bool, Integer, Nullable, Timestamptz},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use crate::db::schema::jobs;
use crate::{
    AppError, AppResult,
    domain::job::{Fenced, Job, JobError, JobState},
};

use super::*;

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
#[derive(Clone, Copy)]
pub struct Taker<'a> {
    pub worker_id: &'a str,
    pub max: i64,
    pub lease_ms: i64,
}

/// Leases queued jobs of `kinds` that are due for one or several AcquireJobs calls, in
/// one statement (its own transaction): the best due jobs, the first `takers[0].max` of
/// them to the first call, the next ones to the second, and so on (each job with its
/// caller's worker id and lease). One list of jobs per taker. The statement is the
/// `jobs_lease` function (its migration says how it reads the queue, and why a function:
/// it keeps one plan per connection where a prepared statement was planned on every
/// call). Calls that arrive together share a statement rather than each locking its way
/// past the rows the others hold at the head of the same index.
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
    impl crate::db::Statement for Acquire {
        fn walk<'b>(
            &'b self,
            mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
        ) -> QueryResult<()> {
            out.push_sql("SELECT * FROM jobs_lease(");
            out.push_bind_param::<Array<Text>, _>(&self.kinds)?;
            out.push_sql(", ");
            out.push_bind_param::<BigInt, _>(&self.total)?;
            out.push_sql(", ");
            out.push_bind_param::<Array<Text>, _>(&self.workers)?;
            out.push_sql(", ");
            out.push_bind_param::<Array<BigInt>, _>(&self.lease_ms)?;
            out.push_sql(", ");
            out.push_bind_param::<Array<BigInt>, _>(&self.firsts)?;
            out.push_sql(")");
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
    let rows: Vec<Taken> = crate::db::Prepared(Acquire {
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
    #[derive(QueryableByName)]
    struct Written {
        #[diesel(sql_type = Integer)]
        at: i32,
        #[diesel(embed)]
        job: JobRow,
    }
    let rows: Vec<Written> = crate::db::Prepared(WriteFenced::new(writes))
        .load(conn)
        .await?;
    rows.into_iter()
        .map(|r| Ok((r.at as usize, Job::try_from(r.job)?)))
        .collect()
}

/// The calls of one `write_fenced` statement, one array per column, ordered by job id.
#[derive(Default)]
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

impl WriteFenced {
    fn new(writes: &[FencedWrite<'_>]) -> Self {
        // By id: the statement finds a job's call by binary search, and locks rows in id
        // order, as everywhere jobs are locked in bulk.
        let mut order: Vec<usize> = (0..writes.len()).collect();
        order.sort_by_key(|&i| writes[i].id);
        let mut st = Self::default();
        for i in order {
            let w = &writes[i];
            st.at.push(i as i32);
            st.ids.push(w.id);
            st.projects.push(w.project);
            st.leases.push(w.lease);
            st.deletion_locks.push(crate::db::deletion_lock(w.project));
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
            let (done, percent, step, message, result) = match w.op {
                Fenced::Progress {
                    percent,
                    step,
                    message,
                } => (false, *percent, step.clone(), message.clone(), None),
                Fenced::Complete { result } => {
                    (true, 100, String::new(), String::new(), result.clone())
                }
            };
            st.done.push(done);
            st.percents.push(percent);
            st.steps.push(step);
            st.messages.push(message);
            st.results.push(result);
        }
        st
    }
}

/// Binds `value` and returns its placeholder (`$n`: diesel numbers binds in the order
/// they are pushed), so later uses name it instead of binding the array again.
fn bind_named<'b, ST, U>(
    out: &mut diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    binds: &mut usize,
    value: &'b U,
) -> QueryResult<String>
where
    ST: diesel::sql_types::SqlType,
    U: diesel::serialize::ToSql<ST, diesel::pg::Pg>,
    diesel::pg::Pg: diesel::sql_types::HasSqlType<ST>,
{
    out.push_bind_param::<ST, U>(value)?;
    *binds += 1;
    Ok(format!("${binds}"))
}

impl crate::db::Statement for WriteFenced {
    fn walk<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    ) -> QueryResult<()> {
        use diesel::sql_types::{Array, Int4, Jsonb, Nullable as N, Text, Uuid as SqlUuid};
        let binds = &mut 0;
        // It stamps the change itself (`sequence`, `update_time`, the event's type: a
        // state change, or progress), which spares each row the `jobs_touch` trigger.
        // No join with the calls: a job finds its call by binary search over the
        // calls' ids (sorted; `width_bucket` gives the position of the one it equals)
        // and reads the call's fields at that position. Joined with `unnest` of the
        // calls, the generic plan (made for an estimated 10 calls) was a nested loop,
        // a merge or a hash join depending on the statistics when it was made; the
        // nested loop read every call for each job: 400 ms for 1,000 calls, where
        // this takes 18. Each array is bound once; later uses name its placeholder.
        out.push_sql(
            "UPDATE jobs SET (state, progress_percent, current_step, message, result, \
             output_assets, error, lease_id, lease_expire_time, end_time, sequence, \
             update_time, last_event) = (SELECT \
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
             CASE WHEN c.done THEN now() ELSE jobs.end_time END, \
             jobs.sequence + 1, now(), CASE WHEN c.done THEN 3 ELSE 4 END \
             FROM (SELECT (",
        );
        let done = bind_named::<Array<Bool>, _>(&mut out, binds, &self.done)?;
        out.push_sql(")[w.i] AS done, (");
        bind_named::<Array<Int4>, _>(&mut out, binds, &self.percents)?;
        out.push_sql(")[w.i] AS percent, (");
        bind_named::<Array<Text>, _>(&mut out, binds, &self.steps)?;
        out.push_sql(")[w.i] AS step, (");
        bind_named::<Array<Text>, _>(&mut out, binds, &self.messages)?;
        out.push_sql(")[w.i] AS message, (");
        bind_named::<Array<N<Jsonb>>, _>(&mut out, binds, &self.results)?;
        out.push_sql(")[w.i] AS result FROM (SELECT width_bucket(jobs.id, ");
        let ids = bind_named::<Array<SqlUuid>, _>(&mut out, binds, &self.ids)?;
        let at = format!("width_bucket(jobs.id, {ids})");
        // The literal state and `id = ANY`: the plan probes the index of running
        // jobs by id whatever the statistics (by tuple id instead, the plan made on a
        // fresh table scanned every running job per statement).
        out.push_sql(&format!(
            ") AS i) w) c) WHERE jobs.id = ANY({ids}) AND jobs.state = 'running' \
             AND jobs.project_id = ("
        ));
        bind_named::<Array<SqlUuid>, _>(&mut out, binds, &self.projects)?;
        out.push_sql(&format!(")[{at}] AND jobs.lease_id = ("));
        bind_named::<Array<SqlUuid>, _>(&mut out, binds, &self.leases)?;
        // A job that others wait on ends through the transactional path, which settles
        // them in the same transaction.
        out.push_sql(&format!(
            ")[{at}] AND NOT (jobs.has_dependents AND ({done})[{at}]) AND (("
        ));
        let kinds = bind_named::<Array<N<Text>>, _>(&mut out, binds, &self.kinds)?;
        // A call whose project a deletion may hold (its bucket's lock is taken) is
        // skipped, not waited for: an UPDATE cannot skip a locked row, and the
        // deletion keeps its jobs locked until it commits, which would hold up every
        // write in the statement. A skipped call goes the slow way, which hands it
        // back to its caller if its job is locked. Holding the shared lock to the end
        // keeps a deletion from starting under the statement.
        out.push_sql(&format!(
            ")[{at}] IS NULL OR jobs.kind = ANY(string_to_array(({kinds})[{at}], ' '))) \
             AND pg_try_advisory_xact_lock_shared({}, (",
            crate::db::DELETION_LOCK_CLASS
        ));
        bind_named::<Array<Int4>, _>(&mut out, binds, &self.deletion_locks)?;
        out.push_sql(&format!(")[{at}]) RETURNING ("));
        bind_named::<Array<Int4>, _>(&mut out, binds, &self.at)?;
        out.push_sql(&format!(")[{at}] AS at, {JOB_COLUMNS}"));
        Ok(())
    }
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
            jobs::schedule_time.eq(crate::db::now_plus::<Timestamptz>(retry_ms)),
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
