//! Project queries. Every query is scoped by owner unless the caller is an admin
//! (`owner: None`), so another owner's project is indistinguishable from a missing one.
use chrono::{DateTime, Utc};
use diesel::{IntoSql, OptionalExtension, prelude::*, sql_types::Bool};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::schema::projects;
use crate::{
    AppError, AppResult,
    domain::project::{ListQuery, Order, Path, Project, ProjectFields},
};

#[derive(Clone, Queryable, Selectable)]
#[diesel(table_name = projects, check_for_backend(diesel::pg::Pg))]
struct ProjectRow {
    id: Uuid,
    owner: String,
    display_name: String,
    description: String,
    labels: serde_json::Value,
    metadata: serde_json::Value,
    revision: i64,
    create_time: DateTime<Utc>,
    update_time: DateTime<Utc>,
}

impl TryFrom<ProjectRow> for Project {
    type Error = AppError;

    fn try_from(row: ProjectRow) -> AppResult<Self> {
        let ProjectRow {
            id,
            owner,
            display_name,
            description,
            labels,
            metadata,
            revision,
            create_time,
            update_time,
        } = row;
        let labels = serde_json::from_value(labels)
            .map_err(|e| AppError::internal(format!("project {id} labels: {e}")))?;
        let serde_json::Value::Object(metadata) = metadata else {
            return Err(AppError::internal(format!(
                "project {id} metadata is not an object"
            )));
        };
        Ok(Project {
            id,
            owner,
            display_name,
            description,
            labels,
            metadata,
            revision,
            create_time,
            update_time,
        })
    }
}

#[derive(Insertable)]
#[diesel(table_name = projects)]
struct NewProjectRow<'a> {
    id: Uuid,
    owner: &'a str,
    display_name: &'a str,
    description: &'a str,
    labels: serde_json::Value,
    metadata: serde_json::Value,
    request_id: Option<&'a str>,
    request_hash: Option<Vec<u8>>,
}

#[derive(AsChangeset, Default)]
#[diesel(table_name = projects)]
struct ProjectChanges<'a> {
    display_name: Option<&'a str>,
    description: Option<&'a str>,
    labels: Option<serde_json::Value>,
    metadata: Option<serde_json::Value>,
}

fn labels_json(fields: &ProjectFields) -> serde_json::Value {
    serde_json::Value::Object(
        fields
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into()))
            .collect(),
    )
}

/// `owner = $sub OR $admin`: one statement shape for both kinds of caller.
type VisibleTo =
    diesel::dsl::Or<diesel::dsl::Eq<projects::owner, String>, diesel::dsl::AsExprOf<bool, Bool>>;

fn visible_to(owner: Option<&str>) -> VisibleTo {
    projects::owner
        .eq(owner.unwrap_or_default().to_owned())
        .or(owner.is_none().into_sql::<Bool>())
}

pub enum Created {
    New(Project),
    /// The same `request_id` was used before with the same payload.
    Replayed(Project),
}

/// A project to insert for `owner`.
pub struct NewProject {
    pub owner: String,
    pub fields: ProjectFields,
    pub request_id: Option<String>,
}

/// Inserts projects with one statement (atomic on its own). Per project: the new
/// project, or with a `request_id` already used, the first result (same payload) or
/// ALREADY_EXISTS (nothing written for that project).
pub async fn create_many(
    conn: &mut AsyncPgConnection,
    projects: &[NewProject],
) -> AppResult<Vec<AppResult<Created>>> {
    let rows: Vec<NewProjectRow> = projects
        .iter()
        .map(|p| NewProjectRow {
            id: Uuid::now_v7(),
            owner: &p.owner,
            display_name: &p.fields.display_name,
            description: &p.fields.description,
            labels: labels_json(&p.fields),
            metadata: serde_json::Value::Object(p.fields.metadata.clone()),
            request_id: p.request_id.as_deref(),
            request_hash: p.request_id.as_ref().map(|_| p.fields.digest()),
        })
        .collect();
    // ON CONFLICT waits for a concurrent insert of the same key to commit, then skips.
    let returned: Vec<ProjectRow> = if let [one] = rows.as_slice() {
        // One row: prepared once per connection (multi-row inserts are planned per call).
        diesel::insert_into(projects::table)
            .values(one)
            .on_conflict((projects::owner, projects::request_id))
            .do_nothing()
            .returning(ProjectRow::as_returning())
            .get_results(conn)
            .await?
    } else {
        diesel::insert_into(projects::table)
            .values(&rows)
            .on_conflict((projects::owner, projects::request_id))
            .do_nothing()
            .returning(ProjectRow::as_returning())
            .get_results(conn)
            .await?
    };
    let mut inserted: std::collections::HashMap<Uuid, ProjectRow> =
        returned.into_iter().map(|r| (r.id, r)).collect();
    // Rows not inserted reused a request_id: their first results, read in one query
    // for the whole group (a replay costs the group one statement, not one each).
    let repeated: Vec<&NewProjectRow> = rows
        .iter()
        .filter(|r| !inserted.contains_key(&r.id))
        .collect();
    let earlier = earlier_results(conn, &repeated).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        match inserted.remove(&row.id) {
            Some(r) => out.push(r.try_into().map(Created::New)),
            None => out.push(replayed(row, &earlier)),
        }
    }
    Ok(out)
}

