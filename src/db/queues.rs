//! What each job queue holds, for the metrics: counted through the partial indexes of
//! queued and running jobs, under a statement timeout so a slow database costs a
//! stale figure, never a stalled scrape (scrapes read what the last refresh found).
use chrono::{DateTime, Utc};
use diesel::{
    QueryableByName,
    sql_types::{BigInt, Nullable, Text, Timestamptz},
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use crate::{AppResult, metrics::QueueFigures};

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = BigInt)]
    queued: i64,
    #[diesel(sql_type = BigInt)]
    running: i64,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    oldest_ready: Option<DateTime<Utc>>,
}

/// Per kind: jobs queued, running, and the schedule time of the longest-waiting ready
/// one (a job scheduled for later is not waiting yet).
pub async fn figures(conn: &mut AsyncPgConnection) -> AppResult<Vec<QueueFigures>> {
    let rows: Vec<Row> = conn
        .transaction(async |conn| {
            diesel::sql_query("SET LOCAL statement_timeout = '2s'")
                .execute(conn)
                .await?;
            diesel::sql_query(
                "SELECT kind, sum(queued)::bigint AS queued, sum(running)::bigint AS running, \
                        min(oldest_ready) AS oldest_ready FROM ( \
                   SELECT kind, count(*) AS queued, 0 AS running, \
                          min(schedule_time) FILTER (WHERE schedule_time <= now()) AS oldest_ready \
                   FROM jobs WHERE state = 'queued' GROUP BY kind \
                   UNION ALL \
                   SELECT kind, 0, count(*), NULL FROM jobs WHERE state = 'running' GROUP BY kind \
                 ) t GROUP BY kind ORDER BY kind",
            )
            .load(conn)
            .await
        })
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| QueueFigures {
            kind: r.kind,
            queued: r.queued,
            running: r.running,
            oldest_ready: r.oldest_ready,
        })
        .collect())
}
