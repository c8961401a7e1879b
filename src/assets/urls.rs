//! Signed URLs served by this server, and URLs presigned by S3 itself.
use std::time::Duration;

use diesel_async::AsyncConnection;

use crate::{
    AppError, AppResult, db,
    domain::asset::{self, Asset, UrlMethod},
    storage::Storage,
};

use super::Assets;

impl Assets {
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
                    db::assets::gc_enqueue(conn, &key, ttl + self.limits.direct_upload_grace)
                        .await?;
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
}