type Earlier = std::collections::HashMap<(String, String), (ProjectRow, Option<Vec<u8>>)>;

/// The projects first created with the request ids of `rows`, by (owner, request id).
async fn earlier_results(
    conn: &mut AsyncPgConnection,
    rows: &[&NewProjectRow<'_>],
) -> AppResult<Earlier> {
    if rows.is_empty() {
        return Ok(Earlier::new());
    }
    let owners: Vec<&str> = rows.iter().map(|r| r.owner).collect();
    let ids: Vec<&str> = rows.iter().filter_map(|r| r.request_id).collect();
    let found: Vec<(ProjectRow, Option<String>, Option<Vec<u8>>)> = projects::table
        .filter(projects::owner.eq_any(owners))
        .filter(projects::request_id.eq_any(ids))
        .select((
            ProjectRow::as_select(),
            projects::request_id,
            projects::request_hash,
        ))
        .load(conn)
        .await?;
    Ok(found
        .into_iter()
        .filter_map(|(row, id, hash)| Some(((row.owner.clone(), id?), (row, hash))))
        .collect())
}

/// The project a repeated `request_id` created, if the request is the same.
fn replayed(row: &NewProjectRow<'_>, earlier: &Earlier) -> AppResult<Created> {
    let (Some(request_id), Some(digest)) = (row.request_id, row.request_hash.as_deref()) else {
        return Err(AppError::internal(
            "insert without request_id returned no row",
        ));
    };
    let key = (row.owner.to_owned(), request_id.to_owned());
    let Some((existing, hash)) = earlier.get(&key) else {
        return Err(AppError::internal(
            "a request_id conflicted but its project is gone",
        ));
    };
    if hash.as_deref() == Some(digest) {
        // Cloned: the same request twice in one group is answered twice.
        Ok(Created::Replayed(existing.clone().try_into()?))
    } else {
        Err(AppError::AlreadyExists(format!(
            "request_id {} was already used to create a different project",
            crate::domain::text::quote(request_id)
        )))
    }
}

/// How [`owner_of`] locks the project row it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    /// A plain read, for read-only paths: it never waits for a deletion in progress
    /// (it sees the project as it was until that commits).
    None,
    /// Held against deletion until commit (what a foreign key takes anyway, and
    /// compatible with other inserts).
    KeyShare,
    /// FOR UPDATE: serializes the writers that check a quota of the project.
    Update,
}

/// The owner of project `id` when the caller (`owner`; `None`: an admin) can see it.
pub async fn owner_of(
    conn: &mut AsyncPgConnection,
    owner: Option<&str>,
    id: Uuid,
    lock: Lock,
) -> AppResult<Option<String>> {
    let query = projects::table
        .filter(projects::id.eq(id))
        .filter(visible_to(owner))
        .select(projects::owner);
    Ok(match lock {
        Lock::None => query.first(conn).await,
        Lock::KeyShare => query.for_key_share().first(conn).await,
        Lock::Update => query.for_update().first(conn).await,
    }
    .optional()?)
}

pub async fn get(
    conn: &mut AsyncPgConnection,
    owner: Option<&str>,
    id: Uuid,
) -> AppResult<Option<Project>> {
    projects::table
        .filter(projects::id.eq(id))
        .filter(visible_to(owner))
        .select(ProjectRow::as_select())
        .first(conn)
        .await
        .optional()?
        .map(Project::try_from)
        .transpose()
}

