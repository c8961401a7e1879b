//! Direct uploads on S3-compatible storage (StartUpload, FinalizeUpload): the client
//! declares the size and SHA-256, PUTs the bytes to presigned URLs that bind that
//! checksum (so the store itself refuses other bytes), and finalizes; the server checks
//! the object with one HEAD and marks the asset READY. No byte passes through the
//! server on this path. An upload never finalized expires: the verifier's round aborts
//! its multipart upload, removes its bytes and marks the asset FAILED.
use std::time::Duration;

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use chrono::{DateTime, Utc};
use diesel_async::AsyncConnection;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{
    AppError, AppResult, db,
    domain::asset::{self, Asset, AssetState},
    storage::{Refused, Storage},
};

use super::{Assets, Expected, name};

/// S3's limits: parts of at least 5 MiB (but the last), at most 10,000 of them, and a
/// single PUT of at most 5 GiB.
pub const MIN_PART_BYTES: i64 = 5 * 1024 * 1024;
pub const MAX_PARTS: usize = 10_000;
pub const MAX_SINGLE_PUT_BYTES: i64 = 5 * 1024 * 1024 * 1024;

/// What a client declares to start a direct upload (validated by the API layer).
#[derive(Debug, Clone)]
pub struct Declared {
    pub size: i64,
    /// Lowercase hex.
    pub sha256: String,
    /// Multipart: every part's size but the last's, and each part's SHA-256 (hex).
    pub parts: Option<(i64, Vec<String>)>,
    pub ttl: Duration,
}

/// One PUT the client makes.
#[derive(Debug, Clone)]
pub struct PlannedPart {
    pub number: u32,
    pub offset: i64,
    pub size: i64,
    pub url: String,
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct Started {
    pub upload_id: Uuid,
    pub parts: Vec<PlannedPart>,
    pub expires: DateTime<Utc>,
}

/// The parts of `size` bytes cut at `part_size`: (offset, size) of each.
pub fn cut(size: i64, part_size: i64) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < size {
        let len = part_size.min(size - offset);
        out.push((offset, len));
        offset += len;
    }
    out
}

/// A hex SHA-256 as bytes (the API layer has checked the hex).
fn digest_of(hex: &str) -> AppResult<Vec<u8>> {
    asset::unhex(hex).ok_or_else(|| AppError::invalid("sha256", "64 lowercase hex digits"))
}

/// Hex SHA-256 to the base64 S3 wants.
fn b64_of_hex(hex: &str) -> AppResult<String> {
    Ok(B64.encode(digest_of(hex)?))
}

/// The checksum S3 reports for a multipart object: SHA-256 over the parts' digests,
/// then `-N`.
fn composite(part_hex: &[Option<String>]) -> AppResult<String> {
    let mut all = Sha256::new();
    for hex in part_hex {
        all.update(digest_of(hex.as_deref().unwrap_or_default())?);
    }
    Ok(format!("{}-{}", B64.encode(all.finalize()), part_hex.len()))
}

fn refused(what: &str, r: Refused) -> AppError {
    AppError::FailedPrecondition(format!("the store refused to {what}: {}", r.0))
}

