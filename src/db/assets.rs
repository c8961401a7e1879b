//! Asset queries, and the queue of objects to delete from storage (`object_gc`).
use chrono::{DateTime, Utc};
use diesel::{
    IntoSql, OptionalExtension,
    dsl::sql,
    prelude::*,
    sql_types::{Bool, Timestamptz},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::{
    projects::Outcome,
    schema::{assets, direct_uploads, object_gc},
};
use crate::{
    AppError, AppResult,
    domain::asset::{Asset, AssetFields, AssetState, Path},
};

#[derive(Queryable, Selectable)]
#[diesel(table_name = assets, check_for_backend(diesel::pg::Pg))]
struct AssetRow {
    id: Uuid,
    project_id: Uuid,
    owner: String,
    display_name: String,
    content_type: String,
    size_bytes: i64,
    sha256: String,
    state: AssetState,
    labels: serde_json::Value,
    metadata: serde_json::Value,
    source_job: Option<Uuid>,
    object_key: Option<String>,
    revision: i64,
    create_time: DateTime<Utc>,
    update_time: DateTime<Utc>,
}

impl TryFrom<AssetRow> for Asset {
    type Error = AppError;

    fn try_from(r: AssetRow) -> AppResult<Self> {
        let AssetRow {
            id,
            project_id,
            owner,
            display_name,
            content_type,
            size_bytes,
            sha256,
            state,
            labels,
            metadata,
            source_job,
            object_key,
            revision,
            create_time,
            update_time,
        } = r;
        let serde_json::Value::Object(metadata) = metadata else {
            return Err(AppError::internal(format!(
                "asset {id} metadata is not an object"
            )));
        };
        Ok(Asset {
            id,
            project_id,
            owner,
            display_name,
            content_type,
            size_bytes,
            sha256,
            state,
            labels: serde_json::from_value(labels)
                .map_err(|e| AppError::internal(format!("asset {id} labels: {e}")))?,
            metadata,
            source_job,
            object_key,
            revision,
            create_time,
            update_time,
        })
    }
}

type VisibleTo =
    diesel::dsl::Or<diesel::dsl::Eq<assets::owner, String>, diesel::dsl::AsExprOf<bool, Bool>>;

fn visible_to(owner: Option<&str>) -> VisibleTo {
    assets::owner
        .eq(owner.unwrap_or_default().to_owned())
        .or(owner.is_none().into_sql::<Bool>())
}

fn labels_json(labels: &std::collections::BTreeMap<String, String>) -> serde_json::Value {
    serde_json::Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into()))
            .collect(),
    )
}

#[derive(Insertable)]
#[diesel(table_name = assets)]
struct NewAssetRow<'a> {
    id: Uuid,
    project_id: Uuid,
    owner: &'a str,
    display_name: &'a str,
    content_type: &'a str,
    labels: serde_json::Value,
    metadata: serde_json::Value,
    request_id: Option<&'a str>,
    request_hash: Option<Vec<u8>>,
}

pub async fn insert(
    conn: &mut AsyncPgConnection,
    owner: &str,
    project: Uuid,
    fields: &AssetFields,
    request_id: Option<&str>,
) -> AppResult<(Asset, bool)> {
    let digest = request_id.map(|_| fields.digest());
    let row = NewAssetRow {
        id: Uuid::now_v7(),
        project_id: project,
        owner,
        display_name: &fields.display_name,
        content_type: &fields.content_type,
        labels: labels_json(&fields.labels),
        metadata: serde_json::Value::Object(fields.metadata.clone()),
        request_id,
        request_hash: digest.clone(),
    };
    let inserted: Option<AssetRow> = diesel::insert_into(assets::table)
        .values(&row)
        .on_conflict((assets::owner, assets::request_id))
        .do_nothing()
        .returning(AssetRow::as_returning())
        .get_result(conn)
        .await
        .optional()?;
    if let Some(row) = inserted {
        return Ok((row.try_into()?, true));
    }
    let (Some(request_id), Some(digest)) = (request_id, digest) else {
        return Err(AppError::internal(
            "asset insert without request_id returned no row",
        ));
    };
    let (existing, hash): (AssetRow, Option<Vec<u8>>) = assets::table
        .filter(assets::owner.eq(owner))
        .filter(assets::request_id.eq(request_id))
        .select((AssetRow::as_select(), assets::request_hash))
        .first(conn)
        .await?;
    if hash.as_deref() == Some(digest.as_slice()) && existing.project_id == project {
        Ok((existing.try_into()?, false))
    } else {
        Err(AppError::AlreadyExists(format!(
            "request_id {request_id:?} was already used to create a different asset"
        )))
    }
}

