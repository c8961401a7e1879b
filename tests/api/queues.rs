//! Queues: pause, limits that hold across instances, per-key limits, start rates, fair
//! turns across concurrency keys, and the figures a queue reports; on both doors and
//! through the CLI.
use std::time::{Duration, Instant};

use mediaplane::proto::v1 as pb;
use tonic::Code;

use crate::helpers::*;

fn queues(
    app: &TestApp,
    token: &str,
) -> pb::queues_service_client::QueuesServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
> {
    pb::queues_service_client::QueuesServiceClient::with_interceptor(
        app.channel.clone(),
        Bearer::new(token),
    )
}

async fn update(app: &TestApp, q: pb::Queue, paths: &[&str]) -> Result<pb::Queue, tonic::Status> {
    queues(app, &admin_token("ops"))
        .update_queue(pb::UpdateQueueRequest {
            queue: Some(q),
            update_mask: Some(prost_types::FieldMask {
                paths: paths.iter().map(|p| p.to_string()).collect(),
            }),
        })
        .await
        .map(|r| r.into_inner())
}

async fn get_queue(app: &TestApp, kind: &str) -> pb::Queue {
    queues(app, &admin_token("ops"))
        .get_queue(pb::GetQueueRequest {
            name: format!("queues/{kind}"),
        })
        .await
        .expect("get queue")
        .into_inner()
}

