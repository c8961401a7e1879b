//! CORS for browsers (grpc-web and HTTP), from the configured origin list.
use http::{HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::{CorsOrigins, Settings};

/// `None` when no origin is configured: browsers on other origins are then refused.
pub fn layer(settings: &Settings) -> Option<CorsLayer> {
    let origins = match &settings.cors_origins {
        CorsOrigins::None => return None,
        CorsOrigins::Any => AllowOrigin::any(),
        CorsOrigins::List(list) => {
            AllowOrigin::list(list.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
        }
    };
    let headers = |names: &[&'static str]| {
        names
            .iter()
            .map(|n| HeaderName::from_static(n))
            .collect::<Vec<_>>()
    };
    let mut layer = CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers(headers(&[
            "authorization",
            "content-type",
            "x-grpc-web",
            "x-user-agent",
            "grpc-timeout",
            "x-request-id",
            "connect-protocol-version",
            "connect-timeout-ms",
            "last-event-id",
            "range",
        ]))
        .expose_headers(headers(&[
            "grpc-status",
            "grpc-message",
            "grpc-status-details-bin",
            "x-request-id",
            "content-length",
            "content-range",
            "etag",
            "location",
        ]))
        .max_age(settings.cors_max_age);
    // Credentials cannot be combined with a wildcard origin (the Fetch spec forbids it).
    if settings.cors_origins != CorsOrigins::Any {
        layer = layer.allow_credentials(true);
    }
    Some(layer)
}
