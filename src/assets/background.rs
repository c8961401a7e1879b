//! Background work: the verifier of direct (presigned) uploads and the collector of
//! objects no asset needs.
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::{
    AppResult, db,
    domain::asset::{self, AssetState},
    storage::Storage,
};

use super::{Assets, Expected, UPLOAD_GRACE, name, upload::Digester};

impl Assets {
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
        if upload.declared {
            // Declared uploads are finalized by their client; one due here has expired.
            self.expire_declared(upload).await?;
            return Ok(false);
        }
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
            if asset_done_or_expired(
                asset_done,
                upload.expire_time,
                self.limits.direct_upload_grace,
            ) {
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
fn asset_done_or_expired(
    asset_done: bool,
    expire_time: chrono::DateTime<chrono::Utc>,
    grace: Duration,
) -> bool {
    asset_done
        || chrono::Utc::now() > expire_time + chrono::Duration::from_std(grace).unwrap_or_default()
}