/// `n` jobs of `kind` with `key`, in one batch.
async fn jobs_of(
    app: &TestApp,
    t: &str,
    parent: &str,
    kind: &str,
    key: &str,
    n: usize,
) -> Vec<pb::Job> {
    let requests = (0..n)
        .map(|_| pb::CreateJobRequest {
            job: Some(pb::Job {
                kind: kind.into(),
                concurrency_key: key.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    app.jobs(t)
        .batch_create_jobs(pb::BatchCreateJobsRequest {
            parent: parent.into(),
            requests,
        })
        .await
        .expect("batch")
        .into_inner()
        .jobs
}

async fn lease(app: &TestApp, kind: &str, max: i32, wait: f64) -> Vec<pb::LeasedJob> {
    app.jobs(&worker_token())
        .acquire_jobs(pb::AcquireJobsRequest {
            worker_id: "w".into(),
            kinds: vec![kind.into()],
            max_jobs: max,
            wait_timeout: Some(prost_types::Duration {
                seconds: wait.trunc() as i64,
                nanos: (wait.fract() * 1e9) as i32,
            }),
            ..Default::default()
        })
        .await
        .expect("acquire")
        .into_inner()
        .jobs
}

/// An AcquireJobs call that waits up to 20 s for `kind`, in the background.
fn spawn_lease(
    app: &TestApp,
    worker_id: &str,
    kind: &str,
    max: i32,
) -> tokio::task::JoinHandle<Vec<pb::LeasedJob>> {
    let mut c = app.jobs(&worker_token());
    let (worker_id, kind) = (worker_id.to_owned(), kind.to_owned());
    tokio::spawn(async move {
        c.acquire_jobs(pb::AcquireJobsRequest {
            worker_id,
            kinds: vec![kind],
            max_jobs: max,
            wait_timeout: Some(prost_types::Duration {
                seconds: 20,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs
    })
}

async fn complete(app: &TestApp, leased: &pb::LeasedJob) {
    app.jobs(&worker_token())
        .complete_job(pb::CompleteJobRequest {
            name: leased.job.as_ref().unwrap().name.clone(),
            lease_id: leased.lease_id.clone(),
            ..Default::default()
        })
        .await
        .expect("complete");
}

fn key_of(l: &pb::LeasedJob) -> String {
    l.job.as_ref().unwrap().concurrency_key.clone()
}

#[tokio::test]
async fn a_paused_queue_leases_nothing_and_resuming_wakes_a_waiting_worker_token() {
    let app = TestApp::spawn().await;
    let t = token("studio");
    let parent = create_project(&app, &t, "pause").await.name;
    let paused = update(
        &app,
        pb::Queue {
            name: "queues/render".into(),
            paused: true,
            ..Default::default()
        },
        &["paused"],
    )
    .await
    .unwrap();
    assert!(paused.paused);
    jobs_of(&app, &t, &parent, "render", "", 3).await;
    assert!(lease(&app, "render", 3, 0.0).await.is_empty());
    // Another kind is not held back.
    jobs_of(&app, &t, &parent, "encode", "", 1).await;
    assert_eq!(lease(&app, "encode", 3, 0.0).await.len(), 1);

    let waiting = spawn_lease(&app, "waiting", "render", 3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let q = get_queue(&app, "render").await;
    assert_eq!((q.queued_jobs, q.running_jobs), (3, 0));
    assert!(q.oldest_queued_age.is_some());
    let started = Instant::now();
    update(
        &app,
        pb::Queue {
            name: "queues/render".into(),
            paused: false,
            ..Default::default()
        },
        &["paused"],
    )
    .await
    .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("woken by the resume")
        .unwrap();
    assert_eq!(got.len(), 3);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn max_running_holds_across_instances_and_a_finished_job_frees_its_slot() {
    let a = TestApp::spawn().await;
    let b = a.spawn_peer().await;
    let t = token("studio");
    let parent = create_project(&a, &t, "gpus").await.name;
    update(
        &a,
        pb::Queue {
            name: "queues/gpu".into(),
            max_running: 3,
            ..Default::default()
        },
        &["max_running"],
    )
    .await
    .unwrap();
    jobs_of(&a, &t, &parent, "gpu", "", 20).await;
    // Eight workers on two instances ask at once for more than exists.
    let mut asks = Vec::new();
    for i in 0..8 {
        let app = if i % 2 == 0 { &a } else { &b };
        asks.push(lease(app, "gpu", 5, 0.0));
    }
    let got: Vec<pb::LeasedJob> = futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(got.len(), 3, "three GPUs");
    assert_eq!(get_queue(&b, "gpu").await.running_jobs, 3);
    // A worker waiting on the full queue gets the slot a completion frees.
    let waiting = spawn_lease(&b, "next", "gpu", 5);
    tokio::time::sleep(Duration::from_millis(300)).await;
    complete(&a, &got[0]).await;
    let next = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("woken when a slot frees")
        .unwrap();
    assert_eq!(next.len(), 1);
    let q = get_queue(&a, "gpu").await;
    assert_eq!(
        (q.running_jobs, q.queued_jobs, q.completions_per_minute),
        (3, 16, 1)
    );
    assert_eq!(q.max_running, 3);
}

#[tokio::test]
async fn max_running_per_key_limits_each_key_and_not_the_others() {
    let app = TestApp::spawn().await;
    let t = token("studio");
    let parent = create_project(&app, &t, "tenants").await.name;
    update(
        &app,
        pb::Queue {
            name: "queues/ads".into(),
            max_running_per_key: 2,
            ..Default::default()
        },
        &["max_running_per_key"],
    )
    .await
    .unwrap();
    jobs_of(&app, &t, &parent, "ads", "acme", 10).await;
    jobs_of(&app, &t, &parent, "ads", "globex", 1).await;
    let got = lease(&app, "ads", 10, 0.0).await;
    let mut keys: Vec<String> = got.iter().map(key_of).collect();
    keys.sort();
    assert_eq!(keys, vec!["acme", "acme", "globex"]);
    assert!(lease(&app, "ads", 10, 0.0).await.is_empty());
    complete(&app, &got[0]).await;
    let more = lease(&app, "ads", 10, 0.0).await;
    assert_eq!(more.len(), 1);
}

/// Six workers on two instances run 24 jobs of two keys under `max_running` 3 and
/// `max_running_per_key` 2; the jobs' own start and end times show the limits were
/// never passed, at any moment.
#[tokio::test]
async fn limits_hold_over_a_whole_run_on_two_instances_by_the_jobs_own_times() {
    let a = TestApp::spawn().await;
    let b = a.spawn_peer().await;
    let t = token("studio");
    let parent = create_project(&a, &t, "timeline").await.name;
    update(
        &a,
        pb::Queue {
            name: "queues/gpu".into(),
            max_running: 3,
            max_running_per_key: 2,
            ..Default::default()
        },
        &["max_running", "max_running_per_key"],
    )
    .await
    .unwrap();
    jobs_of(&a, &t, &parent, "gpu", "acme", 12).await;
    jobs_of(&a, &t, &parent, "gpu", "globex", 12).await;
    let done = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for w in 0..6 {
        let mut c = if w % 2 == 0 { &a } else { &b }.jobs(&worker_token());
        let done = done.clone();
        workers.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while done.lock().unwrap().len() < 24 && Instant::now() < deadline {
                let leased = c
                    .acquire_jobs(pb::AcquireJobsRequest {
                        worker_id: format!("w{w}"),
                        kinds: vec!["gpu".into()],
                        max_jobs: 2,
                        wait_timeout: Some(prost_types::Duration {
                            seconds: 0,
                            nanos: 300_000_000,
                        }),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .jobs;
                for l in leased {
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    let job = l.job.unwrap();
                    let ended = c
                        .complete_job(pb::CompleteJobRequest {
                            name: job.name.clone(),
                            lease_id: l.lease_id,
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    done.lock().unwrap().push((
                        job.concurrency_key,
                        ended.start_time.unwrap(),
                        ended.end_time.unwrap(),
                    ));
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let runs = done.lock().unwrap().clone();
    assert_eq!(runs.len(), 24, "every job ran");
    let at = |t: &prost_types::Timestamp| (t.seconds, t.nanos);
    // +1 at each start, -1 at each end; an end and a start at the same instant do not
    // overlap.
    let mut events: Vec<((i64, i32), i32, String)> = runs
        .iter()
        .flat_map(|(k, s, e)| [(at(s), 1, k.clone()), (at(e), -1, k.clone())])
        .collect();
    events.sort_by(|x, y| x.0.cmp(&y.0).then(x.1.cmp(&y.1)));
    let (mut total, mut peak) = (0, 0);
    let mut per_key = std::collections::HashMap::<String, i32>::new();
    let mut key_peak = 0;
    for (_, delta, key) in events {
        total += delta;
        peak = peak.max(total);
        let n = per_key.entry(key).or_default();
        *n += delta;
        key_peak = key_peak.max(*n);
    }
    assert!(peak <= 3, "at most three running at once, saw {peak}");
    assert!(key_peak <= 2, "at most two per key at once, saw {key_peak}");
    assert!(
        peak >= 2,
        "the limit was reached, not just respected by idling: {peak}"
    );
}

/// Round robin across keys by default: a customer's ten renders are not behind
/// another's ten thousand, with no queue configured at all.
#[tokio::test]
async fn keys_take_turns_so_ten_jobs_are_not_behind_ten_thousand() {
    let app = TestApp::spawn().await;
    let t = token("studio");
    let parent = create_project(&app, &t, "fair").await.name;
    for _ in 0..10 {
        jobs_of(&app, &t, &parent, "render", "big", 1000).await;
    }
    jobs_of(&app, &t, &parent, "render", "small", 10).await;
    jobs_of(&app, &t, &parent, "render", "", 1).await;
    let first = lease(&app, "render", 3, 0.0).await;
    let mut keys: Vec<String> = first.iter().map(key_of).collect();
    keys.sort();
    assert_eq!(keys, vec!["", "big", "small"], "one of each key first");
    let next = lease(&app, "render", 20, 0.0).await;
    let small = next.iter().filter(|l| key_of(l) == "small").count();
    assert_eq!(
        small,
        9,
        "the rest of the ten in the next twenty: {:?}",
        next.iter().map(key_of).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_start_rate_spaces_starts_across_the_interval() {
    let app = TestApp::spawn().await;
    let t = token("studio");
    let parent = create_project(&app, &t, "api").await.name;
    update(
        &app,
        pb::Queue {
            name: "queues/tts".into(),
            start_rate: Some(pb::StartRate {
                jobs: 3,
                interval: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
            }),
            ..Default::default()
        },
        &["start_rate"],
    )
    .await
    .unwrap();
    jobs_of(&app, &t, &parent, "tts", "", 10).await;
    let started = Instant::now();
    let first = lease(&app, "tts", 10, 0.0).await;
    assert_eq!(first.len(), 3);
    assert!(lease(&app, "tts", 10, 0.0).await.is_empty());
    // A waiting worker gets the next three once the first starts leave the window.
    let next = lease(&app, "tts", 10, 5.0).await;
    assert_eq!(next.len(), 3);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // By the jobs' own start times, no window of one second holds more than three.
    let mut starts: Vec<f64> = first
        .iter()
        .chain(&next)
        .map(|l| {
            let t = l.job.as_ref().unwrap().start_time.unwrap();
            t.seconds as f64 + f64::from(t.nanos) / 1e9
        })
        .collect();
    starts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    for (i, s) in starts.iter().enumerate() {
        let within = starts[i..].iter().take_while(|t| **t < s + 1.0).count();
        assert!(
            within <= 3,
            "{within} starts within a second of {s}: {starts:?}"
        );
    }
    // The queue says what it holds.
    let q = get_queue(&app, "tts").await;
    assert_eq!((q.queued_jobs, q.running_jobs), (4, 6));
}

#[tokio::test]
async fn queues_are_for_admins_with_clear_errors_on_both_doors() {
    let app = TestApp::spawn().await;
    let t = token("studio");
    let err = queues(&app, &t)
        .list_queues(pb::ListQueuesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Fleets read the figures with worker tokens; only admins change settings.
    queues(&app, &worker_token())
        .get_queue(pb::GetQueueRequest {
            name: "queues/render".into(),
        })
        .await
        .expect("workers read queues");
    let err = queues(&app, &worker_token())
        .update_queue(pb::UpdateQueueRequest {
            queue: Some(pb::Queue {
                name: "queues/render".into(),
                paused: true,
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = queues(&app, &admin_token("ops"))
        .get_queue(pb::GetQueueRequest {
            name: "queues/Bad Kind".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = update(
        &app,
        pb::Queue {
            name: "queues/render".into(),
            max_running: -1,
            ..Default::default()
        },
        &["max_running"],
    )
    .await
    .unwrap_err();
    assert_eq!(violations(&err), vec!["queue.max_running"]);
    let err = update(
        &app,
        pb::Queue {
            name: "queues/render".into(),
            ..Default::default()
        },
        &["queued_jobs"],
    )
    .await
    .unwrap_err();
    assert_eq!(violations(&err), vec!["update_mask"]);
    // A never-configured kind reads as a queue without limits.
    let q = get_queue(&app, "render").await;
    assert!(!q.paused && q.max_running == 0 && q.start_rate.is_none());
    // Etags: a stale one is ABORTED, the current one applies.
    let set = update(
        &app,
        pb::Queue {
            name: "queues/render".into(),
            max_running: 4,
            etag: q.etag.clone(),
            ..Default::default()
        },
        &["max_running"],
    )
    .await
    .unwrap();
    let err = update(
        &app,
        pb::Queue {
            name: "queues/render".into(),
            max_running: 5,
            etag: q.etag.clone(),
            ..Default::default()
        },
        &["max_running"],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    assert_ne!(set.etag, q.etag);

    // REST: read and patch through the HTTP/JSON edge.
    let http = reqwest::Client::new();
    let admin = admin_token("ops");
    let got: serde_json::Value = http
        .get(app.http("/v1/queues/render"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["maxRunning"], 4);
    let patched = http
        .patch(app.http("/v1/queues/render?updateMask=paused"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"paused": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    let patched: serde_json::Value = patched.json().await.unwrap();
    assert_eq!(
        (patched["paused"].as_bool(), patched["maxRunning"].as_i64()),
        (Some(true), Some(4))
    );
    let listed: serde_json::Value = http
        .get(app.http("/v1/queues"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["queues"][0]["name"], "queues/render");
    let refused = http
        .get(app.http("/v1/queues"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
}

/// `mediaplane queues`: an operator pauses a queue and lists what every queue holds.
#[tokio::test]
async fn the_cli_pauses_and_lists_queues() {
    let app = TestApp::spawn().await;
    let t = token("studio");
    let parent = create_project(&app, &t, "cli").await.name;
    jobs_of(&app, &t, &parent, "render", "", 2).await;
    // Async: the server runs on this test's runtime.
    let run = async |args: &[&str]| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_mediaplane"))
            .arg("queues")
            .args(args)
            .env("MEDIAPLANE_SERVER", app.http(""))
            .env("MEDIAPLANE_TOKEN", admin_token("ops"))
            .output()
            .await
            .expect("runs")
    };
    let out = run(&["pause", "render"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&[
        "set",
        "render",
        "--max-running",
        "2",
        "--start-rate",
        "10/1s",
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["list"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text.lines().find(|l| l.starts_with("render")).expect(&text);
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cols[..4], &["render", "paused", "0", "2"], "{text}");
    assert!(row.contains("10/1s"), "{text}");
    assert_eq!(get_queue(&app, "render").await.max_running, 2);
    let out = run(&["set", "render"]).await;
    assert!(!out.status.success(), "nothing to set is an error");
    let out = run(&["resume", "render"]).await;
    assert!(out.status.success());
    assert!(!get_queue(&app, "render").await.paused);
}
