//! Queues: their settings (the `queues` table) and what each holds, counted through the
//! partial indexes of waiting, queued and running jobs and the index of finished ones,
//! under a statement timeout so a slow database costs a stale figure or an error, never
//! a stalled scrape or board.
use chrono::{DateTime, Utc};
use diesel::{
    QueryableByName,
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
                start_rate: r
                    .rate_jobs
                    .zip(r.rate_interval_ms)
                    .map(|(jobs, ms)| StartRate {
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
        let values = (
            queues::kind.eq(kind),
            queues::paused.eq(s.paused),
            queues::max_running.eq(s.max_running),
            queues::max_running_per_key.eq(s.max_running_per_key),
            queues::rate_jobs.eq(s.start_rate.map(|r| r.jobs)),
            queues::rate_interval_ms.eq(s.start_rate.map(|r| r.interval.as_millis() as i64)),
        );
        let row: QueueRow = if current.is_none() {
            diesel::insert_into(queues::table)
                .values(values)
                .returning(QueueRow::as_returning())
                .get_result(conn)
                .await?
        } else {
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

/// Kinds whose queue restricts leasing: paused, or with a limit or a start rate.
pub async fn restricted(conn: &mut AsyncPgConnection) -> AppResult<Vec<String>> {
    Ok(queues::table
        .filter(queues::restricted.eq(true))
        .select(queues::kind)
        .load(conn)
        .await?)
}

#[derive(QueryableByName)]
struct Candidate {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: uuid::Uuid,
    #[diesel(sql_type = Text)]
    concurrency_key: String,
}

#[derive(QueryableByName)]
struct KeyCount {
    #[diesel(sql_type = Text)]
    concurrency_key: String,
    #[diesel(sql_type = BigInt)]
    running: i64,
}

/// Queued jobs read per page while looking past keys at their limit, and pages read at
/// most per kind and call: a key with a long queue at its limit costs a bounded scan.
const CANDIDATE_PAGE: i64 = 256;
const CANDIDATE_PAGES: i64 = 8;

/// Leases jobs of the restricted kinds among `kinds` for `takers` (in their order), in
/// one transaction that holds those queues' rows locked, so the limits hold across
/// every instance: nothing while paused; no more running than `max_running`, nor per
/// concurrency key than `max_running_per_key`; no more starts than the start rate's
/// bucket holds (its tokens are taken in the same transaction). Jobs are taken in the
/// fetch order (priority, turn across keys, due time).
pub async fn lease_limited(
    conn: &mut AsyncPgConnection,
    kinds: &[String],
    takers: &[crate::db::jobs::Taker<'_>],
) -> AppResult<Vec<Vec<crate::domain::job::Job>>> {
    if takers.iter().all(|t| t.max <= 0) {
        return Ok(takers.iter().map(|_| Vec::new()).collect());
    }
    conn.transaction(async |conn| lease_limited_in(conn, kinds, takers).await)
        .await
}

/// `lease_limited` in the caller's transaction (a worker's turn, whose completions may
/// have freed the slots), which holds the queues' rows locked until it ends.
pub async fn lease_limited_in(
    conn: &mut AsyncPgConnection,
    kinds: &[String],
    takers: &[crate::db::jobs::Taker<'_>],
) -> AppResult<Vec<Vec<crate::domain::job::Job>>> {
    use diesel::sql_types::Array;
    let mut out: Vec<Vec<crate::domain::job::Job>> = takers.iter().map(|_| Vec::new()).collect();
    let mut wants: Vec<i64> = takers.iter().map(|t| t.max.max(0)).collect();
    if wants.iter().sum::<i64>() == 0 {
        return Ok(out);
    }
    {
        let mut kinds = kinds.to_vec();
        kinds.sort_unstable();
        kinds.dedup();
        // Locks the queues, forgetting starts older than their interval.
        let rows: Vec<LimitRow> = diesel::sql_query(
            "UPDATE queues SET rate_starts = CASE WHEN rate_jobs IS NULL THEN '{}' ELSE \
                 ARRAY(SELECT t FROM unnest(rate_starts) t \
                       WHERE t > now() - rate_interval_ms * interval '1 millisecond' ORDER BY t) END \
             WHERE kind IN (SELECT kind FROM queues WHERE kind = ANY($1) AND restricted \
                            ORDER BY kind FOR UPDATE) \
             RETURNING kind, paused, max_running, max_running_per_key, rate_jobs, \
                 cardinality(rate_starts)::bigint AS recent_starts",
        )
        .bind::<Array<Text>, _>(&kinds)
        .load(conn)
        .await?;
        for q in rows {
            let want: i64 = wants.iter().sum();
            if want == 0 || q.paused {
                continue;
            }
            let running: Vec<KeyCount> = diesel::sql_query(
                "SELECT concurrency_key, count(*)::bigint AS running FROM jobs \
                 WHERE state = 'running' AND kind = $1 GROUP BY concurrency_key",
            )
            .bind::<Text, _>(&q.kind)
            .load(conn)
            .await?;
            let total: i64 = running.iter().map(|r| r.running).sum();
            let mut budget = want;
            if let Some(max) = q.max_running {
                budget = budget.min(i64::from(max) - total);
            }
            if let Some(rate) = q.rate_jobs {
                budget = budget.min(i64::from(rate) - q.recent_starts);
            }
            if budget <= 0 {
                continue;
            }
            let mut per_key: std::collections::HashMap<String, i64> = running
                .into_iter()
                .map(|r| (r.concurrency_key, r.running))
                .collect();
            let mut chosen: Vec<uuid::Uuid> = Vec::new();
            let mut page = 0;
            while (chosen.len() as i64) < budget && page < CANDIDATE_PAGES {
                let candidates: Vec<Candidate> = diesel::sql_query(
                    "SELECT id, concurrency_key FROM jobs \
                     WHERE state = 'queued' AND kind = $1 AND schedule_time <= now() \
                     ORDER BY priority DESC, fair_seq, schedule_time, create_time \
                     LIMIT $2 OFFSET $3",
                )
                .bind::<Text, _>(&q.kind)
                .bind::<BigInt, _>(CANDIDATE_PAGE)
                .bind::<BigInt, _>(page * CANDIDATE_PAGE)
                .load(conn)
                .await?;
                let last_page = (candidates.len() as i64) < CANDIDATE_PAGE;
                for c in candidates {
                    if chosen.len() as i64 >= budget {
                        break;
                    }
                    if let Some(limit) = q.max_running_per_key {
                        let n = per_key.entry(c.concurrency_key).or_default();
                        if *n >= i64::from(limit) {
                            continue;
                        }
                        *n += 1;
                    }
                    chosen.push(c.id);
                }
                // Without a per-key limit every candidate is taken: one page is enough.
                if last_page || q.max_running_per_key.is_none() {
                    break;
                }
                page += 1;
            }
            let mut leased_here = 0i64;
            let mut rest = chosen.as_slice();
            for (i, taker) in takers.iter().enumerate() {
                if rest.is_empty() {
                    break;
                }
                let n = (wants[i] as usize).min(rest.len());
                if n == 0 {
                    continue;
                }
                let (mine, others) = rest.split_at(n);
                rest = others;
                let rows: Vec<crate::db::jobs::JobRow> = diesel::sql_query(
                    // Statement time, not the transaction's: the transaction may have
                    // waited for the queue's lock, and a run starts when it is leased.
                    crate::db::jobs::returning_jobs("UPDATE jobs SET state = 'running', attempt = attempt + 1, worker_id = $2, \
                         lease_id = gen_random_uuid(), lease_duration_ms = $3, \
                         lease_expire_time = statement_timestamp() + $3 * interval '1 millisecond', \
                         start_time = COALESCE(start_time, statement_timestamp()), \
                         progress_percent = 0, current_step = '', message = '' \
                     WHERE id = ANY($1) AND state = 'queued'"))
                .bind::<Array<diesel::sql_types::Uuid>, _>(mine)
                .bind::<Text, _>(taker.worker_id)
                .bind::<BigInt, _>(taker.lease_ms)
                .load(conn)
                .await?;
                wants[i] -= rows.len() as i64;
                leased_here += rows.len() as i64;
                for row in rows {
                    out[i].push(crate::domain::job::Job::try_from(row)?);
                }
            }
            if q.rate_jobs.is_some() && leased_here > 0 {
                diesel::sql_query(
                    // Recorded at the latest time and forgotten from the earliest
                    // (`now()` above): either way errs on the side of fewer starts.
                    "UPDATE queues SET rate_starts = rate_starts || array_fill(statement_timestamp(), ARRAY[$2]) \
                     WHERE kind = $1",
                )
                .bind::<Text, _>(&q.kind)
                .bind::<diesel::sql_types::Integer, _>(leased_here as i32)
                .execute(conn)
                .await?;
            }
        }
        Ok(out)
    }
}

#[derive(QueryableByName)]
struct LimitRow {
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    paused: bool,
    #[diesel(sql_type = Nullable<diesel::sql_types::Integer>)]
    max_running: Option<i32>,
    #[diesel(sql_type = Nullable<diesel::sql_types::Integer>)]
    max_running_per_key: Option<i32>,
    #[diesel(sql_type = Nullable<diesel::sql_types::Integer>)]
    rate_jobs: Option<i32>,
    #[diesel(sql_type = BigInt)]
    recent_starts: i64,
}
