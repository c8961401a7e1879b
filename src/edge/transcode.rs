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
use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use http_body_util::BodyExt;
use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MapKey,
    MessageDescriptor, ReflectMessage, SerializeOptions, Value,
};
use tower::ServiceExt;

use super::{
    calls::code_name,
    rules::{self, Binding},
};
use crate::error::http_status;

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
        let bindings = rules::bindings(&pool)?;
        let openapi = Bytes::from(super::openapi::document(&pool, &bindings).to_string());
        Ok(Self {
            inner: Arc::new(Inner {
                bindings,
                openapi,
                grpc,
                max_body,
                json_in: DeserializeOptions::new().deny_unknown_fields(deny_unknown_fields),
                json_out: SerializeOptions::new().skip_default_fields(false),
            }),
        })
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

/// An error in the edge's JSON shape.
pub fn error_response(
    code: tonic::Code,
    message: &str,
    details: Vec<serde_json::Value>,
) -> Box<Response> {
    http_error(http_status(code), code, message, details)
}

/// An error whose HTTP status is not the code's usual one (404/405 routing, 413).
fn http_error(
    status: StatusCode,
    code: tonic::Code,
    message: &str,
    details: Vec<serde_json::Value>,
) -> Box<Response> {
    let body = serde_json::json!({"error": {"code": status.as_u16(), "status": code_name(code), "message": message, "details": details}});
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Box::new(r)
}

fn bad(message: impl Into<String>) -> Box<Response> {
    error_response(tonic::Code::InvalidArgument, &message.into(), vec![])
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
    match edge.call(binding, vars, request).await {
        Ok(r) => r,
        Err(r) => *r,
    }
}

