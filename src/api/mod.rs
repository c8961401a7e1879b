//! gRPC adapters, one file per service: validate, convert, call the domain and the
//! database, convert back.
use tonic::Status;

use crate::{AppError, db};

pub mod assets;
pub mod convert;
pub mod jobs;
pub mod projects;

/// A pooled connection, or UNAVAILABLE when Postgres cannot be reached in time.
pub(crate) async fn conn(pool: &db::Pool) -> Result<db::PooledConn<'_>, Status> {
    pool.get()
        .await
        .map_err(|e| Status::from(AppError::from(e)))
}
