//! Raw downloads from S3-compatible storage: `GET ...:download?alt=media` answers `307`
//! to a short-lived URL the store presigned (CreateSignedUrl, called in-process with the
//! caller's own credentials), so the bytes go from the bucket to the client and never
//! through this server. A client following the redirect sends its `Range` again.
use std::time::Duration;

use axum::{
    body::Body,
    http::{HeaderValue, StatusCode, header},
    response::Response,
};
use prost_reflect::{DynamicMessage, Value};
use tower::ServiceExt;

use super::{Edge, Shape, error_response, forward_request, request::Built};

/// How long a redirect's URL stays valid: long enough to follow, short enough that a
/// leaked Location header is soon useless.
const REDIRECT_TTL: Duration = Duration::from_secs(300);

impl Edge {
    pub(super) async fn redirect_download(
        &self,
        parts: &http::request::Parts,
        vars: &[(String, String)],
    ) -> Result<Response, Box<Response>> {
        let internal = |what: &str| error_response(tonic::Code::Internal, what, vec![]);
        let sign = self
            .inner
            .bindings
            .iter()
            .find(|b| b.rpc.name() == "CreateSignedUrl")
            .ok_or_else(|| internal("CreateSignedUrl is not served"))?;
        let input = sign.rpc.input();
        let mut msg = DynamicMessage::new(input.clone());
        let name = vars
            .iter()
            .find(|(field, _)| field == "name")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        msg.set_field_by_name("name", Value::String(name));
        // CreateSignedUrlRequest.Method.GET
        msg.set_field_by_name("method", Value::EnumNumber(1));
        let ttl_field = input
            .get_field_by_name("ttl")
            .ok_or_else(|| internal("CreateSignedUrlRequest without ttl"))?;
        let prost_reflect::Kind::Message(ttl_type) = ttl_field.kind() else {
            return Err(internal("ttl is not a message"));
        };
        let mut ttl = DynamicMessage::new(ttl_type);
        ttl.set_field_by_name("seconds", Value::I64(REDIRECT_TTL.as_secs() as i64));
        msg.set_field(&ttl_field, Value::Message(ttl));
        let built = Built {
            msg,
            timeout: None,
            query_token: None,
        };
        let shape = Shape {
            raw_download: false,
            sse: false,
        };
        let (inner, _) = forward_request(sign, parts, built, None, shape)?;
        let response = self
            .inner
            .grpc
            .clone()
            .oneshot(inner)
            .await
            .unwrap_or_else(|e| match e {});
        let answer = self.unary_answer(sign, response).await?;
        let url = match answer.get_field_by_name("url").as_deref() {
            Some(Value::String(url)) => url.clone(),
            _ => return Err(internal("CreateSignedUrl answered no URL")),
        };
        let location = HeaderValue::from_str(&url).map_err(|_| internal("unusable URL"))?;
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
        r.headers_mut().insert(header::LOCATION, location);
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok(r)
    }
}
