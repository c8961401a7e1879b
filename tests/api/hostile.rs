//! Input an attacker (or a buggy client) sends: whatever storage would refuse is
//! INVALID_ARGUMENT / 400 on every door with nothing written; errors quote input only
//! up to a bound; tokens are checked claim by claim; tokens in URLs only where a
//! browser needs them; leases only for the worker that took them; ranges that overflow.
//!
//! One file over 600 lines on purpose: it is the checklist of hostile input, read as
//! one list by whoever reviews the service's exposure.
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mediaplane::proto::v1 as pb;
use prost_types::{Struct, Value, value::Kind};
use tonic::Code;

use crate::helpers::*;

fn text(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

fn one(key: &str, value: Value) -> Struct {
    Struct {
        fields: [(key.to_owned(), value)].into(),
    }
}

/// A Struct nested `levels` deep: {"a": {"a": ... 1}}.
fn nested(levels: usize) -> Struct {
    let mut s = one(
        "leaf",
        Value {
            kind: Some(Kind::NumberValue(1.0)),
        },
    );
    for _ in 1..levels {
        s = one(
            "a",
            Value {
                kind: Some(Kind::StructValue(s)),
            },
        );
    }
    s
}

fn nested_json(levels: usize) -> serde_json::Value {
    let mut v = serde_json::json!({"leaf": 1});
    for _ in 1..levels {
        v = serde_json::json!({ "a": v });
    }
    v
}

async fn project_count(app: &TestApp, t: &str) -> usize {
    app.projects(t)
        .list_projects(pb::ListProjectsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .projects
        .len()
}

#[tokio::test]
async fn input_storage_would_refuse_is_invalid_argument_on_both_doors_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let t = token("mallory");
    let p = create_project(&app, &t, "kept").await;
    let create = |project: pb::Project| {
        let mut c = app.projects(&t);
        async move {
            c.create_project(pb::CreateProjectRequest {
                project: Some(project),
                request_id: String::new(),
            })
            .await
        }
    };
    let bad_projects = [
        (
            "NUL in display_name",
            pb::Project {
                display_name: "a\0b".into(),
                ..Default::default()
            },
        ),
        (
            "NUL in description",
            pb::Project {
                display_name: "ok".into(),
                description: "x\0".into(),
                ..Default::default()
            },
        ),
        (
            "NUL in a metadata key",
            pb::Project {
                display_name: "ok".into(),
                metadata: Some(one("k\0", text("v"))),
                ..Default::default()
            },
        ),
        (
            "NUL in a metadata value",
            pb::Project {
                display_name: "ok".into(),
                metadata: Some(one("k", text("v\0"))),
                ..Default::default()
            },
        ),
        (
            "metadata nested 33 levels",
            pb::Project {
                display_name: "ok".into(),
                metadata: Some(nested(33)),
                ..Default::default()
            },
        ),
        (
            "metadata nested 40 levels",
            pb::Project {
                display_name: "ok".into(),
                metadata: Some(nested(40)),
                ..Default::default()
            },
        ),
    ];
    for (what, project) in bad_projects {
        let err = create(project).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(
            !err.message().contains("decode") || what.contains("40"),
            "{what}: {}",
            err.message()
        );
    }

    let http = reqwest::Client::new();
    let rest_bodies = [
        (
            "NUL in displayName",
            serde_json::json!({"displayName": "a\u{0}b"}),
        ),
        (
            "NUL in a metadata key",
            serde_json::json!({"displayName": "ok", "metadata": {"k\u{0}": 1}}),
        ),
        (
            "NUL in a metadata value",
            serde_json::json!({"displayName": "ok", "metadata": {"k": "\u{0}"}}),
        ),
        (
            "metadata nested 40 levels",
            serde_json::json!({"displayName": "ok", "metadata": nested_json(40)}),
        ),
    ];
    for (what, body) in rest_bodies {
        let r = http
            .post(app.http("/v1/projects"))
            .bearer_auth(&t)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{what}");
        let text = r.text().await.unwrap();
        assert!(
            !text.contains("recursion") && !text.contains("DecodeError") && !text.contains("prost"),
            "{what}: no decoder internals: {text}"
        );
    }
    assert_eq!(project_count(&app, &t).await, 1, "nothing was written");

    // Jobs: input, schedule_time, text fields.
    let job =
        |input: Option<Struct>, schedule: Option<prost_types::Timestamp>| pb::CreateJobRequest {
            parent: p.name.clone(),
            job: Some(pb::Job {
                kind: "render".into(),
                input,
                schedule_time: schedule,
                ..Default::default()
            }),
            request_id: String::new(),
            key: String::new(),
        };
    let bad_jobs = [
        ("NUL in an input key", job(Some(one("\0", text("v"))), None)),
        (
            "NUL in an input value",
            job(Some(one("k", text("\0"))), None),
        ),
        ("input nested 33 levels", job(Some(nested(33)), None)),
        (
            "schedule_time in the year 10000",
            job(
                None,
                Some(prost_types::Timestamp {
                    seconds: 253_402_300_800,
                    nanos: 0,
                }),
            ),
        ),
        (
            "schedule_time past chrono's range",
            job(
                None,
                Some(prost_types::Timestamp {
                    seconds: i64::MAX,
                    nanos: 0,
                }),
            ),
        ),
        (
            "schedule_time before the year 1",
            job(
                None,
                Some(prost_types::Timestamp {
                    seconds: -62_135_596_801,
                    nanos: 0,
                }),
            ),
        ),
        (
            "negative nanos",
            job(
                None,
                Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
            ),
        ),
        (
            "NUL in request_id",
            pb::CreateJobRequest {
                request_id: "r\0".into(),
                ..job(None, None)
            },
        ),
    ];
    for (what, request) in bad_jobs {
        let err = app.jobs(&t).create_job(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
    }
    let r = http
        .post(app.http(&format!("/v1/{}/jobs", p.name)))
        .bearer_auth(&t)
        .json(&serde_json::json!({"kind": "render", "scheduleTime": "9999-12-31T23:59:59Z", "input": {"k": "\u{0}"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // A worker's writes: text with NUL, a retry delay past any sane bound.
    let ok = app
        .jobs(&t)
        .create_job(job(None, None))
        .await
        .unwrap()
        .into_inner();
    let w = token_with("fleet", &["worker"], Duration::from_secs(600));
    let leased = acquire_one(&app, &w, "w", "render").await;
    let err = app
        .jobs(&w)
        .report_progress(pb::ReportProgressRequest {
            name: ok.name.clone(),
            lease_id: leased.lease_id.clone(),
            progress_percent: 10,
            current_step: "step\0".into(),
            message: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    for seconds in [1_000_000_000_000_000, i64::MAX] {
        let err = app
            .jobs(&w)
            .fail_job(pb::FailJobRequest {
                name: ok.name.clone(),
                lease_id: leased.lease_id.clone(),
                error: Some(tonic_types::pb::Status {
                    code: 13,
                    message: "boom".into(),
                    details: vec![],
                }),
                retryable: true,
                retry_after: Some(prost_types::Duration { seconds, nanos: 0 }),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "retry_after {seconds}s");
    }
    // The same over REST.
    for body in [
        serde_json::json!({"leaseId": leased.lease_id, "error": {"code": 13, "message": "boom"}, "retryable": true, "retryAfter": "1000000000000000s"}),
        serde_json::json!({"leaseId": leased.lease_id, "error": {"code": 13, "message": "b\u{0}"}}),
    ] {
        let r = http
            .post(app.http(&format!("/v1/{}:fail", ok.name)))
            .bearer_auth(&w)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
    }
    for when in ["10000-01-01T00:00:00Z", "0000-12-31T23:59:59Z"] {
        let r = http
            .post(app.http(&format!("/v1/{}/jobs", p.name)))
            .bearer_auth(&t)
            .json(&serde_json::json!({"kind": "render", "scheduleTime": when}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{when}");
    }
    let stored = app
        .jobs(&t)
        .get_job(pb::GetJobRequest {
            name: ok.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (stored.state(), stored.current_step.as_str()),
        (pb::job::State::Running, ""),
        "refused writes changed nothing"
    );
    let jobs = app
        .jobs(&t)
        .list_jobs(pb::ListJobsRequest {
            parent: p.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 1, "only the valid job was created");

    // Filters with NUL are refused before they reach a query.
    for filter in ["labels.k = \"a\0\"", "content_type = \"a\0\""] {
        let err = app
            .assets(&t)
            .list_assets(pb::ListAssetsRequest {
                parent: p.name.clone(),
                filter: filter.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{filter:?}");
    }
}

#[tokio::test]
async fn errors_quote_client_input_only_up_to_a_bound() {
    let app = TestApp::spawn().await;
    let t = token("mallory");
    let p = create_project(&app, &t, "target").await;
    // A 1 MB field-mask path: INVALID_ARGUMENT, not a transport error about metadata.
    let err = app
        .projects(&t)
        .update_project(pb::UpdateProjectRequest {
            project: Some(pb::Project {
                name: p.name.clone(),
                display_name: "x".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["p".repeat(1_000_000)],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "{:?}",
        err.message().get(..200)
    );
    assert!(err.message().len() <= 1024, "{}", err.message().len());
    assert!(err.message().contains("truncated"), "{}", err.message());

    // A 200 KB bad label key over REST: a small body that says it was cut.
    let r = reqwest::Client::new()
        .post(app.http("/v1/projects"))
        .bearer_auth(&t)
        .json(&serde_json::json!({"displayName": "x", "labels": {"K".repeat(200_000): "v"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body = r.text().await.unwrap();
    assert!(body.len() < 4096, "error body of {} bytes", body.len());
    assert!(body.contains("truncated"), "{body}");
}

fn sign(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn token_claims_are_checked_one_by_one() {
    let app = TestApp::spawn().await;
    let now = jsonwebtoken::get_current_timestamp();
    let refused = [
        (
            "nbf in the future",
            serde_json::json!({"sub": "a", "iat": now, "nbf": now + 600, "exp": now + 900}),
        ),
        (
            "iat in the future",
            serde_json::json!({"sub": "a", "iat": now + 600, "exp": now + 900}),
        ),
        (
            "lifetime of a year",
            serde_json::json!({"sub": "a", "iat": now, "exp": now + 365 * 86400}),
        ),
        (
            "no iat, a year to run",
            serde_json::json!({"sub": "a", "exp": now + 365 * 86400}),
        ),
        ("no exp", serde_json::json!({"sub": "a", "iat": now})),
    ];
    for (what, claims) in refused {
        let err = app
            .projects(&sign(&claims))
            .list_projects(pb::ListProjectsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{what}");
    }
    let fine = serde_json::json!({"sub": "a", "iat": now, "nbf": now, "exp": now + 600});
    app.projects(&sign(&fine))
        .list_projects(pb::ListProjectsRequest::default())
        .await
        .expect("a well-formed token");

    // With an audience and an issuer configured, both must be present and match.
    let strict = TestApp::spawn_with(|s| {
        s.jwt.audience = Some("mediaplane".into());
        s.jwt.issuer = Some("https://auth.studio.example".into());
    })
    .await;
    let cases = [
        (
            "neither",
            serde_json::json!({"sub": "a", "iat": now, "exp": now + 600}),
            false,
        ),
        (
            "wrong audience",
            serde_json::json!({"sub": "a", "iat": now, "exp": now + 600, "aud": "billing", "iss": "https://auth.studio.example"}),
            false,
        ),
        (
            "wrong issuer",
            serde_json::json!({"sub": "a", "iat": now, "exp": now + 600, "aud": "mediaplane", "iss": "https://evil.example"}),
            false,
        ),
        (
            "both right",
            serde_json::json!({"sub": "a", "iat": now, "exp": now + 600, "aud": "mediaplane", "iss": "https://auth.studio.example"}),
            true,
        ),
        (
            "audience in a list",
            serde_json::json!({"sub": "a", "iat": now, "exp": now + 600, "aud": ["x", "mediaplane"], "iss": "https://auth.studio.example"}),
            true,
        ),
    ];
    for (what, claims, ok) in cases {
        let got = strict
            .projects(&sign(&claims))
            .list_projects(pb::ListProjectsRequest::default())
            .await;
        match (ok, got) {
            (true, Ok(_)) => {}
            (false, Err(e)) => assert_eq!(e.code(), Code::Unauthenticated, "{what}"),
            (_, other) => panic!("{what}: {other:?}"),
        }
    }
    // The server's own tokens carry what it checks.
    let minted =
        mediaplane::auth::mint_for(&strict.settings.jwt, "b", &[], &[], Duration::from_secs(60))
            .unwrap();
    strict
        .projects(&minted)
        .list_projects(pb::ListProjectsRequest::default())
        .await
        .expect("minted by the server");
}

#[tokio::test]
async fn tokens_in_urls_are_taken_only_on_watch_streams() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "keep me").await;
    let job = create_job_of(&app, &t, &p.name, "render").await;
    let http = reqwest::Client::new();
    let asset = create_pending_asset(&app, &t, &p.name, "a").await;
    for (method, path) in [
        (reqwest::Method::DELETE, format!("/v1/{}", p.name)),
        (reqwest::Method::GET, "/v1/projects".to_owned()),
        (reqwest::Method::POST, format!("/v1/{}:cancel", job.name)),
        (reqwest::Method::GET, format!("/v1/{}:download", asset.name)),
    ] {
        let r = http
            .request(
                method.clone(),
                app.http(&format!("{path}?access_token={t}")),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{method} {path}");
    }
    assert_eq!(project_count(&app, &t).await, 1, "the DELETE did nothing");
    // Where EventSource cannot send a header, the query token works.
    let r = http
        .get(app.http(&format!("/v1/{}:watch?access_token={t}", job.name)))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_lease_works_only_for_the_worker_that_acquired_it() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "leases").await;
    let job = create_job_of(&app, &t, &p.name, "render").await;
    let ours = token_with("fleet-a", &["worker"], Duration::from_secs(600));
    let theirs = token_with("fleet-b", &["worker"], Duration::from_secs(600));
    let leased = acquire_one(&app, &ours, "a-1", "render").await;
    let complete = |token: &str| {
        let mut c = app.jobs(token);
        let request = pb::CompleteJobRequest {
            name: job.name.clone(),
            lease_id: leased.lease_id.clone(),
            ..Default::default()
        };
        async move { c.complete_job(request).await }
    };
    let err = complete(&theirs).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::Aborted,
        "refused like a stale lease: {err:?}"
    );
    let err = app
        .jobs(&theirs)
        .report_progress(pb::ReportProgressRequest {
            name: job.name.clone(),
            lease_id: leased.lease_id.clone(),
            progress_percent: 99,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    let now = app
        .jobs(&t)
        .get_job(pb::GetJobRequest {
            name: job.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (now.state(), now.progress_percent),
        (pb::job::State::Running, 0),
        "nothing of the foreign writes was applied"
    );
    let done = complete(&ours)
        .await
        .expect("the holder completes it")
        .into_inner();
    assert_eq!(done.state(), pb::job::State::Succeeded);
}

#[tokio::test]
async fn ranges_that_overflow_are_answered_with_checked_arithmetic() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "ranges").await;
    let asset = create_pending_asset(&app, &t, &p.name, "r.bin").await;
    let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let http = reqwest::Client::new();
    let up = http
        .post(app.http(&format!("/v1/{}:upload", asset.name)))
        .bearer_auth(&t)
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(up.status(), 200);
    let signed = app
        .assets(&t)
        .create_signed_url(pb::CreateSignedUrlRequest {
            name: asset.name.clone(),
            method: pb::create_signed_url_request::Method::Get as i32,
            ttl: None,
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    for range in [
        "bytes=0-18446744073709551615",
        "bytes=100-18446744073709551615",
    ] {
        let start: usize = range[6..range.find('-').unwrap()].parse().unwrap();
        for (door, request) in [
            (
                "edge",
                http.get(app.http(&format!("/v1/{}:download?alt=media", asset.name)))
                    .bearer_auth(&t),
            ),
            ("signed URL", http.get(&signed)),
        ] {
            let r = request.header("range", range).send().await.unwrap();
            assert_eq!(r.status(), 206, "{door} {range}");
            assert_eq!(
                r.headers()["content-length"],
                (data.len() - start).to_string().as_str(),
                "{door} {range}"
            );
            let body = r.bytes().await.unwrap();
            assert_eq!(&body[..], &data[start..], "{door} {range}");
        }
    }
    // A start past any offset is unsatisfiable, not a wrapped number.
    let r = http
        .get(app.http(&format!("/v1/{}:download?alt=media", asset.name)))
        .bearer_auth(&t)
        .header("range", "bytes=18446744073709551615-")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
}

#[tokio::test]
async fn a_lease_taken_on_one_instance_is_honoured_by_another_without_a_shared_secret() {
    // Public-key tokens only: no HMAC secret for the instances to derive keys from.
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let public = std::fs::read(format!("{fixtures}/ed25519_public.pem")).unwrap();
    let private = std::fs::read(format!("{fixtures}/ed25519_private.pem")).unwrap();
    let a = TestApp::spawn_with(|s| {
        s.jwt = mediaplane::config::JwtSettings {
            secret: None,
            public_key_pem: Some(public),
            ..Default::default()
        };
    })
    .await;
    let b = a.spawn_peer().await;
    let now = jsonwebtoken::get_current_timestamp();
    let key = EncodingKey::from_ed_pem(&private).unwrap();
    let sign = |claims: serde_json::Value| {
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &key).unwrap()
    };
    let t = sign(serde_json::json!({"sub": "alice", "iat": now, "exp": now + 600}));
    let w = sign(
        serde_json::json!({"sub": "fleet", "roles": ["worker"], "iat": now, "exp": now + 600}),
    );
    let p = create_project(&a, &t, "two instances").await;
    let job = create_job_of(&a, &t, &p.name, "render").await;
    let leased = acquire_one(&a, &w, "w", "render").await;
    let done = b
        .jobs(&w)
        .complete_job(pb::CompleteJobRequest {
            name: job.name,
            lease_id: leased.lease_id,
            ..Default::default()
        })
        .await
        .expect("the other instance honours the lease")
        .into_inner();
    assert_eq!(done.state(), pb::job::State::Succeeded);
}
