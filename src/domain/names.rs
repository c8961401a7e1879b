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