impl Edge {
    async fn call(
        &self,
        b: Binding,
        vars: Vec<(String, String)>,
        request: Request,
    ) -> Result<Response, Box<Response>> {
        let (parts, body) = request.into_parts();
        let query = parts.uri.query().unwrap_or("").to_owned();
        // Raw uploads: a client-streaming RPC whose body is a bytes field takes its first
        // message from the path and query, then the HTTP body as that field.
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
        let (raw_upload, body) = match raw_field {
            Some(field) => (Some((field, body)), Bytes::new()),
            None => match http_body_util::Limited::new(body, self.inner.max_body)
                .collect()
                .await
            {
                Ok(c) => (None, c.to_bytes()),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    let message = format!("request body larger than {} bytes", self.inner.max_body);
                    return Err(http_error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        tonic::Code::ResourceExhausted,
                        &message,
                        vec![],
                    ));
                }
                Err(e) => return Err(bad(format!("cannot read the request body: {e}"))),
            },
        };
        // Raw downloads (`?alt=media` or `Accept: application/octet-stream`) of a stream
        // of bytes; `Range` maps onto `offset`/`length`.
        let accept = parts
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let raw_download = b.rpc.is_server_streaming()
            && (query.split('&').any(|p| p == "alt=media")
                || accept.contains("application/octet-stream"));
        let range = if raw_download {
            parse_range(&parts.headers)?
        } else {
            None
        };
        let input = b.rpc.input();
        let mut msg = DynamicMessage::new(input.clone());
        let mut body_keys = Vec::new();
        if !b.body.is_empty() && !body.is_empty() {
            let json: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
            if b.body == "*" {
                msg = self.parse_json(input.clone(), json, "")?;
            } else {
                if let serde_json::Value::Object(m) = &json {
                    body_keys = m.keys().cloned().collect();
                }
                let field = input
                    .get_field_by_name(&b.body)
                    .ok_or_else(|| bad(format!("no body field {}", b.body)))?;
                let value = match field.kind() {
                    Kind::Message(m) => {
                        Value::Message(self.parse_json(m, json, &format!("{}.", b.body))?)
                    }
                    _ => return Err(bad("only message body fields are supported")),
                };
                msg.set_field(&field, value);
            }
        }
        for (path, value) in &vars {
            set_path(&mut msg, path, value)
                .map_err(|e| bad(format!("path parameter {path}: {e}")))?;
        }
        let mut timeout = None;
        // EventSource cannot send headers: a browser passes its token as `access_token`.
        let mut query_token = None;
        for (key, value) in form_urlencoded(&query) {
            if key == "timeout" {
                timeout = Some(value);
                continue;
            }
            if key == "access_token" {
                query_token = Some(value);
                continue;
            }
            if key == "alt" {
                continue;
            }
            if vars.iter().any(|(p, _)| p == &key) {
                continue;
            }
            set_path(&mut msg, &key, &value)
                .map_err(|e| bad(format!("query parameter {key}: {e}")))?;
        }
        // Last-Event-ID resumes a stream after the last event the client saw.
        if let Some(last) = parts
            .headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            && let Some(f) = input.get_field_by_name("after_sequence")
        {
            let seq: i64 = last
                .trim()
                .parse()
                .map_err(|_| bad("Last-Event-ID must be a sequence number"))?;
            msg.set_field(&f, Value::I64(seq));
        }
        if let Some((start, end)) = range {
            let (Some(off), Some(len)) = (
                input.get_field_by_name("offset"),
                input.get_field_by_name("length"),
            ) else {
                return Err(bad("this stream does not take a Range"));
            };
            // Checked: `bytes=0-18446744073709551615` is a valid header, not a length.
            let length = end.map_or(0, |e| e.saturating_sub(start).saturating_add(1));
            msg.set_field(&off, Value::I64(i64::try_from(start).unwrap_or(i64::MAX)));
            msg.set_field(&len, Value::I64(i64::try_from(length).unwrap_or(i64::MAX)));
        }
        // PATCH without update_mask: the fields present in the body.
        if parts.method == Method::PATCH
            && let Some(mask) = input.get_field_by_name("update_mask")
            && !msg.has_field(&mask)
            && !body_keys.is_empty()
            && let Kind::Message(body_desc) = input
                .get_field_by_name(&b.body)
                .map(|f| f.kind())
                .unwrap_or(Kind::Bool)
        {
            let paths: Vec<Value> = body_keys
                .iter()
                .filter_map(|k| {
                    body_desc
                        .get_field_by_json_name(k)
                        .or_else(|| body_desc.get_field_by_name(k))
                })
                .filter(|f| !matches!(f.name(), "name" | "etag"))
                .map(|f| Value::String(f.name().to_owned()))
                .collect();
            if let Kind::Message(fm) = mask.kind() {
                let mut m = DynamicMessage::new(fm.clone());
                if let Some(pf) = fm.get_field_by_name("paths") {
                    m.set_field(&pf, Value::List(paths));
                }
                msg.set_field(&mask, Value::Message(m));
            }
        }

        let grpc_path = format!("/{}/{}", b.rpc.parent_service().full_name(), b.rpc.name());
        let mut frame = BytesMut::with_capacity(msg.encoded_len() + 5);
        frame.extend_from_slice(&[0]);
        frame.extend_from_slice(&(msg.encoded_len() as u32).to_be_bytes());
        msg.encode(&mut frame).map_err(|e| bad(e.to_string()))?;
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
            if !watch || raw_download || parts.method != Method::GET {
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
        let first = frame.freeze();
        let inner_body = match raw_upload {
            None => Body::from(first),
            Some((field, body)) => {
                let data = body.into_data_stream().map(|r| {
                    r.map_err(|e| crate::AppError::Aborted(format!("upload body broken: {e}")))
                });
                let chunks =
                    crate::storage::rechunk(data, crate::domain::asset::CHUNK).map(move |chunk| {
                        let chunk = chunk.map_err(|e| std::io::Error::other(e.to_string()))?;
                        let mut m = DynamicMessage::new(field.parent_message().clone());
                        m.set_field(&field, Value::Bytes(chunk));
                        let mut f = BytesMut::with_capacity(m.encoded_len() + 5);
                        f.extend_from_slice(&[0]);
                        f.extend_from_slice(&(m.encoded_len() as u32).to_be_bytes());
                        m.encode(&mut f).map_err(std::io::Error::other)?;
                        Ok::<_, std::io::Error>(f.freeze())
                    });
                Body::from_stream(
                    futures::stream::once(async move { Ok::<_, std::io::Error>(first) })
                        .chain(chunks),
                )
            }
        };
        let inner = inner.body(inner_body).map_err(|e| bad(e.to_string()))?;
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
        if raw_download {
            return self.raw_download(rbody, output, range, headers).await;
        }
        if b.rpc.is_server_streaming() {
            let sse = parts
                .headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("text/event-stream"));
            return Ok(self.stream(rbody, output, b.response_body.clone(), sse, headers));
        }
        let mut reader = FrameReader::new(rbody);
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
        let bytes = match first {
            Some(Ok(b)) => b,
            Some(Err(e)) => return Err(error_response(tonic::Code::Internal, &e, vec![])),
            None => Bytes::new(),
        };
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

    fn parse_json(
        &self,
        desc: MessageDescriptor,
        json: serde_json::Value,
        prefix: &str,
    ) -> Result<DynamicMessage, Box<Response>> {
        DynamicMessage::deserialize_with_options(desc, json, &self.inner.json_in).map_err(|e| {
            bad(format!(
                "invalid JSON for {}: {e}",
                if prefix.is_empty() {
                    "the body"
                } else {
                    prefix.trim_end_matches('.')
                }
            ))
        })
    }

    fn render_json(
        &self,
        msg: &DynamicMessage,
        response_body: &str,
    ) -> Result<String, Box<Response>> {
        let field;
        let msg = if response_body.is_empty() {
            msg
        } else {
            field = msg.get_field_by_name(response_body);
            match field.as_deref() {
                Some(Value::Message(m)) => m,
                _ => return Ok("null".into()),
            }
        };
        serde_json::to_string(&Json(msg, &self.inner.json_out))
            .map_err(|e| error_response(tonic::Code::Internal, &e.to_string(), vec![]))
    }

    fn stream(
        &self,
        body: Body,
        output: MessageDescriptor,
        response_body: String,
        sse: bool,
        mut headers: HeaderMap,
    ) -> Response {
        let this = self.clone();
        let reader = FrameReader::new(body);
        let seq_field = output.get_field_by_name("sequence");
        let lines = futures::stream::unfold((reader, false), move |(mut reader, done)| {
            let (this, output, response_body, seq_field) = (
                this.clone(),
                output.clone(),
                response_body.clone(),
                seq_field.clone(),
            );
            async move {
                if done {
                    return None;
                }
                let next = if sse {
                    match tokio::time::timeout(KEEP_ALIVE, reader.next()).await {
                        Ok(n) => n,
                        Err(_) => {
                            return Some((
                                Ok::<_, std::io::Error>(Bytes::from_static(b": keep-alive\n\n")),
                                (reader, false),
                            ));
                        }
                    }
                } else {
                    reader.next().await
                };
                let chunk = match next {
                    Some(Ok(bytes)) => {
                        let json = DynamicMessage::decode(output, bytes)
                            .map_err(|e| e.to_string())
                            .and_then(|m| {
                                this.render_json(&m, &response_body)
                                    .map(|j| (j, m))
                                    .map_err(|_| "cannot render message".to_owned())
                            });
                        match json {
                            Ok((json, m)) if sse => {
                                let id = seq_field
                                    .as_ref()
                                    .and_then(|f| m.get_field(f).as_i64())
                                    .map(|s| format!("id: {s}\n"))
                                    .unwrap_or_default();
                                format!("{id}event: message\ndata: {json}\n\n")
                            }
                            Ok((json, _)) => format!("{{\"result\":{json}}}\n"),
                            // The error is the stream's last line: what follows a
                            // message that could not be rendered is not sent.
                            Err(e) => {
                                let last = final_line(sse, tonic::Code::Internal, &e);
                                return Some((Ok(Bytes::from(last)), (reader, true)));
                            }
                        }
                    }
                    Some(Err(e)) => {
                        let last = final_line(sse, tonic::Code::Internal, &e);
                        return Some((Ok(Bytes::from(last)), (reader, true)));
                    }
                    None => {
                        let (code, message) = reader
                            .trailers
                            .as_ref()
                            .and_then(status_of)
                            .unwrap_or((tonic::Code::Ok, String::new()));
                        if code == tonic::Code::Ok && !sse {
                            return None;
                        }
                        return Some((
                            Ok(Bytes::from(final_line(sse, code, &message))),
                            (reader, true),
                        ));
                    }
                };
                Some((Ok(Bytes::from(chunk)), (reader, false)))
            }
        });
        let mut r = Response::new(Body::from_stream(lines));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(if sse {
                "text/event-stream"
            } else {
                "application/x-ndjson"
            }),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        *r.headers_mut() = headers;
        r
    }
}

