//! The studio page, served by the binary at `/`, driven in a real browser (headless
//! Chromium via playwright-core).
use std::process::Command;

use mediaplane::proto::v1 as pb;

use crate::helpers::*;

#[tokio::test]
async fn the_page_is_served_from_the_binary_and_loads_nothing_from_elsewhere() {
    let app = TestApp::spawn().await;
    let http = reqwest::Client::new();
    for (path, kind) in [
        ("/", "text/html"),
        ("/studio/app.js", "text/javascript"),
        ("/studio/api.js", "text/javascript"),
        ("/studio/app.css", "text/css"),
    ] {
        let r = http.get(app.http(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let headers = r.headers();
        assert!(
            headers["content-type"].to_str().unwrap().starts_with(kind),
            "{path}"
        );
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
            "{csp}"
        );
        assert_eq!(headers["x-content-type-options"], "nosniff");
    }
    let html = http
        .get(app.http("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "{html}"
    );
}

#[tokio::test]
async fn a_browser_signs_in_from_the_link_and_manages_projects() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    for needed in [
        "/usr/bin/chromium",
        &format!("{dir}/node_modules/playwright-core"),
    ] {
        assert!(
            std::path::Path::new(needed).exists(),
            "{needed} missing: run scripts/test.sh, which installs it"
        );
    }
    let app = TestApp::spawn().await;
    let t = token("alice");
    let (server, tok) = (app.http(""), t.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(format!("{dir}/studio.mjs"))
            .env("SERVER", server.trim_end_matches('/'))
            .env("TOKEN", tok)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let url = seen["urlAfterLink"].as_str().unwrap();
    assert!(!url.contains("token"), "the fragment is removed: {url}");
    assert_eq!(seen["stored"], t.as_str(), "kept in sessionStorage");
    assert_eq!(seen["searched"], serde_json::json!(["Storyboard"]));
    assert_eq!(
        seen["afterDismiss"].as_array().unwrap().len(),
        2,
        "a dismissed confirmation deletes nothing: {seen}"
    );
    assert!(
        seen["dialogs"][0].as_str().unwrap().contains("Scratch"),
        "{seen}"
    );
    assert_eq!(seen["afterDelete"], serde_json::json!(["Storyboard v2"]));
    assert!(seen["storedAfterSignOut"].is_null(), "{seen}");
    assert!(
        seen["refused"].as_str().unwrap().contains("refused"),
        "{seen}"
    );
    assert_eq!(seen["afterSignIn"], serde_json::json!(["Storyboard v2"]));
    assert_eq!(seen["elsewhere"], serde_json::json!([]), "{seen}");
    assert_eq!(seen["pageErrors"], serde_json::json!([]), "{seen}");

    // What the page did is what the server holds.
    let listed = app
        .projects(&t)
        .list_projects(pb::ListProjectsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .projects;
    let names: Vec<_> = listed.iter().map(|p| p.display_name.as_str()).collect();
    assert_eq!(names, ["Storyboard v2"]);
}
