//! Authentication and owner isolation.
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mediaplane::{auth::Claims, config::JwtSettings, config::Secret, proto::v1 as pb};
use tonic::{Code, Request};

use crate::helpers::*;

#[tokio::test]
async fn owners_cannot_see_each_other_and_admins_see_all() {
    let app = TestApp::spawn().await;
    let (alice, bob) = (token("alice"), token("bob"));
    let a = create_project(&app, &alice, "Alice's").await;
    let b = create_project(&app, &bob, "Bob's").await;
    let mut as_bob = app.projects(&bob);

    let get = as_bob
        .get_project(pb::GetProjectRequest {
            name: a.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(get.code(), Code::NotFound);
    // Same answer as for a project that never existed: nothing reveals it.
    let never_name = format!("projects/{}", uuid::Uuid::now_v7());
    let never = as_bob
        .get_project(pb::GetProjectRequest {
            name: never_name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(never.code(), Code::NotFound);
    assert_eq!(get.message(), format!("project {} not found", a.name));
    assert_eq!(never.message(), format!("project {never_name} not found"));

    let list = as_bob
        .list_projects(pb::ListProjectsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        list.projects
            .iter()
            .map(|p| p.name.clone())
            .collect::<Vec<_>>(),
        vec![b.name.clone()]
    );

    let update = as_bob
        .update_project(pb::UpdateProjectRequest {
            project: Some(pb::Project {
                name: a.name.clone(),
                display_name: "pwned".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(update.code(), Code::NotFound);
    // Even with the right etag, the answer does not change.
    let delete = as_bob
        .delete_project(pb::DeleteProjectRequest {
            name: a.name.clone(),
            etag: a.etag.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(delete.code(), Code::NotFound);
    let still = app
        .projects(&alice)
        .get_project(pb::GetProjectRequest {
            name: a.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still.display_name, "Alice's");

    let mut admin = app.projects(&admin_token("root"));
    let all = admin
        .list_projects(pb::ListProjectsRequest {
            order_by: "create_time".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        all.projects
            .iter()
            .map(|p| p.owner.as_str())
            .collect::<Vec<_>>(),
        vec!["alice", "bob"]
    );
    let got = admin
        .get_project(pb::GetProjectRequest {
            name: b.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.owner, "bob");
}

#[tokio::test]
async fn missing_malformed_expired_and_forged_tokens_are_unauthenticated() {
    let app = TestApp::spawn().await;
    let mut bare = pb::projects_service_client::ProjectsServiceClient::new(app.channel.clone());
    let err = bare
        .list_projects(pb::ListProjectsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("missing authorization"),
        "{}",
        err.message()
    );

    let mut basic = Request::new(pb::ListProjectsRequest::default());
    basic
        .metadata_mut()
        .insert("authorization", "Basic YWxpY2U6cHc=".parse().unwrap());
    assert_eq!(
        bare.list_projects(basic).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    let now = jsonwebtoken::get_current_timestamp();
    let long_expired = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &Claims {
            sub: "alice".into(),
            iat: Some(now - 7200),
            exp: now - 3600,
            ..Claims::default()
        },
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let forged = mediaplane::auth::mint(
        &Secret::new("another-secret-another-secret-0123456"),
        "alice",
        &[],
        &[],
        Duration::from_secs(60),
    )
    .unwrap();
    let mut tampered = token("alice");
    tampered.insert_str(tampered.rfind('.').unwrap() + 1, "AAAA");
    let none_alg = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&format!(r#"{{"sub":"alice","exp":{}}}"#, now + 60))
    );
    for (what, bad, expect) in [
        ("long expired", long_expired, "expired"),
        ("forged", forged, "signature"),
        ("tampered", tampered, ""),
        ("garbage", "not.a.jwt".into(), ""),
        ("alg none", none_alg, ""),
    ] {
        let err = app
            .projects(&bad)
            .list_projects(pb::ListProjectsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{what}");
        assert!(err.message().contains(expect), "{what}: {}", err.message());
    }

    // Jobs and Assets are behind the same door (checked before the request is even read).
    let err = pb::jobs_service_client::JobsServiceClient::new(app.channel.clone())
        .get_job(pb::GetJobRequest {
            name: "projects/x/jobs/y".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = pb::assets_service_client::AssetsServiceClient::new(app.channel.clone())
        .get_asset(pb::GetAssetRequest {
            name: "projects/x/assets/y".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

#[tokio::test]
async fn public_key_tokens_rs256_and_eddsa() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    for (alg, private, public) in [
        (
            Algorithm::EdDSA,
            "ed25519_private.pem",
            "ed25519_public.pem",
        ),
        (Algorithm::RS256, "rsa_private.pem", "rsa_public.pem"),
    ] {
        let public_pem = std::fs::read(format!("{fixtures}/{public}")).unwrap();
        let private_pem = std::fs::read(format!("{fixtures}/{private}")).unwrap();
        let app = TestApp::spawn_with(|s| {
            s.jwt = JwtSettings {
                secret: Some(Secret::new(SECRET)),
                public_key_pem: Some(public_pem),
                ..JwtSettings::default()
            };
        })
        .await;
        let key = match alg {
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&private_pem).unwrap(),
            _ => EncodingKey::from_rsa_pem(&private_pem).unwrap(),
        };
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: "carol".into(),
            iat: Some(now),
            exp: now + 60,
            ..Claims::default()
        };
        let signed = jsonwebtoken::encode(&Header::new(alg), &claims, &key).unwrap();
        let p = create_project(&app, &signed, "signed by key").await;
        assert_eq!(p.owner, "carol", "{alg:?}");
        // HS256 tokens keep working next to the key.
        create_project(&app, &token("dave"), "hs256").await;
        let expired = jsonwebtoken::encode(
            &Header::new(alg),
            &Claims {
                sub: "carol".into(),
                iat: Some(now - 7200),
                exp: now - 3600,
                ..Claims::default()
            },
            &key,
        )
        .unwrap();
        let err = app
            .projects(&expired)
            .list_projects(pb::ListProjectsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{alg:?}");
    }
}
