//! AssetsService over gRPC: metadata CRUD, streamed upload and download, signed URLs.
use std::{pin::Pin, time::Duration};

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::convert::duration;
use crate::{
    AppError, AppResult,
    assets::{Assets, Declared, Expected, MAX_PARTS, MAX_SINGLE_PUT_BYTES, MIN_PART_BYTES},
    auth::{Caller, caller},
    domain::{
        Violations,
        asset::{self, Asset, AssetFilter, AssetState, CREATE_PATHS, UrlMethod},
        names::{AssetName, ProjectName},
        page, project,
    },
    proto::v1 as pb,
};

pub struct AssetsApi {
    assets: Assets,
    /// Bytes of assets one ListAssets response may hold.
    page_budget: usize,
}

impl AssetsApi {
    pub fn new(assets: Assets, max_message_bytes: usize) -> Self {
        Self {
            assets,
            page_budget: super::page_budget(max_message_bytes),
        }
    }
}

type DownloadStream =
    Pin<Box<dyn Stream<Item = Result<pb::DownloadAssetContentResponse, Status>> + Send>>;

impl AssetsApi {
    async fn create(
        &self,
        caller: &Caller,
        r: pb::CreateAssetRequest,
        prefix: &str,
    ) -> AppResult<Asset> {
        let project = ProjectName::parse(&format!("{prefix}parent"), &r.parent)?;
        let mut v = Violations::default();
        let Some(a) = r.asset else {
            return Err(AppError::invalid(format!("{prefix}asset"), "required"));
        };
        let fields = crate::convert::asset::fields(a, &format!("{prefix}asset."), &mut v);
        fields.validate(&format!("{prefix}asset."), &CREATE_PATHS, &mut v);
        if r.request_id.chars().count() > project::MAX_REQUEST_ID
            || !crate::domain::text::storable(&r.request_id)
        {
            v.add(
                format!("{prefix}request_id"),
                "at most 128 characters, without NUL",
            );
        }
        let fields = v.into_result(fields)?;
        let request_id = (!r.request_id.is_empty()).then_some(r.request_id.as_str());
        self.assets
            .create(caller, project, &fields, request_id)
            .await
    }

    async fn visible(&self, caller: &Caller, name: AssetName) -> AppResult<Asset> {
        self.assets.get(caller, name).await
    }

    /// A URL lifetime: 1h by default, from 1 s to the configured maximum.
    fn ttl(&self, ttl: Option<prost_types::Duration>, v: &mut Violations) -> Duration {
        let max = self.assets.limits.signed_url_max_ttl;
        match ttl {
            None => Duration::from_secs(3600).min(max),
            Some(d) => match duration(&d) {
                Some(d) if d >= Duration::from_secs(1) && d <= max => d,
                _ => {
                    v.add("ttl", format!("from 1s to {}s", max.as_secs()));
                    Duration::ZERO
                }
            },
        }
    }

    /// What StartUpload declares, checked against S3's limits.
    fn declared(&self, r: &pb::StartUploadRequest) -> AppResult<Declared> {
        let mut v = Violations::default();
        let hex = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        if r.size_bytes < 0 {
            v.add("size_bytes", "at least 0");
        }
        if !hex(&r.sha256) {
            v.add("sha256", "64 hex characters (the SHA-256 of the content)");
        }
        let parts = if r.part_size_bytes == 0 {
            if !r.part_sha256.is_empty() {
                v.add("part_size_bytes", "required with part_sha256");
            }
            if r.size_bytes > MAX_SINGLE_PUT_BYTES {
                v.add(
                    "part_size_bytes",
                    format!("required above {MAX_SINGLE_PUT_BYTES} bytes (a multipart upload)"),
                );
            }
            None
        } else {
            let count = if r.part_size_bytes > 0 {
                (r.size_bytes.max(1) + r.part_size_bytes - 1) / r.part_size_bytes
            } else {
                0
            };
            if r.part_size_bytes < MIN_PART_BYTES {
                v.add(
                    "part_size_bytes",
                    format!("at least {MIN_PART_BYTES} bytes"),
                );
            } else if count as usize > MAX_PARTS {
                v.add(
                    "part_size_bytes",
                    format!("large enough for at most {MAX_PARTS} parts"),
                );
            } else if r.part_sha256.len() as i64 != count {
                v.add(
                    "part_sha256",
                    format!("one SHA-256 per part: {count} for this size and part size"),
                );
            }
            for (i, h) in r.part_sha256.iter().enumerate() {
                if !hex(h) {
                    v.add(format!("part_sha256[{i}]"), "64 hex characters");
                }
            }
            Some((
                r.part_size_bytes,
                r.part_sha256
                    .iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect(),
            ))
        };
        let ttl = self.ttl(r.ttl, &mut v);
        v.into_result(Declared {
            size: r.size_bytes,
            sha256: r.sha256.to_ascii_lowercase(),
            parts,
            ttl,
        })
    }
}

