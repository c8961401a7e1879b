//! Postgres: the pool, database creation, embedded migrations. Queries live in one
//! module per resource.
use std::time::Duration;

use diesel::{connection::SimpleConnection, result::ConnectionError};
use diesel_async::{
    AsyncConnection, AsyncPgConnection, RunQueryDsl,
    async_connection_wrapper::AsyncConnectionWrapper,
    pooled_connection::{AsyncDieselConnectionManager, bb8},
};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

pub mod assets;
pub mod jobs;
pub mod projects;
pub mod queues;
pub mod schema;
pub mod states;
pub mod usage;

/// `now() + ms` milliseconds, on the database's clock (the one every instance shares).
pub type NowPlus<ST> = diesel::expression::SqlLiteral<
    ST,
    diesel::expression::UncheckedBind<
        diesel::expression::SqlLiteral<ST>,
        <i64 as diesel::expression::AsExpression<diesel::sql_types::BigInt>>::Expression,
    >,
>;

pub fn now_plus<ST: diesel::expression::TypedExpressionType>(ms: i64) -> NowPlus<ST> {
    diesel::dsl::sql::<ST>("now() + ")
        .bind::<diesel::sql_types::BigInt, _>(ms)
        .sql(" * interval '1 millisecond'")
}

/// A hand-written statement (unnest, CTEs: what the query builder cannot say). Unlike
/// `sql_query`, which diesel never prepares (a Parse and a plan on every call), a
/// `Prepared` statement is prepared once per connection and distinct SQL text.
pub trait Statement: Send + Sync + 'static {
    fn walk<'b>(
        &'b self,
        out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    ) -> diesel::QueryResult<()>;
}

pub struct Prepared<S>(pub S);

/// No static id: diesel then caches the prepared statement by its SQL text rather than
/// by type, so a statement whose SQL varies with its input (the number of rows it
/// names, an optional clause) can never run another text's prepared plan. The cost is
/// writing the SQL on every call, microseconds beside the round trip.
impl<S: Statement> diesel::query_builder::QueryId for Prepared<S> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<S: Statement> diesel::query_builder::QueryFragment<diesel::pg::Pg> for Prepared<S> {
    fn walk_ast<'b>(
        &'b self,
        out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    ) -> diesel::QueryResult<()> {
        self.0.walk(out)
    }
}

impl<S: Statement> diesel::query_builder::Query for Prepared<S> {
    type SqlType = diesel::sql_types::Untyped;
}

pub type Pool = bb8::Pool<AsyncPgConnection>;
pub type PooledConn<'a> = bb8::PooledConnection<'a, AsyncPgConnection>;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Serializes migrations across instances starting at once (arbitrary constant).
const MIGRATION_LOCK: i64 = 0x6d65_6469_6170_6c61;

/// Advisory lock class of project deletions (arbitrary constant; the two-key form keeps
/// these apart from `MIGRATION_LOCK`'s one-key space).
pub const DELETION_LOCK_CLASS: i32 = 0x6d70_6400;
/// A deletion locks its project's bucket, not the project: a group of worker writes
/// takes one lock entry per bucket it touches, so a group spanning a thousand projects
/// cannot fill Postgres' shared lock table (64 entries per connection by default).
const DELETION_LOCK_BUCKETS: u128 = 64;

/// The advisory lock (with `DELETION_LOCK_CLASS`) that a deletion of `project` holds
/// exclusively until it commits, and that the worker-write group statement tries to
/// share for each call, skipping the calls it cannot: so a deletion's locked jobs are
/// never waited for by a statement that other projects' writes share.
pub fn deletion_lock(project: uuid::Uuid) -> i32 {
    // Project ids are UUIDv7: their low bits are random.
    (project.as_u128() % DELETION_LOCK_BUCKETS) as i32
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to Postgres: {0}")]
    Connect(#[from] ConnectionError),
    #[error("database: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("migrations failed: {0}")]
    Migration(String),
    #[error("DATABASE_URL has no database name")]
    NoDatabaseName,
}

/// Builds the pool without connecting: the server starts (and reports NOT_SERVING)
/// while Postgres is away, and connections are made as calls need them.
/// `statement_timeout` bounds how long a statement can outlive a call that timed
/// out (dropping the call does not stop a statement Postgres already runs).
pub fn pool(url: &str, size: u32, statement_timeout: Duration) -> Pool {
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(url);
    bb8::Pool::builder()
        .max_size(size)
        .connection_customizer(Box::new(SessionSettings { statement_timeout }))
        .min_idle(Some(1))
        .connection_timeout(Duration::from_secs(3))
        .idle_timeout(Some(Duration::from_secs(300)))
        // No `SELECT 1` before every use (a round trip per call): a dead connection fails
        // its query as UNAVAILABLE, is marked broken and dropped.
        .test_on_check_out(false)
        .build_unchecked(manager)
}

#[derive(Debug)]
struct SessionSettings {
    statement_timeout: Duration,
}

impl ::bb8::CustomizeConnection<AsyncPgConnection, diesel_async::pooled_connection::PoolError>
    for SessionSettings
{
    fn on_acquire<'a>(
        &'a self,
        conn: &'a mut AsyncPgConnection,
    ) -> std::pin::Pin<
        Box<
            dyn Future<Output = Result<(), diesel_async::pooled_connection::PoolError>> + Send + 'a,
        >,
    > {
        Box::pin(async move {
            use diesel_async::SimpleAsyncConnection;
            let ms = self.statement_timeout.as_millis().max(1);
            conn.batch_execute(&format!(
                "SET statement_timeout = {ms}; SET application_name = 'mediaplane'"
            ))
            .await
            .map_err(diesel_async::pooled_connection::PoolError::QueryError)
        })
    }
}

