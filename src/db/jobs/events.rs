//! Stored job events (for resuming watches) and retention.
use chrono::{DateTime, Utc};
use diesel::{prelude::*, sql_types::Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use crate::db::schema::job_events;
use crate::{AppResult, domain::job::Job};

use super::*;

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
