//! Projects: CRUD, validation, masks, etags, idempotency, pagination.
//!
//! Just over 600 lines: one resource's whole contract, each test one rule of it.
use std::collections::{BTreeMap, HashSet};

use mediaplane::proto::v1 as pb;
use prost_types::{FieldMask, Struct, Value, value::Kind};
use tonic::Code;

use crate::helpers::*;

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}

#[tokio::test]
async fn crud_round_trip() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let mut c = app.projects(&t);
    let metadata = Struct {
        fields: BTreeMap::from([
            (
                "fps".to_owned(),
                Value {
                    kind: Some(Kind::NumberValue(24.0)),
                },
            ),
            (
                "brand".to_owned(),
                Value {
                    kind: Some(Kind::StringValue("acme".into())),
                },
            ),
        ]),
    };
    let created = c
        .create_project(pb::CreateProjectRequest {
            project: Some(pb::Project {
                name: "projects/ignored".into(),
                display_name: "Launch film".into(),
                description: "Q4 spot".into(),
                labels: BTreeMap::from([("env".to_owned(), "prod".to_owned())]),
                metadata: Some(metadata.clone()),
                owner: "mallory".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.name.starts_with("projects/"), "{}", created.name);
    let id = uuid::Uuid::parse_str(created.name.trim_start_matches("projects/")).unwrap();
    assert_eq!(id.get_version_num(), 7, "ids are UUIDv7");
    assert_eq!(
        created.owner, "alice",
        "owner comes from the token, not the payload"
    );
    assert_eq!(created.metadata.as_ref(), Some(&metadata));
    assert!(created.create_time.is_some() && !created.etag.is_empty());

    let got = c
        .get_project(pb::GetProjectRequest {
            name: created.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, created);

    let listed = c
        .list_projects(pb::ListProjectsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.projects, vec![created.clone()]);
    assert!(listed.next_page_token.is_empty());

    let updated = c
        .update_project(pb::UpdateProjectRequest {
            project: Some(pb::Project {
                name: created.name.clone(),
                display_name: "Launch film v2".into(),
                description: "dropped".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.display_name, "Launch film v2");
    assert_eq!(
        updated.description, "Q4 spot",
        "fields outside the mask are untouched"
    );
    assert_eq!(updated.labels, created.labels);
    assert_ne!(updated.etag, created.etag);
    let micros = |t: &Option<prost_types::Timestamp>| {
        t.as_ref()
            .map(|t| t.seconds * 1_000_000 + i64::from(t.nanos) / 1000)
    };
    assert!(
        micros(&updated.update_time) > micros(&created.update_time),
        "update_time maintained"
    );

    c.delete_project(pb::DeleteProjectRequest {
        name: created.name.clone(),
        etag: String::new(),
    })
    .await
    .unwrap();
    let gone = c
        .get_project(pb::GetProjectRequest {
            name: created.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let again = c
        .delete_project(pb::DeleteProjectRequest {
            name: created.name,
            etag: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
}

#[tokio::test]
async fn validation_reports_every_field() {
    let app = TestApp::spawn().await;
    let mut c = app.projects(&token("alice"));
    let err = c
        .create_project(pb::CreateProjectRequest {
            project: Some(pb::Project {
                display_name: "".into(),
                description: "x".repeat(2001),
                labels: BTreeMap::from([("Bad Key".to_owned(), "v".to_owned())]),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        violations(&err),
        vec![
            "project.display_name",
            "project.description",
            "project.labels[Bad Key]"
        ],
        "{err:?}"
    );

    let long = c
        .create_project(pb::CreateProjectRequest {
            project: Some(new_project(&"é".repeat(201))),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&long), vec!["project.display_name"]);
    let ok = c
        .create_project(pb::CreateProjectRequest {
            project: Some(new_project(&"é".repeat(200))),
            request_id: String::new(),
        })
        .await;
    assert!(ok.is_ok(), "200 characters (not bytes) is allowed");

    let missing = c
        .create_project(pb::CreateProjectRequest {
            project: None,
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&missing), vec!["project"]);

    let nan = Struct {
        fields: BTreeMap::from([(
            "x".to_owned(),
            Value {
                kind: Some(Kind::NumberValue(f64::NAN)),
            },
        )]),
    };
    let err = c
        .create_project(pb::CreateProjectRequest {
            project: Some(pb::Project {
                display_name: "n".into(),
                metadata: Some(nan),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err), vec!["project.metadata"]);

    for bad in ["", "projects/", "projects/not-a-uuid", "folders/1"] {
        let err = c
            .get_project(pb::GetProjectRequest { name: bad.into() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
        assert_eq!(violations(&err), vec!["name"]);
    }
}

#[tokio::test]
async fn update_masks_are_checked_against_the_allow_list() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "Masks").await;
    let mut c = app.projects(&t);
    for (paths, expected) in [
        (vec!["owner"], "output only"),
        (vec!["create_time"], "output only"),
        (vec!["name"], "output only"),
        (vec!["nope"], "unknown field"),
        (vec![], "required"),
    ] {
        let err = c
            .update_project(pb::UpdateProjectRequest {
                project: Some(pb::Project {
                    name: p.name.clone(),
                    owner: "mallory".into(),
                    ..Default::default()
                }),
                update_mask: mask(&paths),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{paths:?}");
        assert_eq!(violations(&err), vec!["update_mask"]);
        assert!(
            err.message().contains(expected),
            "{paths:?}: {}",
            err.message()
        );
    }

    // Validation applies to masked fields only; `*` replaces all of them.
    let err = c
        .update_project(pb::UpdateProjectRequest {
            project: Some(pb::Project {
                name: p.name.clone(),
                display_name: String::new(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err), vec!["project.display_name"]);
    let labels = BTreeMap::from([("team".to_owned(), "video".to_owned())]);
    let updated = c
        .update_project(pb::UpdateProjectRequest {
            project: Some(pb::Project {
                name: p.name.clone(),
                labels: labels.clone(),
                ..Default::default()
            }),
            update_mask: mask(&["labels"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (updated.labels, updated.display_name.as_str()),
        (labels, "Masks")
    );
    let all = c
        .update_project(pb::UpdateProjectRequest {
            project: Some(pb::Project {
                name: p.name.clone(),
                display_name: "All".into(),
                ..Default::default()
            }),
            update_mask: mask(&["*"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(all.labels.is_empty() && all.display_name == "All");
}

#[tokio::test]
async fn stale_etags_are_aborted() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "Etags").await;
    let mut c = app.projects(&t);
    let update = |etag: &str, name: &str| pb::UpdateProjectRequest {
        project: Some(pb::Project {
            name: p.name.clone(),
            display_name: name.into(),
            etag: etag.into(),
            ..Default::default()
        }),
        update_mask: mask(&["display_name"]),
    };
    let v2 = c
        .update_project(update(&p.etag, "v2"))
        .await
        .unwrap()
        .into_inner();
    let stale = c
        .update_project(update(&p.etag, "lost update"))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    let forged = c
        .update_project(update("W/\"whatever\"", "x"))
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::Aborted);
    let current = c
        .get_project(pb::GetProjectRequest {
            name: p.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(current.display_name, "v2");
    assert_eq!(current.etag, v2.etag);

    let del = c
        .delete_project(pb::DeleteProjectRequest {
            name: p.name.clone(),
            etag: p.etag.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(del.code(), Code::Aborted);
    c.delete_project(pb::DeleteProjectRequest {
        name: p.name.clone(),
        etag: v2.etag,
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn request_id_makes_create_idempotent_even_concurrently() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let request = |name: &str| pb::CreateProjectRequest {
        project: Some(new_project(name)),
        request_id: "req-42".into(),
    };

    let mut calls = Vec::new();
    for _ in 0..8 {
        let mut c = app.projects(&t);
        let r = request("Once");
        calls.push(tokio::spawn(async move {
            c.create_project(r).await.map(|r| r.into_inner())
        }));
    }
    let mut names = HashSet::new();
    for call in calls {
        names.insert(call.await.unwrap().expect("every retry succeeds").name);
    }
    assert_eq!(names.len(), 1, "one project for one request id: {names:?}");

    let mut c = app.projects(&t);
    let listed = c
        .list_projects(pb::ListProjectsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.projects.len(), 1);

    let different = c
        .create_project(request("Other payload"))
        .await
        .unwrap_err();
    assert_eq!(different.code(), Code::AlreadyExists);

    // Request ids are per caller: bob's "req-42" is his own.
    let bobs = app
        .projects(&token("bob"))
        .create_project(request("Once"))
        .await
        .unwrap()
        .into_inner();
    assert!(!names.contains(&bobs.name));
}

/// Pages through everything that existed before, while other rows are inserted.
async fn page_through(app: &TestApp, t: &str, order_by: &str, page_size: i32) -> Vec<String> {
    let mut c = app.projects(t);
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = c
            .list_projects(pb::ListProjectsRequest {
                page_size,
                page_token: page_token.clone(),
                filter: String::new(),
                order_by: order_by.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.projects.len() <= page_size as usize);
        seen.extend(page.projects.into_iter().map(|p| p.name));
        if page.next_page_token.is_empty() {
            return seen;
        }
        page_token = page.next_page_token;
    }
}

#[tokio::test]
async fn a_page_of_large_projects_is_cut_to_fit_one_response() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    // 80 projects of ~60 KB of metadata: about 4.8 MB, past the 4 MiB message limit.
    let metadata = sized_struct("brief", 60_000);
    for i in 0..80 {
        app.projects(&t)
            .create_project(pb::CreateProjectRequest {
                project: Some(pb::Project {
                    display_name: format!("large {i}"),
                    metadata: Some(metadata.clone()),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .unwrap();
    }
    let first = app
        .projects(&t)
        .list_projects(pb::ListProjectsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("a page that fits, not the whole list refused")
        .into_inner();
    assert!(
        (1..80).contains(&first.projects.len()) && !first.next_page_token.is_empty(),
        "{} projects on the first page",
        first.projects.len()
    );
    let all = page_through(&app, &t, "", 1000).await;
    assert_eq!(all.len(), 80);
    assert_eq!(
        all.iter().collect::<HashSet<_>>().len(),
        80,
        "no project twice"
    );
}

#[tokio::test]
async fn pagination_has_no_duplicates_or_gaps_under_concurrent_inserts() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let mut before = HashSet::new();
    for i in 0..60 {
        before.insert(create_project(&app, &t, &format!("p{i}")).await.name);
    }
    let writer = {
        let mut c = app.projects(&t);
        tokio::spawn(async move {
            for i in 0..40 {
                c.create_project(pb::CreateProjectRequest {
                    project: Some(new_project(&format!("late{i}"))),
                    request_id: String::new(),
                })
                .await
                .unwrap();
            }
        })
    };
    for order in ["", "create_time", "create_time desc"] {
        let seen = page_through(&app, &t, order, 7).await;
        let unique: HashSet<_> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), seen.len(), "duplicates with order {order:?}");
        assert!(
            before.is_subset(&unique),
            "rows that existed before were skipped with order {order:?}"
        );
    }
    writer.await.unwrap();

    // Order really is by creation, both ways.
    let asc = page_through(&app, &t, "create_time", 1000).await;
    let mut desc = page_through(&app, &t, "", 1000).await;
    desc.reverse();
    assert_eq!(asc.len(), 100);
    assert_eq!(asc, desc);
}

#[tokio::test]
async fn page_size_limits_and_tokens() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    for i in 0..55 {
        create_project(&app, &t, &format!("p{i}")).await;
    }
    let mut c = app.projects(&t);
    let first = c
        .list_projects(pb::ListProjectsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.projects.len(), 50, "default page size");
    let big = c
        .list_projects(pb::ListProjectsRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        big.projects.len(),
        55,
        "over the maximum is clamped, not an error"
    );
    let neg = c
        .list_projects(pb::ListProjectsRequest {
            page_size: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&neg), vec!["page_size"]);

    for token_value in ["garbage", "eyJ2IjoxfQ"] {
        let err = c
            .list_projects(pb::ListProjectsRequest {
                page_token: token_value.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(violations(&err), vec!["page_token"], "{token_value}");
    }
    // A token is bound to its query: another filter, order or caller rejects it.
    let foreign = [
        pb::ListProjectsRequest {
            page_token: first.next_page_token.clone(),
            order_by: "create_time".into(),
            ..Default::default()
        },
        pb::ListProjectsRequest {
            page_token: first.next_page_token.clone(),
            filter: "labels.a:*".into(),
            ..Default::default()
        },
    ];
    for r in foreign {
        assert_eq!(
            c.list_projects(r).await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }
    let err = app
        .projects(&token("bob"))
        .list_projects(pb::ListProjectsRequest {
            page_token: first.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let bad_order = c
        .list_projects(pb::ListProjectsRequest {
            order_by: "display_name".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&bad_order), vec!["order_by"]);
}

#[tokio::test]
async fn list_filters_by_labels() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let mut c = app.projects(&t);
    for (name, labels) in [
        ("a", vec![("env", "prod"), ("team", "ads")]),
        ("b", vec![("env", "dev")]),
        ("c", vec![("env", "prod")]),
    ] {
        c.create_project(pb::CreateProjectRequest {
            project: Some(pb::Project {
                display_name: name.into(),
                labels: labels
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap();
    }
    let names = |filter: &'static str| {
        let mut c = c.clone();
        async move {
            let r = c
                .list_projects(pb::ListProjectsRequest {
                    filter: filter.into(),
                    order_by: "create_time".into(),
                    ..Default::default()
                })
                .await?;
            Ok::<_, tonic::Status>(
                r.into_inner()
                    .projects
                    .into_iter()
                    .map(|p| p.display_name)
                    .collect::<Vec<_>>(),
            )
        }
    };
    assert_eq!(
        names(r#"labels.env = "prod""#).await.unwrap(),
        vec!["a", "c"]
    );
    assert_eq!(
        names(r#"labels.env = "prod" AND labels.team:*"#)
            .await
            .unwrap(),
        vec!["a"]
    );
    assert_eq!(names("labels.team:*").await.unwrap(), vec!["a"]);
    assert_eq!(
        names(r#"labels.env = "qa""#).await.unwrap(),
        Vec::<String>::new()
    );
    let err = names("display_name = \"a\"").await.unwrap_err();
    assert_eq!(violations(&err), vec!["filter"]);
}
