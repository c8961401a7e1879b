//! Object storage for asset bytes, through `object_store`: a local directory by
//! default, any S3-compatible service in production. Keys are built from ids only.
//! Local bytes are written and read by `local.rs` (direct I/O); the S3 calls around
//! direct uploads (checksums, multipart, HEAD) are in `direct.rs`.
use std::{ops::Range, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt, TryStreamExt, stream::BoxStream};
use object_store::{
    GetOptions, GetRange, GetResultPayload, ObjectStore, ObjectStoreExt, WriteMultipart,
    path::Path, signer::Signer,
};
use uuid::Uuid;

pub use crate::config::StorageSettings;

mod direct;
mod local;
pub use direct::{Refused, StoredObject};
pub use local::LocalWriter;
use local::file_chunks;

#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    /// Present for S3: presigned URLs come from the store itself.
    signer: Option<Arc<dyn Signer>>,
    prefix: Path,
    /// The directory of a local store: uploads are written there directly.
    local_dir: Option<Arc<std::path::Path>>,
    /// For S3 calls made through URLs this server presigns (`direct.rs`).
    http: s3_http::Client,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Storage({})", self.store)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("storage: {0}")]
pub struct StorageError(pub String);

impl From<object_store::Error> for StorageError {
    fn from(e: object_store::Error) -> Self {
        Self(e.to_string())
    }
}

impl From<StorageError> for crate::AppError {
    fn from(e: StorageError) -> Self {
        crate::AppError::Unavailable(e.0)
    }
}

