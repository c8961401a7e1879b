//! Logging: human or JSON lines, filtered by RUST_LOG (default `info`).
//!
//! Lines are written by a thread of their own (tracing-appender): a slow reader of
//! stdout (a full pipe, a stalled log shipper) must not block the runtime's workers,
//! which write a line per call. If it falls 128,000 lines behind, new lines are
//! dropped rather than calls delayed.
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Flushes the lines still queued when dropped: hold it until the process ends.
#[must_use = "dropping it stops logging"]
pub struct LogGuard(#[allow(dead_code)] Option<WorkerGuard>);

/// Installs the global subscriber; a second call (tests) is a no-op.
pub fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking(std::io::stdout());
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(writer),
            )
            .try_init(),
        LogFormat::Human => registry
            .with(fmt::layer().with_target(false).with_writer(writer))
            .try_init(),
    };
    LogGuard(installed.is_ok().then_some(guard))
}
