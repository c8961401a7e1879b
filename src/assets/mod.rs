//! Assets: the service behind AssetsService. Metadata CRUD here; the upload pipeline
//! shared by gRPC (UploadAssetContent) and signed PUT URLs in `upload.rs`; signed and
//! presigned URLs in `urls.rs`; direct uploads to S3 (declared, then finalized) in
//! `direct.rs`; the verifier of direct uploads and the collector that
//! deletes unneeded objects in `background.rs`.
//!
//! Invariants: a READY asset always has its bytes (rows are deleted before bytes, and
//! bytes become visible only in the transaction that marks the asset READY); every
//! object written is listed in `object_gc` until that transaction, so a failed or
//! interrupted upload leaves nothing behind once the collector has run.
mod background;
mod direct;
mod upload;
mod urls;

pub use direct::{Declared, MAX_PARTS, MAX_SINGLE_PUT_BYTES, MIN_PART_BYTES, PlannedPart, Started};

use std::{ops::Range, sync::Arc, time::Duration};

use bytes::Bytes;
use diesel_async::AsyncConnection;
use futures::{Stream, StreamExt};

use crate::{
    AppError, AppResult, db,
    domain::asset::{self, Asset},
    quotas::Quotas,
    storage::Storage,
};
use crate::{
    auth::Caller,
    db::projects::{Lock, Outcome},
    domain::{
        asset::{AssetFields, ListAssets},
        names::{AssetName, ProjectName},
        project,
    },
};

/// How long an upload may run before its object counts as abandoned.
const UPLOAD_GRACE: Duration = Duration::from_secs(24 * 3600);
const SNIFF_BYTES: usize = 8192;

#[derive(Debug, Clone)]
pub struct AssetLimits {
    pub max_asset_bytes: i64,
    pub project_quota_bytes: i64,
    pub signed_url_max_ttl: Duration,
    /// How long after its URL expires a presigned PUT is still waited for (S3 checks the
    /// expiry when a request starts; a large PUT may finish well after).
    pub direct_upload_grace: Duration,
}

#[derive(Clone)]
pub struct Assets {
    pub db: db::Pool,
    quotas: Quotas,
    metrics: crate::metrics::Metrics,
    pub storage: Storage,
    pub limits: Arc<AssetLimits>,
    signing_key: Arc<[u8]>,
    public_url: Arc<str>,
}

/// What the uploader declared about the bytes.
#[derive(Debug, Default, Clone)]
pub struct Expected {
    pub sha256: Option<String>,
    pub size: Option<i64>,
}

impl Assets {
    pub fn new(
        db: db::Pool,
        quotas: Quotas,
        metrics: crate::metrics::Metrics,
        storage: Storage,
        limits: AssetLimits,
        signing_key: Vec<u8>,
        public_url: &str,
    ) -> Self {
        Self {
            db,
            quotas,
            metrics,
            storage,
            limits: Arc::new(limits),
            signing_key: signing_key.into(),
            public_url: public_url.trim_end_matches('/').into(),
        }
    }

    fn too_big(&self, size: i64) -> Option<AppError> {
        (size > self.limits.max_asset_bytes).then(|| {
            AppError::ResourceExhausted(format!(
                "asset larger than the limit of {} bytes",
                self.limits.max_asset_bytes
            ))
        })
    }

    /// Creates a PENDING asset in a project the caller can see; a `request_id` seen
    /// before with the same fields answers with the asset it created.
    pub async fn create(
        &self,
        caller: &Caller,
        project: ProjectName,
        fields: &AssetFields,
        request_id: Option<&str>,
    ) -> AppResult<Asset> {
        let mut conn = self.db.get().await?;
        let scope = caller.owner_scope().map(str::to_owned);
        conn.transaction(async |conn| {
            let owner = db::projects::owner_of(conn, scope.as_deref(), project.0, Lock::Update)
                .await?
                .ok_or_else(|| AppError::NotFound(format!("project {project}")))?;
            Ok(
                db::assets::insert(conn, &owner, project.0, fields, request_id)
                    .await?
                    .0,
            )
        })
        .await
    }

