//! The studio page: plain HTML, CSS and JavaScript modules, embedded at compile time
//! and served at `/` on the public port. No build step and no Node for `cargo build`;
//! the page loads nothing from elsewhere (its CSP says so), so it works offline. It
//! signs in with a bearer token kept in `sessionStorage` and talks to the REST edge of
//! the same origin, like any other client.
use axum::{
    Router,
    http::{HeaderValue, header},
    response::IntoResponse,
    routing::get,
};

/// Every file of the page: path, content type, bytes.
const FILES: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("studio/index.html"),
    ),
    (
        "/studio/app.css",
        "text/css; charset=utf-8",
        include_str!("studio/app.css"),
    ),
    ("/studio/app.js", JS, include_str!("studio/app.js")),
    ("/studio/api.js", JS, include_str!("studio/api.js")),
    ("/studio/ui.js", JS, include_str!("studio/ui.js")),
    (
        "/studio/projects.js",
        JS,
        include_str!("studio/projects.js"),
    ),
    ("/studio/jobs.js", JS, include_str!("studio/jobs.js")),
    ("/studio/job.js", JS, include_str!("studio/job.js")),
    ("/studio/assets.js", JS, include_str!("studio/assets.js")),
    ("/studio/queues.js", JS, include_str!("studio/queues.js")),
];
const JS: &str = "text/javascript; charset=utf-8";

/// Only this origin: scripts, styles, fetches and EventSource; previews may show blobs.
/// `storage`: the origin of the store's own signed URLs (S3), which previews, downloads
/// and uploads reach directly.
fn csp(storage: Option<&str>) -> String {
    let s = storage.map(|o| format!(" {o}")).unwrap_or_default();
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'{s}; \
         img-src 'self' blob: data:{s}; media-src 'self' blob:{s}; base-uri 'none'; \
         form-action 'none'; frame-ancestors 'none'"
    )
}

pub fn router(storage_origin: Option<&str>) -> Router {
    let csp = HeaderValue::from_str(&csp(storage_origin))
        .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"));
    FILES
        .iter()
        .fold(Router::new(), |router, &(path, content_type, body)| {
            let csp = csp.clone();
            router.route(
                path,
                get(move || async move { file(content_type, body, csp) }),
            )
        })
}

fn file(content_type: &'static str, body: &'static str, csp: HeaderValue) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CONTENT_SECURITY_POLICY, csp),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            // The files change only with the binary: revalidate rather than cache stale.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
}
