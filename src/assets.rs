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
    quotas::{Quota, Quotas, Uploading},
    storage::Storage,
};

/// How long an upload may run before its object counts as abandoned.
const UPLOAD_GRACE: Duration = Duration::from_secs(24 * 3600);
const SNIFF_BYTES: usize = 8192;
/// How long after its URL expires a presigned PUT is still looked for (S3 checks the
/// expiry when a request starts; a large PUT may finish well after).
const DIRECT_UPLOAD_SLACK: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct AssetLimits {
    pub max_asset_bytes: i64,
    pub project_quota_bytes: i64,
    pub signed_url_max_ttl: Duration,
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
    async fn commit_ready(
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
            db::assets::lock_project(conn, None, asset.project_id).await?;
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

    fn quota_error(&self, used: i64) -> AppError {
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
        let metrics = self.metrics.clone();
        Ok(stream.map(move |r| {
            if let Ok(chunk) = &r {
                metrics.asset_bytes("downloaded", chunk.len() as u64);
            }
            r.map_err(AppError::from)
        }))
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
        if self.storage.presigns() {
            return self.presigned_url(asset, method, ttl, expires).await;
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

    /// A URL signed by S3 itself. A PUT goes to a fresh key of its own, registered first,
    /// so the verifier looks for the object and the collector removes it after expiry.
    async fn presigned_url(
        &self,
        asset: &Asset,
        method: UrlMethod,
        ttl: Duration,
        expires: i64,
    ) -> AppResult<(String, i64)> {
        let key = match method {
            UrlMethod::Get => asset
                .object_key
                .clone()
                .ok_or_else(|| AppError::internal("READY asset without bytes"))?,
            UrlMethod::Put => {
                let key = Storage::new_key(asset.project_id, asset.id);
                let expire_time = chrono::DateTime::from_timestamp(expires, 0)
                    .ok_or_else(|| AppError::internal("expiry out of range"))?;
                let mut conn = self.db.get().await?;
                conn.transaction(async |conn| {
                    db::assets::gc_enqueue(conn, &key, ttl + DIRECT_UPLOAD_SLACK).await?;
                    db::assets::direct_upload_add(conn, &key, asset.id, expire_time).await
                })
                .await?;
                key
            }
        };
        let http_method = match method {
            UrlMethod::Get => http::Method::GET,
            UrlMethod::Put => http::Method::PUT,
        };
        let url = self
            .storage
            .presigned(http_method, &key, ttl)
            .await?
            .ok_or_else(|| AppError::internal("store does not presign"))?;
        Ok((url, expires))
    }

    /// Looks for objects uploaded through presigned PUT URLs until `stop`.
    pub fn spawn_verifier(&self, every: Duration, stop: CancellationToken) {
        if !self.storage.presigns() {
            return;
        }
        let this = self.clone();
        every_until(every, stop, "direct upload verifier", move || {
            let this = this.clone();
            async move { this.verify_direct_uploads_once().await }
        });
    }

    /// One look at the direct uploads that are due; returns how many became READY.
    pub async fn verify_direct_uploads_once(&self) -> AppResult<usize> {
        let due = {
            let mut conn = self.db.get().await?;
            db::assets::direct_uploads_claim_due(&mut conn, 16).await?
        };
        let mut ready = 0;
        for upload in due {
            match self.verify_direct_upload(&upload).await {
                Ok(true) => ready += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(key = upload.upload_key, error = %e, "direct upload check failed; will retry")
                }
            }
        }
        Ok(ready)
    }

    /// The object of a presigned PUT, once there, is copied to a key only the server
    /// writes (the URL may be used again until it expires), then hashed, sniffed and
    /// checked like any upload. An upload that breaks a limit is discarded and the
    /// asset stays PENDING.
    async fn verify_direct_upload(&self, upload: &db::assets::DirectUpload) -> AppResult<bool> {
        let key = upload.upload_key.as_str();
        let asset = {
            let mut conn = self.db.get().await?;
            db::assets::by_id(&mut conn, upload.asset_id).await?
        };
        let pending = asset.filter(|a| a.state == AssetState::Pending);
        let asset_done = pending.is_none();
        let arrived = !asset_done && self.storage.exists(key).await?;
        let (Some(asset), true) = (pending, arrived) else {
            // Nothing to wait for any more (the asset is READY or gone), or nothing yet.
            if asset_done_or_expired(asset_done, upload.expire_time) {
                let mut conn = self.db.get().await?;
                db::assets::direct_upload_remove(&mut conn, key).await?;
            }
            return Ok(false);
        };
        let final_key = Storage::new_key(asset.project_id, asset.id);
        {
            let mut conn = self.db.get().await?;
            db::assets::direct_upload_hold(&mut conn, key, Duration::from_secs(600)).await?;
            db::assets::gc_enqueue(&mut conn, &final_key, UPLOAD_GRACE).await?;
        }
        // From here the uploaded object is not needed (a PUT made again with the same
        // URL lands there anew; its gc entry removes it once the URL has expired).
        self.storage.copy(key, &final_key).await?;
        let _ = self.storage.delete(key).await;
        let verified = async {
            let mut digest = Digester::new();
            let mut chunks = self.storage.read(&final_key, None, asset::CHUNK).await?;
            while let Some(chunk) = chunks.next().await {
                digest.add(chunk?).await?;
            }
            let (size, sha256, head) = digest.finish().await?;
            let uploading = self.quotas.start_upload(&asset.owner);
            self.commit_ready(
                &asset,
                &final_key,
                (size, &sha256, &head),
                &Expected::default(),
                &uploading,
            )
            .await
        }
        .await;
        match verified {
            Ok(_) => Ok(true),
            Err(e) => {
                self.discard(&final_key).await;
                let mut conn = self.db.get().await?;
                db::assets::direct_upload_remove(&mut conn, key).await?;
                tracing::warn!(asset = name(&asset), error = %e, "direct upload rejected; the asset stays PENDING");
                Ok(false)
            }
        }
    }

    /// Deletes due objects (deleted assets, abandoned uploads) until `stop`.
    pub fn spawn_collector(&self, every: Duration, stop: CancellationToken) {
        let this = self.clone();
        every_until(every, stop, "object collector", move || {
            let this = this.clone();
            async move { this.collect_once().await }
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

/// Runs `work` every `period` until `stop`; a failed round is logged and retried at
/// the next tick.
fn every_until<F, Fut>(period: Duration, stop: CancellationToken, what: &'static str, work: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = AppResult<usize>> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {
                    if let Err(e) = work().await {
                        tracing::warn!(error = %e, "{what} failed; retrying at the next round");
                    }
                }
            }
        }
    });
}

/// Whether a direct upload needs no more looks: its asset is no longer PENDING, or its
/// URL expired long enough ago for a PUT started just before expiry to have finished.
fn asset_done_or_expired(asset_done: bool, expire_time: chrono::DateTime<chrono::Utc>) -> bool {
    asset_done
        || chrono::Utc::now()
            > expire_time + chrono::Duration::from_std(DIRECT_UPLOAD_SLACK).unwrap_or_default()
}

/// Size, SHA-256 and the first bytes of a byte stream. SHA-256 runs on its own thread,
/// beside the network and the storage writes: inline it would cost as much time as
/// the rest of an upload together.
struct Digester {
    to_hash: tokio::sync::mpsc::Sender<Bytes>,
    hasher: tokio::task::JoinHandle<sha2::digest::Output<Sha256>>,
    size: i64,
    head: Vec<u8>,
}

impl Digester {
    fn new() -> Self {
        let (to_hash, mut hash_rx) = tokio::sync::mpsc::channel::<Bytes>(8);
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

    async fn add(&mut self, chunk: Bytes) -> AppResult<()> {
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

    async fn finish(self) -> AppResult<(i64, String, Vec<u8>)> {
        drop(self.to_hash);
        let digest = self
            .hasher
            .await
            .map_err(|e| AppError::internal(format!("upload hasher: {e}")))?;
        Ok((self.size, asset::hex(&digest), self.head))
    }
}

pub fn name(asset: &Asset) -> String {
    crate::domain::names::AssetName {
        project: asset.project_id,
        asset: asset.id,
    }
    .to_string()
}