/// One page, plus whether more rows follow.
pub async fn list(conn: &mut AsyncPgConnection, q: &ListQuery) -> AppResult<(Vec<Project>, bool)> {
    let mut query = projects::table.select(ProjectRow::as_select()).into_boxed();
    if let Some(owner) = &q.owner {
        query = query.filter(projects::owner.eq(owner.clone()));
    }
    if !q.filter.equals.is_empty() {
        let wanted: serde_json::Map<_, _> = q
            .filter
            .equals
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into()))
            .collect();
        query = query.filter(projects::labels.contains(serde_json::Value::Object(wanted)));
    }
    for key in &q.filter.present {
        query = query.filter(projects::labels.has_key(key.clone()));
    }
    // Row comparison so Postgres walks the (owner, create_time, id) index from the cursor.
    if let Some(after) = q.after {
        query = query.filter(super::after_cursor(after, q.order == Order::CreateTimeDesc));
    }
    query = match q.order {
        Order::CreateTimeAsc => query.order((projects::create_time.asc(), projects::id.asc())),
        Order::CreateTimeDesc => query.order((projects::create_time.desc(), projects::id.desc())),
    };
    let mut rows: Vec<ProjectRow> = query.limit(q.limit + 1).load(conn).await?;
    let more = rows.len() as i64 > q.limit;
    rows.truncate(q.limit as usize);
    let projects = rows
        .into_iter()
        .map(Project::try_from)
        .collect::<AppResult<_>>()?;
    Ok((projects, more))
}

pub enum Outcome<T> {
    Done(T),
    NotFound,
    /// The project exists but its revision is not the one the etag named.
    EtagMismatch,
}

/// Writes the masked fields; `expected_revision` makes it conditional (etag).
pub async fn update(
    conn: &mut AsyncPgConnection,
    owner: Option<&str>,
    id: Uuid,
    fields: &ProjectFields,
    paths: &[Path],
    expected_revision: Option<i64>,
) -> AppResult<Outcome<Project>> {
    let mut changes = ProjectChanges::default();
    for path in paths {
        match path {
            Path::DisplayName => changes.display_name = Some(&fields.display_name),
            Path::Description => changes.description = Some(&fields.description),
            Path::Labels => changes.labels = Some(labels_json(fields)),
            Path::Metadata => {
                changes.metadata = Some(serde_json::Value::Object(fields.metadata.clone()))
            }
        }
    }
    let updated: Option<ProjectRow> = diesel::update(projects::table)
        .filter(projects::id.eq(id))
        .filter(visible_to(owner))
        .filter(
            projects::revision
                .eq(expected_revision.unwrap_or_default())
                .or(expected_revision.is_none().into_sql::<Bool>()),
        )
        .set(&changes)
        .returning(ProjectRow::as_returning())
        .get_result(conn)
        .await
        .optional()?;
    match updated {
        Some(row) => Ok(Outcome::Done(row.try_into()?)),
        None => missing_or_stale(conn, owner, id).await,
    }
}

/// Deletes a project with its jobs and assets (by cascade). Run it in a transaction:
/// the deletion lock it takes first must last until the cascade commits.
pub async fn delete(
    conn: &mut AsyncPgConnection,
    owner: Option<&str>,
    id: Uuid,
    expected_revision: Option<i64>,
) -> AppResult<Outcome<()>> {
    // Taken before any row: it waits only for worker-write statements in flight
    // (short), and from here on they skip this project's calls (`super::deletion_lock`).
    diesel::sql_query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind::<diesel::sql_types::Integer, _>(super::DELETION_LOCK_CLASS)
        .bind::<diesel::sql_types::Integer, _>(super::deletion_lock(id))
        .execute(conn)
        .await?;
    let deleted = diesel::delete(projects::table)
        .filter(projects::id.eq(id))
        .filter(visible_to(owner))
        .filter(
            projects::revision
                .eq(expected_revision.unwrap_or_default())
                .or(expected_revision.is_none().into_sql::<Bool>()),
        )
        .execute(conn)
        .await?;
    if deleted == 1 {
        Ok(Outcome::Done(()))
    } else {
        missing_or_stale(conn, owner, id).await
    }
}

async fn missing_or_stale<T>(
    conn: &mut AsyncPgConnection,
    owner: Option<&str>,
    id: Uuid,
) -> AppResult<Outcome<T>> {
    Ok(match get(conn, owner, id).await? {
        Some(_) => Outcome::EtagMismatch,
        None => Outcome::NotFound,
    })
}