#[tonic::async_trait]
impl crate::proto::server::assets_service_server::AssetsService for AssetsApi {
    async fn create_asset(
        &self,
        request: Request<pb::CreateAssetRequest>,
    ) -> Result<Response<pb::Asset>, Status> {
        let caller = caller(&request)?;
        Ok(Response::new(
            self.create(&caller, request.into_inner(), "").await?.into(),
        ))
    }

    async fn get_asset(
        &self,
        request: Request<pb::GetAssetRequest>,
    ) -> Result<Response<pb::Asset>, Status> {
        let caller = caller(&request)?;
        let name = AssetName::parse("name", &request.get_ref().name)?;
        Ok(Response::new(self.visible(&caller, name).await?.into()))
    }

    async fn list_assets(
        &self,
        request: Request<pb::ListAssetsRequest>,
    ) -> Result<Response<pb::ListAssetsResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let project = ProjectName::parse("parent", &r.parent)?;
        let filter =
            AssetFilter::parse(&r.filter).map_err(|why| AppError::invalid("filter", why))?;
        if !matches!(r.order_by.trim(), "" | "create_time desc") {
            return Err(AppError::invalid(
                "order_by",
                "supported: `create_time desc` (the default)",
            )
            .into());
        }
        let limit = page::page_size(r.page_size)?;
        let owner = caller.owner_scope().map(str::to_owned);
        let fingerprint = page::fingerprint(&[
            "assets",
            owner.as_deref().unwrap_or("*"),
            &r.parent,
            &filter.canonical(),
        ]);
        let after = page::decode(&r.page_token, &fingerprint)?;
        let query = crate::domain::asset::ListAssets {
            owner,
            project: project.0,
            filter,
            limit,
            after,
        };
        let (assets, more) = self.assets.list(&query).await?;
        let (assets, last, cut) = super::fit_page(assets, self.page_budget, |a| page::Cursor {
            create_time: a.create_time,
            id: a.id,
        });
        let next_page_token = page::next_token(more || cut, last, &fingerprint);
        Ok(Response::new(pb::ListAssetsResponse {
            assets,
            next_page_token,
        }))
    }

    async fn update_asset(
        &self,
        request: Request<pb::UpdateAssetRequest>,
    ) -> Result<Response<pb::Asset>, Status> {
        let caller = caller(&request)?;
        let pb::UpdateAssetRequest {
            asset: a,
            update_mask,
        } = request.into_inner();
        let Some(mut a) = a else {
            return Err(AppError::invalid("asset", "required").into());
        };
        let name = AssetName::parse("asset.name", &a.name)?;
        let paths = asset::parse_mask(&update_mask.map(|m| m.paths).unwrap_or_default())?;
        let etag = std::mem::take(&mut a.etag);
        let mut v = Violations::default();
        let fields = crate::convert::asset::fields(a, "asset.", &mut v);
        fields.validate("asset.", &paths, &mut v);
        let fields = v.into_result(fields)?;
        let asset = self
            .assets
            .update(&caller, name, &fields, &paths, &etag)
            .await?;
        Ok(Response::new(asset.into()))
    }

    async fn delete_asset(
        &self,
        request: Request<pb::DeleteAssetRequest>,
    ) -> Result<Response<()>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let name = AssetName::parse("name", &r.name)?;
        self.assets.delete(&caller, name, &r.etag).await?;
        Ok(Response::new(()))
    }

    async fn upload_asset_content(
        &self,
        request: Request<Streaming<pb::UploadAssetContentRequest>>,
    ) -> Result<Response<pb::Asset>, Status> {
        let caller = caller(&request)?;
        let mut stream = request.into_inner();
        let first = stream.next().await.ok_or_else(|| {
            AppError::invalid("header", "the first message must carry the header")
        })??;
        let Some(pb::upload_asset_content_request::Payload::Header(header)) = first.payload else {
            return Err(
                AppError::invalid("header", "the first message must carry the header").into(),
            );
        };
        let mut v = Violations::default();
        let sha256 = (!header.sha256.is_empty()).then_some(header.sha256.clone());
        if sha256
            .as_ref()
            .is_some_and(|s| s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            v.add("header.sha256", "64 hex characters");
        }
        if header.size_bytes < 0 {
            v.add("header.size_bytes", "must not be negative");
        }
        let target = match (header.name.is_empty(), header.create.is_some()) {
            (false, false) => Some(AssetName::parse("header.name", &header.name)?),
            (true, true) => None,
            _ => {
                v.add(
                    "header",
                    "set exactly one of name (an existing asset) or create",
                );
                None
            }
        };
        v.into_result(())?;
        let asset = match target {
            Some(name) => self.visible(&caller, name).await?,
            None => {
                let create = header.create.clone().unwrap_or_default();
                self.create(&caller, create, "header.create.").await?
            }
        };
        let chunks = stream.map(|m| match m {
            Ok(pb::UploadAssetContentRequest {
                payload: Some(pb::upload_asset_content_request::Payload::Chunk(c)),
            }) => {
                if c.len() > asset::CHUNK {
                    Err(AppError::invalid(
                        "chunk",
                        format!("chunks are at most {} bytes", asset::CHUNK),
                    ))
                } else {
                    Ok(c)
                }
            }
            Ok(_) => Err(AppError::invalid(
                "payload",
                "only the first message carries a header; later ones carry chunks",
            )),
            Err(status) => Err(AppError::Aborted(format!(
                "upload stream broken: {}",
                status.message()
            ))),
        });
        let expected = Expected {
            sha256,
            size: (header.size_bytes > 0).then_some(header.size_bytes),
        };
        let ready = self
            .assets
            .upload(asset, Box::pin(chunks), expected)
            .await?;
        Ok(Response::new(ready.into()))
    }

    async fn download_asset_content(
        &self,
        request: Request<pb::DownloadAssetContentRequest>,
    ) -> Result<Response<DownloadStream>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let name = AssetName::parse("name", &r.name)?;
        let asset = self.visible(&caller, name).await?;
        if asset.state != AssetState::Ready {
            return Err(AppError::FailedPrecondition(format!(
                "asset {name} is {}; only READY assets have content",
                asset.state.as_str().to_uppercase()
            ))
            .into());
        }
        let size = asset.size_bytes.max(0) as u64;
        let mut v = Violations::default();
        if r.offset < 0 || r.offset as u64 > size {
            v.add("offset", format!("from 0 to the asset's size ({size})"));
        }
        if r.length < 0 {
            v.add("length", "must not be negative (0 means to the end)");
        }
        v.into_result(())?;
        let start = r.offset as u64;
        let end = if r.length == 0 {
            size
        } else {
            start.saturating_add(r.length as u64).min(size)
        };
        let bytes = if start < end {
            Some(self.assets.read(&asset, start..end).await?)
        } else {
            None
        };
        let head = futures::stream::once(async move {
            Ok(pb::DownloadAssetContentResponse {
                payload: Some(pb::download_asset_content_response::Payload::Asset(
                    asset.into(),
                )),
            })
        });
        let body = futures::stream::iter(bytes).flatten().map(|chunk| {
            chunk
                .map(|c| pb::DownloadAssetContentResponse {
                    payload: Some(pb::download_asset_content_response::Payload::Chunk(c)),
                })
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(head.chain(body))))
    }

    async fn create_signed_url(
        &self,
        request: Request<pb::CreateSignedUrlRequest>,
    ) -> Result<Response<pb::CreateSignedUrlResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let name = AssetName::parse("name", &r.name)?;
        let mut v = Violations::default();
        let method = match pb::create_signed_url_request::Method::try_from(r.method) {
            Ok(pb::create_signed_url_request::Method::Get) => UrlMethod::Get,
            Ok(pb::create_signed_url_request::Method::Put) => UrlMethod::Put,
            _ => {
                v.add("method", "GET or PUT");
                UrlMethod::Get
            }
        };
        let ttl = self.ttl(r.ttl, &mut v);
        v.into_result(())?;
        let asset = self.visible(&caller, name).await?;
        match (method, asset.state) {
            (UrlMethod::Get, AssetState::Ready) | (UrlMethod::Put, AssetState::Pending) => {}
            (UrlMethod::Get, s) => {
                return Err(AppError::FailedPrecondition(format!(
                    "asset {name} is {}; GET URLs need a READY asset",
                    s.as_str().to_uppercase()
                ))
                .into());
            }
            (UrlMethod::Put, s) => {
                return Err(AppError::FailedPrecondition(format!(
                    "asset {name} is {}; PUT URLs need a PENDING asset",
                    s.as_str().to_uppercase()
                ))
                .into());
            }
        }
        let (url, expires) = self.assets.signed_url(&asset, method, ttl).await?;
        Ok(Response::new(pb::CreateSignedUrlResponse {
            url,
            expire_time: Some(prost_types::Timestamp {
                seconds: expires,
                nanos: 0,
            }),
        }))
    }

    async fn start_upload(
        &self,
        request: Request<pb::StartUploadRequest>,
    ) -> Result<Response<pb::StartUploadResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let name = AssetName::parse("name", &r.name)?;
        let declared = self.declared(&r)?;
        let asset = self.visible(&caller, name).await?;
        let started = self.assets.start_upload(&asset, &declared).await?;
        Ok(Response::new(crate::convert::asset::started(started)))
    }

    async fn finalize_upload(
        &self,
        request: Request<pb::FinalizeUploadRequest>,
    ) -> Result<Response<pb::Asset>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let name = AssetName::parse("name", &r.name)?;
        let upload_id = uuid::Uuid::parse_str(&r.upload_id)
            .map_err(|_| AppError::invalid("upload_id", "the upload_id StartUpload returned"))?;
        let asset = self.visible(&caller, name).await?;
        Ok(Response::new(
            self.assets
                .finalize_upload(&asset, upload_id, &r.part_etags)
                .await?
                .into(),
        ))
    }
}
