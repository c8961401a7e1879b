//! The Kubernetes manifests, checked offline: the example overlay renders, every
//! built-in object passes strict schema validation (tests/deploy/check.py), every
//! probe's health service name is SERVING on a real server, and every metric the
//! alerts or docs/operations.md name is exported after a workload.
use std::time::Duration;

use mediaplane::proto::v1 as pb;
use serde_json::Value;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

use crate::helpers::*;

#[tokio::test]
async fn manifests_validate_and_name_what_the_server_serves_and_exports() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = tokio::process::Command::new(format!("{root}/.venv/bin/python"))
        .args([&format!("{root}/tests/deploy/check.py"), root])
        .output()
        .await
        .expect("run scripts/test.sh first: it installs the venv (and needs kubectl)");
    assert!(
        out.status.success(),
        "manifests do not render or validate:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let checked: Value = serde_json::from_slice(&out.stdout).unwrap();
    for kind in [
        "Deployment",
        "Service",
        "ConfigMap",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PrometheusRule",
    ] {
        assert!(
            checked["kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k == kind),
            "{kind} missing from the overlay"
        );
    }

    let app = TestApp::spawn_with(|s| s.queue_figures_interval = Duration::from_millis(200)).await;
    let probes = checked["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 3, "startup, liveness and readiness probes");
    for probe in probes {
        let service = probe["service"].as_str().unwrap().to_owned();
        let status = app
            .health()
            .check(HealthCheckRequest {
                service: service.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("{service}: {e:?}"))
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service}");
    }

    // A workload that touches every metric family.
    let t = token("alice");
    let p = create_project(&app, &t, "deployed").await;
    create_job_of(&app, &t, &p.name, "render").await;
    create_job_of(&app, &t, &p.name, "render").await;
    let w = token_with("fleet", &["worker"], Duration::from_secs(600));
    let leased = acquire_one(&app, &w, "w", "render").await;
    let done = leased.job.unwrap().name;
    app.jobs(&w)
        .complete_job(pb::CompleteJobRequest {
            name: done.clone(),
            lease_id: leased.lease_id,
            ..Default::default()
        })
        .await
        .unwrap();
    // A stream: the finished job's snapshot, then its end.
    let mut watch = app
        .jobs(&t)
        .watch_job(pb::WatchJobRequest {
            name: done,
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    while watch.message().await.unwrap().is_some() {}
    tokio::time::sleep(Duration::from_millis(600)).await;
    let text = app.metrics_text().await;
    let exported: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|l| {
            l.strip_prefix("# TYPE ")
                .and_then(|t| t.split_whitespace().next())
                .or_else(|| (!l.starts_with('#')).then(|| l.split(['{', ' ']).next().unwrap()))
        })
        .collect();
    let named = checked["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|a| a["metrics"].as_array().unwrap())
        .chain(checked["documented"].as_array().unwrap());
    for metric in named {
        let metric = metric.as_str().unwrap();
        assert!(
            exported.contains(metric),
            "{metric} is named by an alert or docs/operations.md but not exported:\n{text}"
        );
    }
}
