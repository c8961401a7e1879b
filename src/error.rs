//! The service's one error type, and its one mapping to gRPC codes (docs/design.md, "Errors").
//! The HTTP status for each code lives beside it so both transports share the table.
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, QuotaViolation, StatusExt};

pub type AppResult<T> = Result<T, AppError>;

/// One problem with one field of a request (`google.rpc.BadRequest.FieldViolation`
/// on the wire; kept free of tonic so the domain can build it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Malformed input; every problem found is listed as a field violation.
    #[error("{message}")]
    InvalidArgument {
        message: String,
        violations: Vec<FieldViolation>,
    },
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// Missing, or owned by someone else: the message never says which.
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// Etag or lease conflict.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// Over a quota or cap: RESOURCE_EXHAUSTED with a `google.rpc.QuotaFailure`
    /// naming the quota and its limit.
    #[error("{message}")]
    QuotaExceeded {
        quota: &'static str,
        limit: i64,
        message: String,
    },
    /// A dependency is down; safe to retry.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure: logged in full, reported to clients without detail.
    #[error("internal error: {0}")]
    Internal(String),
}

impl AppError {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        let (field, description) = (field.into(), description.into());
        Self::InvalidArgument {
            message: format!("invalid {field}: {description}"),
            violations: vec![FieldViolation::new(field, description)],
        }
    }

    pub fn internal(context: impl std::fmt::Display) -> Self {
        Self::Internal(context.to_string())
    }

    /// This error as `google.rpc.Status`, for one item of a batch answer: the code,
    /// message and details the whole call would have carried (logged the same way).
    pub fn into_rpc_status(self) -> tonic_types::pb::Status {
        rpc_status(&Status::from(self))
    }

    pub fn code(&self) -> Code {
        // Exhaustive on purpose: a new variant must be placed in the table.
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::Aborted(_) => Code::Aborted,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::ResourceExhausted(_) | Self::QuotaExceeded { .. } => Code::ResourceExhausted,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Internal(_) => Code::Internal,
        }
    }
}

/// HTTP status for a gRPC code, per the table in docs/design.md, "Errors" (grpc-gateway's mapping).
pub fn http_status(code: Code) -> http::StatusCode {
    use http::StatusCode as S;
    match code {
        Code::Ok => S::OK,
        Code::Cancelled => S::from_u16(499).unwrap_or(S::BAD_REQUEST),
        Code::Unknown | Code::Internal | Code::DataLoss => S::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => S::BAD_REQUEST,
        Code::DeadlineExceeded => S::GATEWAY_TIMEOUT,
        Code::NotFound => S::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => S::CONFLICT,
        Code::PermissionDenied => S::FORBIDDEN,
        Code::ResourceExhausted => S::TOO_MANY_REQUESTS,
        Code::Unimplemented => S::NOT_IMPLEMENTED,
        Code::Unavailable => S::SERVICE_UNAVAILABLE,
        Code::Unauthenticated => S::UNAUTHORIZED,
    }
}

impl From<AppError> for Status {
    fn from(error: AppError) -> Self {
        use crate::domain::text::bounded;
        let code = error.code();
        match error {
            // Messages and violations may quote client input: bound them, so an error
            // never outgrows the transport's metadata limit (which fails the call
            // with a transport error instead of this one).
            AppError::InvalidArgument {
                message,
                violations,
            } => Status::with_error_details(
                code,
                bounded(message),
                ErrorDetails::with_bad_request(
                    violations
                        .into_iter()
                        .map(|v| {
                            tonic_types::FieldViolation::new(
                                bounded(v.field),
                                bounded(v.description),
                            )
                        })
                        .collect::<Vec<_>>(),
                ),
            ),
            AppError::QuotaExceeded {
                quota,
                limit,
                message,
            } => Status::with_error_details(
                code,
                bounded(message),
                ErrorDetails::with_quota_failure(vec![QuotaViolation::new(
                    quota,
                    format!("limit {limit}"),
                )]),
            ),
            AppError::Internal(detail) => {
                tracing::error!(error.detail = %detail, "internal error");
                Status::new(code, "internal error")
            }
            AppError::Unavailable(detail) => {
                tracing::warn!(error.detail = %detail, "dependency unavailable");
                Status::new(code, "service temporarily unavailable, retry later")
            }
            other => Status::new(code, bounded(other.to_string())),
        }
    }
}

impl From<diesel::result::Error> for AppError {
    fn from(error: diesel::result::Error) -> Self {
        use diesel::result::{DatabaseErrorKind as K, Error as E};
        match &error {
            // A dead connection (Postgres gone or restarted) is retryable, not a bug.
            E::DatabaseError(K::ClosedConnection | K::UnableToSendCommand, _) => {
                Self::Unavailable(error.to_string())
            }
            // Postgres ended the session (a terminated backend, a shutdown, a failover
            // in progress): SQLSTATE 57P01-57P03, which diesel-async reports only as
            // an unknown kind with the server's message (its code is not exposed).
            E::DatabaseError(K::Unknown, info) if session_ended(info.message()) => {
                Self::Unavailable(error.to_string())
            }
            E::DatabaseError(K::UniqueViolation, info) => Self::AlreadyExists(format!(
                "conflicts with an existing resource ({})",
                info.constraint_name().unwrap_or("unique key")
            )),
            E::DatabaseError(K::SerializationFailure, _) => {
                Self::Aborted("concurrent modification, retry".into())
            }
            _ => Self::Internal(format!("database: {error}")),
        }
    }
}

/// Postgres's messages for a session it ended or would not start (57P01 admin_shutdown,
/// 57P02 crash_shutdown, 57P03 cannot_connect_now, 57P04 database_dropped).
fn session_ended(message: &str) -> bool {
    message.starts_with("terminating connection")
        || message.starts_with("the database system is")
        || message.starts_with("server closed the connection")
}

/// Codes that mean the server, not the caller, failed (OpenTelemetry's gRPC server
/// conventions): their spans are marked as errors.
pub fn is_server_fault(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

impl From<diesel_async::pooled_connection::bb8::RunError> for AppError {
    fn from(error: diesel_async::pooled_connection::bb8::RunError) -> Self {
        Self::Unavailable(format!("database pool: {error}"))
    }
}

/// A call's answer as `google.rpc.Status` (one item of a batch, one answer of a worker
/// session): the code, message and details the call would have carried.
pub fn rpc_status(status: &Status) -> tonic_types::pb::Status {
    let details = status.details();
    if !details.is_empty()
        && let Ok(full) = <tonic_types::pb::Status as prost::Message>::decode(details)
    {
        return full;
    }
    tonic_types::pb::Status {
        code: status.code() as i32,
        message: status.message().to_owned(),
        details: Vec::new(),
    }
}
