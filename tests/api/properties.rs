//! Property tests: arbitrary input to the validators, resource names, page tokens,
//! filters, the HTTP rule matcher and the JSON transcoding never panics and never
//! yields a 500, and what should round-trip does.
use mediaplane::{
    AppError,
    domain::{
        asset::AssetFilter,
        job::JobFilter,
        labels::LabelFilter,
        names::{AssetName, JobName, ProjectName},
        page, text,
    },
    edge::rules::Template,
};
use proptest::{prelude::*, test_runner::TestRunner};

use crate::helpers::*;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Client input is refused as such, never as an internal error.
fn not_internal<T>(r: &Result<T, AppError>) -> bool {
    !matches!(r, Err(AppError::Internal(_)))
}

fn uuid() -> impl Strategy<Value = uuid::Uuid> {
    any::<u128>().prop_map(uuid::Uuid::from_u128)
}

/// Strings made mostly of the characters that matter to our parsers.
fn tricky() -> impl Strategy<Value = String> {
    let pieces = prop_oneof![
        Just("projects/".to_owned()),
        Just("/jobs/".to_owned()),
        Just("/assets/".to_owned()),
        Just("labels.".to_owned()),
        Just(" AND ".to_owned()),
        Just("\"".to_owned()),
        Just("\\".to_owned()),
        Just("=".to_owned()),
        Just(":*".to_owned()),
        Just("%".to_owned()),
        Just("%2F".to_owned()),
        Just("\u{0}".to_owned()),
        Just("é".to_owned()),
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just(":".to_owned()),
        Just("/".to_owned()),
        any::<String>(),
        uuid().prop_map(|u| u.to_string()),
    ];
    prop::collection::vec(pieces, 0..12).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn names_round_trip_and_never_panic(p in uuid(), j in uuid(), s in tricky()) {
        let project = ProjectName(p);
        prop_assert_eq!(ProjectName::parse("name", &project.to_string()).unwrap(), project);
        let job = JobName { project: p, job: j };
        prop_assert_eq!(JobName::parse("name", &job.to_string()).unwrap(), job);
        let asset = AssetName { project: p, asset: j };
        prop_assert_eq!(AssetName::parse("name", &asset.to_string()).unwrap(), asset);
        for r in [
            ProjectName::parse("name", &s).map(|_| ()),
            JobName::parse("name", &s).map(|_| ()),
            AssetName::parse("name", &s).map(|_| ()),
        ] {
            prop_assert!(not_internal(&r));
        }
    }

    #[test]
    fn page_tokens_round_trip_and_foreign_ones_are_invalid(
        id in uuid(),
        micros in 0i64..4_000_000_000_000_000,
        query in "[a-z0-9]{1,16}",
        other in "[A-Z]{1,16}",
        junk in tricky(),
    ) {
        let cursor = page::Cursor {
            create_time: chrono::DateTime::from_timestamp_micros(micros).unwrap(),
            id,
        };
        let token = page::encode(cursor, &query);
        let back = page::decode(&token, &query).unwrap().unwrap();
        prop_assert_eq!((back.create_time, back.id), (cursor.create_time, cursor.id));
        let foreign = matches!(
            page::decode(&token, &other),
            Err(AppError::InvalidArgument { .. })
        );
        prop_assert!(foreign, "a token of another query is INVALID_ARGUMENT");
        let r = page::decode(&junk, &query);
        let fine = r.is_ok() || matches!(r, Err(AppError::InvalidArgument { .. }));
        prop_assert!(fine, "junk tokens are INVALID_ARGUMENT");
    }

    #[test]
    fn filters_never_panic_and_label_filters_round_trip(
        s in tricky(),
        labels in prop::collection::btree_map("[a-z][a-z0-9_-]{0,10}", "[ -~&&[^\"\\\\]]{0,20}", 0..5),
    ) {
        let _ = LabelFilter::parse(&s);
        let _ = JobFilter::parse(&s);
        let _ = AssetFilter::parse(&s);
        let text: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("labels.{k} = \"{v}\""))
            .collect();
        let parsed = LabelFilter::parse(&text.join(" AND ")).unwrap();
        prop_assert_eq!(parsed.equals, labels);
    }

    #[test]
    fn the_rule_matcher_never_panics_and_finds_what_it_bound(
        template in tricky(),
        path in tricky(),
        p in uuid(),
        j in uuid(),
    ) {
        if let Ok(t) = Template::parse(&format!("/{template}")) {
            let _ = t.matches(&format!("/{path}"));
        }
        let t = Template::parse("/v1/{name=projects/*/jobs/*}:cancel").unwrap();
        let name = format!("projects/{p}/jobs/{j}");
        let vars = t.matches(&format!("/v1/{name}:cancel")).unwrap();
        prop_assert_eq!(vars, vec![("name".to_owned(), name)]);
        let _ = t.matches(&format!("/v1/{path}"));
    }

    #[test]
    fn quotes_and_json_checks_are_bounded(s in any::<String>(), depth in 0usize..80) {
        prop_assert!(text::quote(&s).chars().count() <= text::MAX_QUOTE + 40);
        prop_assert!(text::bounded(s.repeat(3)).len() <= text::MAX_MESSAGE);
        let mut v = serde_json::json!(s);
        for _ in 0..depth {
            v = serde_json::json!([v]);
        }
        let checked = text::check_json_value(&v, 0);
        prop_assert_eq!(checked.is_ok(), depth <= text::MAX_JSON_DEPTH && !s.contains('\0'));
    }
}