impl Storage {
    pub fn open(settings: &StorageSettings) -> Result<Self, StorageError> {
        if let Some(rest) = settings.url.strip_prefix("file://") {
            let dir = std::path::PathBuf::from(if rest.is_empty() { "." } else { rest });
            std::fs::create_dir_all(&dir)
                .map_err(|e| StorageError(format!("cannot create {}: {e}", dir.display())))?;
            let dir = dir
                .canonicalize()
                .map_err(|e| StorageError(format!("{}: {e}", dir.display())))?;
            // Whatever is written is on disk before it is acknowledged, as S3 acknowledges
            // a PUT (uploads themselves go through `LocalWriter`, which fsyncs too):
            // otherwise a crash could leave a READY asset pointing at a truncated file.
            let store =
                object_store::local::LocalFileSystem::new_with_prefix(&dir)?.with_fsync(true);
            return Ok(Self {
                store: Arc::new(store),
                signer: None,
                prefix: Path::default(),
                local_dir: Some(dir.into()),
                http: s3_http::Client::new(),
            });
        }
        if let Some(rest) = settings.url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let mut builder = object_store::aws::AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_region(&settings.s3_region);
            if let Some(endpoint) = &settings.s3_endpoint {
                builder = builder
                    .with_endpoint(endpoint)
                    .with_allow_http(endpoint.starts_with("http://"))
                    .with_virtual_hosted_style_request(false);
            }
            if let (Some(id), Some(secret)) =
                (&settings.s3_access_key_id, &settings.s3_secret_access_key)
            {
                builder = builder
                    .with_access_key_id(id)
                    .with_secret_access_key(secret.expose());
            }
            let s3 = Arc::new(builder.build()?);
            return Ok(Self {
                store: s3.clone(),
                signer: Some(s3),
                prefix: Path::from(prefix),
                local_dir: None,
                http: s3_http::Client::new(),
            });
        }
        Err(StorageError(format!(
            "unsupported storage URL {:?}: use file:///dir or s3://bucket",
            settings.url
        )))
    }

    fn path(&self, key: &str) -> Path {
        self.prefix.parts().chain(Path::from(key).parts()).collect()
    }

    /// A fresh key for one upload attempt of an asset: ids only, never client text.
    pub fn new_key(project: Uuid, asset: Uuid) -> String {
        Self::upload_key(project, asset, Uuid::now_v7())
    }

    /// The key of upload `id` of an asset.
    pub fn upload_key(project: Uuid, asset: Uuid, id: Uuid) -> String {
        format!("projects/{project}/assets/{asset}/{id}")
    }

    pub fn uploader(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Upload, StorageError>> + Send + '_ {
        let path = self.path(key);
        async move {
            if let Some(dir) = &self.local_dir {
                let file = dir.join(path.as_ref());
                return Ok(Upload::Local(
                    tokio::task::spawn_blocking(move || LocalWriter::start(file))
                        .await
                        .map_err(|e| StorageError(format!("upload: {e}")))??,
                ));
            }
            let upload = self.store.put_multipart(&path).await?;
            Ok(Upload::Multipart(WriteMultipart::new_with_chunk_size(
                upload,
                5 * 1024 * 1024,
            )))
        }
    }

    /// The bytes in `range` (all when `None`) as chunks of `chunk` bytes (the last
    /// may be shorter).
    pub async fn read(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        chunk: usize,
    ) -> Result<BoxStream<'static, Result<Bytes, StorageError>>, StorageError> {
        let options = GetOptions {
            range: range.map(GetRange::Bounded),
            ..Default::default()
        };
        let result = self.store.get_opts(&self.path(key), options).await?;
        let range = result.range.clone();
        Ok(match result.payload {
            // object_store reads local files 8 KiB per blocking task; whole chunks,
            // one ahead, are what a stream of 1 MiB messages needs.
            GetResultPayload::File(file, path) => file_chunks(file, &path, range, chunk).boxed(),
            GetResultPayload::Stream(stream) => {
                rechunk(stream.map_err(StorageError::from), chunk).boxed()
            }
        })
    }

    pub async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn exists(&self, key: &str) -> Result<bool, StorageError> {
        match self.store.head(&self.path(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the store hands out its own signed URLs (S3); a local store does not.
    pub fn presigns(&self) -> bool {
        self.signer.is_some()
    }

    /// A URL signed by the store itself for `method` on `key` (S3); `None` for a local
    /// store, whose URLs mediaplane signs and serves.
    pub async fn presigned(
        &self,
        method: http::Method,
        key: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StorageError> {
        match &self.signer {
            Some(signer) => Ok(Some(
                signer
                    .signed_url(method, &self.path(key), ttl)
                    .await?
                    .to_string(),
            )),
            None => Ok(None),
        }
    }

    /// The origin (`https://host[:port]`) of the URLs the store signs, if it signs any:
    /// the studio page's CSP lets previews, downloads and uploads reach it.
    pub async fn presign_origin(&self) -> Option<String> {
        let signer = self.signer.as_ref()?;
        let url = signer
            .signed_url(
                http::Method::GET,
                &self.path("origin-probe"),
                Duration::from_secs(60),
            )
            .await
            .ok()?;
        Some(url.origin().ascii_serialization())
    }

    /// A copy made by the store (server-side on S3: the bytes do not pass through here).
    pub async fn copy(&self, from: &str, to: &str) -> Result<(), StorageError> {
        Ok(self.store.copy(&self.path(from), &self.path(to)).await?)
    }
}

/// Regroups a byte stream into chunks of `size` bytes (the last may be shorter).
/// Pieces that already have that size pass through without a copy.
pub fn rechunk<S, E>(
    stream: S,
    size: usize,
) -> impl Stream<Item = Result<Bytes, E>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
{
    futures::stream::unfold(
        (Box::pin(stream), BytesMut::new(), false),
        move |(mut stream, mut buf, mut done)| async move {
            loop {
                if buf.len() >= size {
                    let chunk = buf.split_to(size).freeze();
                    return Some((Ok(chunk), (stream, buf, done)));
                }
                if done {
                    if buf.is_empty() {
                        return None;
                    }
                    let chunk = buf.split().freeze();
                    return Some((Ok(chunk), (stream, buf, done)));
                }
                match stream.next().await {
                    Some(Ok(bytes)) if buf.is_empty() && bytes.len() == size => {
                        return Some((Ok(bytes), (stream, buf, done)));
                    }
                    Some(Ok(bytes)) => buf.extend_from_slice(&bytes),
                    Some(Err(e)) => return Some((Err(e), (stream, buf, true))),
                    None => done = true,
                }
            }
        },
    )
}

/// A streaming write; memory is bounded by the part size times the parts in flight.
pub enum Upload {
    /// S3: parts of 5 MiB, two in flight.
    Multipart(WriteMultipart),
    Local(LocalWriter),
}

impl Upload {
    /// Queues `chunk` for writing without copying it.
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError> {
        match self {
            Upload::Multipart(writer) => {
                writer.wait_for_capacity(2).await?;
                writer.put(chunk);
                Ok(())
            }
            Upload::Local(local) => local.write(chunk).await,
        }
    }

    /// Returns once the object is stored durably.
    pub async fn finish(self) -> Result<(), StorageError> {
        match self {
            Upload::Multipart(writer) => {
                writer.finish().await?;
                Ok(())
            }
            Upload::Local(local) => local.finish().await,
        }
    }

    pub async fn abort(self) {
        match self {
            Upload::Multipart(writer) => {
                let _ = writer.abort().await;
            }
            Upload::Local(local) => local.abort().await,
        }
    }
}
