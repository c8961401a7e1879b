//! The doors other than native gRPC on the same port: grpc-web, CORS, reflection,
//! plus request ids and message limits.
use mediaplane::{config::CorsOrigins, proto::v1 as pb};
use prost::Message;
use tonic::Code;

use crate::helpers::*;

#[tokio::test]
async fn grpc_web_over_http1_with_cors() {
    let app = TestApp::spawn_with(|s| {
        s.cors_origins = CorsOrigins::List(vec!["http://studio.example".into()])
    })
    .await;
    let t = token("alice");
    let p = create_project(&app, &t, "from a browser").await;
    let http = reqwest::Client::builder().http1_only().build().unwrap();
    let url = app.http("/mediaplane.v1.ProjectsService/GetProject");

    let preflight = http
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "http://studio.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,x-grpc-web,authorization,x-user-agent",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    let h = preflight.headers();
    assert_eq!(h["access-control-allow-origin"], "http://studio.example");
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for name in ["authorization", "x-grpc-web", "content-type"] {
        assert!(allowed.contains(name), "{allowed}");
    }

    let response = http
        .post(&url)
        .header("origin", "http://studio.example")
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("authorization", format!("Bearer {t}"))
        .body(grpc_web_frame(&pb::GetProjectRequest {
            name: p.name.clone(),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "http://studio.example"
    );
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        assert!(exposed.contains(name), "{exposed}");
    }
    let body = response.bytes().await.unwrap();
    let (message, trailers) = parse_grpc_web(&body);
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let got = pb::Project::decode(message.unwrap().as_slice()).unwrap();
    assert_eq!(got.display_name, "from a browser");

    // An origin not on the list gets no CORS grant.
    let other = http
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "http://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());

    // Errors reach browsers as grpc-web statuses too.
    let denied = http
        .post(&url)
        .header("content-type", "application/grpc-web+proto")
        .body(grpc_web_frame(&pb::GetProjectRequest {
            name: p.name.clone(),
        }))
        .send()
        .await
        .unwrap();
    let status = denied
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = denied.bytes().await.unwrap();
    let code = status.unwrap_or_else(|| parse_grpc_web(&body).1);
    assert!(code.contains("16"), "UNAUTHENTICATED expected, got {code}");

    // grpc-web over HTTP/2 as well.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = h2
        .post(&url)
        .header("content-type", "application/grpc-web+proto")
        .header("authorization", format!("Bearer {t}"))
        .body(grpc_web_frame(&pb::GetProjectRequest {
            name: p.name.clone(),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let (message, trailers) = parse_grpc_web(&response.bytes().await.unwrap());
    assert!(
        trailers.contains("grpc-status:0") && message.is_some(),
        "{trailers}"
    );

    // Plain HTTP on the same port is untouched by the grpc-web layer.
    assert_eq!(
        http.get(app.http("/livez")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_every_service() {
    use tokio_stream::StreamExt;
    let app = TestApp::spawn().await;

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(app.channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection needs no token")
        .into_inner();
    let Some(Ok(response)) = stream.next().await else {
        panic!("no reflection answer")
    };
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected answer")
    };
    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    for expected in [
        "grpc.health.v1.Health",
        "mediaplane.v1.AssetsService",
        "mediaplane.v1.JobsService",
        "mediaplane.v1.ProjectsService",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }

    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest as AlphaRequest,
        server_reflection_client::ServerReflectionClient as AlphaClient,
        server_reflection_request::MessageRequest as AlphaMessage,
        server_reflection_response::MessageResponse as AlphaResponse,
    };
    let request = AlphaRequest {
        host: String::new(),
        message_request: Some(AlphaMessage::FileContainingSymbol(
            "mediaplane.v1.ProjectsService".into(),
        )),
    };
    let mut stream = AlphaClient::new(app.channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(Ok(response)) = stream.next().await else {
        panic!("no v1alpha answer")
    };
    let Some(AlphaResponse::FileDescriptorResponse(files)) = response.message_response else {
        panic!("unexpected v1alpha answer")
    };
    let file = prost_types::FileDescriptorProto::decode(files.file_descriptor_proto[0].as_slice())
        .unwrap();
    assert_eq!(file.name(), "mediaplane/v1/projects.proto");
}

#[tokio::test]
async fn request_ids_are_taken_or_generated_and_returned() {
    let app = TestApp::spawn().await;
    let mut c = app.projects(&token("alice"));
    let mut request = tonic::Request::new(pb::ListProjectsRequest::default());
    request
        .metadata_mut()
        .insert("x-request-id", "studio-trace-123".parse().unwrap());
    let response = c.list_projects(request).await.unwrap();
    assert_eq!(
        response.metadata().get("x-request-id").unwrap(),
        "studio-trace-123"
    );

    let response = c
        .list_projects(pb::ListProjectsRequest::default())
        .await
        .unwrap();
    let generated = response
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(uuid::Uuid::parse_str(generated).is_ok(), "{generated}");

    // Errors carry it too, so a user can quote it.
    let err = c
        .get_project(pb::GetProjectRequest { name: "bad".into() })
        .await
        .unwrap_err();
    assert!(err.metadata().get("x-request-id").is_some());
}

#[tokio::test]
async fn oversized_messages_are_resource_exhausted() {
    let app = TestApp::spawn_with(|s| s.max_message_bytes = 16 * 1024).await;
    let mut c = app.projects(&token("alice"));
    let err = c
        .create_project(pb::CreateProjectRequest {
            project: Some(pb::Project {
                display_name: "big".into(),
                description: "x".repeat(20 * 1024),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("16384"),
        "the limit is in the message: {}",
        err.message()
    );

    // grpc-web, binary and base64 text (which a browser without binary support sends):
    // the same code.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let request = pb::CreateProjectRequest {
        project: Some(pb::Project {
            display_name: "big".into(),
            description: "x".repeat(20 * 1024),
            ..Default::default()
        }),
        request_id: String::new(),
    };
    let frame = grpc_web_frame(&request);
    let http = reqwest::Client::builder().http1_only().build().unwrap();
    for text in [false, true] {
        let content_type = if text {
            "application/grpc-web-text"
        } else {
            "application/grpc-web+proto"
        };
        let body = if text {
            b64.encode(&frame).into_bytes()
        } else {
            frame.clone()
        };
        let r = http
            .post(app.http("/mediaplane.v1.ProjectsService/CreateProject"))
            .header("content-type", content_type)
            .header("x-grpc-web", "1")
            .bearer_auth(token("alice"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{content_type}");
        let header = r.headers().get("grpc-status").cloned();
        let body = r.bytes().await.unwrap();
        let body = if text {
            b64.decode(&body).unwrap()
        } else {
            body.to_vec()
        };
        let (_, trailers) = parse_grpc_web(&body);
        let code = header
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_else(|| trailers.clone());
        assert!(
            code == "8" || code.contains("grpc-status:8") || code.contains("grpc-status: 8"),
            "{content_type}: RESOURCE_EXHAUSTED (8) expected: {code}"
        );
    }
}
