//! Queues: their settings (the `queues` table) and what each holds, counted through the
//! partial indexes of waiting, queued and running jobs and the index of finished ones,
//! under a statement timeout so a slow database costs a stale figure or an error, never
//! a stalled scrape or board.
use chrono::{DateTime, Utc};
use diesel::{
    QueryableByName,
    dsl::sql,
    prelude::*,
    sql_types::{BigInt, Nullable, Text, Timestamptz},
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use crate::db::schema::queues;
use crate::{
    AppResult,
    domain::queue::{Queue, QueueFigures, QueueSettings, StartRate},
};

#[derive(Queryable, Selectable)]
#[diesel(table_name = queues, check_for_backend(diesel::pg::Pg))]
struct QueueRow {
    kind: String,
    paused: bool,
    max_running: Option<i32>,
    max_running_per_key: Option<i32>,
    rate_jobs: Option<i32>,
    rate_interval_ms: Option<i64>,
    revision: i64,
    update_time: DateTime<Utc>,
}

impl From<QueueRow> for Queue {
    fn from(r: QueueRow) -> Self {
        Queue {
            kind: r.kind,
            settings: QueueSettings {
                paused: r.paused,
                max_running: r.max_running,
                max_running_per_key: r.max_running_per_key,
                start_rate: r.rate_jobs.zip(r.rate_interval_ms).map(|(jobs, ms)| StartRate {
                    jobs,
                    interval: std::time::Duration::from_millis(ms.max(0) as u64),
                }),
            },
            revision: r.revision,
            update_time: Some(r.update_time),
        }
    }
}

pub async fn get(conn: &mut AsyncPgConnection, kind: &str) -> AppResult<Option<Queue>> {
    Ok(queues::table
        .find(kind)
        .select(QueueRow::as_select())
        .first(conn)
        .await
        .optional()?
        .map(Queue::from))
}

pub async fn list(conn: &mut AsyncPgConnection) -> AppResult<Vec<Queue>> {
    Ok(queues::table
        .order(queues::kind)
        .select(QueueRow::as_select())
        .load(conn)
        .await?
        .into_iter()
        .map(Queue::from)
        .collect())
}

/// What became of an update.
pub enum Updated {
    Done(Queue),
    /// The queue's revision is not `expected`.
    Stale,
}

/// Writes a queue's settings, creating its row if needed; with `expected`, only if the
/// queue's revision is that (0: a queue never configured).
pub async fn put(
    conn: &mut AsyncPgConnection,
    kind: &str,
    s: &QueueSettings,
    expected: Option<i64>,
) -> AppResult<Updated> {
    conn.transaction(async |conn| {
        let current: Option<i64> = queues::table
            .find(kind)
            .select(queues::revision)
            .for_update()
            .first(conn)
            .await
            .optional()?;
        if expected.is_some_and(|e| e != current.unwrap_or(0)) {
            return Ok(Updated::Stale);
        }
        let rate_changed = match current {
            None => true,
            Some(_) => {
                let (jobs, ms): (Option<i32>, Option<i64>) = queues::table
                    .find(kind)
                    .select((queues::rate_jobs, queues::rate_interval_ms))
                    .first(conn)
                    .await?;
                jobs != s.start_rate.map(|r| r.jobs)
                    || ms != s.start_rate.map(|r| r.interval.as_millis() as i64)
            }
        };
        let values = (
            queues::kind.eq(kind),
            queues::paused.eq(s.paused),
            queues::max_running.eq(s.max_running),
            queues::max_running_per_key.eq(s.max_running_per_key),
            queues::rate_jobs.eq(s.start_rate.map(|r| r.jobs)),
            queues::rate_interval_ms.eq(s.start_rate.map(|r| r.interval.as_millis() as i64)),
        );
        let full_bucket = (
            queues::rate_tokens.eq(s.start_rate.map_or(0.0, |r| f64::from(r.jobs))),
            queues::rate_time.eq(sql::<Nullable<Timestamptz>>("now()")),
        );
        let row: QueueRow = if current.is_none() {
            // A new rate starts with a full bucket.
            diesel::insert_into(queues::table)
                .values((values, full_bucket))
                .returning(QueueRow::as_returning())
                .get_result(conn)
                .await?
        } else {
            if rate_changed {
                diesel::update(queues::table.find(kind))
                    .set(full_bucket)
                    .execute(conn)
                    .await?;
            }
            diesel::update(queues::table.find(kind))
                .set((
                    values,
                    queues::revision.eq(queues::revision + 1),
                    queues::update_time.eq(diesel::dsl::now),
                ))
                .returning(QueueRow::as_returning())
                .get_result(conn)
                .await?
        };
        Ok(Updated::Done(row.into()))
    })
    .await
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = BigInt)]
    waiting: i64,
    #[diesel(sql_type = BigInt)]
    queued: i64,
    #[diesel(sql_type = BigInt)]
    running: i64,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    oldest_ready: Option<DateTime<Utc>>,
    #[diesel(sql_type = BigInt)]
    succeeded: i64,
    #[diesel(sql_type = BigInt)]
    failed: i64,
}