impl Edge {
    /// A stream of {metadata message | bytes} as a raw HTTP body: headers from the
    /// first message (`content_type`, `size_bytes`, `sha256`), then the bytes.
    async fn raw_download(
        &self,
        body: Body,
        output: MessageDescriptor,
        range: Option<(u64, Option<u64>)>,
        mut headers: HeaderMap,
    ) -> Result<Response, Box<Response>> {
        let Some(bytes_field) = output.fields().find(|f| f.kind() == Kind::Bytes) else {
            return Err(bad("this stream has no bytes to download raw"));
        };
        let mut reader = FrameReader::new(body);
        let first = match reader.next().await {
            Some(Ok(b)) => DynamicMessage::decode(output.clone(), b)
                .map_err(|e| error_response(tonic::Code::Internal, &e.to_string(), vec![]))?,
            Some(Err(e)) => return Err(error_response(tonic::Code::Internal, &e, vec![])),
            None => {
                return Err(reader
                    .trailers
                    .as_ref()
                    .and_then(status_error)
                    .unwrap_or_else(|| {
                        error_response(tonic::Code::Internal, "empty stream", vec![])
                    }));
            }
        };
        let meta = output
            .fields()
            .find_map(|f| match first.get_field(&f).as_ref() {
                Value::Message(m) if first.has_field(&f) => Some(m.clone()),
                _ => None,
            });
        let text = |name: &str| {
            meta.as_ref()
                .and_then(|m| m.get_field_by_name(name))
                .and_then(|v| v.as_str().map(str::to_owned))
        };
        let size = meta
            .as_ref()
            .and_then(|m| m.get_field_by_name("size_bytes"))
            .and_then(|v| v.as_i64())
            .unwrap_or(0)
            .max(0) as u64;
        let put = |h: &mut HeaderMap, k: header::HeaderName, v: String| {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(k, v);
            }
        };
        put(
            &mut headers,
            header::CONTENT_TYPE,
            text("content_type")
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| "application/octet-stream".into()),
        );
        if let Some(sha) = text("sha256") {
            put(&mut headers, header::ETAG, format!("\"{sha}\""));
        }
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        let status = match range {
            Some((start, end)) => {
                let end = end.map_or(size, |e| e.saturating_add(1).min(size));
                put(
                    &mut headers,
                    header::CONTENT_RANGE,
                    format!("bytes {start}-{}/{size}", end.saturating_sub(1)),
                );
                put(
                    &mut headers,
                    header::CONTENT_LENGTH,
                    end.saturating_sub(start).to_string(),
                );
                StatusCode::PARTIAL_CONTENT
            }
            None => {
                put(&mut headers, header::CONTENT_LENGTH, size.to_string());
                StatusCode::OK
            }
        };
        let chunks = futures::stream::unfold(reader, move |mut reader| {
            let (output, bytes_field) = (output.clone(), bytes_field.clone());
            async move {
                match reader.next().await {
                    Some(Ok(b)) => {
                        let item = DynamicMessage::decode(output, b)
                            .map_err(std::io::Error::other)
                            .map(|m| {
                                m.get_field(&bytes_field)
                                    .as_bytes()
                                    .cloned()
                                    .unwrap_or_default()
                            });
                        Some((item, reader))
                    }
                    Some(Err(e)) => Some((Err(std::io::Error::other(e)), reader)),
                    None => match reader.trailers.as_ref().and_then(status_of) {
                        Some((tonic::Code::Ok, _)) | None => None,
                        Some((code, message)) => Some((
                            Err(std::io::Error::other(format!("{code:?}: {message}"))),
                            reader,
                        )),
                    },
                }
            }
        });
        let mut r = Response::new(Body::from_stream(chunks));
        *r.status_mut() = status;
        *r.headers_mut() = headers;
        Ok(r)
    }
}

