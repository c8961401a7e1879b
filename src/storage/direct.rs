//! Direct uploads on S3-compatible storage: URLs that bind a SHA-256 the store enforces,
//! and the few S3 calls the server makes itself around them (start and complete a
//! multipart upload with checksums, HEAD with checksum mode). object_store's typed API
//! does not expose checksums on these calls, so they go through URLs object_store
//! presigns (its SigV4 signer), sent with the same HTTP client crate it uses. The
//! server never handles the bytes on this path.
use std::time::Duration;

use object_store::signer::{HeaderName, HeaderValue, SignedUrlOptions};
use serde::Deserialize;

use super::{Storage, StorageError};

const CHECKSUM_SHA256: &str = "x-amz-checksum-sha256";

/// What the store says about an object (a HEAD).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub size: u64,
    /// `x-amz-checksum-sha256` as the store reports it: base64, with `-N` for a
    /// multipart object (the checksum of its parts' checksums). `None`: not reported.
    pub sha256: Option<String>,
}

/// The store refused a request for a reason the client caused (its S3 error code and
/// message), as opposed to the store being unreachable.
#[derive(Debug, Clone)]
pub struct Refused(pub String);

impl Storage {
    fn signer(&self) -> Result<&std::sync::Arc<dyn object_store::signer::Signer>, StorageError> {
        self.signer
            .as_ref()
            .ok_or_else(|| StorageError("the store does not presign URLs".into()))
    }