/// Per kind (all kinds with unfinished or recently finished jobs, or only `kind`):
/// jobs waiting, queued and running, the schedule time of the longest-waiting due one
/// (a job scheduled for later is not waiting yet), and the jobs that succeeded and
/// failed in the last minute.
pub async fn figures(
    conn: &mut AsyncPgConnection,
    kind: Option<&str>,
) -> AppResult<Vec<QueueFigures>> {
    let rows: Vec<Row> = conn
        .transaction(async |conn| {
            diesel::sql_query("SET LOCAL statement_timeout = '2s'")
                .execute(conn)
                .await?;
            diesel::sql_query(
                "SELECT kind, sum(waiting)::bigint AS waiting, sum(queued)::bigint AS queued, \
                        sum(running)::bigint AS running, min(oldest_ready) AS oldest_ready, \
                        sum(succeeded)::bigint AS succeeded, sum(failed)::bigint AS failed FROM ( \
                   SELECT kind, count(*) AS waiting, 0 AS queued, 0 AS running, \
                          NULL::timestamptz AS oldest_ready, 0 AS succeeded, 0 AS failed \
                   FROM jobs WHERE state = 'waiting' AND ($1::text IS NULL OR kind = $1) GROUP BY kind \
                   UNION ALL \
                   SELECT kind, 0, count(*), 0, \
                          min(schedule_time) FILTER (WHERE schedule_time <= now()), 0, 0 \
                   FROM jobs WHERE state = 'queued' AND ($1::text IS NULL OR kind = $1) GROUP BY kind \
                   UNION ALL \
                   SELECT kind, 0, 0, count(*), NULL, 0, 0 FROM jobs \
                   WHERE state = 'running' AND ($1::text IS NULL OR kind = $1) GROUP BY kind \
                   UNION ALL \
                   SELECT kind, 0, 0, 0, NULL, count(*) FILTER (WHERE state = 'succeeded'), \
                          count(*) FILTER (WHERE state = 'failed') FROM jobs \
                   WHERE state IN ('succeeded', 'failed', 'cancelled') \
                     AND end_time > now() - interval '1 minute' \
                     AND ($1::text IS NULL OR kind = $1) GROUP BY kind \
                 ) t GROUP BY kind ORDER BY kind",
            )
            .bind::<Nullable<Text>, _>(kind)
            .load(conn)
            .await
        })
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| QueueFigures {
            kind: r.kind,
            waiting: r.waiting,
            queued: r.queued,
            running: r.running,
            oldest_ready: r.oldest_ready,
            succeeded_last_minute: r.succeeded,
            failed_last_minute: r.failed,
        })
        .collect())
}
