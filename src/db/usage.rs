//! What an owner holds, counted against the quotas (`crate::quotas`). Each count is
//! bounded by what the quota needs to know: a count stops one past the limit.
use diesel::{
    QueryableByName,
    sql_types::{BigInt, Text},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::AppResult;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn count(conn: &mut AsyncPgConnection, sql: &str, owner: &str, cap: i64) -> AppResult<i64> {
    let row: Count = diesel::sql_query(sql)
        .bind::<Text, _>(owner)
        .bind::<BigInt, _>(cap)
        .get_result(conn)
        .await?;
    Ok(row.n)
}

/// The owner's projects, up to `cap`.
pub async fn projects(conn: &mut AsyncPgConnection, owner: &str, cap: i64) -> AppResult<i64> {
    count(
        conn,
        "SELECT count(*) AS n FROM (SELECT 1 FROM projects WHERE owner = $1 LIMIT $2) t",
        owner,
        cap,
    )
    .await
}

/// The owner's jobs not yet finished, up to `cap`: read project by project through
/// the (project, state) index, so no index on the jobs' owner is kept for it.
pub async fn active_jobs(conn: &mut AsyncPgConnection, owner: &str, cap: i64) -> AppResult<i64> {
    count(
        conn,
        "SELECT count(*) AS n FROM (SELECT 1 FROM jobs \
         WHERE project_id IN (SELECT id FROM projects WHERE owner = $1) \
         AND state IN ('waiting', 'queued', 'running') LIMIT $2) t",
        owner,
        cap,
    )
    .await
}

/// Bytes of the owner's READY assets (`cap` is unused: a sum has no shortcut).
pub async fn storage_bytes(conn: &mut AsyncPgConnection, owner: &str) -> AppResult<i64> {
    count(
        conn,
        "SELECT COALESCE(SUM(size_bytes), 0)::bigint AS n FROM assets \
         WHERE project_id IN (SELECT id FROM projects WHERE owner = $1) \
         AND state = 'ready' AND $2 >= 0",
        owner,
        0,
    )
    .await
}

/// Serializes the storage-quota checks of one owner until the transaction ends (the
/// check and the write that makes bytes count must not interleave with another's).
pub async fn lock_storage(conn: &mut AsyncPgConnection, owner: &str) -> AppResult<()> {
    diesel::sql_query(
        "SELECT pg_advisory_xact_lock(hashtextextended('mediaplane storage ' || $1, 0))",
    )
    .bind::<Text, _>(owner)
    .execute(conn)
    .await?;
    Ok(())
}
