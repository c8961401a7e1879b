//! The door every call of `mediaplane.v1` passes, whichever transport it came by: gRPC
//! directly, grpc-web through tonic-web, REST through the edge (which calls the same
//! gRPC router in-process). So one budget belongs to a principal, not to a transport.
//!
//! In order: authenticate the bearer token (a failure counts against the client IP's
//! anonymous budget), count the call against the principal's budget for its class,
//! hold a slot of the principal's open watch streams or uploads for as long as the
//! call's response lives, then hand the caller to the handler in the extensions.
//! Health and reflection are public and pass untouched.
pub mod connections;
pub mod rate;

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::Body,
    extract::{Request, State},
    middleware::Next,
    response::Response,
};
use http::{HeaderMap, HeaderValue, header::CONTENT_TYPE};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    AppError,
    auth::{Caller, Verifier},
};
pub use rate::{Class, Decision, Limiter};

/// The address a connection came from, put in every request's extensions by the
/// accept loop (and carried by the edge onto its in-process calls).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// Headers a rate-limited answer carries, read by the edge onto HTTP responses.
pub const RATE_HEADERS: [&str; 4] = [
    "retry-after",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
];

#[derive(Clone)]
pub struct Guard {
    verifier: Verifier,
    /// While it says Postgres is down, calls fail at once instead of each waiting
    /// for the pool's timeout.
    health: crate::health::Health,
    /// The retry hint then given: the prober's interval.
    health_interval: Duration,
    limiter: Option<Limiter>,
    streams: OpenStreams,
}

impl Guard {
    pub fn new(
        verifier: Verifier,
        limiter: Option<Limiter>,
        // Per principal: watch streams, uploads, worker sessions.
        caps: [u32; 3],
        health: crate::health::Health,
        health_interval: Duration,
    ) -> Self {
        Self {
            verifier,
            health,
            health_interval,
            limiter,
            streams: OpenStreams {
                caps,
                open: Arc::default(),
            },
        }
    }
}

/// Kinds of long-lived calls capped per principal (on each instance).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Held {
    Watch = 0,
    Upload = 1,
    Session = 2,
}

impl Held {
    fn quota_name(self) -> &'static str {
        match self {
            Held::Watch => "open_watch_streams",
            Held::Upload => "uploads_in_progress",
            Held::Session => "open_worker_sessions",
        }
    }
}

#[derive(Clone)]
struct OpenStreams {
    caps: [u32; 3],
    open: Arc<Mutex<HashMap<(Held, String), u32>>>,
}

impl OpenStreams {
    fn hold(&self, held: Held, sub: &str) -> Result<Slot, Status> {
        let cap = self.caps[held as usize];
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry((held, sub.to_owned())).or_insert(0);
        if *n >= cap {
            return Err(quota_exceeded(
                held.quota_name(),
                i64::from(cap),
                &format!(
                    "too many {} for this principal (limit {cap}); close one first",
                    held.quota_name().replace('_', " ")
                ),
            ));
        }
        *n += 1;
        Ok(Slot {
            streams: self.clone(),
            key: Some((held, sub.to_owned())),
        })
    }
}

/// One open watch, upload or worker session; the count goes down when the response is
/// dropped.
struct Slot {
    streams: OpenStreams,
    key: Option<(Held, String)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let mut open = self.streams.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&key);
            }
        }
    }
}

/// `RESOURCE_EXHAUSTED` with a `google.rpc.QuotaFailure` naming the quota and its limit.
fn quota_exceeded(quota: &'static str, limit: i64, message: &str) -> Status {
    AppError::QuotaExceeded {
        quota,
        limit,
        message: message.to_owned(),
    }
    .into()
}

/// The class of a `mediaplane.v1` method (`JobsService/GetJob`), and what it holds open.
fn classify(method: &str, caller_is_worker: bool) -> (Class, Option<Held>) {
    let name = method.rsplit('/').next().unwrap_or(method);
    match name {
        "WatchJob" | "WatchJobs" => (Class::Stream, Some(Held::Watch)),
        "UploadAssetContent" => (Class::Stream, Some(Held::Upload)),
        "DownloadAssetContent" => (Class::Stream, None),
        "AcquireJobs" | "ReportProgress" | "CompleteJob" | "BatchCompleteJobs" | "FailJob"
        | "WorkerSession" => {
            // Only worker tokens spend the worker budget; anyone else is refused by
            // the handler, after paying for the call like any write.
            (
                if caller_is_worker {
                    Class::Worker
                } else {
                    Class::Write
                },
                (name == "WorkerSession").then_some(Held::Session),
            )
        }
        n if n.starts_with("Get")
            || n.starts_with("List")
            || n == "CreateSignedUrl"
            || n == "SummarizeJobs" =>
        {
            (Class::Read, None)
        }
        _ => (Class::Write, None),
    }
}

