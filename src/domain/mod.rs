//! Types and rules of the service, independent of gRPC and of SQL.
pub mod asset;
pub mod job;
pub mod labels;
pub mod names;
pub mod page;
pub mod project;

/// Errors found while validating a request: every one is reported at once.
#[derive(Debug, Default)]
pub struct Violations(Vec<tonic_types::FieldViolation>);

impl Violations {
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0
            .push(tonic_types::FieldViolation::new(field, description));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(value)` when nothing was found, else INVALID_ARGUMENT with every violation.
    pub fn into_result<T>(self, value: T) -> crate::AppResult<T> {
        if self.0.is_empty() {
            return Ok(value);
        }
        let message = match self.0.as_slice() {
            [one] => format!("invalid {}: {}", one.field, one.description),
            many => format!(
                "{} invalid fields: {}",
                many.len(),
                many.iter()
                    .map(|v| v.field.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        Err(crate::AppError::InvalidArgument {
            message,
            violations: self.0,
        })
    }
}