pub async fn get(
    conn: &mut AsyncPgConnection,
    owner: Option<&str>,
    project: Uuid,
    id: Uuid,
) -> AppResult<Option<Asset>> {
    assets::table
        .filter(assets::id.eq(id))
        .filter(assets::project_id.eq(project))
        .filter(visible_to(owner))
        .select(AssetRow::as_select())
        .first(conn)
        .await
        .optional()?
        .map(Asset::try_from)
        .transpose()
}

pub async fn lock(
    conn: &mut AsyncPgConnection,
    owner: Option<&str>,
    project: Uuid,
    id: Uuid,
) -> AppResult<Option<Asset>> {
    assets::table
        .filter(assets::id.eq(id))
        .filter(assets::project_id.eq(project))
        .filter(visible_to(owner))
        .select(AssetRow::as_select())
        .for_update()
        .first(conn)
        .await
        .optional()?
        .map(Asset::try_from)
        .transpose()
}

/// Newest first.
pub async fn list(
    conn: &mut AsyncPgConnection,
    q: &crate::domain::asset::ListAssets,
) -> AppResult<(Vec<Asset>, bool)> {
    let mut query = assets::table
        .filter(assets::project_id.eq(q.project))
        .filter(visible_to(q.owner.as_deref()))
        .select(AssetRow::as_select())
        .into_boxed();
    if !q.filter.states.is_empty() {
        query = query.filter(assets::state.eq_any(q.filter.states.clone()));
    }
    if let Some(prefix) = &q.filter.content_type_prefix {
        let escaped = prefix
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        query = query.filter(assets::content_type.like(format!("{escaped}%")));
    }
    if !q.filter.labels.is_empty() {
        query = query.filter(assets::labels.contains(labels_json(&q.filter.labels)));
    }
    if let Some(after) = q.after {
        query = query.filter(super::after_cursor(after, true));
    }
    let mut rows: Vec<AssetRow> = query
        .order((assets::create_time.desc(), assets::id.desc()))
        .limit(q.limit + 1)
        .load(conn)
        .await?;
    let more = rows.len() as i64 > q.limit;
    rows.truncate(q.limit as usize);
    Ok((
        rows.into_iter()
            .map(Asset::try_from)
            .collect::<AppResult<_>>()?,
        more,
    ))
}

#[derive(AsChangeset, Default)]
#[diesel(table_name = assets)]
struct AssetChanges<'a> {
    display_name: Option<&'a str>,
    labels: Option<serde_json::Value>,
    metadata: Option<serde_json::Value>,
}

pub async fn update(
    conn: &mut AsyncPgConnection,
    owner: Option<&str>,
    project: Uuid,
    id: Uuid,
    fields: &AssetFields,
    paths: &[Path],
    expected_revision: Option<i64>,
) -> AppResult<Outcome<Asset>> {
    let mut changes = AssetChanges::default();
    for path in paths {
        match path {
            Path::DisplayName => changes.display_name = Some(&fields.display_name),
            Path::Labels => changes.labels = Some(labels_json(&fields.labels)),
            Path::Metadata => {
                changes.metadata = Some(serde_json::Value::Object(fields.metadata.clone()))
            }
            Path::ContentType => {}
        }
    }
    let updated: Option<AssetRow> = diesel::update(assets::table)
        .filter(assets::id.eq(id))
        .filter(assets::project_id.eq(project))
        .filter(visible_to(owner))
        .filter(
            assets::revision
                .eq(expected_revision.unwrap_or_default())
                .or(expected_revision.is_none().into_sql::<Bool>()),
        )
        .set(&changes)
        .returning(AssetRow::as_returning())
        .get_result(conn)
        .await
        .optional()?;
    match updated {
        Some(row) => Ok(Outcome::Done(row.try_into()?)),
        None => Ok(match get(conn, owner, project, id).await? {
            Some(_) => Outcome::EtagMismatch,
            None => Outcome::NotFound,
        }),
    }
}