pub async fn middleware(State(guard): State<Guard>, mut request: Request, next: Next) -> Response {
    let Some(method) = request.uri().path().strip_prefix("/mediaplane.v1.") else {
        return next.run(request).await;
    };
    let method = method.to_owned();
    if guard.health.postgres_down() {
        return grpc_error(Status::with_error_details(
            Code::Unavailable,
            "the database is unreachable; retry shortly",
            ErrorDetails::with_retry_info(Some(guard.health_interval)),
        ));
    }
    let ip = request.extensions().get::<ClientIp>().map(|c| c.0);
    let caller = match authenticate(&guard.verifier, request.headers()) {
        Ok(caller) => caller,
        Err(status) => {
            if let (Some(limiter), Some(ip)) = (&guard.limiter, ip) {
                let decision = limiter.check(Class::Anonymous, &ip.to_string()).await;
                if !decision.allowed {
                    return limited(Class::Anonymous, decision);
                }
            }
            return grpc_error(status);
        }
    };
    let (class, held) = classify(&method, caller.is_worker());
    if let Some(limiter) = &guard.limiter {
        let decision = limiter.check(class, &caller.sub).await;
        if !decision.allowed {
            return limited(class, decision);
        }
    }
    let slot = match held.map(|h| guard.streams.hold(h, &caller.sub)).transpose() {
        Ok(slot) => slot,
        Err(status) => return grpc_error(status),
    };
    if method == "JobsService/WorkerSession"
        && let Some(limiter) = &guard.limiter
    {
        request.extensions_mut().insert(MessageBudget {
            limiter: limiter.clone(),
            class,
            key: caller.sub.clone(),
        });
    }
    request.extensions_mut().insert(caller);
    let mut response = next.run(request).await;
    undecodable_is_invalid_argument(&mut response);
    match slot {
        None => response,
        Some(slot) => {
            response.map(|body| Body::new(crate::edge::coalesce::HoldingBody::new(body, slot)))
        }
    }
}

/// tonic answers a request it cannot decode (bad protobuf, nesting past prost's
/// recursion limit) with INTERNAL and the decoder's words; it is the client's input,
/// so INVALID_ARGUMENT, without internals.
fn undecodable_is_invalid_argument(response: &mut Response) {
    let headers = response.headers_mut();
    let undecodable = headers.get("grpc-status").is_some_and(|v| v == "13")
        && headers
            .get("grpc-message")
            .is_some_and(|m| m.as_bytes().starts_with(b"failed%20to%20decode"));
    if undecodable {
        headers.insert(
            "grpc-status",
            HeaderValue::from(Code::InvalidArgument as i32),
        );
        headers.insert(
            "grpc-message",
            HeaderValue::from_static(
                "the%20request%20message%20cannot%20be%20decoded%20(malformed%2C%20or%20nested%20too%20deeply)",
            ),
        );
        headers.remove("grpc-status-details-bin");
    }
}

fn authenticate(verifier: &Verifier, headers: &HeaderMap) -> Result<Caller, Status> {
    let header = headers.get(http::header::AUTHORIZATION).ok_or_else(|| {
        Status::unauthenticated("missing authorization metadata (expected `Bearer <token>`)")
    })?;
    let token = header
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?;
    verifier.verify(token)
}

/// Each request on a WorkerSession stream spends the budget of the call it stands for
/// (opening the stream spent one), so a stream is no way around the worker limit.
#[derive(Clone)]
pub struct MessageBudget {
    limiter: Limiter,
    class: Class,
    key: String,
}

impl MessageBudget {
    pub async fn spend(&self) -> Result<(), Status> {
        let decision = self.limiter.check(self.class, &self.key).await;
        if decision.allowed {
            Ok(())
        } else {
            Err(over_limit(self.class, &decision))
        }
    }
}

/// RESOURCE_EXHAUSTED with `google.rpc.RetryInfo`.
fn over_limit(class: Class, decision: &Decision) -> Status {
    let wait = decision.retry_after.max(Duration::from_millis(1));
    Status::with_error_details(
        Code::ResourceExhausted,
        format!(
            "rate limit of {} exceeded; retry in {} ms",
            class.as_str(),
            wait.as_millis().max(1)
        ),
        ErrorDetails::with_retry_info(Some(wait)),
    )
}

/// The over-limit answer, plus the HTTP headers (`Retry-After`, `RateLimit-*`) the
/// edge passes on to REST clients.
fn limited(class: Class, decision: Decision) -> Response {
    let wait = decision.retry_after.max(Duration::from_millis(1));
    let mut response = grpc_error(over_limit(class, &decision));
    let headers = response.headers_mut();
    let secs = |d: Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
    headers.insert("retry-after", HeaderValue::from(secs(wait)));
    headers.insert("ratelimit-limit", HeaderValue::from(decision.limit));
    headers.insert("ratelimit-remaining", HeaderValue::from(decision.remaining));
    headers.insert(
        "ratelimit-reset",
        HeaderValue::from(secs(decision.reset.max(wait))),
    );
    response
}

/// A trailers-only gRPC answer (tonic-web turns it into grpc-web, the edge into JSON).
fn grpc_error(status: Status) -> Response {
    let mut response = status.into_http::<Body>();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_has_the_class_its_name_says() {
        assert_eq!(classify("JobsService/GetJob", false).0, Class::Read);
        assert_eq!(
            classify("ProjectsService/ListProjects", false).0,
            Class::Read
        );
        assert_eq!(classify("JobsService/CreateJob", false).0, Class::Write);
        assert_eq!(classify("JobsService/CancelJob", false).0, Class::Write);
        assert_eq!(classify("JobsService/AcquireJobs", true).0, Class::Worker);
        assert_eq!(classify("JobsService/AcquireJobs", false).0, Class::Write);
        assert_eq!(
            classify("JobsService/WatchJobs", false),
            (Class::Stream, Some(Held::Watch))
        );
        assert_eq!(
            classify("AssetsService/UploadAssetContent", false),
            (Class::Stream, Some(Held::Upload))
        );
        assert_eq!(
            classify("JobsService/WorkerSession", true),
            (Class::Worker, Some(Held::Session))
        );
    }
}
