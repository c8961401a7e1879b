//! A REST call's answer: the gRPC response rendered as JSON, NDJSON or SSE, or raw
//! bytes for downloads.

use axum::{
    body::Body,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::Response,
};
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use prost_reflect::{DynamicMessage, Kind, MessageDescriptor, Value};

use super::{Edge, Json, KEEP_ALIVE};
use crate::edge::errors::{bad, error_response, final_line, status_error, status_of};

impl Edge {
    pub(super) fn render_json(
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

    pub(super) fn stream(
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
    pub(super) async fn raw_download(
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

/// Reads gRPC length-prefixed messages from a response body, keeping the trailers.
pub(super) struct FrameReader {
    body: Body,
    buf: BytesMut,
    pub(super) trailers: Option<HeaderMap>,
    ended: bool,
}

impl FrameReader {
    pub(super) fn new(body: Body) -> Self {
        Self {
            body,
            buf: BytesMut::new(),
            trailers: None,
            ended: false,
        }
    }

    pub(super) async fn next(&mut self) -> Option<Result<Bytes, String>> {
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