/// `Range: bytes=a-b` or `bytes=a-` as (start, inclusive end).
/// Canonical proto3 JSON of a message, written straight into a `String`.
struct Json<'a>(&'a DynamicMessage, &'a SerializeOptions);

impl serde::Serialize for Json<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize_with_options(s, self.1)
    }
}

fn parse_range(headers: &HeaderMap) -> Result<Option<(u64, Option<u64>)>, Box<Response>> {
    let Some(value) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let unsatisfiable = || {
        http_error(
            StatusCode::RANGE_NOT_SATISFIABLE,
            tonic::Code::OutOfRange,
            "only one `bytes=start-[end]` range is supported",
            vec![],
        )
    };
    let spec = value.strip_prefix("bytes=").ok_or_else(unsatisfiable)?;
    let (a, b) = spec.split_once('-').ok_or_else(unsatisfiable)?;
    let start: u64 = a.trim().parse().map_err(|_| unsatisfiable())?;
    let end = match b.trim() {
        "" => None,
        e => Some(e.parse::<u64>().map_err(|_| unsatisfiable())?),
    };
    if end.is_some_and(|e| e < start) {
        return Err(unsatisfiable());
    }
    Ok(Some((start, end)))
}

fn final_line(sse: bool, code: tonic::Code, message: &str) -> String {
    let status = http_status(code).as_u16();
    if sse {
        let data =
            serde_json::json!({"code": status, "status": code_name(code), "message": message});
        format!("event: status\ndata: {data}\n\n")
    } else {
        let data = serde_json::json!({"error": {"code": status, "status": code_name(code), "message": message, "details": []}});
        format!("{data}\n")
    }
}

