//! Asset bytes: the upload pipeline shared by gRPC (UploadAssetContent) and signed
//! PUT URLs, downloads, signed URLs, and the collector that deletes unneeded objects.
//!
//! Invariants: a READY asset always has its bytes (rows are deleted before bytes, and
//! bytes become visible only in the transaction that marks the asset READY); every
//! object written is listed in `object_gc` until that transaction, so a failed or
//! interrupted upload leaves nothing behind once the collector has run.
use std::{ops::Range, sync::Arc, time::Duration};

use bytes::Bytes;
use diesel_async::AsyncConnection;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::{
    AppError, AppResult, db,
    domain::asset::{self, Asset, AssetState, UrlMethod},
    storage::Storage,
};

/// How long an upload may run before its object counts as abandoned.
const UPLOAD_GRACE: Duration = Duration::from_secs(24 * 3600);
const SNIFF_BYTES: usize = 8192;

#[derive(Debug, Clone)]
pub struct AssetLimits {
    pub max_asset_bytes: i64,
    pub project_quota_bytes: i64,
    pub signed_url_max_ttl: Duration,
}

#[derive(Clone)]
pub struct Assets {
    pub db: db::Pool,
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
        storage: Storage,
        limits: AssetLimits,
        signing_key: Vec<u8>,
        public_url: &str,
    ) -> Self {
        Self {
            db,
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
        if let Some(size) = expected.size {
            let mut conn = self.db.get().await?;
            let used = db::assets::project_usage(&mut conn, asset.project_id).await?;
            if used + size > self.limits.project_quota_bytes {
                return Err(self.quota_error(used));
            }
        }
        let key = Storage::new_key(asset.project_id, asset.id);
        {
            let mut conn = self.db.get().await?;
            db::assets::gc_enqueue(&mut conn, &key, UPLOAD_GRACE).await?;
        }
        let written = self.write(&key, &mut chunks).await;
        let (size, sha256, head) = match written {
            Ok(w) => w,
            Err(e) => {
                self.discard(&key).await;
                return Err(e);
            }
        };
        let mismatch = match (&expected.sha256, &expected.size) {
            (Some(want), _) if !want.eq_ignore_ascii_case(&sha256) => Some(AppError::invalid(
                "sha256",
                format!("declared {want} but the uploaded bytes hash to {sha256}"),
            )),
            (_, Some(want)) if *want != size => Some(AppError::invalid(
                "size_bytes",
                format!("declared {want} bytes but {size} were uploaded"),
            )),
            _ => None,
        };
        if let Some(e) = mismatch {
            self.discard(&key).await;
            return Err(e);
        }
        let content_type = infer::get(&head)
            .map(|t| t.mime_type().to_owned())
            .or_else(|| (!asset.content_type.is_empty()).then(|| asset.content_type.clone()))
            .unwrap_or_else(|| "application/octet-stream".to_owned());

        let limits = self.limits.clone();
        let mut conn = self.db.get().await?;
        let committed = conn
            .transaction(async |conn| {
                db::assets::lock_project(conn, None, asset.project_id).await?;
                let used = db::assets::project_usage(conn, asset.project_id).await?;
                if used + size > limits.project_quota_bytes {
                    return Err(AppError::ResourceExhausted(format!(
                        "project storage quota of {} bytes exceeded ({used} bytes in use)",
                        limits.project_quota_bytes
                    )));
                }
                let ready = db::assets::mark_ready(
                    conn,
                    asset.id,
                    &key,
                    size,
                    &sha256,
                    &content_type,
                )
                .await?
                .ok_or_else(|| {
                    AppError::FailedPrecondition(format!(
                        "asset {} is no longer PENDING (deleted, or uploaded by another call)",
                        name(&asset)
                    ))
                })?;
                db::assets::gc_dequeue(conn, &key).await?;
                Ok(ready)
            })
            .await;
        drop(conn);
        match committed {
            Ok(ready) => Ok(ready),
            Err(e) => {
                self.discard(&key).await;
                Err(e)
            }
        }
    }

    fn quota_error(&self, used: i64) -> AppError {
        AppError::ResourceExhausted(format!(
            "project storage quota of {} bytes exceeded ({used} bytes in use)",
            self.limits.project_quota_bytes
        ))
    }

    /// Writes the stream; returns size, hex sha256 and the first bytes for sniffing.
    async fn write<S>(&self, key: &str, chunks: &mut S) -> AppResult<(i64, String, Vec<u8>)>
    where
        S: Stream<Item = AppResult<Bytes>> + Unpin + Send,
    {
        let mut upload = self.storage.uploader(key).await?;
        // SHA-256 runs on its own thread, beside the network and the storage writes:
        // inline it would cost as much time as the rest of the upload together.
        let (to_hash, mut hash_rx) = tokio::sync::mpsc::channel::<Bytes>(8);
        let hasher = tokio::task::spawn_blocking(move || {
            let mut hasher = Sha256::new();
            while let Some(chunk) = hash_rx.blocking_recv() {
                hasher.update(&chunk);
            }
            hasher.finalize()
        });
        let mut size: i64 = 0;
        let mut head = Vec::with_capacity(SNIFF_BYTES);
        let failed = loop {
            let chunk = match chunks.next().await {
                None => break None,
                Some(Ok(c)) => c,
                Some(Err(e)) => break Some(e),
            };
            size += chunk.len() as i64;
            if let Some(e) = self.too_big(size) {
                break Some(e);
            }
            if head.len() < SNIFF_BYTES {
                head.extend_from_slice(&chunk[..chunk.len().min(SNIFF_BYTES - head.len())]);
            }
            if to_hash.send(chunk.clone()).await.is_err() {
                break Some(AppError::internal("upload hasher stopped"));
            }
            if let Err(e) = upload.write(chunk).await {
                break Some(e.into());
            }
        };
        drop(to_hash);
        if let Some(e) = failed {
            upload.abort().await;
            return Err(e);
        }
        upload.finish().await?;
        let digest = hasher
            .await
            .map_err(|e| AppError::internal(format!("upload hasher: {e}")))?;
        Ok((size, asset::hex(&digest), head))
    }

    /// Best-effort removal of an object that will never be READY; the collector
    /// retries what fails here.
    async fn discard(&self, key: &str) {
        if self.storage.delete(key).await.is_ok()
            && let Ok(mut conn) = self.db.get().await
        {
            let _ = db::assets::gc_dequeue(&mut conn, key).await;
        }
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
        Ok(stream.map(|r| r.map_err(AppError::from)))
    }

    pub fn signing_key(&self) -> &[u8] {
        &self.signing_key
    }

    /// A URL for `method` on this asset, valid until `expires` (unix seconds).
    pub async fn signed_url(
        &self,
        asset: &Asset,
        method: UrlMethod,
        ttl: Duration,
    ) -> AppResult<(String, i64)> {
        let expires = chrono::Utc::now().timestamp() + ttl.as_secs() as i64;
        if method == UrlMethod::Get
            && let Some(key) = &asset.object_key
            && let Some(url) = self.storage.presigned_get(key, ttl).await?
        {
            return Ok((url, expires));
        }
        let signature = asset::url_signature(
            &self.signing_key,
            method,
            asset.project_id,
            asset.id,
            expires,
        );
        Ok((
            format!(
                "{}/v1/signed/projects/{}/assets/{}?method={}&expires={expires}&signature={signature}",
                self.public_url,
                asset.project_id,
                asset.id,
                method.as_str()
            ),
            expires,
        ))
    }

    /// Deletes due objects (deleted assets, abandoned uploads) until `stop`.
    pub fn spawn_collector(&self, every: Duration, stop: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {
                        if let Err(e) = this.collect_once().await {
                            tracing::warn!(error = %e, "object collector failed");
                        }
                    }
                }
            }
        });
    }

    pub async fn collect_once(&self) -> AppResult<usize> {
        let keys = {
            let mut conn = self.db.get().await?;
            db::assets::gc_claim_due(&mut conn, 100).await?
        };
        let mut removed = 0;
        for key in keys {
            match self.storage.delete(&key).await {
                Ok(()) => {
                    let mut conn = self.db.get().await?;
                    db::assets::gc_dequeue(&mut conn, &key).await?;
                    removed += 1;
                }
                Err(e) => tracing::warn!(key, error = %e, "object delete failed; will retry"),
            }
        }
        Ok(removed)
    }
}

pub fn name(asset: &Asset) -> String {
    crate::domain::names::AssetName {
        project: asset.project_id,
        asset: asset.id,
    }
    .to_string()
}