/// Splits `postgres://host/db?x` into the URL of the `postgres` maintenance database and `db`.
fn maintenance_url(url: &str) -> Result<(String, String), DbError> {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let slash = base[scheme_end..]
        .rfind('/')
        .map(|i| i + scheme_end)
        .ok_or(DbError::NoDatabaseName)?;
    let name = &base[slash + 1..];
    if name.is_empty() {
        return Err(DbError::NoDatabaseName);
    }
    let mut maintenance = format!("{}/postgres", &base[..slash]);
    if let Some(q) = query {
        maintenance.push('?');
        maintenance.push_str(q);
    }
    Ok((maintenance, name.to_owned()))
}

/// Creates the database named in `url` when it does not exist yet.
pub async fn create_database_if_missing(url: &str) -> Result<(), DbError> {
    let (maintenance, name) = maintenance_url(url)?;
    let mut conn = AsyncPgConnection::establish(&maintenance).await?;
    #[derive(diesel::QueryableByName)]
    struct Exists {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        exists: bool,
    }
    let found: Exists =
        diesel::sql_query("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1) AS exists")
            .bind::<diesel::sql_types::Text, _>(&name)
            .get_result(&mut conn)
            .await?;
    if found.exists {
        return Ok(());
    }
    let quoted = name.replace('"', "\"\"");
    match diesel::sql_query(format!("CREATE DATABASE \"{quoted}\""))
        .execute(&mut conn)
        .await
    {
        Ok(_) => {
            tracing::info!(database = %name, "created database");
            Ok(())
        }
        // Another instance won the race.
        Err(diesel::result::Error::DatabaseError(_, info))
            if info.message().contains("already exists") =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Applies pending migrations, one instance at a time. Returns how many ran.
pub async fn migrate(url: &str) -> Result<usize, DbError> {
    let conn = AsyncPgConnection::establish(url).await?;
    let mut conn = AsyncConnectionWrapper::<AsyncPgConnection>::from(conn);
    // The wrapper blocks on the runtime: run it off the async workers.
    tokio::task::spawn_blocking(move || {
        conn.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))?;
        let applied = conn
            .run_pending_migrations(MIGRATIONS)
            .map(|v| v.len())
            .map_err(|e| DbError::Migration(e.to_string()));
        conn.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))?;
        applied
    })
    .await
    .map_err(|e| DbError::Migration(e.to_string()))?
}

/// Reverts every applied migration (tests and `down` checks).
pub async fn revert_all(url: &str) -> Result<usize, DbError> {
    let conn = AsyncPgConnection::establish(url).await?;
    let mut conn = AsyncConnectionWrapper::<AsyncPgConnection>::from(conn);
    tokio::task::spawn_blocking(move || {
        conn.revert_all_migrations(MIGRATIONS)
            .map(|v| v.len())
            .map_err(|e| DbError::Migration(e.to_string()))
    })
    .await
    .map_err(|e| DbError::Migration(e.to_string()))?
}

/// Keyset condition after `cursor` on (create_time, id), as a row comparison so
/// Postgres walks the (…, create_time, id) indexes from the cursor.
pub(crate) fn after_cursor<QS>(
    cursor: crate::domain::page::Cursor,
    descending: bool,
) -> Box<dyn diesel::BoxableExpression<QS, diesel::pg::Pg, SqlType = diesel::sql_types::Bool>> {
    use diesel::sql_types::{Bool, Timestamptz, Uuid};
    Box::new(
        diesel::dsl::sql::<Bool>(if descending {
            "(create_time, id) < ("
        } else {
            "(create_time, id) > ("
        })
        .bind::<Timestamptz, _>(cursor.create_time)
        .sql(", ")
        .bind::<Uuid, _>(cursor.id)
        .sql(")"),
    )
}

/// `SELECT 1` through the pool, for health probes.
pub async fn ping(pool: &Pool) -> Result<(), String> {
    let mut conn = pool.get().await.map_err(|e| e.to_string())?;
    diesel::sql_query("SELECT 1")
        .execute(&mut *conn)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maintenance_urls() {
        let (m, n) = maintenance_url("postgres://u@h:5432/app?sslmode=disable").unwrap();
        assert_eq!(
            (m.as_str(), n.as_str()),
            ("postgres://u@h:5432/postgres?sslmode=disable", "app")
        );
        assert!(maintenance_url("postgres://h:5432/").is_err());
    }
}