    /// A URL for `method` on `key`, signed with extra query parameters and with headers
    /// the request must carry (exactly these values).
    async fn presigned_with(
        &self,
        method: http::Method,
        key: &str,
        ttl: Duration,
        query: &[(&str, &str)],
        headers: &[(&'static str, &str)],
    ) -> Result<String, StorageError> {
        let mut options =
            SignedUrlOptions::default().with_query(query.iter().map(|(k, v)| (*k, *v)));
        for (name, value) in headers {
            let value = HeaderValue::from_str(value)
                .map_err(|e| StorageError(format!("header {name}: {e}")))?;
            options = options.with_signed_header(HeaderName::from_static(name), value);
        }
        Ok(self
            .signer()?
            .signed_url_opts(method, &self.path(key), ttl, &options)
            .await?
            .to_string())
    }

    /// A request the server itself sends to the store, through a URL it presigns for a
    /// minute, carrying the headers that URL is signed for.
    async fn request(
        &self,
        method: http::Method,
        key: &str,
        query: &[(&str, &str)],
        headers: &[(&'static str, &str)],
    ) -> Result<s3_http::RequestBuilder, StorageError> {
        let url = self
            .presigned_with(method.clone(), key, Duration::from_secs(60), query, headers)
            .await?;
        let mut request = self.http.request(method, url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Ok(request)
    }

    /// A PUT URL for `key` whose body must hash to `sha256_b64` (the store checks).
    pub async fn presigned_put_checked(
        &self,
        key: &str,
        ttl: Duration,
        sha256_b64: &str,
        part: Option<(u32, &str)>,
    ) -> Result<String, StorageError> {
        let number;
        let query: Vec<(&str, &str)> = match part {
            Some((n, upload_id)) => {
                number = n.to_string();
                vec![("partNumber", number.as_str()), ("uploadId", upload_id)]
            }
            None => Vec::new(),
        };
        self.presigned_with(
            http::Method::PUT,
            key,
            ttl,
            &query,
            &[(CHECKSUM_SHA256, sha256_b64)],
        )
        .await
    }

    /// Starts a multipart upload whose parts carry SHA-256 checksums; its upload id.
    pub async fn start_multipart(&self, key: &str) -> Result<String, StorageError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Initiated {
            upload_id: String,
        }
        let response = self
            .request(
                http::Method::POST,
                key,
                &[("uploads", "")],
                &[("x-amz-checksum-algorithm", "SHA256")],
            )
            .await?
            .send()
            .await
            .map_err(unreachable_store)?;
        let body = ok_body(response).await?.map_err(|r| StorageError(r.0))?;
        let initiated: Initiated = quick_xml::de::from_str(&body)
            .map_err(|e| StorageError(format!("CreateMultipartUpload answer: {e}")))?;
        Ok(initiated.upload_id)
    }

    /// Completes a multipart upload from its parts' ETags and SHA-256 checksums (base64).
    pub async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(String, String)],
    ) -> Result<Result<(), Refused>, StorageError> {
        use quick_xml::escape::escape;
        let mut xml = String::from("<CompleteMultipartUpload>");
        for (i, (etag, sha256)) in parts.iter().enumerate() {
            xml.push_str(&format!(
                "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag><ChecksumSHA256>{}</ChecksumSHA256></Part>",
                i + 1,
                escape(etag.as_str()),
                escape(sha256.as_str())
            ));
        }
        xml.push_str("</CompleteMultipartUpload>");
        let response = self
            .request(http::Method::POST, key, &[("uploadId", upload_id)], &[])
            .await?
            .body(xml)
            .send()
            .await
            .map_err(unreachable_store)?;
        // S3 may answer 200 with an error document once it has started completing.
        Ok(match ok_body(response).await? {
            Ok(body) if body.contains("<Error>") => Err(Refused(error_code(&body))),
            Ok(_) => Ok(()),
            Err(refused) => Err(refused),
        })
    }

    /// Abandons a multipart upload and the parts it holds (a store that no longer knows
    /// it is fine).
    pub async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StorageError> {
        let response = self
            .request(http::Method::DELETE, key, &[("uploadId", upload_id)], &[])
            .await?
            .send()
            .await
            .map_err(unreachable_store)?;
        match ok_body(response).await? {
            Ok(_) => Ok(()),
            Err(Refused(code)) if code.starts_with("NoSuchUpload") => Ok(()),
            Err(Refused(code)) => Err(StorageError(format!("AbortMultipartUpload: {code}"))),
        }
    }

    /// The object's size and SHA-256 checksum as the store reports them; `None` if there is
    /// no object at `key`.
    pub async fn head_checked(&self, key: &str) -> Result<Option<StoredObject>, StorageError> {
        let response = self
            .request(
                http::Method::HEAD,
                key,
                &[],
                &[("x-amz-checksum-mode", "ENABLED")],
            )
            .await?
            .send()
            .await
            .map_err(unreachable_store)?;
        if response.status() == http::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !response.status().is_success() {
            return Err(StorageError(format!("HEAD answered {}", response.status())));
        }
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let size = header("content-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| StorageError("HEAD without a Content-Length".into()))?;
        Ok(Some(StoredObject {
            size,
            sha256: header(CHECKSUM_SHA256),
        }))
    }
}

fn unreachable_store(e: s3_http::Error) -> StorageError {
    StorageError(format!("store unreachable: {e}"))
}

/// The body of a successful answer, or the store's refusal (4xx) with its error code;
/// a 5xx is the store failing.
async fn ok_body(response: s3_http::Response) -> Result<Result<String, Refused>, StorageError> {
    let status = response.status();
    let body = response.text().await.map_err(unreachable_store)?;
    if status.is_success() {
        Ok(Ok(body))
    } else if status.is_client_error() {
        Ok(Err(Refused(error_code(&body))))
    } else {
        Err(StorageError(format!("store answered {status}")))
    }
}

/// `Code: Message` of an S3 error document (or the body's start when it is not one).
fn error_code(body: &str) -> String {
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "PascalCase", default)]
    struct S3Error {
        code: String,
        message: String,
    }
    match quick_xml::de::from_str::<S3Error>(body) {
        Ok(e) if !e.code.is_empty() => format!("{}: {}", e.code, e.message),
        _ => body.chars().take(200).collect(),
    }
}
