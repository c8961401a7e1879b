//! Assets: states, validation, list filters, signed-URL tokens.
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

use super::{Violations, labels};

pub const MAX_DISPLAY_NAME: usize = 512;
pub const MAX_CONTENT_TYPE: usize = 255;
pub const MAX_METADATA_BYTES: usize = 64 * 1024;
/// Largest chunk in an upload or download message.
pub const CHUNK: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssetState {
    Pending,
    Ready,
    Failed,
}

impl AssetState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Ready => "ready",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "pending" => Self::Pending,
            "ready" => Self::Ready,
            "failed" => Self::Failed,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Asset {
    pub id: Uuid,
    pub project_id: Uuid,
    pub owner: String,
    pub display_name: String,
    pub content_type: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub state: AssetState,
    pub labels: BTreeMap<String, String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub source_job: Option<Uuid>,
    pub object_key: Option<String>,
    pub revision: i64,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
}

impl Asset {
    pub fn etag(&self) -> String {
        super::project::etag_of(self.revision)
    }
}

/// Client-settable fields of an asset.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AssetFields {
    pub display_name: String,
    pub content_type: String,
    pub labels: BTreeMap<String, String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

pub fn valid_content_type(ct: &str) -> bool {
    let Some((ty, sub)) = ct.split(';').next().unwrap_or("").trim().split_once('/') else {
        return false;
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    ct.len() <= MAX_CONTENT_TYPE && token(ty) && token(sub)
}

impl AssetFields {
    pub fn validate(&self, prefix: &str, paths: &[Path], v: &mut Violations) {
        for path in paths {
            match path {
                Path::DisplayName => {
                    if self.display_name.chars().count() > MAX_DISPLAY_NAME
                        || self.display_name.chars().any(char::is_control)
                    {
                        v.add(
                            format!("{prefix}display_name"),
                            format!("at most {MAX_DISPLAY_NAME} characters, no control characters"),
                        );
                    }
                }
                Path::ContentType => {
                    if !self.content_type.is_empty() && !valid_content_type(&self.content_type) {
                        v.add(
                            format!("{prefix}content_type"),
                            "a media type like video/mp4",
                        );
                    }
                }
                Path::Labels => labels::validate(&format!("{prefix}labels"), &self.labels, v),
                Path::Metadata => {
                    if serde_json::to_vec(&self.metadata)
                        .map_or(true, |b| b.len() > MAX_METADATA_BYTES)
                    {
                        v.add(
                            format!("{prefix}metadata"),
                            format!("at most {MAX_METADATA_BYTES} bytes as JSON"),
                        );
                    }
                }
            }
        }
    }

    pub fn digest(&self) -> Vec<u8> {
        use sha2::Digest;
        Sha256::digest(serde_json::to_vec(self).unwrap_or_default()).to_vec()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    DisplayName,
    ContentType,
    Labels,
    Metadata,
}

pub const CREATE_PATHS: [Path; 4] = [
    Path::DisplayName,
    Path::ContentType,
    Path::Labels,
    Path::Metadata,
];

/// UpdateAsset mask: display_name, labels, metadata (content type and bytes are the upload's).
pub fn parse_mask(paths: &[String]) -> crate::AppResult<Vec<Path>> {
    let mut v = Violations::default();
    let mut out = Vec::new();
    if paths.is_empty() {
        v.add(
            "update_mask",
            "required: name the fields to update (display_name, labels, metadata) or `*`",
        );
    }
    for p in paths {
        let parsed = match p.as_str() {
            "*" => {
                out.extend([Path::DisplayName, Path::Labels, Path::Metadata]);
                continue;
            }
            "display_name" | "displayName" => Path::DisplayName,
            "labels" => Path::Labels,
            "metadata" => Path::Metadata,
            other @ ("name" | "content_type" | "contentType" | "size_bytes" | "sizeBytes"
            | "sha256" | "state" | "source_job" | "sourceJob" | "create_time"
            | "createTime" | "update_time" | "updateTime" | "etag") => {
                v.add(
                    "update_mask",
                    format!(
                        "`{}` is output only or immutable",
                        super::text::quote(other)
                    ),
                );
                continue;
            }
            other => {
                v.add(
                    "update_mask",
                    format!(
                        "unknown field `{}`; updatable: display_name, labels, metadata",
                        super::text::quote(other)
                    ),
                );
                continue;
            }
        };
        if !out.contains(&parsed) {
            out.push(parsed);
        }
    }
    v.into_result(out)
}

/// ListAssets filter: `state = READY AND content_type = "video/*" AND labels.k = "v"`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AssetFilter {
    pub states: Vec<AssetState>,
    /// Exact type, or a prefix when the filter ends with `*`.
    pub content_type_prefix: Option<String>,
    pub labels: BTreeMap<String, String>,
}

impl AssetFilter {
    pub fn parse(filter: &str) -> Result<Self, String> {
        let mut out = Self::default();
        if filter.trim().is_empty() {
            return Ok(out);
        }
        for term in filter.split(" AND ") {
            let (field, value) = term.split_once('=').ok_or_else(|| {
                format!(
                    "unsupported term `{}`: expected FIELD = VALUE",
                    super::text::quote(term.trim())
                )
            })?;
            let value = value.trim().trim_matches('"').to_owned();
            if !super::text::storable(&value) {
                return Err("filter values may not contain NUL".into());
            }
            match field.trim() {
                "state" => out
                    .states
                    .push(AssetState::parse(&value).ok_or_else(|| {
                        format!("unknown state `{}`", super::text::quote(&value))
                    })?),
                "content_type" => {
                    out.content_type_prefix = Some(value.trim_end_matches('*').to_owned())
                }
                key if key.starts_with("labels.") => {
                    out.labels
                        .insert(key.trim_start_matches("labels.").to_owned(), value);
                }
                other => {
                    return Err(format!(
                        "cannot filter on `{}`: use state, content_type or labels.KEY",
                        super::text::quote(other)
                    ));
                }
            }
        }
        Ok(out)
    }

    pub fn canonical(&self) -> String {
        format!(
            "{:?}|{:?}|{:?}",
            self.states, self.content_type_prefix, self.labels
        )
    }
}

/// What a signed URL allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlMethod {
    Get,
    Put,
}