/// Deletes the row; the table's trigger queues its bytes in `object_gc`.
pub async fn delete(
    conn: &mut AsyncPgConnection,
    owner: Option<&str>,
    project: Uuid,
    id: Uuid,
    expected_revision: Option<i64>,
) -> AppResult<Outcome<Option<String>>> {
    let deleted: Option<Option<String>> = diesel::delete(assets::table)
        .filter(assets::id.eq(id))
        .filter(assets::project_id.eq(project))
        .filter(visible_to(owner))
        .filter(
            assets::revision
                .eq(expected_revision.unwrap_or_default())
                .or(expected_revision.is_none().into_sql::<Bool>()),
        )
        .returning(assets::object_key)
        .get_result(conn)
        .await
        .optional()?;
    match deleted {
        Some(key) => Ok(Outcome::Done(key)),
        None => Ok(match get(conn, owner, project, id).await? {
            Some(_) => Outcome::EtagMismatch,
            None => Outcome::NotFound,
        }),
    }
}

/// Bytes of READY assets in a project (for the quota).
pub async fn project_usage(conn: &mut AsyncPgConnection, project: Uuid) -> AppResult<i64> {
    let used: Option<i64> = assets::table
        .filter(assets::project_id.eq(project))
        .filter(assets::state.eq(AssetState::Ready))
        .select(
            sql::<diesel::sql_types::Nullable<diesel::sql_types::BigInt>>(
                "SUM(size_bytes)::bigint",
            ),
        )
        .first(conn)
        .await?;
    Ok(used.unwrap_or(0))
}

/// PENDING -> READY with the verified facts of the upload.
pub async fn mark_ready(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    key: &str,
    size: i64,
    sha256: &str,
    content_type: &str,
) -> AppResult<Option<Asset>> {
    diesel::update(
        assets::table
            .filter(assets::id.eq(id))
            .filter(assets::state.eq(AssetState::Pending)),
    )
    .set((
        assets::state.eq(AssetState::Ready),
        assets::object_key.eq(key),
        assets::size_bytes.eq(size),
        assets::sha256.eq(sha256),
        assets::content_type.eq(content_type),
    ))
    .returning(AssetRow::as_returning())
    .get_result(conn)
    .await
    .optional()?
    .map(Asset::try_from)
    .transpose()
}

/// READY assets among `ids` in `project`, locked, for linking to a job.
pub async fn ready_in_project(
    conn: &mut AsyncPgConnection,
    project: Uuid,
    ids: &[Uuid],
) -> AppResult<Vec<Uuid>> {
    Ok(assets::table
        .filter(assets::project_id.eq(project))
        .filter(assets::id.eq_any(ids))
        .filter(assets::state.eq(AssetState::Ready))
        .select(assets::id)
        .for_update()
        .load(conn)
        .await?)
}

pub async fn set_source_job(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
    job: Uuid,
) -> AppResult<()> {
    diesel::update(assets::table.filter(assets::id.eq_any(ids)))
        .set(assets::source_job.eq(job))
        .execute(conn)
        .await?;
    Ok(())
}

