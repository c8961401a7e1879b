//! Projects: validation rules, updates by field mask, list queries.
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::{Violations, labels, labels::LabelFilter, names::ProjectName, page};
use crate::{AppError, AppResult};

pub const MAX_DISPLAY_NAME: usize = 200;
pub const MAX_DESCRIPTION: usize = 2000;
pub const MAX_METADATA_BYTES: usize = 64 * 1024;
pub const MAX_REQUEST_ID: usize = 128;

/// A stored project.
#[derive(Debug, Clone, PartialEq)]
pub struct Project {
    pub id: Uuid,
    pub owner: String,
    pub display_name: String,
    pub description: String,
    pub labels: BTreeMap<String, String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub revision: i64,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
}

impl Project {
    pub fn name(&self) -> ProjectName {
        ProjectName(self.id)
    }

    /// Opaque to clients; derived from the revision the database bumps on every update.
    pub fn etag(&self) -> String {
        etag_of(self.revision)
    }
}

pub fn etag_of(revision: i64) -> String {
    format!("r{revision}")
}

/// The revision an etag names, or `None` when it was not issued by us (never matches).
pub fn revision_of(etag: &str) -> Option<i64> {
    etag.strip_prefix('r')?.parse().ok()
}

/// The client-settable fields of a project, validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProjectFields {
    pub display_name: String,
    pub description: String,
    pub labels: BTreeMap<String, String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

impl ProjectFields {
    /// Checks the fields named by `paths` (all of them on create), prefixing field
    /// names in violations with `prefix` (`project.`).
    pub fn validate(&self, prefix: &str, paths: &[Path], v: &mut Violations) {
        for path in paths {
            match path {
                Path::DisplayName => {
                    let n = self.display_name.chars().count();
                    if n == 0
                        || n > MAX_DISPLAY_NAME
                        || self.display_name.trim().is_empty()
                        || self.display_name.chars().any(char::is_control)
                    {
                        v.add(
                            format!("{prefix}display_name"),
                            format!(
                                "required, 1 to {MAX_DISPLAY_NAME} characters, not only spaces, no control characters"
                            ),
                        );
                    }
                }
                Path::Description => {
                    if self.description.chars().count() > MAX_DESCRIPTION
                        || !super::text::storable(&self.description)
                    {
                        v.add(
                            format!("{prefix}description"),
                            format!("at most {MAX_DESCRIPTION} characters, without NUL"),
                        );
                    }
                }
                Path::Labels => labels::validate(&format!("{prefix}labels"), &self.labels, v),
                Path::Metadata => {
                    let size = serde_json::to_vec(&self.metadata)
                        .map(|b| b.len())
                        .unwrap_or(usize::MAX);
                    if size > MAX_METADATA_BYTES {
                        v.add(
                            format!("{prefix}metadata"),
                            format!("at most {MAX_METADATA_BYTES} bytes as JSON"),
                        );
                    }
                }
            }
        }
    }

    /// Digest of the payload, to tell a retried create from a different one.
    pub fn digest(&self) -> Vec<u8> {
        use sha2::{Digest, Sha256};
        // BTreeMap / serde_json::Map are ordered, so equal payloads serialize equally.
        Sha256::digest(serde_json::to_vec(self).unwrap_or_default()).to_vec()
    }
}

/// Update-mask paths clients may set (the mass-assignment allow-list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    DisplayName,
    Description,
    Labels,
    Metadata,
}

pub const ALL_PATHS: [Path; 4] = [
    Path::DisplayName,
    Path::Description,
    Path::Labels,
    Path::Metadata,
];

const IMMUTABLE_PATHS: &[&str] = &["name", "owner", "create_time", "update_time", "etag"];

/// Parses an update mask against the allow-list.
pub fn parse_mask(paths: &[String]) -> AppResult<Vec<Path>> {
    let mut v = Violations::default();
    let mut out = Vec::new();
    if paths.is_empty() {
        v.add("update_mask", "required: name the fields to update (display_name, description, labels, metadata) or `*`");
    }
    for p in paths {
        let parsed = match p.as_str() {
            "*" => {
                out.extend(ALL_PATHS);
                continue;
            }
            "display_name" | "displayName" => Path::DisplayName,
            "description" => Path::Description,
            "labels" => Path::Labels,
            "metadata" => Path::Metadata,
            other
                if IMMUTABLE_PATHS.contains(&other)
                    || other == "createTime"
                    || other == "updateTime" =>
            {
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
                        "unknown field `{}`; updatable: display_name, description, labels, metadata",
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
    out.dedup();
    v.into_result(out)
}

/// Sort order of ListProjects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    CreateTimeAsc,
    CreateTimeDesc,
}

impl Order {
    pub fn parse(order_by: &str) -> AppResult<Self> {
        let words: Vec<&str> = order_by.split_whitespace().collect();
        match words.as_slice() {
            [] | ["create_time", "desc"] => Ok(Self::CreateTimeDesc),
            ["create_time"] | ["create_time", "asc"] => Ok(Self::CreateTimeAsc),
            _ => Err(AppError::invalid(
                "order_by",
                "supported: `create_time`, `create_time asc`, `create_time desc`",
            )),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::CreateTimeAsc => "asc",
            Self::CreateTimeDesc => "desc",
        }
    }
}

/// A validated ListProjects request.
#[derive(Debug, Clone)]
pub struct ListQuery {
    /// `None`: every owner (admins).
    pub owner: Option<String>,
    pub filter: LabelFilter,
    pub order: Order,
    pub limit: i64,
    pub after: Option<page::Cursor>,
    fingerprint: String,
}

impl ListQuery {
    pub fn new(
        owner: Option<&str>,
        page_size: i32,
        page_token: &str,
        filter: &str,
        order_by: &str,
    ) -> AppResult<Self> {
        let filter = LabelFilter::parse(filter).map_err(|why| AppError::invalid("filter", why))?;
        let order = Order::parse(order_by)?;
        let limit = page::page_size(page_size)?;
        let fingerprint = page::fingerprint(&[
            "projects",
            owner.unwrap_or("*"),
            &filter.canonical(),
            order.as_str(),
        ]);
        let after = page::decode(page_token, &fingerprint)?;
        Ok(Self {
            owner: owner.map(str::to_owned),
            filter,
            order,
            limit,
            after,
            fingerprint,
        })
    }

    /// `last`: the cursor of the last project sent.
    pub fn next_token(&self, more: bool, last: Option<page::Cursor>) -> String {
        page::next_token(more, last, &self.fingerprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_allow_list() {
        assert_eq!(
            parse_mask(&["display_name".into(), "labels".into()]).unwrap(),
            vec![Path::DisplayName, Path::Labels]
        );
        assert_eq!(parse_mask(&["*".into()]).unwrap().len(), 4);
        assert!(parse_mask(&["owner".into()]).is_err());
        assert!(parse_mask(&["nope".into()]).is_err());
        assert!(parse_mask(&[]).is_err());
    }

    #[test]
    fn etags() {
        assert_eq!(revision_of(&etag_of(7)), Some(7));
        assert_eq!(revision_of("W/x"), None);
    }
}
