//! The README's five-minute tour, run as written: the `sh` blocks between its
//! `<!-- tour` and `<!-- end of tour -->` markers, in order, in one bash with `set -e`,
//! against the `mediaplane` binary this test suite built. Only the port differs (the
//! tour's default 127.0.0.1:8080 becomes a free one, in its URLs and the server's
//! address) and the database, Redis prefix and admin listener, which the tour leaves
//! to their defaults, are this test's own.
use std::{process::Stdio, time::Duration};

use crate::helpers::{ScratchDb, remove_redis_keys};

const BIN: &str = env!("CARGO_BIN_EXE_mediaplane");
const README: &str = include_str!("../../README.md");

/// The tour's shell blocks, in order.
fn tour(readme: &str) -> Vec<String> {
    let start = readme
        .find("<!-- tour")
        .expect("README marks where the tour starts");
    let end = readme[start..]
        .find("<!-- end of tour -->")
        .map(|i| start + i)
        .expect("README marks where the tour ends");
    let mut blocks = Vec::new();
    let mut lines = readme[start..end].lines();
    while let Some(line) = lines.next() {
        if line.trim() == "```sh" {
            let block: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
            blocks.push(block.join("\n"));
        }
    }
    blocks
}

#[test]
fn the_tour_is_found_in_the_readme() {
    let blocks = tour(README);
    assert!(blocks.len() >= 5, "{blocks:?}");
    let all = blocks.join("\n");
    for step in [
        "mediaplane serve",
        "/v1/projects",
        "mediaplane worker",
        "--watch",
        "text/event-stream",
    ] {
        assert!(all.contains(step), "the tour has no `{step}`");
    }
}

#[tokio::test]
async fn the_readme_tour_runs_as_written() {
    let db = ScratchDb::reserve().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let prefix = format!("mp_test_{}", uuid::Uuid::new_v4().simple());
    let script = tour(README)
        .join("\n")
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
    // Whatever the tour left running is stopped when the script ends, however it ends.
    let script =
        format!("set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n{script}\n");
    let dir = tempfile::tempdir().expect("a scratch directory");
    let bin_dir = std::path::Path::new(BIN)
        .parent()
        .expect("the binary's directory");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let child = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env("PATH", path)
        .env("MEDIAPLANE_ADDR", format!("127.0.0.1:{port}"))
        .env("DATABASE_URL", db.url())
        .env("MEDIAPLANE_REDIS_PREFIX", &prefix)
        .env("MEDIAPLANE_ADMIN_ADDR", "off")
        .env("RUST_LOG", "warn")
        .env_remove("MEDIAPLANE_CONFIG")
        .env_remove("MEDIAPLANE_TOKEN")
        .env_remove("MEDIAPLANE_SERVER")
        // Its own process group: if the tour hangs, the server and worker it started
        // in the background go with it.
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("bash starts");
    let group = child.id().expect("a running child") as i32;
    let out = match tokio::time::timeout(Duration::from_secs(120), child.wait_with_output()).await {
        Ok(out) => out.expect("bash runs"),
        Err(_) => {
            // SAFETY: kill(2) on the process group this test created.
            unsafe { libc::kill(-group, libc::SIGKILL) };
            panic!("the tour did not finish within two minutes");
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let logs = ["serve.log", "worker.log"]
        .map(|f| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default());
    assert!(
        out.status.success(),
        "the tour failed ({}):\n{stdout}\n{stderr}\nserver: {}\nworker: {}",
        out.status,
        logs[0],
        logs[1]
    );
    // The CLI watched its job to the end, and SSE followed the REST job to the end.
    assert!(stdout.contains("projects/"), "{stdout}");
    assert!(stdout.contains("SUCCEEDED 100%"), "{stdout}");
    assert!(
        stdout.contains(r#""state":"SUCCEEDED""#) && stdout.contains(r#""frames":240"#),
        "{stdout}"
    );
    assert!(stdout.contains("event: status"), "{stdout}");
    remove_redis_keys(&prefix);
}
