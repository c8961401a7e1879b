//! The HTTP/JSON edge: routes REST calls by the `google.api.http` rules in the
//! descriptors and calls the same tonic services in-process (through the same
//! authentication), so no RPC is written twice and a new annotated RPC is served at
//! once. JSON is canonical proto3 JSON (prost-reflect).
//!
//! Server-streaming RPCs answer newline-delimited JSON (`{"result": ...}` per line,
//! a final `{"error": ...}` if the stream fails), or Server-Sent Events with
//! `Accept: text/event-stream` (`id:` = the message's `sequence`, a final `status`
//! event, keep-alive comments, `Last-Event-ID` resuming through `after_sequence`).
use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::Response,
};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http_body_util::BodyExt;
use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, SerializeOptions,
    Value,
};
use tower::ServiceExt;

use super::{
    errors::{bad, error_response, http_error, status_error},
    rules::Binding,
};

mod redirect;
mod request;
mod response;
#[cfg(test)]
mod tests;

const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Clone)]
pub struct Edge {
    inner: Arc<Inner>,
}

struct Inner {
    bindings: Vec<Binding>,
    /// Rendered once at start.
    openapi: Bytes,
    grpc: Router,
    max_body: usize,
    /// Raw downloads answer 307 to a URL the store presigned (`redirect.rs`).
    redirect_downloads: bool,
    json_in: DeserializeOptions,
    json_out: SerializeOptions,
}

impl Edge {
    pub fn new(grpc: Router, max_body: usize, deny_unknown_fields: bool) -> Result<Self, String> {
        let pool =
            DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string())?;
        Self::with_pool(&pool, grpc, max_body, deny_unknown_fields)
    }

    /// The edge for the services in `pool`, calling `grpc` (tests use their own protos).
    pub fn with_pool(
        pool: &DescriptorPool,
        grpc: Router,
        max_body: usize,
        deny_unknown_fields: bool,
    ) -> Result<Self, String> {
        let pool = pool.clone();
        let bindings = super::rules::bindings(&pool)?;
        let openapi = Bytes::from(super::openapi::document(&pool, &bindings).to_string());
        Ok(Self {
            inner: Arc::new(Inner {
                bindings,
                openapi,
                grpc,
                max_body,
                redirect_downloads: false,
                json_in: DeserializeOptions::new().deny_unknown_fields(deny_unknown_fields),
                json_out: SerializeOptions::new().skip_default_fields(false),
            }),
        })
    }

    /// Raw downloads redirect to the store (S3-compatible storage presigns its URLs).
    pub fn with_download_redirects(mut self, on: bool) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.redirect_downloads = on;
        }
        self
    }

    pub fn bindings(&self) -> &[Binding] {
        &self.inner.bindings
    }

    /// The fallback handler of the HTTP router.
    pub fn router(self) -> Router {
        Router::new()
            .route("/openapi.json", axum::routing::get(openapi))
            .fallback(handle)
            .with_state(self)
    }
}

