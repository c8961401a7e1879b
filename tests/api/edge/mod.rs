//! The HTTP/JSON edge over a real socket: every binding, REST CRUD, JSON edge cases,
//! errors, isolation, and server streams as NDJSON and SSE; one file per behaviour.
use std::time::Duration;

use mediaplane::{config::CorsOrigins, edge::rules::Seg, proto::v1 as pb};
use serde_json::{Value, json};

use crate::helpers::*;

struct Rest {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Rest {
    fn new(app: &TestApp, token: Option<&str>) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: app.http(""),
            token: token.map(str::to_owned),
        }
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

#[tokio::test]
async fn every_binding_in_the_proto_is_routed_through_authentication() {
    let app = TestApp::spawn().await;
    let pool =
        prost_reflect::DescriptorPool::decode(mediaplane::proto::FILE_DESCRIPTOR_SET).unwrap();
    let bindings = mediaplane::edge::rules::bindings(&pool).unwrap();
    let rpcs: usize = pool
        .services()
        .filter(|s| s.package_name() == "mediaplane.v1")
        // Bidirectional streams (WorkerSession) have no HTTP/JSON form.
        .map(|s| {
            s.methods()
                .filter(|m| !(m.is_client_streaming() && m.is_server_streaming()))
                .count()
        })
        .sum();
    assert_eq!(
        bindings.len(),
        rpcs,
        "one binding per RPC that HTTP can carry"
    );
    let anonymous = Rest::new(&app, None);
    for b in &bindings {
        // A concrete path for the template: every `*` and `**` gets an id.
        let id = uuid::Uuid::now_v7().to_string();
        let mut path = String::new();
        for s in &b.template.segs {
            path.push('/');
            path.push_str(match s {
                Seg::Literal(l) => l,
                Seg::Star | Seg::DoubleStar => &id,
            });
        }
        if let Some(v) = &b.template.verb {
            path = format!("{path}:{v}");
        }
        let body = (!b.body.is_empty()).then(|| json!({}));
        let (status, err) = anonymous
            .send(
                reqwest::Method::from_bytes(b.method.as_str().as_bytes()).unwrap(),
                &path,
                body,
            )
            .await;
        // Client-streaming uploads take the raw body, so they too reach authentication.
        let expected = 401;
        assert_eq!(
            status,
            expected,
            "{} {path} ({}): {err}",
            b.method,
            b.rpc.full_name()
        );
        assert!(
            err["error"]["status"].is_string(),
            "JSON error shape for {path}: {err}"
        );
    }
}

async fn lines(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.unwrap();
    text.lines().map(str::to_owned).collect()
}

mod crud;
mod raw;
mod streams;
