//! The edge's own tests, against protos of their own.
use super::{
    request::{form_urlencoded, set_path},
    response::FrameReader,
    *,
};

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
                let req =
                    DynamicMessage::decode(pool.get_message_by_name("t.Req").unwrap(), &body[5..])
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