/// JSON values of any shape, a few levels deep, with the strings that matter.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map_or(serde_json::Value::Null, serde_json::Value::Number)),
        tricky().prop_map(serde_json::Value::from),
        Just(serde_json::Value::from("9999-12-31T23:59:59Z")),
        Just(serde_json::Value::from("0001-01-01T00:00:00Z")),
        Just(serde_json::Value::from("1e999")),
        Just(serde_json::Value::from("-9223372036854775809")),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("displayName".to_owned()),
                    Just("metadata".to_owned()),
                    Just("labels".to_owned()),
                    Just("kind".to_owned()),
                    Just("input".to_owned()),
                    Just("priority".to_owned()),
                    Just("maxAttempts".to_owned()),
                    Just("scheduleTime".to_owned()),
                    Just("ttl".to_owned()),
                    tricky(),
                ],
                inner,
                0..5
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Arbitrary bodies, paths and queries over REST against a real server: never a 500.
#[test]
fn arbitrary_rest_calls_never_answer_500() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (app, project, job) = rt.block_on(async {
        let app = TestApp::spawn_with(|s| s.limits.rates = None).await;
        let t = token("fuzz");
        let p = create_project(&app, &t, "fuzzed").await;
        let job = create_job_of(&app, &t, &p.name, "render").await;
        (app, p.name, job.name)
    });
    let t = token("fuzz");
    let http = reqwest::Client::new();
    let routes = [
        ("POST", "/v1/projects".to_owned()),
        ("PATCH", format!("/v1/{project}")),
        ("POST", format!("/v1/{project}/jobs")),
        ("POST", format!("/v1/{project}/jobs:batchCreate")),
        ("POST", format!("/v1/{project}/assets")),
        ("POST", format!("/v1/{job}:cancel")),
        ("POST", "/v1/jobs:acquire".to_owned()),
    ];
    let mut runner = TestRunner::new(config(256));
    runner
        .run(
            &(0..routes.len(), json(), tricky(), tricky()),
            |(route, body, path, query)| {
                let (method, base) = &routes[route];
                let statuses = rt.block_on(async {
                    let mut out = Vec::new();
                    let r = http
                        .request(method.parse().unwrap(), app.http(base))
                        .bearer_auth(&t)
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    out.push((format!("{method} {base} {body}"), r.status().as_u16()));
                    let encoded: String = url_escape(&path);
                    let r = http
                        .get(app.http(&format!("/v1/{encoded}?{}", url_escape(&query))))
                        .bearer_auth(&t)
                        .send()
                        .await
                        .unwrap();
                    out.push((format!("GET /v1/{encoded}"), r.status().as_u16()));
                    let r = http
                        .get(app.http(&format!(
                            "/v1/{project}/jobs?filter={}&pageToken={}",
                            url_escape(&path),
                            url_escape(&query)
                        )))
                        .bearer_auth(&t)
                        .send()
                        .await
                        .unwrap();
                    out.push(("GET jobs with a filter".to_owned(), r.status().as_u16()));
                    out
                });
                for (what, status) in statuses {
                    prop_assert!(status < 500, "{} answered {}", what, status);
                }
                Ok(())
            },
        )
        .unwrap();
    rt.block_on(async move { drop(app) });
}

/// Percent-encodes everything but unreserved characters.
fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