impl Assets {
    /// Presigned PUT URLs for a PENDING asset's bytes, each bound to its declared SHA-256.
    pub async fn start_upload(&self, asset: &Asset, declared: &Declared) -> AppResult<Started> {
        if !self.storage.presigns() {
            return Err(AppError::FailedPrecondition(
                "direct uploads need S3-compatible storage; this server stores bytes itself: \
                 use UploadAssetContent or a signed PUT URL"
                    .into(),
            ));
        }
        if asset.state != AssetState::Pending {
            return Err(AppError::FailedPrecondition(format!(
                "asset {} is {}; uploads need a PENDING asset",
                name(asset),
                asset.state.as_str().to_uppercase()
            )));
        }
        if let Some(e) = self.too_big(declared.size) {
            return Err(e);
        }
        {
            let mut conn = self.db.get().await?;
            let used = db::assets::project_usage(&mut conn, asset.project_id).await?;
            if used + declared.size > self.limits.project_quota_bytes {
                return Err(self.quota_error(used));
            }
        }
        let upload_id = Uuid::now_v7();
        let key = Storage::upload_key(asset.project_id, asset.id, upload_id);
        let expires = Utc::now()
            + chrono::Duration::from_std(declared.ttl)
                .map_err(|_| AppError::internal("ttl out of range"))?;
        let mut parts = Vec::new();
        let mut multipart_id = None;
        match &declared.parts {
            None => {
                let checksum = b64_of_hex(&declared.sha256)?;
                let url = self
                    .storage
                    .presigned_put_checked(&key, declared.ttl, &checksum, None)
                    .await?;
                parts.push(PlannedPart {
                    number: 1,
                    offset: 0,
                    size: declared.size,
                    url,
                    headers: vec![("x-amz-checksum-sha256".into(), checksum)],
                });
            }
            Some((part_size, hashes)) => {
                let id = self.storage.start_multipart(&key).await?;
                for (i, ((offset, size), hex)) in cut(declared.size, *part_size)
                    .into_iter()
                    .zip(hashes)
                    .enumerate()
                {
                    let number = i as u32 + 1;
                    let checksum = b64_of_hex(hex)?;
                    let url = self
                        .storage
                        .presigned_put_checked(&key, declared.ttl, &checksum, Some((number, &id)))
                        .await?;
                    parts.push(PlannedPart {
                        number,
                        offset,
                        size,
                        url,
                        headers: vec![("x-amz-checksum-sha256".into(), checksum)],
                    });
                }
                multipart_id = Some(id);
            }
        }
        let row = db::assets::DeclaredUpload {
            upload_key: key.clone(),
            asset_id: asset.id,
            expire_time: expires,
            sha256: Some(declared.sha256.clone()),
            size_bytes: Some(declared.size),
            part_size_bytes: declared.parts.as_ref().map(|(s, _)| *s),
            part_sha256: declared
                .parts
                .as_ref()
                .map(|(_, h)| h.iter().cloned().map(Some).collect())
                .unwrap_or_default(),
            multipart_id,
        };
        // Looked at again (to be removed) only once a PUT started before expiry is done.
        let check_after = expires
            + chrono::Duration::from_std(self.limits.direct_upload_grace).unwrap_or_default();
        let mut conn = self.db.get().await?;
        conn.transaction(async |conn| {
            db::assets::gc_enqueue(conn, &key, declared.ttl + self.limits.direct_upload_grace)
                .await?;
            db::assets::declared_upload_add(conn, &row, check_after).await
        })
        .await?;
        Ok(Started {
            upload_id,
            parts,
            expires,
        })
    }

