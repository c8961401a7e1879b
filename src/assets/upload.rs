//! The upload pipeline: stream, hash, check, make READY.

use bytes::Bytes;
use diesel_async::AsyncConnection;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};

use crate::{
    AppError, AppResult, db,
    domain::asset::{self, Asset, AssetState},
    quotas::{Quota, Uploading},
    storage::Storage,
};

use super::{Assets, Expected, SNIFF_BYTES, UPLOAD_GRACE, name};

impl Assets {
    /// Streams `chunks` into storage for a PENDING asset and makes it READY.
    pub async fn upload<S>(
        &self,
        asset: Asset,
        mut chunks: S,
        expected: Expected,
    ) -> AppResult<Asset>
    where
        S: Stream<Item = AppResult<Bytes>> + Unpin + Send,
    {
        if asset.state != AssetState::Pending {
            return Err(AppError::FailedPrecondition(format!(
                "asset {} is {}; content can only be uploaded to a PENDING asset (create a new asset for new content)",
                name(&asset),
                asset.state.as_str().to_uppercase()
            )));
        }
        if let Some(e) = expected.size.and_then(|s| self.too_big(s)) {
            return Err(e);
        }
        // In progress, the upload counts in its owner's storage (declared size, else
        // the bytes written so far); READY bytes are read once here and re-checked
        // under a lock when the upload commits.
        let mut uploading = self.quotas.start_upload(&asset.owner);
        let _in_progress = self.metrics.upload_started();
        let owner_ready = {
            let mut conn = self.db.get().await?;
            db::usage::storage_bytes(&mut conn, &asset.owner).await?
        };
        if let Some(size) = expected.size {
            let mut conn = self.db.get().await?;
            let used = db::assets::project_usage(&mut conn, asset.project_id).await?;
            if used + size > self.limits.project_quota_bytes {
                return Err(self.quota_error(used));
            }
            uploading.set(size);
        }
        self.check_owner_storage(&asset.owner, owner_ready)?;
        let key = Storage::new_key(asset.project_id, asset.id);
        {
            let mut conn = self.db.get().await?;
            db::assets::gc_enqueue(&mut conn, &key, UPLOAD_GRACE).await?;
        }
        let written = self
            .write(&key, &mut chunks, &mut uploading, owner_ready)
            .await;
        let (size, sha256, head) = match written {
            Ok(w) => w,
            Err(e) => {
                self.discard(&key).await;
                return Err(e);
            }
        };
        let committed = self
            .commit_ready(&asset, &key, (size, &sha256, &head), &expected, &uploading)
            .await;
        if committed.is_err() {
            self.discard(&key).await;
        }
        committed
    }

    /// Checks what was stored at `key` against what was declared and the limits, and
    /// makes the asset READY with it. The caller removes the object on error.
    pub(super) async fn commit_ready(
        &self,
        asset: &Asset,
        key: &str,
        (size, sha256, head): (i64, &str, &[u8]),
        expected: &Expected,
        uploading: &Uploading,
    ) -> AppResult<Asset> {
        match (&expected.sha256, &expected.size) {
            (Some(want), _) if !want.eq_ignore_ascii_case(sha256) => {
                return Err(AppError::invalid(
                    "sha256",
                    format!("declared {want} but the uploaded bytes hash to {sha256}"),
                ));
            }
            (_, Some(want)) if *want != size => {
                return Err(AppError::invalid(
                    "size_bytes",
                    format!("declared {want} bytes but {size} were uploaded"),
                ));
            }
            _ => {}
        }
        if let Some(e) = self.too_big(size) {
            return Err(e);
        }
        let content_type = infer::get(head)
            .map(|t| t.mime_type().to_owned())
            .or_else(|| (!asset.content_type.is_empty()).then(|| asset.content_type.clone()))
            .unwrap_or_else(|| "application/octet-stream".to_owned());

        let mut conn = self.db.get().await?;
        conn.transaction(async |conn| {
            db::projects::owner_of(conn, None, asset.project_id, db::projects::Lock::Update)
                .await?;
            let used = db::assets::project_usage(conn, asset.project_id).await?;
            if used + size > self.limits.project_quota_bytes {
                return Err(self.quota_error(used));
            }
            db::usage::lock_storage(conn, &asset.owner).await?;
            let ready = db::usage::storage_bytes(conn, &asset.owner).await?;
            let others = self.quotas.uploading(&asset.owner) - uploading.bytes();
            let limit = self.quotas.limit(Quota::StorageBytes);
            if ready + others + size > limit {
                return Err(crate::quotas::exceeded(
                    Quota::StorageBytes,
                    limit,
                    ready + others,
                ));
            }
            let ready = db::assets::mark_ready(conn, asset.id, key, size, sha256, &content_type)
                .await?
                .ok_or_else(|| {
                    AppError::FailedPrecondition(format!(
                        "asset {} is no longer PENDING (deleted, or uploaded by another call)",
                        name(asset)
                    ))
                })?;
            db::assets::gc_dequeue(conn, key).await?;
            // Presigned PUT URLs still out for this asset can no longer make it READY.
            db::assets::direct_uploads_remove_asset(conn, asset.id).await?;
            Ok(ready)
        })
        .await
    }

