//! Other languages: a Python grpcio client generated from `proto/` alone.
use std::{path::PathBuf, process::Command};

use mediaplane::proto::v1 as pb;

use crate::helpers::*;

/// The interpreter with grpcio, grpcio-tools and grpcio-health-checking, which
/// scripts/test.sh installs in `.venv`. Missing is a failure, not a skip.
fn python() -> PathBuf {
    let path = std::env::var_os("MEDIAPLANE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python")));
    assert!(
        path.exists(),
        "{} not found: run scripts/test.sh, which installs the Python interop tools",
        path.display()
    );
    path
}

#[tokio::test]
async fn python_grpcio_client_creates_and_reads_a_project_and_checks_health() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/projects_client.py"
    );
    let (python, addr) = (python(), app.addr.to_string());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python).args([script, &addr, &t]).output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["owner"], "alice");

    // What Python created is what the Rust client reads.
    let name = report["name"].as_str().unwrap().to_owned();
    let p = app
        .projects(&token("alice"))
        .get_project(pb::GetProjectRequest { name })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.display_name, "from python");
}