fn status_of(headers: &HeaderMap) -> Option<(tonic::Code, String)> {
    let code = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Some((tonic::Code::from_i32(code), message))
}

/// The JSON error for a non-OK grpc-status in `headers`, details included.
fn status_error(headers: &HeaderMap) -> Option<Box<Response>> {
    let (code, message) = status_of(headers)?;
    if code == tonic::Code::Ok {
        return None;
    }
    let details = headers
        .get("grpc-status-details-bin")
        .and_then(|v| {
            base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(
                    v.as_bytes()
                        .iter()
                        .copied()
                        .filter(|b| *b != b'=')
                        .collect::<Vec<_>>(),
                )
                .ok()
        })
        .and_then(|b| tonic_types::pb::Status::decode(b.as_slice()).ok())
        .map(|s| s.details.iter().map(render_detail).collect())
        .unwrap_or_default();
    Some(error_response(code, &message, details))
}

fn render_detail(any: &prost_types::Any) -> serde_json::Value {
    if any.type_url.ends_with("google.rpc.BadRequest")
        && let Ok(b) = tonic_types::pb::BadRequest::decode(any.value.as_slice())
    {
        let violations: Vec<_> = b
            .field_violations
            .into_iter()
            .map(|v| serde_json::json!({"field": v.field, "description": v.description}))
            .collect();
        return serde_json::json!({"@type": any.type_url, "fieldViolations": violations});
    }
    if any.type_url.ends_with("google.rpc.RetryInfo")
        && let Ok(r) = tonic_types::pb::RetryInfo::decode(any.value.as_slice())
    {
        let delay = r.retry_delay.unwrap_or_default();
        let secs = delay.seconds as f64 + f64::from(delay.nanos) / 1e9;
        return serde_json::json!({"@type": any.type_url, "retryDelay": format!("{secs:.3}s")});
    }
    if any.type_url.ends_with("google.rpc.QuotaFailure")
        && let Ok(q) = tonic_types::pb::QuotaFailure::decode(any.value.as_slice())
    {
        let violations: Vec<_> = q
            .violations
            .into_iter()
            .map(|v| serde_json::json!({"subject": v.subject, "description": v.description}))
            .collect();
        return serde_json::json!({"@type": any.type_url, "violations": violations});
    }
    serde_json::json!({"@type": any.type_url})
}

fn percent_decode(s: &str) -> String {
    rules::decode(s, true)
}

/// `a=1&b.c=2&labels[k]=v` pairs, decoded.
fn form_urlencoded(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                percent_decode(&k.replace('+', " ")),
                percent_decode(&v.replace('+', " ")),
            )
        })
        .collect()
}