    pub(super) fn quota_error(&self, used: i64) -> AppError {
        AppError::ResourceExhausted(format!(
            "project storage quota of {} bytes exceeded ({used} bytes in use)",
            self.limits.project_quota_bytes
        ))
    }

    /// The owner's storage quota against READY bytes (`ready`) and every upload in
    /// progress on this instance, this one included.
    fn check_owner_storage(&self, owner: &str, ready: i64) -> AppResult<()> {
        let limit = self.quotas.limit(Quota::StorageBytes);
        let used = ready.saturating_add(self.quotas.uploading(owner));
        if used > limit {
            return Err(crate::quotas::exceeded(Quota::StorageBytes, limit, used));
        }
        Ok(())
    }

    /// Writes the stream; returns size, hex sha256 and the first bytes for sniffing.
    async fn write<S>(
        &self,
        key: &str,
        chunks: &mut S,
        uploading: &mut Uploading,
        owner_ready: i64,
    ) -> AppResult<(i64, String, Vec<u8>)>
    where
        S: Stream<Item = AppResult<Bytes>> + Unpin + Send,
    {
        let mut upload = self.storage.uploader(key).await?;
        let mut digest = Digester::new();
        let failed = loop {
            let chunk = match chunks.next().await {
                None => break None,
                Some(Ok(c)) => c,
                Some(Err(e)) => break Some(e),
            };
            self.metrics.asset_bytes("uploaded", chunk.len() as u64);
            if let Err(e) = digest.add(chunk.clone()).await {
                break Some(e);
            }
            if let Some(e) = self.too_big(digest.size) {
                break Some(e);
            }
            if digest.size > uploading.bytes() {
                uploading.set(digest.size);
                if let Err(e) = self.check_owner_storage(uploading.owner(), owner_ready) {
                    break Some(e);
                }
            }
            if let Err(e) = upload.write(chunk).await {
                break Some(e.into());
            }
        };
        if let Some(e) = failed {
            upload.abort().await;
            return Err(e);
        }
        upload.finish().await?;
        digest.finish().await
    }

    /// Best-effort removal of an object that will never be READY; the collector
    /// retries what fails here.
    pub(super) async fn discard(&self, key: &str) {
        if self.storage.delete(key).await.is_ok()
            && let Ok(mut conn) = self.db.get().await
        {
            let _ = db::assets::gc_dequeue(&mut conn, key).await;
        }
    }
}

/// Chunks queued for the hasher. Each holds its receive buffer (1 to 2 MiB) until
/// hashed, so the queue is most of an upload's memory: deep enough to smooth out the
/// hasher's turns on the CPU, no deeper.
const HASH_QUEUE: usize = 3;

/// Size, SHA-256 and the first bytes of a byte stream. SHA-256 runs on its own thread,
/// beside the network and the storage writes: inline it would cost as much time as
/// the rest of an upload together.
pub(super) struct Digester {
    to_hash: tokio::sync::mpsc::Sender<Bytes>,
    hasher: tokio::task::JoinHandle<sha2::digest::Output<Sha256>>,
    size: i64,
    head: Vec<u8>,
}

impl Digester {
    pub(super) fn new() -> Self {
        let (to_hash, mut hash_rx) = tokio::sync::mpsc::channel::<Bytes>(HASH_QUEUE);
        let hasher = tokio::task::spawn_blocking(move || {
            let mut hasher = Sha256::new();
            while let Some(chunk) = hash_rx.blocking_recv() {
                hasher.update(&chunk);
            }
            hasher.finalize()
        });
        Self {
            to_hash,
            hasher,
            size: 0,
            head: Vec::with_capacity(SNIFF_BYTES),
        }
    }

    pub(super) async fn add(&mut self, chunk: Bytes) -> AppResult<()> {
        self.size += chunk.len() as i64;
        if self.head.len() < SNIFF_BYTES {
            let take = chunk.len().min(SNIFF_BYTES - self.head.len());
            self.head.extend_from_slice(&chunk[..take]);
        }
        self.to_hash
            .send(chunk)
            .await
            .map_err(|_| AppError::internal("upload hasher stopped"))
    }

    pub(super) async fn finish(self) -> AppResult<(i64, String, Vec<u8>)> {
        drop(self.to_hash);
        let digest = self
            .hasher
            .await
            .map_err(|e| AppError::internal(format!("upload hasher: {e}")))?;
        Ok((self.size, asset::hex(&digest), self.head))
    }
}
