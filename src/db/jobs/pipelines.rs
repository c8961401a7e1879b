//! Pipelines: jobs that wait for jobs. A waiting job is released (QUEUED) or cancelled
//! in the transaction that ends its last dependency; these statements run inside the
//! engine's transactions, after the change that ended a job.
use diesel::{
    prelude::*,
    sql_types::{Array, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use crate::db::schema::jobs;
use crate::{
    AppResult,
    domain::job::{Job, JobState},
};

use super::*;

/// The states of the jobs `ids` of `project` that exist, locked FOR SHARE: none of them
/// can end until the transaction does, so a dependent created now is settled by the
/// transaction that ends them (which waits for this one and then sees the dependent).
pub async fn lock_dependencies(
    conn: &mut AsyncPgConnection,
    project: Uuid,
    ids: &[Uuid],
) -> AppResult<std::collections::HashMap<Uuid, (String, JobState)>> {
    Ok(jobs::table
        .filter(jobs::id.eq_any(ids))
        .filter(jobs::project_id.eq(project))
        .order(jobs::id)
        .select((jobs::id, jobs::kind, jobs::state))
        .for_share()
        .load::<(Uuid, String, JobState)>(conn)
        .await?
        .into_iter()
        .map(|(id, kind, state)| (id, (kind, state)))
        .collect())
}

/// Marks unfinished jobs as having dependents, so their end settles them (no event:
/// nothing a watcher sees changes).
pub async fn mark_has_dependents(conn: &mut AsyncPgConnection, ids: &[Uuid]) -> AppResult<()> {
    if ids.is_empty() {
        return Ok(());
    }
    diesel::update(
        jobs::table
            .filter(jobs::id.eq_any(ids))
            .filter(jobs::has_dependents.eq(false))
            .filter(jobs::state.eq_any([JobState::Waiting, JobState::Queued, JobState::Running])),
    )
    .set(jobs::has_dependents.eq(true))
    .execute(conn)
    .await?;
    Ok(())
}

/// Jobs by id, in full: the dependencies handed to a worker with its lease.
pub async fn get_by_ids(conn: &mut AsyncPgConnection, ids: &[Uuid]) -> AppResult<Vec<Job>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    jobs_from(
        jobs::table
            .filter(jobs::id.eq_any(ids))
            .select(JobRow::as_select())
            .load(conn)
            .await?,
    )
}

/// Waiting jobs of the project that depend on any of `ids`, locked in id order.
async fn lock_waiting_dependents(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
) -> AppResult<Vec<Uuid>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    // `cardinality(..) > 0` matches the partial GIN index's predicate.
    Ok(diesel::sql_query(
        "SELECT id FROM jobs WHERE depends_on && $1 AND cardinality(depends_on) > 0 \
         AND state = 'waiting' ORDER BY id FOR UPDATE",
    )
    .bind::<Array<SqlUuid>, _>(ids)
    .load::<IdRow>(conn)
    .await?
    .into_iter()
    .map(|r| r.id)
    .collect())
}

#[derive(QueryableByName)]
struct IdRow {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
}

/// Decides the waiting jobs `ids` (locked) from their dependencies' states as now
/// committed or written by this transaction: QUEUED once every one SUCCEEDED (with
/// `run_anyway`, once every one ended), CANCELLED when one ended FAILED or CANCELLED,
/// with an error naming it; the others keep waiting. Returns the jobs it changed.
async fn decide(conn: &mut AsyncPgConnection, ids: &[Uuid]) -> AppResult<Vec<Job>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    // The code of a cancelled job's error: CANCELLED (1).
    let rows: Vec<JobRow> = diesel::sql_query(returning_jobs(
        "WITH d AS (SELECT j.id, j.run_anyway, \
                bool_and(p.state = 'succeeded') AS ok, \
                bool_and(p.state IN ('succeeded', 'failed', 'cancelled')) AS ended, \
                (array_agg(p.id ORDER BY p.end_time, p.id) \
                    FILTER (WHERE p.state IN ('failed', 'cancelled')))[1] AS cause, \
                (array_agg(p.state::text ORDER BY p.end_time, p.id) \
                    FILTER (WHERE p.state IN ('failed', 'cancelled')))[1] AS cause_state \
             FROM jobs j LEFT JOIN jobs p ON p.id = ANY(j.depends_on) \
             WHERE j.id = ANY($1) AND j.state = 'waiting' GROUP BY j.id, j.run_anyway), \
         v AS (SELECT d.*, (d.ok IS NOT FALSE OR (d.run_anyway AND d.ended)) AS go FROM d) \
         UPDATE jobs SET \
             state = CASE WHEN v.go THEN 'queued'::job_state ELSE 'cancelled'::job_state END, \
             schedule_time = CASE WHEN v.go THEN GREATEST(jobs.schedule_time, now()) \
                 ELSE jobs.schedule_time END, \
             fair_seq = CASE WHEN v.go \
                 THEN jobs_next_turn(jobs.kind, jobs.priority, jobs.concurrency_key) \
                 ELSE jobs.fair_seq END, \
             cancelled_by = CASE WHEN v.go THEN NULL ELSE v.cause END, \
             error = CASE WHEN v.go THEN NULL ELSE jsonb_build_object('code', 1, 'message', \
                 'cancelled: dependency projects/' || jobs.project_id || '/jobs/' || v.cause \
                 || ' ended ' || upper(v.cause_state)) END, \
             end_time = CASE WHEN v.go THEN NULL ELSE now() END \
         FROM v WHERE jobs.id = v.id \
           AND (v.go OR (NOT jobs.run_anyway AND v.cause IS NOT NULL))",
    ))
    .bind::<Array<SqlUuid>, _>(ids)
    .load(conn)
    .await?;
    jobs_from(rows)
}

