//! Per-call middleware for every request on the port, gRPC or HTTP:
//! - a request id (from `x-request-id` or generated) in the span, the request
//!   metadata handlers see, and the response headers;
//! - the call's span, a child of the caller's W3C `traceparent` when there is one;
//! - one log line per call with method, code and latency, written when the response
//!   body ends (gRPC codes travel in trailers);
//! - a deadline for unary calls (`grpc-timeout` or the configured request timeout);
//! - during shutdown, new calls are refused and open streams end with UNAVAILABLE.
use std::{
    pin::Pin,
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    extract::{Request, State},
    middleware::Next,
    response::Response,
};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header::CONTENT_TYPE};
use http_body::Frame;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::Instrument;

pub const REQUEST_ID: &str = "x-request-id";

#[derive(Clone)]
pub struct CallContext {
    pub request_timeout: Duration,
    /// Cancelled when the server starts to shut down.
    pub draining: CancellationToken,
    /// The largest gRPC message accepted (tonic enforces it; see [`Oversized`]).
    pub max_message_bytes: usize,
}

pub async fn middleware(
    State(ctx): State<CallContext>,
    mut request: Request,
    next: Next,
) -> Response {
    let request_id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let request_id_header =
        HeaderValue::from_str(&request_id).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    request
        .headers_mut()
        .insert(REQUEST_ID, request_id_header.clone());

    let grpc = is_grpc(request.headers());
    let oversized = Oversized::watch(&mut request, ctx.max_message_bytes);
    // The door, for the call metrics (the edge marks its own calls REST).
    let transport = match request.headers().get(CONTENT_TYPE).map(|v| v.as_bytes()) {
        Some(ct) if ct.starts_with(b"application/grpc-web") => crate::metrics::Transport::GrpcWeb,
        Some(ct) if ct.starts_with(b"application/grpc") => crate::metrics::Transport::Grpc,
        _ => crate::metrics::Transport::Rest,
    };
    request.extensions_mut().insert(transport);
    let method = request.uri().path().to_owned();
    let span = tracing::info_span!(
        "call",
        %request_id,
        // The method is the span's name (and `otel.name` in log lines); the trace id
        // is for log lines only (`telemetry::LogOnlyFields` keeps it out of exports).
        trace_id = tracing::field::Empty,
        // AcquireJobs records the worker it serves.
        worker_id = tracing::field::Empty,
        otel.name = %method,
        otel.kind = "server",
        rpc.grpc.status_code = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    if let Some(trace_id) = crate::telemetry::join_caller(&span, request.headers()) {
        span.record("trace_id", trace_id);
    }
    let start = Instant::now();
    let health_call = method.starts_with("/grpc.health.")
        || matches!(method.as_str(), "/healthz" | "/livez" | "/readyz");

    let mut response = if ctx.draining.is_cancelled() && !health_call {
        error_response(
            grpc,
            tonic::Code::Unavailable,
            "server is shutting down; retry on another instance",
        )
    } else {
        let deadline = grpc_timeout(request.headers())
            .map_or(ctx.request_timeout, |t| t.min(ctx.request_timeout));
        match tokio::time::timeout(deadline, next.run(request).instrument(span.clone())).await {
            Ok(response) => response,
            Err(_) => error_response(grpc, tonic::Code::DeadlineExceeded, "deadline exceeded"),
        }
    };
    response.headers_mut().insert(REQUEST_ID, request_id_header);
    if oversized.seen() {
        resource_exhausted_for_oversized(&mut response);
    }

    let (parts, body) = response.into_parts();
    let header_code = parts
        .headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    // A worker session ends itself when draining starts, after answering what it
    // was given (completions that were committed must reach their worker).
    let ends_itself = method == "/mediaplane.v1.JobsService/WorkerSession";
    let log = CallLog {
        span,
        method,
        start,
        grpc,
        http_status: parts.status.as_u16(),
        code: header_code,
        finished: false,
    };
    // Only streams still open when shutdown starts are ended early, never a response
    // in the middle of a message: gRPC with UNAVAILABLE trailers, NDJSON and SSE with
    // a final error line or status event.
    let content_type = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let ending =
        if content_type == "application/grpc" || content_type.starts_with("application/grpc+") {
            (header_code.is_none() && !ends_itself).then_some(Ending::Trailers)
        } else if content_type.starts_with("application/x-ndjson")
            || content_type.starts_with("text/event-stream")
        {
            Some(Ending::Data(Bytes::from(super::errors::final_line(
                content_type.starts_with("text/event-stream"),
                tonic::Code::Unavailable,
                "server is shutting down",
            ))))
        } else {
            None
        };
    let stop = ending.map(|e| (Box::pin(ctx.draining.clone().cancelled_owned()), e));
    // grpc-web carries its trailers in the body; the code is read from them there.
    let web = (header_code.is_none() && content_type.starts_with("application/grpc-web"))
        .then(|| content_type.starts_with("application/grpc-web-text"));
    Response::from_parts(
        parts,
        Body::new(LoggedBody {
            inner: body,
            log,
            stop,
            stopped: false,
            web,
        }),
    )
}

/// tonic refuses a request message over the size limit with OUT_OF_RANGE; the gRPC
/// spec (and our error table) make it RESOURCE_EXHAUSTED. Whether that is what
/// happened is read from the request itself, which declares each message's length
/// in its prefix (under base64 for grpc-web-text), not from tonic's wording.
#[derive(Clone, Default)]
struct Oversized(Option<std::sync::Arc<std::sync::atomic::AtomicBool>>);

/// Reads the message prefixes of a request body, binary or base64.
enum Prefixes {
    Binary(super::frames::FramePrefixes),
    Text(super::frames::TextFramePrefixes),
}

impl Oversized {
    fn watch(request: &mut Request, limit: usize) -> Self {
        let content_type = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mut prefixes = if content_type.starts_with("application/grpc-web-text") {
            Prefixes::Text(Default::default())
        } else if content_type.starts_with("application/grpc") {
            Prefixes::Binary(Default::default())
        } else {
            return Self(None);
        };
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = seen.clone();
        let body = std::mem::take(request.body_mut());
        let scanned = http_body_util::BodyExt::map_frame(body, move |frame| {
            if let Some(data) = frame.data_ref() {
                let each = |len| {
                    if len > limit as u64 {
                        flag.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                };
                match &mut prefixes {
                    Prefixes::Binary(p) => p.feed(data, each),
                    Prefixes::Text(p) => p.feed(data, each),
                };
            }
            frame
        });
        *request.body_mut() = Body::new(scanned);
        Self(Some(seen))
    }

    fn seen(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))
    }
}

