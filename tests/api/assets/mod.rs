//! Assets: metadata, streamed bytes, signed URLs, isolation, limits, job outputs,
//! one file per behaviour with the shared helpers here.
use std::time::Duration;

use mediaplane::proto::v1::{
    self as pb, asset::State, create_signed_url_request::Method,
    upload_asset_content_request::Payload,
};
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::helpers::*;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Deterministic pseudo-random bytes (incompressible, no recognizable header).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn png(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&[
        0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13, b'I', b'H', b'D', b'R',
    ]);
    v.extend(noise(len - v.len(), 7));
    v
}

fn header_create(
    parent: &str,
    display_name: &str,
    sha256: &str,
    size: i64,
) -> pb::UploadAssetContentRequest {
    pb::UploadAssetContentRequest {
        payload: Some(Payload::Header(pb::UploadAssetHeader {
            name: String::new(),
            create: Some(pb::CreateAssetRequest {
                parent: parent.into(),
                asset: Some(pb::Asset {
                    display_name: display_name.into(),
                    content_type: "application/octet-stream".into(),
                    ..Default::default()
                }),
                request_id: String::new(),
            }),
            sha256: sha256.into(),
            size_bytes: size,
        })),
    }
}

fn messages(
    header: pb::UploadAssetContentRequest,
    data: &[u8],
) -> Vec<pb::UploadAssetContentRequest> {
    let mut out = vec![header];
    out.extend(
        data.chunks(1024 * 1024)
            .map(|c| pb::UploadAssetContentRequest {
                payload: Some(Payload::Chunk(bytes::Bytes::copy_from_slice(c))),
            }),
    );
    out
}

pub(crate) async fn upload(
    app: &TestApp,
    t: &str,
    parent: &str,
    data: &[u8],
) -> Result<pb::Asset, tonic::Status> {
    let sha = hex(&Sha256::digest(data));
    let msgs = messages(
        header_create(parent, "clip.bin", &sha, data.len() as i64),
        data,
    );
    app.assets(t)
        .upload_asset_content(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

async fn download(
    app: &TestApp,
    t: &str,
    name: &str,
    offset: i64,
    length: i64,
) -> Result<(pb::Asset, Vec<u8>), tonic::Status> {
    let mut stream = app
        .assets(t)
        .download_asset_content(pb::DownloadAssetContentRequest {
            name: name.into(),
            offset,
            length,
        })
        .await?
        .into_inner();
    let mut meta = None;
    let mut bytes = Vec::new();
    while let Some(msg) = stream.next().await {
        match msg?.payload {
            Some(pb::download_asset_content_response::Payload::Asset(a)) => meta = Some(a),
            Some(pb::download_asset_content_response::Payload::Chunk(c)) => {
                assert!(c.len() <= 1024 * 1024, "chunks are at most 1 MiB");
                bytes.extend(c);
            }
            None => {}
        }
    }
    Ok((meta.expect("metadata comes first"), bytes))
}

/// Files under the test's storage directory (the bytes of every asset).
fn stored_files(app: &TestApp) -> Vec<std::path::PathBuf> {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out)
                } else {
                    out.push(p)
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(&app.db.storage_dir(), &mut out);
    out
}

mod content;
mod direct;
mod ownership;
mod s3;
mod urls;
