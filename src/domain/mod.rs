//! Types and rules of the service, independent of gRPC and of SQL.
pub mod asset;
pub mod job;
pub mod labels;
pub mod names;
pub mod page;
pub mod project;
pub mod queue;
pub mod text;

/// Violations listed in one error at most. The details travel in a response header
/// (`grpc-status-details-bin`): a batch of 1,000 bad items listed in full overflows
/// the client's header limit, which fails the whole connection, not just the call.
pub const MAX_REPORTED: usize = 50;

/// Errors found while validating a request: every one is reported at once.
#[derive(Debug, Default)]
pub struct Violations(Vec<crate::error::FieldViolation>);

impl Violations {
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0
            .push(crate::error::FieldViolation::new(field, description));
    }

    /// The value of a check made elsewhere (a name's parse), or `None` with its
    /// violations added here; an error that is not a violation is passed on.
    pub fn check<T>(&mut self, checked: crate::AppResult<T>) -> crate::AppResult<Option<T>> {
        match checked {
            Ok(value) => Ok(Some(value)),
            Err(crate::AppError::InvalidArgument { violations, .. }) => {
                self.0.extend(violations);
                Ok(None)
            }
            Err(other) => Err(other),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(value)` when nothing was found, else INVALID_ARGUMENT with every violation.
    pub fn into_result<T>(self, value: T) -> crate::AppResult<T> {
        if self.0.is_empty() {
            return Ok(value);
        }
        let mut violations = self.0;
        let found = violations.len();
        let message = match violations.as_slice() {
            [one] => format!("invalid {}: {}", one.field, one.description),
            many => format!(
                "{found} invalid fields: {}{}",
                many.iter()
                    .take(MAX_REPORTED)
                    .map(|v| v.field.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                if found > MAX_REPORTED { ", ..." } else { "" }
            ),
        };
        violations.truncate(MAX_REPORTED);
        Err(crate::AppError::InvalidArgument {
            message,
            violations,
        })
    }
}