/// Queues an object for deletion once `not_before` has passed (an upload in flight
/// is queued far ahead and dequeued when it completes, so a crash leaves no orphan).
pub async fn gc_enqueue(
    conn: &mut AsyncPgConnection,
    key: &str,
    delay: std::time::Duration,
) -> AppResult<()> {
    diesel::insert_into(object_gc::table)
        .values((
            object_gc::object_key.eq(key),
            object_gc::not_before.eq(super::now_plus::<Timestamptz>(delay.as_millis() as i64)),
        ))
        .on_conflict(object_gc::object_key)
        .do_nothing()
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn gc_dequeue(conn: &mut AsyncPgConnection, key: &str) -> AppResult<()> {
    diesel::delete(object_gc::table.filter(object_gc::object_key.eq(key)))
        .execute(conn)
        .await?;
    Ok(())
}

/// Due objects, claimed for a while (not_before pushed back) so collectors on other
/// instances skip them.
pub async fn gc_claim_due(conn: &mut AsyncPgConnection, limit: i64) -> AppResult<Vec<String>> {
    #[derive(QueryableByName)]
    struct Key {
        #[diesel(sql_type = diesel::sql_types::Text)]
        object_key: String,
    }
    let keys: Vec<Key> = diesel::sql_query(
        "WITH due AS (SELECT object_key FROM object_gc WHERE not_before <= now() ORDER BY not_before LIMIT $1 FOR UPDATE SKIP LOCKED) \
         UPDATE object_gc g SET attempts = g.attempts + 1, not_before = now() + LEAST(g.attempts + 1, 60) * interval '1 minute' \
         FROM due WHERE g.object_key = due.object_key RETURNING g.object_key",
    )
    .bind::<diesel::sql_types::BigInt, _>(limit)
    .load(conn)
    .await?;
    Ok(keys.into_iter().map(|k| k.object_key).collect())
}

/// A presigned PUT URL handed out for `asset`: its object is looked for at `key` until
/// it arrives or the URL has expired.
pub async fn direct_upload_add(
    conn: &mut AsyncPgConnection,
    key: &str,
    asset: Uuid,
    expire_time: DateTime<Utc>,
) -> AppResult<()> {
    diesel::insert_into(direct_uploads::table)
        .values((
            direct_uploads::upload_key.eq(key),
            direct_uploads::asset_id.eq(asset),
            direct_uploads::expire_time.eq(expire_time),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

#[derive(Debug)]
pub struct DirectUpload {
    pub upload_key: String,
    pub asset_id: Uuid,
    pub expire_time: DateTime<Utc>,
    /// Declared up front (StartUpload): the client finalizes it; the verifier only
    /// removes it once it has expired.
    pub declared: bool,
    pub multipart_id: Option<String>,
}

/// A direct upload whose size and SHA-256 the client declared (StartUpload).
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = direct_uploads, check_for_backend(diesel::pg::Pg))]
pub struct DeclaredUpload {
    pub upload_key: String,
    pub asset_id: Uuid,
    pub expire_time: DateTime<Utc>,
    pub sha256: Option<String>,
    pub size_bytes: Option<i64>,
    pub part_size_bytes: Option<i64>,
    pub part_sha256: Vec<Option<String>>,
    pub multipart_id: Option<String>,
}

/// Registers a declared upload; the verifier looks at it only after `check_after` (when
/// it has expired unfinalized).
pub async fn declared_upload_add(
    conn: &mut AsyncPgConnection,
    upload: &DeclaredUpload,
    check_after: DateTime<Utc>,
) -> AppResult<()> {
    diesel::insert_into(direct_uploads::table)
        .values((upload.clone(), direct_uploads::check_after.eq(check_after)))
        .execute(conn)
        .await?;
    Ok(())
}

/// A declared upload of `asset`, locked (one finalize at a time).
pub async fn declared_upload_lock(
    conn: &mut AsyncPgConnection,
    key: &str,
    asset: Uuid,
) -> AppResult<Option<DeclaredUpload>> {
    Ok(direct_uploads::table
        .filter(direct_uploads::upload_key.eq(key))
        .filter(direct_uploads::asset_id.eq(asset))
        .filter(direct_uploads::sha256.is_not_null())
        .select(DeclaredUpload::as_select())
        .for_update()
        .first(conn)
        .await
        .optional()?)
}

/// A PENDING asset whose direct uploads have all expired unfinalized becomes FAILED.
pub async fn fail_if_abandoned(conn: &mut AsyncPgConnection, asset: Uuid) -> AppResult<bool> {
    let n = diesel::update(
        assets::table
            .filter(assets::id.eq(asset))
            .filter(assets::state.eq(AssetState::Pending))
            .filter(diesel::dsl::not(diesel::dsl::exists(
                direct_uploads::table.filter(direct_uploads::asset_id.eq(asset)),
            ))),
    )
    .set(assets::state.eq(AssetState::Failed))
    .execute(conn)
    .await?;
    Ok(n > 0)
}

/// Direct uploads due for a look, claimed (the next look pushed back: 1 s, 2 s, 4 s ...
/// up to 10 s) so verifiers on other instances skip them meanwhile.
pub async fn direct_uploads_claim_due(
    conn: &mut AsyncPgConnection,
    limit: i64,
) -> AppResult<Vec<DirectUpload>> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        upload_key: String,
        #[diesel(sql_type = diesel::sql_types::Uuid)]
        asset_id: Uuid,
        #[diesel(sql_type = Timestamptz)]
        expire_time: DateTime<Utc>,
        #[diesel(sql_type = Bool)]
        declared: bool,
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
        multipart_id: Option<String>,
    }
    let rows: Vec<Row> = diesel::sql_query(
        "WITH due AS (SELECT upload_key FROM direct_uploads WHERE check_after <= now() ORDER BY check_after LIMIT $1 FOR UPDATE SKIP LOCKED) \
         UPDATE direct_uploads d SET checks = d.checks + 1, check_after = now() + LEAST(2 ^ LEAST(d.checks, 4), 10) * interval '1 second' \
         FROM due WHERE d.upload_key = due.upload_key \
         RETURNING d.upload_key, d.asset_id, d.expire_time, d.sha256 IS NOT NULL AS declared, d.multipart_id",
    )
    .bind::<diesel::sql_types::BigInt, _>(limit)
    .load(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| DirectUpload {
            upload_key: r.upload_key,
            asset_id: r.asset_id,
            expire_time: r.expire_time,
            declared: r.declared,
            multipart_id: r.multipart_id,
        })
        .collect())
}

