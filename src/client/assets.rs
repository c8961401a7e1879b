//! `mediaplane assets upload | download`: moving large files the way the server is
//! fastest at. With S3-compatible storage an upload goes straight to the bucket
//! (StartUpload, a PUT per part bound to its SHA-256, FinalizeUpload); otherwise it
//! streams through the server in 1 MiB chunks cut from one reused buffer, over a
//! connection whose HTTP/2 windows and frames fit such chunks (`client::transfer`).
use std::{
    io::Read,
    path::{Path, PathBuf},
    process::ExitCode,
};

use bytes::BytesMut;
use sha2::{Digest, Sha256};

use crate::{client::ClientArgs, domain::asset::hex, proto::v1 as pb};

/// Parts of a direct upload: 16 MiB (S3's minimum is 5 MiB); files up to one part go
/// in a single PUT.
const PART_BYTES: u64 = 16 * 1024 * 1024;
/// Chunks streamed through the server.
const CHUNK: usize = 1024 * 1024;

#[derive(Debug, clap::Subcommand)]
pub enum AssetsCommand {
    /// Upload a file as a new asset of a project; prints the READY asset's name.
    Upload {
        #[command(flatten)]
        client: ClientArgs,
        /// The project (`projects/…`).
        #[arg(long)]
        project: String,
        file: PathBuf,
        /// Declared content type (the server sniffs the bytes when it sees them).
        #[arg(long, default_value = "")]
        content_type: String,
    },
    /// Download an asset's bytes into a file (`-` for standard output).
    Download {
        #[command(flatten)]
        client: ClientArgs,
        /// The asset (`projects/…/assets/…`).
        asset: String,
        #[arg(short, long, default_value = "-")]
        output: PathBuf,
    },
}

fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", s.code(), s.message())
}

/// Size, SHA-256 and each `PART_BYTES` part's SHA-256 of a file, read once.
fn digest(path: &Path) -> anyhow::Result<(u64, String, Vec<String>)> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let (mut whole, mut part) = (Sha256::new(), Sha256::new());
    let (mut size, mut in_part) = (0u64, 0u64);
    let mut parts = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let take = rest.len().min((PART_BYTES - in_part) as usize);
            part.update(&rest[..take]);
            whole.update(&rest[..take]);
            in_part += take as u64;
            rest = &rest[take..];
            if in_part == PART_BYTES {
                parts.push(hex(&std::mem::take(&mut part).finalize()));
                in_part = 0;
            }
        }
        size += n as u64;
    }
    if in_part > 0 {
        parts.push(hex(&part.finalize()));
    }
    Ok((size, hex(&whole.finalize()), parts))
}