/// Sets `a.b.c` (or `labels[key]`) on `msg` from text, by the field's type.
fn set_path(msg: &mut DynamicMessage, path: &str, text: &str) -> Result<(), String> {
    let (head, rest) = match path.split_once('.') {
        Some((h, r)) if !h.contains('[') => (h, Some(r)),
        _ => (path, None),
    };
    if let Some((name, key)) = head.split_once('[') {
        let key = key.strip_suffix(']').ok_or("expected name[key]")?;
        let field = field_named(&msg.descriptor(), name)?;
        let Kind::Message(entry) = field.kind() else {
            return Err(format!("{name} is not a map"));
        };
        if !field.is_map() {
            return Err(format!("{name} is not a map"));
        }
        let value = scalar(&entry.map_entry_value_field(), text)?;
        if let Value::Map(map) = msg.get_field_mut(&field) {
            map.insert(MapKey::String(key.to_owned()), value);
        }
        return Ok(());
    }
    let field = field_named(&msg.descriptor(), head)?;
    match rest {
        Some(rest) => {
            let Kind::Message(_) = field.kind() else {
                return Err(format!("{head} has no fields"));
            };
            match msg.get_field_mut(&field) {
                Value::Message(inner) => set_path(inner, rest, text),
                _ => Err(format!("{head} has no fields")),
            }
        }
        None if field.is_list() => {
            let value = scalar(&field, text)?;
            if let Value::List(list) = msg.get_field_mut(&field) {
                list.push(value);
            }
            Ok(())
        }
        None => {
            let value = scalar(&field, text)?;
            msg.set_field(&field, value);
            Ok(())
        }
    }
}

fn field_named(desc: &MessageDescriptor, name: &str) -> Result<FieldDescriptor, String> {
    desc.get_field_by_name(name)
        .or_else(|| desc.get_field_by_json_name(name))
        .ok_or_else(|| format!("unknown field `{name}` in {}", desc.full_name()))
}

/// A single value from text: scalars, enums by name or number, and well-known types
/// in their JSON string forms (Timestamp, Duration, FieldMask).
fn scalar(field: &FieldDescriptor, text: &str) -> Result<Value, String> {
    let wrong = |what: &str| format!("{text:?} is not {what}");
    Ok(match field.kind() {
        Kind::String => Value::String(text.to_owned()),
        Kind::Bool => Value::Bool(text.parse().map_err(|_| wrong("true or false"))?),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            Value::I32(text.parse().map_err(|_| wrong("a 32-bit integer"))?)
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            Value::I64(text.parse().map_err(|_| wrong("a 64-bit integer"))?)
        }
        Kind::Uint32 | Kind::Fixed32 => {
            Value::U32(text.parse().map_err(|_| wrong("an unsigned integer"))?)
        }
        Kind::Uint64 | Kind::Fixed64 => {
            Value::U64(text.parse().map_err(|_| wrong("an unsigned integer"))?)
        }
        Kind::Float => Value::F32(text.parse().map_err(|_| wrong("a number"))?),
        Kind::Double => Value::F64(text.parse().map_err(|_| wrong("a number"))?),
        Kind::Bytes => Value::Bytes(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|_| wrong("base64"))?
                .into(),
        ),
        Kind::Enum(e) => match e.get_value_by_name(text) {
            Some(v) => Value::EnumNumber(v.number()),
            None => Value::EnumNumber(
                text.parse()
                    .map_err(|_| format!("{text:?} is not a value of {}", e.full_name()))?,
            ),
        },
        Kind::Message(m) => {
            // Well-known types take their JSON string form.
            let json = serde_json::Value::String(text.to_owned());
            Value::Message(
                DynamicMessage::deserialize(m.clone(), json)
                    .map_err(|e| format!("{text:?} is not a valid {}: {e}", m.full_name()))?,
            )
        }
    })
}

/// Reads gRPC length-prefixed messages from a response body, keeping the trailers.
struct FrameReader {
    body: Body,
    buf: BytesMut,
    trailers: Option<HeaderMap>,
    ended: bool,
}

impl FrameReader {
    fn new(body: Body) -> Self {
        Self {
            body,
            buf: BytesMut::new(),
            trailers: None,
            ended: false,
        }
    }