/// Keeps other verifiers off `key` for `hold` (while its object is copied and hashed).
pub async fn direct_upload_hold(
    conn: &mut AsyncPgConnection,
    key: &str,
    hold: std::time::Duration,
) -> AppResult<()> {
    diesel::update(direct_uploads::table.filter(direct_uploads::upload_key.eq(key)))
        .set(
            direct_uploads::check_after.eq(super::now_plus::<Timestamptz>(hold.as_millis() as i64)),
        )
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn direct_upload_remove(conn: &mut AsyncPgConnection, key: &str) -> AppResult<()> {
    diesel::delete(direct_uploads::table.filter(direct_uploads::upload_key.eq(key)))
        .execute(conn)
        .await?;
    Ok(())
}

/// Every direct upload of `asset` (it is READY: the other URLs can no longer succeed).
pub async fn direct_uploads_remove_asset(
    conn: &mut AsyncPgConnection,
    asset: Uuid,
) -> AppResult<()> {
    diesel::delete(direct_uploads::table.filter(direct_uploads::asset_id.eq(asset)))
        .execute(conn)
        .await?;
    Ok(())
}

/// An asset by id alone, for background work that has no caller.
pub async fn by_id(conn: &mut AsyncPgConnection, id: Uuid) -> AppResult<Option<Asset>> {
    assets::table
        .filter(assets::id.eq(id))
        .select(AssetRow::as_select())
        .first(conn)
        .await
        .optional()?
        .map(Asset::try_from)
        .transpose()
}