pub async fn run(command: AssetsCommand) -> anyhow::Result<ExitCode> {
    match command {
        AssetsCommand::Upload {
            client,
            project,
            file,
            content_type,
        } => {
            let asset = upload(&client, &project, &file, &content_type).await?;
            println!("{}", asset.name);
            eprintln!(
                "{} bytes, sha256 {}, {}",
                asset.size_bytes, asset.sha256, asset.content_type
            );
        }
        AssetsCommand::Download {
            client,
            asset,
            output,
        } => download(&client, &asset, &output).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn upload(
    args: &ClientArgs,
    project: &str,
    path: &Path,
    content_type: &str,
) -> anyhow::Result<pb::Asset> {
    let (size, sha256, parts) = digest(path)?;
    let mut assets = args.assets().await?;
    let display_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let asset = assets
        .create_asset(pb::CreateAssetRequest {
            parent: project.to_owned(),
            asset: Some(pb::Asset {
                display_name,
                content_type: content_type.to_owned(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let multipart = parts.len() > 1;
    let started = assets
        .start_upload(pb::StartUploadRequest {
            name: asset.name.clone(),
            size_bytes: size as i64,
            sha256: sha256.clone(),
            part_size_bytes: if multipart { PART_BYTES as i64 } else { 0 },
            part_sha256: if multipart { parts } else { Vec::new() },
            ttl: None,
        })
        .await;
    match started {
        Ok(started) => direct(&mut assets, &asset.name, path, started.into_inner()).await,
        // Local storage: through the server.
        Err(s) if s.code() == tonic::Code::FailedPrecondition => {
            through_server(&mut assets, &asset.name, path, size, &sha256).await
        }
        Err(s) => Err(status(s)),
    }
}

/// PUTs each part straight to the store, then finalizes.
async fn direct(
    assets: &mut super::AssetsClient,
    name: &str,
    path: &Path,
    started: pb::StartUploadResponse,
) -> anyhow::Result<pb::Asset> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path)?;
    let http = s3_http::Client::new();
    let mut etags = Vec::new();
    for part in &started.parts {
        let mut body = vec![0u8; part.size_bytes as usize];
        file.read_exact_at(&mut body, part.offset as u64)?;
        let mut put = http.put(&part.url).body(body);
        for (k, v) in &part.headers {
            put = put.header(k, v);
        }
        let response = put
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("PUT of part {} failed: {e}", part.part_number))?;
        if !response.status().is_success() {
            let code = response.status();
            let text = response.text().await.unwrap_or_default();
            anyhow::bail!("the store refused part {}: {code} {text}", part.part_number);
        }
        etags.push(
            response
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
        );
    }
    let multipart = started.parts.len() > 1;
    Ok(assets
        .finalize_upload(pb::FinalizeUploadRequest {
            name: name.to_owned(),
            upload_id: started.upload_id,
            part_etags: if multipart { etags } else { Vec::new() },
        })
        .await
        .map_err(status)?
        .into_inner())
}

/// Streams the file through the server in 1 MiB chunks cut from one reused buffer.
async fn through_server(
    assets: &mut super::AssetsClient,
    name: &str,
    path: &Path,
    size: u64,
    sha256: &str,
) -> anyhow::Result<pb::Asset> {
    use pb::upload_asset_content_request::Payload;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let header = pb::UploadAssetContentRequest {
        payload: Some(Payload::Header(pb::UploadAssetHeader {
            name: name.to_owned(),
            sha256: sha256.to_owned(),
            size_bytes: size as i64,
            ..Default::default()
        })),
    };
    let path = path.to_path_buf();
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut file = std::fs::File::open(&path)?;
        if tx.blocking_send(header).is_err() {
            return Ok(());
        }
        let mut pool = BytesMut::new();
        loop {
            if pool.capacity() < CHUNK {
                pool.reserve(8 * CHUNK);
            }
            pool.resize(CHUNK, 0);
            let n = file.read(&mut pool[..])?;
            if n == 0 {
                return Ok(());
            }
            let chunk = pool.split_to(n).freeze();
            pool.clear();
            let msg = pb::UploadAssetContentRequest {
                payload: Some(Payload::Chunk(chunk)),
            };
            if tx.blocking_send(msg).is_err() {
                return Ok(());
            }
        }
    });
    let asset = assets
        .upload_asset_content(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(status)?
        .into_inner();
    reader.await??;
    Ok(asset)
}

async fn download(args: &ClientArgs, name: &str, output: &Path) -> anyhow::Result<()> {
    use pb::download_asset_content_response::Payload;
    use std::io::Write;
    let mut assets = args.assets().await?;
    let mut stream = assets
        .download_asset_content(pb::DownloadAssetContentRequest {
            name: name.to_owned(),
            offset: 0,
            length: 0,
        })
        .await
        .map_err(status)?
        .into_inner();
    // Plain blocking writes: a command line tool with one stream to follow.
    let mut out: Box<dyn Write + Send> = if output.as_os_str() == "-" {
        Box::new(std::io::stdout())
    } else {
        Box::new(std::io::BufWriter::with_capacity(
            CHUNK,
            std::fs::File::create(output)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", output.display()))?,
        ))
    };
    let mut hasher = Sha256::new();
    let mut expected = None;
    while let Some(message) = stream.message().await.map_err(status)? {
        match message.payload {
            Some(Payload::Asset(a)) => expected = Some(a.sha256),
            Some(Payload::Chunk(chunk)) => {
                hasher.update(&chunk);
                out.write_all(&chunk)?;
            }
            None => {}
        }
    }
    out.flush()?;
    let got = hex(&hasher.finalize());
    if let Some(want) = expected
        && !want.is_empty()
        && want != got
    {
        anyhow::bail!("the bytes received hash to {got}, not the asset's {want}");
    }
    Ok(())
}
