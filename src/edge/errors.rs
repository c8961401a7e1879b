//! The edge's one JSON error shape (`google.rpc.Status` in JSON, as AIP-193 and
//! gRPC-gateway write it): `{"error": {"code": <HTTP status>, "status": "NOT_FOUND",
//! "message": ..., "details": [...]}}`. Every HTTP error the server writes is built
//! here: routing and body errors, gRPC statuses turned into JSON with their details,
//! the last line of a failed NDJSON stream and the `status` event of an SSE stream.
use axum::{
    body::Body,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::Response,
};
use base64::Engine;
use prost::Message;

use crate::error::http_status;

/// Canonical upper-case name of a code (`NOT_FOUND`), as google.rpc.Code spells it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The error object: what `{"error": ...}` holds, and what an SSE `status` event
/// carries (without details).
pub fn status_json(
    status: StatusCode,
    code: tonic::Code,
    message: &str,
    details: Option<Vec<serde_json::Value>>,
) -> serde_json::Value {
    let mut object = serde_json::json!({
        "code": status.as_u16(),
        "status": code_name(code),
        "message": message,
    });
    if let (Some(details), Some(map)) = (details, object.as_object_mut()) {
        map.insert("details".into(), serde_json::Value::Array(details));
    }
    object
}

/// `{"error": ...}` for `code` at its usual HTTP status.
pub fn error_json(code: tonic::Code, message: &str) -> serde_json::Value {
    serde_json::json!({"error": status_json(http_status(code), code, message, Some(vec![]))})
}

/// An error response for `code`, at its usual HTTP status.
pub fn error_response(
    code: tonic::Code,
    message: &str,
    details: Vec<serde_json::Value>,
) -> Box<Response> {
    http_error(http_status(code), code, message, details)
}

/// An error whose HTTP status is not the code's usual one (404/405 routing, 413).
pub fn http_error(
    status: StatusCode,
    code: tonic::Code,
    message: &str,
    details: Vec<serde_json::Value>,
) -> Box<Response> {
    let body = serde_json::json!({"error": status_json(status, code, message, Some(details))});
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Box::new(r)
}

/// INVALID_ARGUMENT with `message`.
pub fn bad(message: impl Into<String>) -> Box<Response> {
    error_response(tonic::Code::InvalidArgument, &message.into(), vec![])
}

/// The last line of a stream that failed: an SSE `status` event, or an NDJSON
/// `{"error": ...}` line.
pub fn final_line(sse: bool, code: tonic::Code, message: &str) -> String {
    if sse {
        let data = status_json(http_status(code), code, message, None);
        format!("event: status\ndata: {data}\n\n")
    } else {
        format!("{}\n", error_json(code, message))
    }
}

pub fn status_of(headers: &HeaderMap) -> Option<(tonic::Code, String)> {
    let code = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(super::rules::decode_all)
        .unwrap_or_default();
    Some((tonic::Code::from_i32(code), message))
}

/// The JSON error for a non-OK grpc-status in `headers`, details included.
pub fn status_error(headers: &HeaderMap) -> Option<Box<Response>> {
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