    /// Completes a multipart upload (from the parts' ETags), checks the object's size and
    /// checksum with the store, and marks the asset READY.
    pub async fn finalize_upload(
        &self,
        asset: &Asset,
        upload_id: Uuid,
        etags: &[String],
    ) -> AppResult<Asset> {
        if asset.state != AssetState::Pending {
            return Err(AppError::FailedPrecondition(format!(
                "asset {} is {}; only a PENDING asset's upload can be finalized",
                name(asset),
                asset.state.as_str().to_uppercase()
            )));
        }
        let key = Storage::upload_key(asset.project_id, asset.id, upload_id);
        let upload = {
            let mut conn = self.db.get().await?;
            db::assets::declared_upload_lock(&mut conn, &key, asset.id).await?
        }
        .ok_or_else(|| {
            AppError::NotFound(format!(
                "upload {upload_id} of asset {} (expired, or never started)",
                name(asset)
            ))
        })?;
        let (Some(sha256), Some(size)) = (upload.sha256.clone(), upload.size_bytes) else {
            return Err(AppError::internal(
                "declared upload without its declaration",
            ));
        };
        let want = match &upload.multipart_id {
            None => b64_of_hex(&sha256)?,
            Some(id) => {
                if etags.len() != upload.part_sha256.len() {
                    return Err(AppError::invalid(
                        "part_etags",
                        format!(
                            "{} parts were uploaded; give the ETag of each, in order",
                            upload.part_sha256.len()
                        ),
                    ));
                }
                let parts: Vec<(String, String)> = etags
                    .iter()
                    .zip(&upload.part_sha256)
                    .map(|(etag, hex)| {
                        Ok((
                            etag.clone(),
                            b64_of_hex(hex.as_deref().unwrap_or_default())?,
                        ))
                    })
                    .collect::<AppResult<_>>()?;
                // A repeated finalize finds the upload already completed: the HEAD decides.
                if let Err(r) = self.storage.complete_multipart(&key, id, &parts).await?
                    && self.storage.head_checked(&key).await?.is_none()
                {
                    return Err(refused("complete the multipart upload", r));
                }
                composite(&upload.part_sha256)?
            }
        };
        let stored = self.storage.head_checked(&key).await?.ok_or_else(|| {
            AppError::FailedPrecondition(format!(
                "no bytes have arrived for upload {upload_id}: PUT them to its URLs first"
            ))
        })?;
        if stored.size as i64 != size {
            return Err(AppError::FailedPrecondition(format!(
                "the store holds {} bytes for upload {upload_id}, but {size} were declared",
                stored.size
            )));
        }
        // Some stores report a multipart object's checksum without its `-N`.
        let reported = stored.sha256.as_deref().map(|got| {
            if upload.multipart_id.is_some() && !got.contains('-') {
                format!("{got}-{}", upload.part_sha256.len())
            } else {
                got.to_owned()
            }
        });
        match reported.as_deref() {
            Some(got) if got == want => {}
            Some(got) => {
                return Err(AppError::FailedPrecondition(format!(
                    "the store reports SHA-256 {got} for upload {upload_id}, not the declared {want}"
                )));
            }
            None => {
                return Err(AppError::FailedPrecondition(
                    "the store did not report the object's SHA-256, so it cannot be verified \
                     without reading it back; this store does not support direct uploads"
                        .into(),
                ));
            }
        }
        let uploading = self.quotas.start_upload(&asset.owner);
        self.commit_ready(
            asset,
            &key,
            (size, &sha256, &[]),
            &Expected {
                sha256: Some(sha256.clone()),
                size: Some(size),
            },
            &uploading,
        )
        .await
    }

    /// A declared upload past its expiry, never finalized: its multipart upload is
    /// aborted, its bytes removed, and its asset FAILED if nothing else can fill it.
    pub(super) async fn expire_declared(&self, upload: &db::assets::DirectUpload) -> AppResult<()> {
        let key = upload.upload_key.as_str();
        if let Some(id) = &upload.multipart_id {
            self.storage.abort_multipart(key, id).await?;
        }
        // The gc entry made at start removes the bytes too, should this fail.
        let _ = self.storage.delete(key).await;
        let mut conn = self.db.get().await?;
        let failed = conn
            .transaction(async |conn| {
                db::assets::direct_upload_remove(conn, key).await?;
                db::assets::fail_if_abandoned(conn, upload.asset_id).await
            })
            .await?;
        if failed {
            tracing::info!(asset = %upload.asset_id, "direct upload expired unfinalized; the asset is FAILED");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_content_exactly() {
        assert_eq!(cut(10, 4), vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(cut(8, 4), vec![(0, 4), (4, 4)]);
        assert_eq!(cut(3, 4), vec![(0, 3)]);
    }

    #[test]
    fn the_composite_checksum_is_over_the_part_digests() {
        let a = asset::hex(&Sha256::digest(b"a"));
        let b = asset::hex(&Sha256::digest(b"b"));
        let mut all = Sha256::new();
        all.update(Sha256::digest(b"a"));
        all.update(Sha256::digest(b"b"));
        assert_eq!(
            composite(&[Some(a), Some(b)]).unwrap(),
            format!("{}-2", B64.encode(all.finalize()))
        );
    }
}
