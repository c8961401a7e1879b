//! Signed asset URLs served by mediaplane itself (local storage, and PUT everywhere):
//! `GET|PUT /v1/signed/projects/{p}/assets/{a}?method=..&expires=..&signature=..`.
//! No token: the HMAC signature over method, asset and expiry is the credential.
use axum::{
    Json, Router,
    body::Body,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use uuid::Uuid;

use crate::{
    AppError,
    assets::{Assets, Expected},
    domain::asset::{self, AssetState, UrlMethod},
};

pub fn router(assets: Assets) -> Router {
    Router::new()
        .route(
            "/v1/signed/projects/{project}/assets/{asset}",
            get(download).put(upload),
        )
        .with_state(assets)
}

#[derive(Deserialize)]
struct Signed {
    method: String,
    expires: i64,
    signature: String,
}

fn error(e: AppError) -> Response {
    let code = e.code();
    // Through Status: an internal error's message is the one clients may see.
    let message = tonic::Status::from(e).message().to_owned();
    *super::errors::error_response(code, &message, vec![])
}

fn check(
    assets: &Assets,
    method: UrlMethod,
    project: Uuid,
    asset: Uuid,
    q: &Signed,
) -> Result<(), AppError> {
    let denied = |why: &str| AppError::PermissionDenied(format!("signed URL refused: {why}"));
    if q.method != method.as_str() {
        return Err(denied("it was signed for another method"));
    }
    if !asset::verify_url_signature(
        assets.signing_key(),
        method,
        project,
        asset,
        q.expires,
        &q.signature,
    ) {
        return Err(denied("bad signature"));
    }
    if chrono::Utc::now().timestamp() > q.expires {
        return Err(denied("expired"));
    }
    Ok(())
}

async fn load(
    assets: &Assets,
    project: Uuid,
    id: Uuid,
) -> Result<crate::domain::asset::Asset, AppError> {
    assets.get_signed(project, id).await
}

/// `bytes=a-b`, `bytes=a-`, `bytes=-n`; `None` for a missing header, `Err` when unsatisfiable.
fn parse_range(headers: &HeaderMap, size: u64) -> Result<Option<std::ops::Range<u64>>, ()> {
    let Some(value) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let spec = value.strip_prefix("bytes=").ok_or(())?;
    if spec.contains(',') {
        return Err(());
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let range = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| ())?;
            size.saturating_sub(n)..size
        }
        (a, "") => a.parse::<u64>().map_err(|_| ())?..size,
        (a, b) => {
            let end = b.parse::<u64>().map_err(|_| ())?.saturating_add(1);
            a.parse::<u64>().map_err(|_| ())?..end.min(size)
        }
    };
    if range.start >= range.end || range.start >= size {
        return Err(());
    }
    Ok(Some(range))
}

async fn download(
    State(assets): State<Assets>,
    Path((project, id)): Path<(Uuid, Uuid)>,
    Query(q): Query<Signed>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = check(&assets, UrlMethod::Get, project, id, &q) {
        return error(e);
    }
    let a = match load(&assets, project, id).await {
        Ok(a) => a,
        Err(e) => return error(e),
    };
    if a.state != AssetState::Ready {
        return error(AppError::FailedPrecondition(
            "the asset has no content yet".into(),
        ));
    }
    let size = a.size_bytes.max(0) as u64;
    let (status, range) = match parse_range(&headers, size) {
        Ok(Some(r)) => (StatusCode::PARTIAL_CONTENT, r),
        Ok(None) => (StatusCode::OK, 0..size),
        Err(()) => {
            let mut r = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}"))
                    .unwrap_or(HeaderValue::from_static("bytes */0")),
            );
            return r;
        }
    };
    let body = if range.is_empty() {
        Body::empty()
    } else {
        match assets.read(&a, range.clone()).await {
            Ok(stream) => {
                Body::from_stream(stream.map_err(|e| std::io::Error::other(e.to_string())))
            }
            Err(e) => return error(e),
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    let put = |h: &mut HeaderMap, k: header::HeaderName, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    put(h, header::CONTENT_TYPE, a.content_type.clone());
    put(
        h,
        header::CONTENT_LENGTH,
        (range.end - range.start).to_string(),
    );
    put(h, header::ETAG, format!("\"{}\"", a.sha256));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT {
        put(
            h,
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{size}", range.start, range.end - 1),
        );
    }
    response
}

async fn upload(
    State(assets): State<Assets>,
    Path((project, id)): Path<(Uuid, Uuid)>,
    Query(q): Query<Signed>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(e) = check(&assets, UrlMethod::Put, project, id, &q) {
        return error(e);
    }
    let a = match load(&assets, project, id).await {
        Ok(a) => a,
        Err(e) => return error(e),
    };
    let size = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok());
    let sha256 = headers
        .get("x-mediaplane-sha256")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let chunks = body
        .into_data_stream()
        .map(|r| r.map_err(|e| AppError::Aborted(format!("upload body broken: {e}"))));
    match assets
        .upload(a, Box::pin(chunks), Expected { sha256, size })
        .await
    {
        Ok(ready) => {
            let body = serde_json::json!({
                "name": crate::assets::name(&ready),
                "state": "READY",
                "sizeBytes": ready.size_bytes.to_string(),
                "sha256": ready.sha256,
                "contentType": ready.content_type,
            });
            (StatusCode::OK, Json(body)).into_response()
        }
        Err(e) => error(e),
    }
}
