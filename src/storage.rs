//! Object storage for asset bytes, through `object_store`: a local directory by
//! default, any S3-compatible service in production. Keys are built from ids only.
use std::{ops::Range, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use object_store::{
    GetOptions, GetRange, ObjectStore, ObjectStoreExt, WriteMultipart, path::Path, signer::Signer,
};
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct StorageSettings {
    /// `file:///abs/dir`, `file://./relative` or `s3://bucket[/prefix]`.
    pub url: String,
    pub s3_endpoint: Option<String>,
    pub s3_region: String,
    pub s3_access_key_id: Option<String>,
    pub s3_secret_access_key: Option<crate::config::Secret>,
}

#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    /// Present for S3: presigned GET URLs come from the store itself.
    signer: Option<Arc<dyn Signer>>,
    prefix: Path,
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
            let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)?;
            return Ok(Self {
                store: Arc::new(store),
                signer: None,
                prefix: Path::default(),
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
        format!("projects/{project}/assets/{asset}/{}", Uuid::now_v7())
    }

    pub fn uploader(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Upload, StorageError>> + Send + '_ {
        let path = self.path(key);
        async move {
            let upload = self.store.put_multipart(&path).await?;
            Ok(Upload {
                writer: Some(WriteMultipart::new_with_chunk_size(upload, 5 * 1024 * 1024)),
            })
        }
    }

    /// The bytes in `range` (all when `None`) as a stream of chunks.
    pub async fn read(
        &self,
        key: &str,
        range: Option<Range<u64>>,
    ) -> Result<impl Stream<Item = Result<Bytes, StorageError>> + Send + 'static, StorageError>
    {
        let options = GetOptions {
            range: range.map(GetRange::Bounded),
            ..Default::default()
        };
        let result = self.store.get_opts(&self.path(key), options).await?;
        Ok(result.into_stream().map_err(StorageError::from))
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

    /// A presigned GET URL when the store can make one (S3).
    pub async fn presigned_get(
        &self,
        key: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StorageError> {
        match &self.signer {
            Some(signer) => Ok(Some(
                signer
                    .signed_url(http::Method::GET, &self.path(key), ttl)
                    .await?
                    .to_string(),
            )),
            None => Ok(None),
        }
    }
}

/// A streaming write; memory is bounded by the part size times the parts in flight.
pub struct Upload {
    writer: Option<WriteMultipart>,
}

impl Upload {
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), StorageError> {
        let writer = self
            .writer
            .as_mut()
            .ok_or_else(|| StorageError("upload already finished".into()))?;
        writer.wait_for_capacity(2).await?;
        writer.write(chunk);
        Ok(())
    }

    pub async fn finish(mut self) -> Result<(), StorageError> {
        let writer = self
            .writer
            .take()
            .ok_or_else(|| StorageError("upload already finished".into()))?;
        writer.finish().await?;
        Ok(())
    }

    pub async fn abort(mut self) {
        if let Some(writer) = self.writer.take() {
            let _ = writer.abort().await;
        }
    }
}