impl UrlMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Put => "PUT",
        }
    }
}

/// HMAC-SHA256 over method, asset and expiry, hex encoded.
pub fn url_signature(
    key: &[u8],
    method: UrlMethod,
    project: Uuid,
    asset: Uuid,
    expires: i64,
) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any size"));
    mac.update(format!("{}\n{project}\n{asset}\n{expires}", method.as_str()).as_bytes());
    hex(&mac.finalize().into_bytes())
}

/// Constant-time check of a signature from a URL.
pub fn verify_url_signature(
    key: &[u8],
    method: UrlMethod,
    project: Uuid,
    asset: Uuid,
    expires: i64,
    signature: &str,
) -> bool {
    let Some(given) = unhex(signature) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any size"));
    mac.update(format!("{}\n{project}\n{asset}\n{expires}", method.as_str()).as_bytes());
    mac.verify_slice(&given).is_ok()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A page of a project's assets, as ListAssets asks for it.
pub struct ListAssets {
    pub owner: Option<String>,
    pub project: Uuid,
    pub filter: AssetFilter,
    pub limit: i64,
    pub after: Option<super::page::Cursor>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures() {
        let (p, a) = (Uuid::now_v7(), Uuid::now_v7());
        let sig = url_signature(b"k", UrlMethod::Get, p, a, 100);
        assert!(verify_url_signature(b"k", UrlMethod::Get, p, a, 100, &sig));
        assert!(!verify_url_signature(b"k", UrlMethod::Put, p, a, 100, &sig));
        assert!(!verify_url_signature(
            b"k",
            UrlMethod::Get,
            p,
            Uuid::now_v7(),
            100,
            &sig
        ));
        assert!(!verify_url_signature(b"k", UrlMethod::Get, p, a, 101, &sig));
        assert!(!verify_url_signature(
            b"other",
            UrlMethod::Get,
            p,
            a,
            100,
            &sig
        ));
        assert!(!verify_url_signature(b"k", UrlMethod::Get, p, a, 100, "zz"));
    }

    #[test]
    fn content_types_and_filters() {
        assert!(valid_content_type("video/mp4") && valid_content_type("text/plain; charset=utf-8"));
        assert!(!valid_content_type("mp4") && !valid_content_type("a/b/c d"));
        let f =
            AssetFilter::parse(r#"state = READY AND content_type = "video/*" AND labels.k = "v""#)
                .unwrap();
        assert_eq!(f.states, vec![AssetState::Ready]);
        assert_eq!(f.content_type_prefix.as_deref(), Some("video/"));
    }
}