    async fn next(&mut self) -> Option<Result<Bytes, String>> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() >= 5 + len {
                    if self.buf[0] != 0 {
                        // Nothing after a frame we cannot read can be trusted: the
                        // stream ends here, with this error.
                        self.buf.clear();
                        self.ended = true;
                        return Some(Err("compressed responses are not supported".into()));
                    }
                    self.buf.advance(5);
                    return Some(Ok(self.buf.split_to(len).freeze()));
                }
            }
            if self.ended {
                return None;
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(t) = frame.trailers_ref() {
                        self.trailers = Some(t.clone());
                    } else if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => {
                    self.ended = true;
                    return Some(Err(e.to_string()));
                }
                None => self.ended = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// gRPC frames as a response body: (compressed flag, message bytes) each.
    fn frames(messages: &[(u8, &[u8])]) -> Body {
        let mut out = Vec::new();
        for (flag, m) in messages {
            out.push(*flag);
            out.extend_from_slice(&(m.len() as u32).to_be_bytes());
            out.extend_from_slice(m);
        }
        Body::from(out)
    }

    #[tokio::test]
    async fn a_frame_that_cannot_be_read_ends_the_stream() {
        let mut reader = FrameReader::new(frames(&[(1, b"zz"), (0, b"")]));
        assert!(matches!(reader.next().await, Some(Err(_))));
        assert!(reader.next().await.is_none(), "the error is not repeated");
    }

    #[tokio::test]
    async fn a_streamed_error_is_the_last_line() {
        let pool = super::super::test_pool(
            r#"syntax = "proto3";
package t;
import "google/api/annotations.proto";
message Event { int64 sequence = 1; string text = 2; }
"#,
        );
        let edge = Edge::with_pool(&pool, Router::new(), 1 << 20, true).unwrap();
        let output = pool.get_message_by_name("t.Event").unwrap();
        // A message, one that does not decode (a field without its value), another.
        let good = [0x08, 0x01];
        for sse in [false, true] {
            let body = frames(&[(0, &good), (0, &[0x12]), (0, &good)]);
            let r = edge.stream(body, output.clone(), String::new(), sse, HeaderMap::new());
            let text = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
            let text = String::from_utf8_lossy(&text);
            let results = text.matches("\"sequence\":\"1\"").count();
            assert_eq!(results, 1, "nothing is sent after the error: {text}");
            assert!(text.trim_end().ends_with('}'), "{text}");
            assert!(text.contains("INTERNAL"), "{text}");
        }
    }

    /// `response_body` and `additional_bindings` (rule forms our own API does not use)
    /// over HTTP on a real socket: a test proto, and a gRPC stub that echoes what the
    /// edge sent it.
    #[tokio::test]
    async fn response_body_and_additional_bindings_over_http() {
        let pool = super::super::test_pool(
            r#"syntax = "proto3";
package t;
import "google/api/annotations.proto";
service S {
  rpc Get(Req) returns (Resp) {
    option (google.api.http) = {
      get: "/v1/{name=shelves/*/books/*}"
      response_body: "book"
      additional_bindings { get: "/v1/{name=books/**}" }
      additional_bindings { post: "/v1/{name=shelves/*}:lookup" body: "book" }
    };
  }
}
message Book { string title = 1; }
message Req { string name = 1; Book book = 2; }
message Resp { Book book = 1; int64 count = 2; }
"#,
        );

        // The stub answers Resp { book.title = "<name>|<book.title>", count = 7 }.
        let stub_pool = pool.clone();
        let stub = Router::new().route(
            "/t.S/Get",
            axum::routing::post(move |body: Bytes| {
                let pool = stub_pool.clone();
                async move {
                    let req = DynamicMessage::decode(
                        pool.get_message_by_name("t.Req").unwrap(),
                        &body[5..],
                    )
                    .unwrap();
                    let name = req
                        .get_field_by_name("name")
                        .unwrap()
                        .as_str()
                        .unwrap()
                        .to_owned();
                    let given = req
                        .get_field_by_name("book")
                        .and_then(|b| {
                            b.as_message()?
                                .get_field_by_name("title")
                                .map(|t| t.as_str().unwrap_or_default().to_owned())
                        })
                        .unwrap_or_default();
                    let mut resp = DynamicMessage::new(pool.get_message_by_name("t.Resp").unwrap());
                    let mut book = DynamicMessage::new(pool.get_message_by_name("t.Book").unwrap());
                    book.set_field_by_name("title", Value::String(format!("{name}|{given}")));
                    resp.set_field_by_name("book", Value::Message(book));
                    resp.set_field_by_name("count", Value::I64(7));
                    let mut frame = vec![0u8];
                    frame.extend_from_slice(&(resp.encoded_len() as u32).to_be_bytes());
                    resp.encode(&mut frame).unwrap();
                    (
                        [
                            (header::CONTENT_TYPE, "application/grpc"),
                            (header::HeaderName::from_static("grpc-status"), "0"),
                        ],
                        frame,
                    )
                }
            }),
        );
        let edge = Edge::with_pool(&pool, stub, 1 << 20, true).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, edge.router()).await });
        let http = reqwest::Client::new();
        let json = |r: reqwest::Response| async move {
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()
        };

        // response_body: the client gets the `book` field, not the whole Resp.
        let r = http
            .get(format!("{base}/v1/shelves/s1/books/b1"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            json(r).await,
            serde_json::json!({"title": "shelves/s1/books/b1|"})
        );
        // An additional binding (with `**`) calls the same RPC; its rule has no
        // response_body, so the whole Resp comes back.
        let r = http
            .get(format!("{base}/v1/books/a/b/c"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            json(r).await,
            serde_json::json!({"book": {"title": "books/a/b/c|"}, "count": "7"})
        );
        // Another additional binding: custom verb, POST, `body: "book"`.
        let r = http
            .post(format!("{base}/v1/shelves/s9:lookup"))
            .json(&serde_json::json!({"title": "Dune"}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            json(r).await,
            serde_json::json!({"book": {"title": "shelves/s9|Dune"}, "count": "7"})
        );
        // The primary template does not match what only the additional one does.
        let r = http
            .get(format!("{base}/v1/shelves/s1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }

    fn message(name: &str) -> DynamicMessage {
        let pool = DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        DynamicMessage::new(pool.get_message_by_name(name).unwrap())
    }

    fn json(m: &DynamicMessage) -> serde_json::Value {
        serde_json::to_value(m).unwrap()
    }

    #[test]
    fn query_parameters_follow_the_http_rule_mapping() {
        // Nested fields with dots, maps as name[key], ints, and both naming styles.
        let mut m = message("mediaplane.v1.CreateJobRequest");
        for (k, v) in [
            ("job.kind", "render"),
            ("job.priority", "5"),
            ("job.labels[env]", "prod"),
            ("requestId", "r-1"),
            ("job.schedule_time", "2026-01-01T00:00:00Z"),
        ] {
            set_path(&mut m, k, v).unwrap();
        }
        let j = json(&m);
        assert_eq!(j["job"]["kind"], "render");
        assert_eq!(j["job"]["priority"], 5);
        assert_eq!(j["job"]["labels"]["env"], "prod");
        assert_eq!(j["requestId"], "r-1");
        assert_eq!(
            j["job"]["scheduleTime"], "2026-01-01T00:00:00Z",
            "Timestamp from its JSON form"
        );

        // Repeated fields by repeating the key; Duration in its JSON form.
        let mut m = message("mediaplane.v1.AcquireJobsRequest");
        for (k, v) in [
            ("kinds", "render"),
            ("kinds", "transcode"),
            ("lease_duration", "1.5s"),
            ("max_jobs", "3"),
        ] {
            set_path(&mut m, k, v).unwrap();
        }
        let j = json(&m);
        assert_eq!(j["kinds"], serde_json::json!(["render", "transcode"]));
        assert_eq!(j["leaseDuration"], "1.500s");

        // Enums by name or number; FieldMask from its JSON form.
        let mut m = message("mediaplane.v1.CreateSignedUrlRequest");
        set_path(&mut m, "method", "PUT").unwrap();
        assert_eq!(json(&m)["method"], "PUT");
        set_path(&mut m, "method", "1").unwrap();
        assert_eq!(json(&m)["method"], "GET");
        let mut m = message("mediaplane.v1.UpdateProjectRequest");
        set_path(&mut m, "updateMask", "displayName,labels").unwrap();
        assert_eq!(json(&m)["updateMask"], "displayName,labels");

        // int64 in query; errors name the problem.
        let mut m = message("mediaplane.v1.WatchJobRequest");
        set_path(&mut m, "after_sequence", "42").unwrap();
        assert_eq!(json(&m)["afterSequence"], "42", "int64 as a string in JSON");
        assert!(
            set_path(&mut m, "after_sequence", "x")
                .unwrap_err()
                .contains("64-bit integer")
        );
        assert!(
            set_path(&mut m, "nope", "1")
                .unwrap_err()
                .contains("unknown field `nope`")
        );
    }

    #[test]
    fn form_decoding() {
        assert_eq!(
            form_urlencoded("filter=labels.env%20%3D%20%22prod%22&a=b+c&flag"),
            vec![
                ("filter".to_owned(), "labels.env = \"prod\"".to_owned()),
                ("a".to_owned(), "b c".to_owned()),
                ("flag".to_owned(), String::new())
            ]
        );
    }
}