    /// An asset the caller can see.
    pub async fn get(&self, caller: &Caller, name: AssetName) -> AppResult<Asset> {
        let mut conn = self.db.get().await?;
        db::assets::get(&mut conn, caller.owner_scope(), name.project, name.asset)
            .await?
            .ok_or_else(|| not_found(name))
    }

    /// The asset a signed URL names: the signature is the caller's authority, so no
    /// owner is checked.
    pub async fn get_signed(&self, project: uuid::Uuid, id: uuid::Uuid) -> AppResult<Asset> {
        let mut conn = self.db.get().await?;
        db::assets::get(&mut conn, None, project, id)
            .await?
            .ok_or_else(|| not_found(format!("projects/{project}/assets/{id}")))
    }

    /// One page of a project's assets, newest first, and whether more follow; a
    /// project the caller cannot see is NOT_FOUND, not an empty list.
    pub async fn list(&self, query: &ListAssets) -> AppResult<(Vec<Asset>, bool)> {
        let mut conn = self.db.get().await?;
        db::projects::owner_of(&mut conn, query.owner.as_deref(), query.project, Lock::None)
            .await?
            .ok_or_else(|| AppError::NotFound(format!("project {}", ProjectName(query.project))))?;
        db::assets::list(&mut conn, query).await
    }

    /// Writes the fields `paths` name; an `etag` makes it conditional.
    pub async fn update(
        &self,
        caller: &Caller,
        name: AssetName,
        fields: &AssetFields,
        paths: &[asset::Path],
        etag: &str,
    ) -> AppResult<Asset> {
        let mut conn = self.db.get().await?;
        let outcome = db::assets::update(
            &mut conn,
            caller.owner_scope(),
            name.project,
            name.asset,
            fields,
            paths,
            expected_revision(etag),
        )
        .await?;
        settle(outcome, name)
    }

    /// Deletes the asset's row, then its bytes (the collector retries what fails).
    pub async fn delete(&self, caller: &Caller, name: AssetName, etag: &str) -> AppResult<()> {
        let mut conn = self.db.get().await?;
        let outcome = db::assets::delete(
            &mut conn,
            caller.owner_scope(),
            name.project,
            name.asset,
            expected_revision(etag),
        )
        .await?;
        drop(conn);
        if let Some(key) = settle(outcome, name)? {
            self.delete_bytes(&key).await;
        }
        Ok(())
    }

    /// After a row delete: remove the bytes now if possible (the trigger queued them).
    pub async fn delete_bytes(&self, key: &str) {
        self.discard(key).await;
    }

    /// The bytes of a READY asset in `range`, as chunks of at most 1 MiB.
    pub async fn read(
        &self,
        asset: &Asset,
        range: Range<u64>,
    ) -> AppResult<impl Stream<Item = AppResult<Bytes>> + Send + 'static> {
        let key = asset
            .object_key
            .as_deref()
            .ok_or_else(|| AppError::internal("READY asset without bytes"))?;
        let stream = self.storage.read(key, Some(range), asset::CHUNK).await?;
        let metrics = self.metrics.clone();
        Ok(stream.map(move |r| {
            if let Ok(chunk) = &r {
                metrics.asset_bytes("downloaded", chunk.len() as u64);
            }
            r.map_err(AppError::from)
        }))
    }
}

/// An etag we did not issue can never match: -1 is never a revision.
fn expected_revision(etag: &str) -> Option<i64> {
    (!etag.is_empty()).then(|| project::revision_of(etag).unwrap_or(-1))
}

fn settle<T>(outcome: Outcome<T>, name: AssetName) -> AppResult<T> {
    match outcome {
        Outcome::Done(value) => Ok(value),
        Outcome::NotFound => Err(not_found(name)),
        Outcome::EtagMismatch => Err(AppError::Aborted(format!(
            "etag does not match the current version of {name}"
        ))),
    }
}

fn not_found(name: impl std::fmt::Display) -> AppError {
    AppError::NotFound(format!("asset {name}"))
}

pub fn name(asset: &Asset) -> String {
    crate::domain::names::AssetName {
        project: asset.project_id,
        asset: asset.id,
    }
    .to_string()
}