async fn openapi(State(edge): State<Edge>) -> Response {
    let mut r = Response::new(Body::from(edge.inner.openapi.clone()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(State(edge): State<Edge>, request: Request) -> Response {
    let path = request.uri().path().to_owned();
    let mut path_matched = false;
    let mut found = None;
    for b in &edge.inner.bindings {
        if let Some(vars) = b.template.matches(&path) {
            path_matched = true;
            if b.method == request.method() {
                found = Some((b.clone(), vars));
                break;
            }
        }
    }
    let Some((binding, vars)) = found else {
        return *if path_matched {
            http_error(
                StatusCode::METHOD_NOT_ALLOWED,
                tonic::Code::Unimplemented,
                &format!("method {} is not allowed on {path}", request.method()),
                vec![],
            )
        } else {
            http_error(
                StatusCode::NOT_FOUND,
                tonic::Code::NotFound,
                &format!("no route for {} {path}", request.method()),
                vec![],
            )
        };
    };
    crate::telemetry::rename_current_span(format!(
        "/{}/{}",
        binding.rpc.parent_service().full_name(),
        binding.rpc.name()
    ));
    match edge.call(binding, vars, request).await {
        Ok(r) => r,
        Err(r) => *r,
    }
}

impl Edge {
    /// One REST call, in steps: read the body, build the request message, call the
    /// gRPC service in-process, render its answer.
    async fn call(
        &self,
        b: Binding,
        vars: Vec<(String, String)>,
        request: Request,
    ) -> Result<Response, Box<Response>> {
        let (parts, body) = request.into_parts();
        let query = parts.uri.query().unwrap_or("").to_owned();
        let (raw_upload, body) = self.read_body(&b, body).await?;
        let shape = Shape::of(&b, &parts.headers, &query);
        if shape.raw_download
            && self.inner.redirect_downloads
            && b.rpc.name() == "DownloadAssetContent"
        {
            return self.redirect_download(&parts, &vars).await;
        }
        let range = if shape.raw_download {
            request::parse_range(&parts.headers)?
        } else {
            None
        };
        let built = self.build_message(&b, &parts, &vars, &query, &body, range)?;
        let (inner, deadline) = forward_request(&b, &parts, built, raw_upload, shape)?;
        let call = self.inner.grpc.clone().oneshot(inner);
        let response = match deadline
            .filter(|_| !b.rpc.is_server_streaming() && !b.rpc.is_client_streaming())
        {
            Some(d) => tokio::time::timeout(d, call).await.map_err(|_| {
                error_response(tonic::Code::DeadlineExceeded, "deadline exceeded", vec![])
            })?,
            None => call.await,
        }
        .unwrap_or_else(|e| match e {});
        self.respond(&b, response, shape, range).await
    }

    /// The body of a raw upload (a client-streaming RPC whose body is a bytes field:
    /// its first message comes from the path and query, then the HTTP body as that
    /// field), or the whole body, bounded.
    async fn read_body(
        &self,
        b: &Binding,
        body: Body,
    ) -> Result<(Option<RawUpload>, Bytes), Box<Response>> {
        let raw_field = b
            .rpc
            .is_client_streaming()
            .then(|| b.rpc.input().get_field_by_name(&b.body))
            .flatten()
            .filter(|f| f.kind() == Kind::Bytes);
        if b.rpc.is_client_streaming() && raw_field.is_none() {
            return Err(error_response(
                tonic::Code::Unimplemented,
                "this client-streaming RPC is not served over HTTP/JSON; use gRPC",
                vec![],
            ));
        }
        if let Some(field) = raw_field {
            return Ok((Some(RawUpload { field, body }), Bytes::new()));
        }
        match http_body_util::Limited::new(body, self.inner.max_body)
            .collect()
            .await
        {
            Ok(c) => Ok((None, c.to_bytes())),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                let message = format!("request body larger than {} bytes", self.inner.max_body);
                Err(http_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    tonic::Code::ResourceExhausted,
                    &message,
                    vec![],
                ))
            }
            Err(e) => Err(bad(format!("cannot read the request body: {e}"))),
        }
    }

    /// The gRPC answer as the REST caller asked for it: an error, raw bytes, a stream
    /// (NDJSON or SSE) or one JSON object.
    async fn respond(
        &self,
        b: &Binding,
        response: Response,
        shape: Shape,
        range: Option<(u64, Option<u64>)>,
    ) -> Result<Response, Box<Response>> {
        let (rparts, rbody) = response.into_parts();
        if let Some(mut err) = status_error(&rparts.headers) {
            for name in crate::guard::RATE_HEADERS {
                if let Some(v) = rparts.headers.get(name) {
                    err.headers_mut().insert(name, v.clone());
                }
            }
            return Err(err);
        }
        let output = b.rpc.output();
        let mut headers = HeaderMap::new();
        if let Some(id) = rparts.headers.get("x-request-id") {
            headers.insert("x-request-id", id.clone());
        }
        if shape.raw_download {
            return self.raw_download(rbody, output, range, headers).await;
        }
        if b.rpc.is_server_streaming() {
            return Ok(self.stream(rbody, output, b.response_body.clone(), shape.sse, headers));
        }
        let bytes = unary_bytes(rbody).await?;
        let fast = b
            .response_body
            .is_empty()
            .then(|| super::json::render(&output, &bytes))
            .flatten();
        let json = match fast {
            Some(json) => json,
            None => {
                let out = DynamicMessage::decode(output, bytes)
                    .map_err(|e| error_response(tonic::Code::Internal, &e.to_string(), vec![]))?;
                self.render_json(&out, &b.response_body)?
            }
        };
        let mut r = Response::new(Body::from(json));
        *r.headers_mut() = headers;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(r)
    }
}

/// The one message of a unary answer's body, its trailers checked.
async fn unary_bytes(body: Body) -> Result<Bytes, Box<Response>> {
    let mut reader = response::FrameReader::new(body);
    let first = reader.next().await;
    if matches!(first, Some(Ok(_))) {
        // Read on to the trailers: they carry the call's code (to the end, the
        // call is finished for the call metrics too, not dropped halfway).
        let _ = reader.next().await;
    }
    let trailers = reader.trailers.take();
    if let Some(err) = trailers.as_ref().and_then(status_error) {
        return Err(err);
    }
    match first {
        Some(Ok(b)) => Ok(b),
        Some(Err(e)) => Err(error_response(tonic::Code::Internal, &e, vec![])),
        None => Ok(Bytes::new()),
    }
}

impl Edge {
    /// A unary call's answer as a message of `b`'s output type, or its error.
    async fn unary_answer(
        &self,
        b: &Binding,
        response: Response,
    ) -> Result<DynamicMessage, Box<Response>> {
        let (rparts, rbody) = response.into_parts();
        if let Some(err) = status_error(&rparts.headers) {
            return Err(err);
        }
        let bytes = unary_bytes(rbody).await?;
        DynamicMessage::decode(b.rpc.output(), bytes)
            .map_err(|e| error_response(tonic::Code::Internal, &e.to_string(), vec![]))
    }
}

/// A raw upload's bytes field and the HTTP body that fills it.
struct RawUpload {
    field: FieldDescriptor,
    body: Body,
}

/// What kind of answer the caller wants.
#[derive(Clone, Copy)]
struct Shape {
    /// Raw bytes of a stream of bytes (`?alt=media` or `Accept:
    /// application/octet-stream`); `Range` maps onto `offset`/`length`.
    raw_download: bool,
    /// Server-Sent Events rather than NDJSON, for a stream.
    sse: bool,
}

impl Shape {
    fn of(b: &Binding, headers: &HeaderMap, query: &str) -> Self {
        let accept = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        Self {
            raw_download: b.rpc.is_server_streaming()
                && (query.split('&').any(|p| p == "alt=media")
                    || accept.contains("application/octet-stream")),
            sse: accept.contains("text/event-stream"),
        }
    }
}

/// The in-process gRPC request for a built message, and the deadline the edge
/// enforces on it.
fn forward_request(
    b: &Binding,
    parts: &http::request::Parts,
    built: request::Built,
    raw_upload: Option<RawUpload>,
    shape: Shape,
) -> Result<(http::Request<Body>, Option<Duration>), Box<Response>> {
    let request::Built {
        msg,
        timeout,
        query_token,
    } = built;
    let grpc_path = format!("/{}/{}", b.rpc.parent_service().full_name(), b.rpc.name());
    let mut inner = http::Request::builder()
        .method(Method::POST)
        .uri(grpc_path)
        .version(http::Version::HTTP_2)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers");
    for name in ["authorization", "x-request-id", "grpc-timeout"] {
        if let Some(v) = parts.headers.get(name) {
            inner = inner.header(name, v);
        }
    }
    if let Some(t) = query_token {
        // Tokens in URLs end up in logs and Referer headers: only where a browser
        // cannot send a header (EventSource on a watch route), never on writes.
        let watch = b.rpc.is_server_streaming() && b.rpc.name().starts_with("Watch");
        if !watch || shape.raw_download || parts.method != Method::GET {
            return Err(error_response(
                tonic::Code::Unauthenticated,
                "access_token in the query is accepted only on watch streams (SSE/NDJSON); send `Authorization: Bearer <token>`",
                vec![],
            ));
        }
        if !parts.headers.contains_key(header::AUTHORIZATION) {
            inner = inner.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
    }
    // Budgets of calls without a valid token are kept per client IP.
    if let Some(ip) = parts.extensions.get::<crate::guard::ClientIp>() {
        inner = inner.extension(*ip);
    }
    inner = inner.extension(crate::metrics::Transport::Rest);
    // The in-process call skips the transport's own deadline handling, so the edge
    // enforces `timeout` (or the client's grpc-timeout) on unary calls itself.
    let mut deadline = parts
        .headers
        .get("grpc-timeout")
        .and_then(|v| super::calls::parse_grpc_timeout(v.to_str().ok()?));
    if let Some(t) = timeout {
        let d = humantime::parse_duration(&t)
            .map_err(|_| bad("timeout must be a duration like 5s or 500ms"))?;
        inner = inner.header("grpc-timeout", format!("{}m", d.as_millis().max(1)));
        deadline = Some(d);
    }
    let first = frame(&msg).map_err(|e| bad(e.to_string()))?;
    let body = match raw_upload {
        None => Body::from(first),
        Some(RawUpload { field, body }) => {
            let data = body.into_data_stream().map(|r| {
                r.map_err(|e| crate::AppError::Aborted(format!("upload body broken: {e}")))
            });
            let chunks =
                crate::storage::rechunk(data, crate::domain::asset::CHUNK).map(move |chunk| {
                    let chunk = chunk.map_err(|e| std::io::Error::other(e.to_string()))?;
                    let mut m = DynamicMessage::new(field.parent_message().clone());
                    m.set_field(&field, Value::Bytes(chunk));
                    frame(&m).map_err(std::io::Error::other)
                });
            Body::from_stream(
                futures::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(chunks),
            )
        }
    };
    let inner = inner.body(body).map_err(|e| bad(e.to_string()))?;
    Ok((inner, deadline))
}

/// A message as one uncompressed gRPC frame.
fn frame(msg: &DynamicMessage) -> Result<Bytes, prost::EncodeError> {
    let mut frame = BytesMut::with_capacity(msg.encoded_len() + 5);
    frame.extend_from_slice(&[0]);
    frame.extend_from_slice(&(msg.encoded_len() as u32).to_be_bytes());
    msg.encode(&mut frame)?;
    Ok(frame.freeze())
}

impl Edge {}

/// Canonical proto3 JSON of a message, written straight into a `String`.
struct Json<'a>(&'a DynamicMessage, &'a SerializeOptions);

impl serde::Serialize for Json<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize_with_options(s, self.1)
    }
}