fn resource_exhausted_for_oversized(response: &mut Response) {
    let headers = response.headers_mut();
    if headers.get("grpc-status").is_some_and(|v| v == "11") {
        headers.insert(
            "grpc-status",
            HeaderValue::from(tonic::Code::ResourceExhausted as i32),
        );
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// Parses `grpc-timeout` (`<digits><H|M|S|m|u|n>`, gRPC over HTTP/2 spec).
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    parse_grpc_timeout(headers.get("grpc-timeout")?.to_str().ok()?)
}

pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A gRPC trailers-only response, or a JSON error for HTTP callers.
fn error_response(grpc: bool, code: tonic::Code, message: &str) -> Response {
    if grpc {
        let mut response = tonic::Status::new(code, message).into_http::<Body>();
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        response
    } else {
        *super::errors::error_response(code, message, vec![])
    }
}

/// Writes the call's log line when dropped: after the body ended, or when the
/// client went away first.
struct CallLog {
    span: tracing::Span,
    method: String,
    start: Instant,
    grpc: bool,
    http_status: u16,
    code: Option<i32>,
    finished: bool,
}

impl Drop for CallLog {
    fn drop(&mut self) {
        let latency_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let _enter = self.span.enter();
        if self.grpc {
            let code = match (self.code, self.finished) {
                (Some(c), _) => super::errors::code_name(tonic::Code::from_i32(c)),
                (None, false) => "CANCELLED",
                (None, true) => "UNKNOWN",
            };
            let numeric = self.code.unwrap_or(tonic::Code::Cancelled as i32);
            self.span.record("rpc.grpc.status_code", numeric);
            if crate::error::is_server_fault(tonic::Code::from_i32(numeric)) {
                self.span.record("otel.status_code", "ERROR");
            }
            tracing::info!(method = %self.method, code, latency_ms, "grpc call");
        } else {
            self.span
                .record("http.response.status_code", i64::from(self.http_status));
            if self.http_status >= 500 {
                self.span.record("otel.status_code", "ERROR");
            }
            tracing::info!(method = %self.method, status = self.http_status, latency_ms, "http request");
        }
    }
}

pin_project_lite::pin_project! {
    struct LoggedBody {
        #[pin]
        inner: Body,
        log: CallLog,
        stop: Option<(Pin<Box<WaitForCancellationFutureOwned>>, Ending)>,
        stopped: bool,
        // Some(text) for a grpc-web response whose code is in its body's trailers.
        web: Option<bool>,
    }
}

/// How a stream is ended when the server shuts down.
enum Ending {
    Trailers,
    Data(Bytes),
}

impl http_body::Body for LoggedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.project();
        if *this.stopped {
            return Poll::Ready(None);
        }
        let frame = match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                // Shutdown: end an idle stream with a status the client can act on.
                if let Some((stop, ending)) = this.stop.as_mut() {
                    ready!(stop.as_mut().poll(cx));
                    *this.stopped = true;
                    this.log.code = Some(tonic::Code::Unavailable as i32);
                    this.log.finished = true;
                    let frame = match ending {
                        Ending::Trailers => {
                            let mut trailers = HeaderMap::new();
                            trailers.insert(
                                "grpc-status",
                                HeaderValue::from(tonic::Code::Unavailable as i32),
                            );
                            trailers.insert(
                                "grpc-message",
                                HeaderValue::from_static("server%20is%20shutting%20down"),
                            );
                            Frame::trailers(trailers)
                        }
                        Ending::Data(data) => Frame::data(data.clone()),
                    };
                    return Poll::Ready(Some(Ok(frame)));
                }
                return Poll::Pending;
            }
        };
        match &frame {
            Some(Ok(f)) => {
                if let Some(code) = f
                    .trailers_ref()
                    .and_then(|t| t.get("grpc-status"))
                    .and_then(|v| v.to_str().ok())
                {
                    this.log.code = code.parse().ok();
                    this.log.finished = true;
                } else if let (Some(text), Some(data)) = (*this.web, f.data_ref())
                    && let Some(code) = super::frames::grpc_web_status(data, text)
                {
                    this.log.code = Some(code);
                    this.log.finished = true;
                }
            }
            None => this.log.finished = true,
            Some(Err(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.stopped || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The status a client sees when the service answers OUT_OF_RANGE, worded as
    /// tonic words a message over its limit, to a request declaring `declared` bytes.
    async fn status_for(declared: u32) -> String {
        let ctx = CallContext {
            request_timeout: Duration::from_secs(5),
            draining: CancellationToken::new(),
            max_message_bytes: 100,
        };
        let app = axum::Router::new()
            .route(
                "/t.S/M",
                axum::routing::post(|_body: Bytes| async {
                    (
                        [
                            ("content-type", "application/grpc"),
                            ("grpc-status", "11"),
                            (
                                "grpc-message",
                                "Error,%20decoded%20message%20length%20too%20large",
                            ),
                        ],
                        "",
                    )
                }),
            )
            .layer(axum::middleware::from_fn_with_state(ctx, middleware));
        let mut body = vec![0u8];
        body.extend(declared.to_be_bytes());
        body.extend(vec![0u8; declared.min(200) as usize]);
        let request = http::Request::post("/t.S/M")
            .header("content-type", "application/grpc")
            .body(Body::from(body))
            .unwrap();
        let response = tower::ServiceExt::oneshot(app, request).await.unwrap();
        response.headers()["grpc-status"]
            .to_str()
            .unwrap()
            .to_owned()
    }

    #[tokio::test]
    async fn only_a_message_over_the_limit_becomes_resource_exhausted() {
        assert_eq!(status_for(1000).await, "8");
        assert_eq!(
            status_for(10).await,
            "11",
            "an OUT_OF_RANGE with any other cause stays what it is, whatever its words"
        );
    }
}
