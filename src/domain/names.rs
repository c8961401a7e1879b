//! Resource names (AIP-122): `projects/{uuid}` and children.
use uuid::Uuid;

use crate::{AppError, AppResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProjectName(pub Uuid);

impl ProjectName {
    /// Parses `projects/{uuid}`; `field` names the request field in the error.
    pub fn parse(field: &str, name: &str) -> AppResult<Self> {
        let id = name
            .strip_prefix("projects/")
            .filter(|rest| !rest.contains('/'))
            .ok_or_else(|| {
                AppError::invalid(field, "expected a name of the form projects/{project}")
            })?;
        Uuid::try_parse(id)
            .map(Self)
            .map_err(|_| AppError::invalid(field, "the project id in the name is not a valid id"))
    }
}

impl std::fmt::Display for ProjectName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "projects/{}", self.0)
    }
}

/// `projects/{project}/jobs/{job}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JobName {
    pub project: Uuid,
    pub job: Uuid,
}

impl JobName {
    pub fn parse(field: &str, name: &str) -> AppResult<Self> {
        let (project, job) = parse_child(name, "jobs").ok_or_else(|| {
            AppError::invalid(
                field,
                "expected a name of the form projects/{project}/jobs/{job}",
            )
        })?;
        Ok(Self { project, job })
    }
}

impl std::fmt::Display for JobName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "projects/{}/jobs/{}", self.project, self.job)
    }
}

/// `projects/{project}/assets/{asset}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AssetName {
    pub project: Uuid,
    pub asset: Uuid,
}

impl AssetName {
    pub fn parse(field: &str, name: &str) -> AppResult<Self> {
        let (project, asset) = parse_child(name, "assets").ok_or_else(|| {
            AppError::invalid(
                field,
                "expected a name of the form projects/{project}/assets/{asset}",
            )
        })?;
        Ok(Self { project, asset })
    }
}

impl std::fmt::Display for AssetName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "projects/{}/assets/{}", self.project, self.asset)
    }
}

/// `projects/{uuid}/{collection}/{uuid}`.
fn parse_child(name: &str, collection: &str) -> Option<(Uuid, Uuid)> {
    let mut parts = name.split('/');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("projects"), Some(p), Some(c), Some(id), None) if c == collection => {
            Some((Uuid::try_parse(p).ok()?, Uuid::try_parse(id).ok()?))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let id = Uuid::now_v7();
        assert_eq!(
            ProjectName::parse("name", &format!("projects/{id}"))
                .unwrap()
                .0,
            id
        );
        for bad in [
            "",
            "projects/",
            "projects/x",
            "folders/1",
            &format!("projects/{id}/jobs/1"),
        ] {
            assert!(ProjectName::parse("name", bad).is_err(), "{bad}");
        }
    }
}