/// Settles the dependents of jobs that just ended (`ended`, in this transaction):
/// releases those whose dependencies are all done and cancels those a failure
/// dooms, then the dependents of those it cancelled, and so on. Returns every job it
/// changed, in the order it changed them.
pub async fn settle_dependents(
    conn: &mut AsyncPgConnection,
    ended: &[Uuid],
) -> AppResult<Vec<Job>> {
    let mut changed = Vec::new();
    let mut ended = ended.to_vec();
    while !ended.is_empty() {
        let waiting = lock_waiting_dependents(conn, &ended).await?;
        let decided = decide(conn, &waiting).await?;
        ended = decided
            .iter()
            .filter(|j| j.state.is_terminal())
            .map(|j| j.id)
            .collect();
        changed.extend(decided);
    }
    Ok(changed)
}

/// Cancels the waiting dependents of `causes` (jobs being cancelled) at once, except
/// those that run anyway, then settles theirs. Returns every job it changed.
pub async fn cancel_dependents(
    conn: &mut AsyncPgConnection,
    causes: &[Uuid],
) -> AppResult<Vec<Job>> {
    let waiting = lock_waiting_dependents(conn, causes).await?;
    if waiting.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<JobRow> = diesel::sql_query(
        returning_jobs("UPDATE jobs SET state = 'cancelled', end_time = now(), \
             cancelled_by = c.cause, \
             error = jsonb_build_object('code', 1, 'message', \
                 'cancelled: dependency projects/' || jobs.project_id || '/jobs/' || c.cause \
                 || ' was cancelled') \
         FROM (SELECT j.id, (SELECT x FROM unnest(j.depends_on) x WHERE x = ANY($2) LIMIT 1) AS cause \
               FROM jobs j WHERE j.id = ANY($1)) c \
         WHERE jobs.id = c.id AND NOT jobs.run_anyway"),
    )
    .bind::<Array<SqlUuid>, _>(&waiting)
    .bind::<Array<SqlUuid>, _>(causes)
    .load(conn)
    .await?;
    let mut changed = jobs_from(rows)?;
    let cancelled: Vec<Uuid> = changed.iter().map(|j| j.id).collect();
    changed.extend(settle_dependents(conn, &cancelled).await?);
    Ok(changed)
}

/// After a retry of `root`: the jobs its end cancelled (and those theirs cancelled) go
/// back to WAITING, and are decided again at once (another dependency may have failed
/// meanwhile). Returns every job it changed.
pub async fn rearm_dependents(conn: &mut AsyncPgConnection, root: Uuid) -> AppResult<Vec<Job>> {
    let rows: Vec<JobRow> = diesel::sql_query(returning_jobs(
        "WITH RECURSIVE r AS ( \
             SELECT id FROM jobs WHERE cancelled_by = $1 AND state = 'cancelled' \
             UNION SELECT j.id FROM jobs j JOIN r ON j.cancelled_by = r.id \
                 WHERE j.state = 'cancelled') \
         UPDATE jobs SET state = 'waiting', end_time = NULL, error = NULL, \
             cancelled_by = NULL, cancel_requested = false \
         FROM r WHERE jobs.id = r.id",
    ))
    .bind::<SqlUuid, _>(root)
    .load(conn)
    .await?;
    let mut changed = jobs_from(rows)?;
    let mut ids: Vec<Uuid> = changed.iter().map(|j| j.id).collect();
    ids.sort_unstable();
    let decided = decide(conn, &ids).await?;
    let cancelled: Vec<Uuid> = decided
        .iter()
        .filter(|j| j.state.is_terminal())
        .map(|j| j.id)
        .collect();
    changed.extend(decided);
    changed.extend(settle_dependents(conn, &cancelled).await?);
    Ok(changed)
}
