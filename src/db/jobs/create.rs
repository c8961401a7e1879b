//! Inserting jobs: many in one statement, with request-id replays told apart.
use chrono::{DateTime, Utc};
use diesel::{prelude::*, sql_types::Timestamptz, upsert::DecoratableTarget};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use crate::db::schema::jobs;
use crate::{
    AppError, AppResult,
    domain::job::{Job, JobState, NewJob},
};

use super::*;

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
    concurrency_key: &'a str,
    run_anyway: bool,
    depends_on: Vec<Option<Uuid>>,
    state: JobState,
    has_dependents: bool,
    fair_seq: i64,
}

/// A job to insert into a project whose owner is known (and locked).
#[derive(Clone, Copy)]
pub struct Insert<'a> {
    pub owner: &'a str,
    pub project: Uuid,
    pub job: &'a NewJob,
    pub request_id: Option<&'a str>,
    /// The creating call's trace context, for the job's workers.
    pub traceparent: Option<&'a str>,
    /// Its dependencies (resolved to ids) and the state they put it in.
    pub depends_on: &'a [Uuid],
    pub state: JobState,
    /// A later job of the same batch depends on it.
    pub has_dependents: bool,
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
            concurrency_key: &i.job.concurrency_key,
            run_anyway: i.job.run_anyway,
            depends_on: i.depends_on.iter().copied().map(Some).collect(),
            state: i.state,
            has_dependents: i.has_dependents,
            fair_seq: 0,
        })
        .collect();
    let mut rows = rows;
    give_turns(conn, &mut rows).await?;
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

/// Gives each row its turn in its kind, priority and key (`jobs_next_turn`, read once
/// per group in one query): the group's next turn, then one more per row, in order.
async fn give_turns(conn: &mut AsyncPgConnection, rows: &mut [NewJobRow<'_>]) -> AppResult<()> {
    use diesel::sql_types::{Array, BigInt, Int4, Text};
    #[derive(QueryableByName)]
    struct Turn {
        #[diesel(sql_type = BigInt)]
        turn: i64,
    }
    let mut groups: Vec<(&str, i32, &str)> = rows
        .iter()
        .map(|r| (r.kind, r.priority, r.concurrency_key))
        .collect();
    groups.sort_unstable();
    groups.dedup();
    let turns: Vec<Turn> = diesel::sql_query(
        "SELECT jobs_next_turn(g.k, g.p, g.ck) AS turn \
         FROM unnest($1::text[], $2::int4[], $3::text[]) WITH ORDINALITY AS g(k, p, ck, n) \
         ORDER BY g.n",
    )
    .bind::<Array<Text>, _>(groups.iter().map(|g| g.0).collect::<Vec<_>>())
    .bind::<Array<Int4>, _>(groups.iter().map(|g| g.1).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(groups.iter().map(|g| g.2).collect::<Vec<_>>())
    .load(conn)
    .await?;
    let mut next: std::collections::HashMap<(&str, i32, &str), i64> = groups
        .iter()
        .copied()
        .zip(turns.into_iter().map(|t| t.turn))
        .collect();
    for row in rows.iter_mut() {
        if let Some(turn) = next.get_mut(&(row.kind, row.priority, row.concurrency_key)) {
            row.fair_seq = *turn;
            *turn += 1;
        }
    }
    Ok(())
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
        keys: Vec<String>,
        /// The one kind, priority and key of every job, when they share them.
        uniform: Option<(String, i32, String)>,
    }
    impl InsertVisible {
        /// The per-job columns, as the arguments of one `unnest`.
        fn columns<'b>(
            &'b self,
            out: &mut diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
        ) -> QueryResult<()> {
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
            out.push_sql(", ");
            out.push_bind_param::<Array<Text>, _>(&self.keys)?;
            Ok(())
        }
    }
    impl crate::db::Statement for InsertVisible {
        fn walk<'b>(
            &'b self,
            mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
        ) -> QueryResult<()> {
            // The projects are locked first, skipping any that a deletion holds: their
            // jobs are left out (the caller retries them alone, waiting for the deletion's
            // outcome) instead of the whole group waiting on the foreign key's check.
            out.push_sql("WITH p AS MATERIALIZED (SELECT id, owner FROM projects WHERE id = ANY(");
            out.push_bind_param::<Array<diesel::sql_types::Uuid>, _>(&self.projects)?;
            // Each job's turn (`jobs_next_turn`): read once per kind, priority and key of
            // the group, then one more per job in the order of the calls. A group of one
            // kind, priority and key (the usual case) reads it once with no grouping,
            // which Postgres plans faster.
            const INSERT: &str = " INSERT INTO jobs (id, project_id, owner, kind, input, labels, \
                priority, max_attempts, schedule_time, request_id, request_hash, traceparent, \
                concurrency_key, fair_seq) \
                SELECT c.id, p.id, p.owner, c.kind, c.input, c.labels, c.priority, \
                c.max_attempts, COALESCE(c.schedule_time, now()), c.request_id, c.request_hash, \
                c.traceparent, c.key, t.turn - 1 + row_number() OVER ";
            const ROWS: &str = ") WITH ORDINALITY AS c(id, project, scope, kind, input, labels, \
                priority, max_attempts, schedule_time, request_id, request_hash, traceparent, key, n)";
            const VISIBLE: &str = " JOIN p ON p.id = c.project WHERE c.scope IS NULL OR p.owner = c.scope \
                ON CONFLICT (owner, request_id) WHERE request_id IS NOT NULL DO NOTHING RETURNING ";
            out.push_sql(") FOR KEY SHARE SKIP LOCKED), ");
            if let Some((kind, priority, key)) = &self.uniform {
                out.push_sql("t AS MATERIALIZED (SELECT jobs_next_turn(");
                out.push_bind_param::<Text, _>(kind)?;
                out.push_sql(", ");
                out.push_bind_param::<Int4, _>(priority)?;
                out.push_sql(", ");
                out.push_bind_param::<Text, _>(key)?;
                out.push_sql(") AS turn)");
                out.push_sql(INSERT);
                out.push_sql("(ORDER BY c.n) FROM unnest(");
                self.columns(&mut out)?;
                out.push_sql(ROWS);
                out.push_sql(" CROSS JOIN t");
            } else {
                out.push_sql("c AS MATERIALIZED (SELECT * FROM unnest(");
                self.columns(&mut out)?;
                out.push_sql(ROWS);
                out.push_sql(
                    "), t AS (SELECT g.kind, g.priority, g.key, \
                     jobs_next_turn(g.kind, g.priority, g.key) AS turn \
                     FROM (SELECT DISTINCT kind, priority, key FROM c) g)",
                );
                out.push_sql(INSERT);
                out.push_sql(
                    "(PARTITION BY c.kind, c.priority, c.key ORDER BY c.n) \
                     FROM c JOIN t ON t.kind = c.kind AND t.priority = c.priority AND t.key = c.key",
                );
            }
            out.push_sql(VISIBLE);
            out.push_sql(JOB_COLUMNS);
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
        keys: inserts
            .iter()
            .map(|i| i.job.concurrency_key.clone())
            .collect(),
        uniform: inserts.split_first().and_then(|(first, rest)| {
            let (kind, priority, key) = (
                &first.job.kind,
                first.job.priority,
                &first.job.concurrency_key,
            );
            rest.iter()
                .all(|i| {
                    i.job.kind == *kind
                        && i.job.priority == priority
                        && i.job.concurrency_key == *key
                })
                .then(|| (kind.clone(), priority, key.clone()))
        }),
    };
    let rows: Vec<JobRow> = match crate::db::Prepared(statement).load(conn).await {
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
