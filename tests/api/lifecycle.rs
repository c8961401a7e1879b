//! Start-up, shutdown, migrations, configuration and deadlines.
//!
//! One file over 600 lines: each test is one stage of an instance's life (start,
//! configuration, migrations, deadlines, shutdown), read in that order.
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use mediaplane::proto::v1 as pb;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_mediaplane");

/// Holds a row lock on a project so that calls touching it wait.
async fn lock_project(app: &TestApp, name: &str) -> AsyncPgConnection {
    let mut conn = AsyncPgConnection::establish(&app.db.url()).await.unwrap();
    let id = name.trim_start_matches("projects/");
    conn.batch_execute(&format!(
        "BEGIN; SELECT 1 FROM projects WHERE id = '{id}' FOR UPDATE;"
    ))
    .await
    .unwrap();
    conn
}

fn rename(name: &str, to: &str) -> pb::UpdateProjectRequest {
    pb::UpdateProjectRequest {
        project: Some(pb::Project {
            name: name.into(),
            display_name: to.into(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["display_name".into()],
        }),
    }
}

#[tokio::test]
async fn graceful_shutdown_finishes_calls_in_flight_and_ends_streams() {
    let mut app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "draining").await;

    let mut lock = lock_project(&app, &p.name).await;
    let in_flight = {
        let mut c = app.projects(&t);
        let r = rename(&p.name, "finished during drain");
        tokio::spawn(async move { c.update_project(r).await })
    };
    let mut watch = app
        .health()
        .watch(HealthCheckRequest {
            service: "readiness".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!in_flight.is_finished(), "the update waits on the row lock");

    let server = app.begin_shutdown();
    // Health flips first; then the stream ends with a status clients can act on.
    let flipped = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap();
    assert_eq!(
        flipped.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    let ended = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap();
    assert_eq!(ended.unwrap_err().code(), Code::Unavailable);

    // New calls are refused while the old one is still running: on the open connection
    // (GOAWAY, or UNAVAILABLE from the server) and on new connections (listener closed).
    let refused = app
        .projects(&t)
        .get_project(pb::GetProjectRequest {
            name: p.name.clone(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(refused.code(), Code::Unavailable | Code::Cancelled),
        "{refused:?}"
    );
    let fresh = tonic::transport::Endpoint::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await;
    assert!(fresh.is_err(), "no new connections during the drain");
    assert!(!in_flight.is_finished());

    lock.batch_execute("COMMIT").await.unwrap();
    let done = in_flight
        .await
        .unwrap()
        .expect("the call in flight completes");
    assert_eq!(done.into_inner().display_name, "finished during drain");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server stops within the drain period")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn deadlines_from_client_and_config() {
    let app = TestApp::spawn_with(|s| s.request_timeout = Duration::from_millis(700)).await;
    let t = token("alice");
    let p = create_project(&app, &t, "slow").await;
    let lock = lock_project(&app, &p.name).await;

    // tonic's client enforces grpc-timeout itself; a raw HTTP/2 request shows the server does too.
    let body = {
        use prost::Message;
        let msg = rename(&p.name, "late").encode_to_vec();
        let mut frame = vec![0u8];
        frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        frame.extend_from_slice(&msg);
        frame
    };
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let start = std::time::Instant::now();
    let response = h2
        .post(app.http("/mediaplane.v1.ProjectsService/UpdateProject"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "200m")
        .header("authorization", format!("Bearer {t}"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers().get("grpc-status").unwrap(),
        "4",
        "DEADLINE_EXCEEDED"
    );
    assert!(
        start.elapsed() < Duration::from_millis(650),
        "the client's shorter deadline wins"
    );

    let err = app
        .projects(&t)
        .update_project(rename(&p.name, "late"))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::DeadlineExceeded,
        "configured request timeout"
    );
    drop(lock);

    eventually(Duration::from_secs(5), "calls work after timeouts", || {
        let mut c = app.projects(&t);
        let name = p.name.clone();
        // As everywhere in gRPC, DEADLINE_EXCEEDED does not say the write did not happen:
        // the statement already sent may still commit once the lock is gone.
        async move { c.get_project(pb::GetProjectRequest { name }).await.is_ok() }
    })
    .await;
}

#[tokio::test]
async fn migrations_run_down_and_up_again() {
    let db = ScratchDb::reserve().await;
    let url = db.url();
    mediaplane::db::create_database_if_missing(&url)
        .await
        .unwrap();
    mediaplane::db::create_database_if_missing(&url)
        .await
        .expect("idempotent");
    let applied = mediaplane::db::migrate(&url).await.unwrap();
    assert!(applied >= 1);
    assert_eq!(
        mediaplane::db::migrate(&url).await.unwrap(),
        0,
        "nothing pending the second time"
    );

    let tables = || async {
        #[derive(diesel::QueryableByName)]
        struct T {
            #[diesel(sql_type = diesel::sql_types::Text)]
            tablename: String,
        }
        let mut conn = AsyncPgConnection::establish(&url).await.unwrap();
        let rows: Vec<T> = diesel_async::RunQueryDsl::load(
            diesel::sql_query("SELECT tablename::text AS tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> '__diesel_schema_migrations' ORDER BY 1"),
            &mut conn,
        )
        .await
        .unwrap();
        rows.into_iter().map(|t| t.tablename).collect::<Vec<_>>()
    };
    assert!(tables().await.contains(&"projects".to_owned()));
    assert_eq!(mediaplane::db::revert_all(&url).await.unwrap(), applied);
    assert_eq!(
        tables().await,
        Vec::<String>::new(),
        "down.sql leaves nothing behind"
    );
    assert_eq!(mediaplane::db::migrate(&url).await.unwrap(), applied);
    assert!(tables().await.contains(&"projects".to_owned()));
}

/// The real binary: first-run token, readiness, SIGTERM, exit code 0.
#[tokio::test]
async fn binary_serves_with_a_first_run_token_and_exits_cleanly_on_sigterm() {
    let db = ScratchDb::reserve().await;
    let mut child = Command::new(BIN)
        .arg("serve")
        .env_remove("MEDIAPLANE_JWT_SECRET")
        .env_remove("MEDIAPLANE_CONFIG")
        .env("MEDIAPLANE_ADDR", "127.0.0.1:0")
        .env("MEDIAPLANE_ADMIN_ADDR", "127.0.0.1:0")
        .env("DATABASE_URL", db.url())
        .env("MEDIAPLANE_LOG_FORMAT", "json")
        .env(
            "MEDIAPLANE_STORAGE_URL",
            format!("file://{}", db.storage_dir().display()),
        )
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // stderr carries the token, stdout the JSON logs with the bound address.
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let token = tokio::task::spawn_blocking(move || {
        let mut lines = stderr.lines().map_while(Result::ok);
        let token = lines
            .find(|l| l.starts_with("eyJ"))
            .expect("a token is printed");
        let link = lines
            .find(|l| l.contains("#token="))
            .expect("a studio link is printed");
        std::thread::spawn(move || lines.for_each(drop));
        (token, link)
    });
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let addr = tokio::task::spawn_blocking(move || {
        let mut lines = stdout.lines().map_while(Result::ok);
        let line = lines
            .find(|l| l.contains("serving gRPC"))
            .expect("serving line");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json log line");
        // Keep draining so the child never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        v["fields"]["addr"].as_str().unwrap().to_owned()
    });
    let ((token, link), addr) = (token.await.unwrap(), addr.await.unwrap());
    // The one-click link: this server's address, the token only in the fragment.
    assert!(
        link.ends_with(&format!("http://{addr}/#token={token}")),
        "{link}"
    );

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = pb::projects_service_client::ProjectsServiceClient::with_interceptor(
        channel,
        Bearer::new(&token),
    );
    let p = c
        .create_project(pb::CreateProjectRequest {
            project: Some(new_project("first run")),
            request_id: String::new(),
        })
        .await
        .expect("the printed token works")
        .into_inner();
    assert_eq!(p.owner, "local");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), Some(0), "clean exit on SIGTERM");
}

#[test]
fn bad_configuration_is_reported_with_its_key() {
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env_remove("MEDIAPLANE_CONFIG")
            .env_remove("MEDIAPLANE_JWT_SECRET");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["serve"], &[("MEDIAPLANE_ADDR", "nowhere")]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("MEDIAPLANE_ADDR") && err.contains("--addr") && err.contains("127.0.0.1:8080"),
        "{err}"
    );

    let (code, err) = run(&["serve", "--request-timeout", "forever"], &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("MEDIAPLANE_REQUEST_TIMEOUT"), "{err}");

    let (code, err) = run(&["serve"], &[("DATABASE_URL", "mysql://root:hunter2@db/x")]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("DATABASE_URL") && !err.contains("hunter2"),
        "secrets are never echoed: {err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mediaplane.toml");
    std::fs::write(&file, "addr = \"127.0.0.1:9\"\nmax_mesage_bytes = 10\n").unwrap();
    let (code, err) = run(&["serve", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("unknown key `max_mesage_bytes`"), "{err}");

    let (code, err) = run(&["token", "--sub", "alice"], &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("MEDIAPLANE_JWT_SECRET"), "{err}");
}

#[test]
fn token_command_mints_verifiable_tokens() {
    let out = Command::new(BIN)
        .args(["token", "--sub", "alice", "--role", "worker", "--ttl", "2h"])
        .env("MEDIAPLANE_JWT_SECRET", SECRET)
        .env_remove("MEDIAPLANE_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let verifier = mediaplane::auth::Verifier::new(&mediaplane::config::JwtSettings {
        secret: Some(mediaplane::config::Secret::new(SECRET)),
        ..mediaplane::config::JwtSettings::default()
    })
    .unwrap();
    let caller = verifier.verify(token.trim()).unwrap();
    assert_eq!(
        (caller.sub.as_str(), caller.roles.as_slice()),
        ("alice", ["worker".to_owned()].as_slice())
    );
    let claims = jsonwebtoken::decode::<mediaplane::auth::Claims>(
        token.trim(),
        &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
        &jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256),
    )
    .unwrap()
    .claims;
    assert_eq!(claims.exp - claims.iat.unwrap(), 7200, "--ttl 2h");
}

#[tokio::test]
async fn migrate_command_only_migrates() {
    let db = ScratchDb::reserve().await;
    let out = Command::new(BIN)
        .args(["migrate", "--database-url", &db.url()])
        .env_remove("MEDIAPLANE_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("migrations applied: "));
    assert_eq!(
        mediaplane::db::migrate(&db.url()).await.unwrap(),
        0,
        "already migrated"
    );
}

/// Waiting AcquireJobs calls answer at once, empty, when the drain starts: an idle
/// instance with a fleet long-polling it stops in well under a second.
#[tokio::test]
async fn an_idle_instance_with_waiting_long_polls_stops_within_a_second() {
    let mut app = TestApp::spawn_with(|s| s.drain_timeout = Duration::from_secs(10)).await;
    let w = token_with("fleet", &["worker"], Duration::from_secs(600));
    let mut polls = Vec::new();
    for i in 0..5 {
        let mut jobs = app.jobs(&w);
        polls.push(tokio::spawn(async move {
            jobs.acquire_jobs(pb::AcquireJobsRequest {
                worker_id: format!("w{i}"),
                kinds: vec!["render".into()],
                max_jobs: 1,
                wait_timeout: Some(prost_types::Duration {
                    seconds: 30,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let server = app.begin_shutdown();
    for poll in polls {
        let answer = poll.await.unwrap().expect("an answer, not an error");
        assert!(answer.into_inner().jobs.is_empty());
    }
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server stops")
        .unwrap()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "stopped in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_connection_postgres_terminates_is_unavailable_and_the_next_call_recovers() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "terminated").await;

    // A call waiting on a row lock when Postgres ends its session (an operator's
    // pg_terminate_backend, a failover): SQLSTATE 57P01 "terminating connection".
    let mut lock = lock_project(&app, &p.name).await;
    let in_flight = {
        let mut c = app.projects(&t);
        let r = rename(&p.name, "never written");
        tokio::spawn(async move { c.update_project(r).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!in_flight.is_finished(), "the update waits on the row lock");
    lock.batch_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .await
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .unwrap()
        .unwrap()
        .expect_err("its session was ended");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        !status.message().contains("terminating"),
        "no internals: {status:?}"
    );
    lock.batch_execute("ROLLBACK").await.unwrap();

    // Recovery is automatic: the pool replaces the dead connections.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match app
            .projects(&t)
            .get_project(pb::GetProjectRequest {
                name: p.name.clone(),
            })
            .await
        {
            Ok(got) => {
                assert_eq!(got.into_inner().display_name, "terminated");
                break;
            }
            Err(s) => {
                assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                assert!(std::time::Instant::now() < deadline, "no recovery: {s:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Starts the binary on a fresh database; its address once it serves.
fn serve_binary(db: &ScratchDb) -> (std::process::Child, String) {
    let mut child = Command::new(BIN)
        .arg("serve")
        .env_remove("MEDIAPLANE_CONFIG")
        .env("MEDIAPLANE_JWT_SECRET", SECRET)
        .env("MEDIAPLANE_ADDR", "127.0.0.1:0")
        .env("MEDIAPLANE_ADMIN_ADDR", "off")
        .env("DATABASE_URL", db.url())
        .env(
            "MEDIAPLANE_REDIS_PREFIX",
            format!("mp_drain_{}", uuid::Uuid::new_v4().simple()),
        )
        .env("MEDIAPLANE_LOG_FORMAT", "json")
        .env("MEDIAPLANE_RATE_LIMITS", "off")
        .env(
            "MEDIAPLANE_STORAGE_URL",
            format!("file://{}", db.storage_dir().display()),
        )
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut lines = stdout.lines().map_while(Result::ok);
    let line = lines
        .find(|l| l.contains("serving gRPC"))
        .expect("serving line");
    std::thread::spawn(move || lines.for_each(drop));
    let v: serde_json::Value = serde_json::from_str(&line).expect("json log line");
    (child, v["fields"]["addr"].as_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_under_load_answers_every_call_that_committed() {
    const RUNS: usize = 6;
    for run in 0..RUNS {
        let db = ScratchDb::reserve().await;
        let (mut child, addr) = tokio::task::block_in_place(|| serve_binary(&db));
        let t = token("loaded");
        let connect = || async {
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap()
        };
        let mut projects = pb::projects_service_client::ProjectsServiceClient::with_interceptor(
            connect().await,
            Bearer::new(&t),
        );
        let project = projects
            .create_project(pb::CreateProjectRequest {
                project: Some(new_project("drained")),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .name;

        // 4 connections x 16 callers creating jobs, each with its own request id,
        // until the server stops answering.
        let mut callers = tokio::task::JoinSet::new();
        for c in 0..4 {
            let channel = connect().await;
            for k in 0..16 {
                let jobs = pb::jobs_service_client::JobsServiceClient::with_interceptor(
                    channel.clone(),
                    Bearer::new(&t),
                );
                let project = project.clone();
                callers.spawn(async move {
                    let mut jobs = jobs;
                    let mut outcomes = Vec::new();
                    for i in 0.. {
                        let request_id = format!("r-{c}-{k}-{i}");
                        let r = jobs
                            .create_job(pb::CreateJobRequest {
                                parent: project.clone(),
                                job: Some(pb::Job {
                                    kind: "render".into(),
                                    ..Default::default()
                                }),
                                request_id: request_id.clone(),
                                key: String::new(),
                            })
                            .await;
                        let failed = r.is_err();
                        outcomes.push((
                            request_id,
                            r.map(|_| ()).map_err(|s| (s.code(), format!("{s:?}"))),
                        ));
                        if failed {
                            return outcomes;
                        }
                    }
                    outcomes
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(300 + 40 * run as u64)).await;
        let signalled = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(signalled.success());
        let mut outcomes = Vec::new();
        while let Some(done) = callers.join_next().await {
            outcomes.extend(done.unwrap());
        }
        let exit = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(exit.code(), Some(0), "clean exit on SIGTERM");

        let mut conn = AsyncPgConnection::establish(&db.url()).await.unwrap();
        #[derive(diesel::QueryableByName)]
        struct Committed {
            #[diesel(sql_type = diesel::sql_types::Text)]
            request_id: String,
        }
        let committed: std::collections::HashSet<String> =
            diesel_async::RunQueryDsl::load::<Committed>(
                diesel::sql_query("SELECT request_id FROM jobs WHERE request_id IS NOT NULL"),
                &mut conn,
            )
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.request_id)
            .collect();
        drop(conn);
        let ok = outcomes.iter().filter(|(_, r)| r.is_ok()).count();
        assert!(ok > 0, "run {run}: the load ran");
        for (request_id, outcome) in &outcomes {
            match outcome {
                Ok(()) => assert!(
                    committed.contains(request_id),
                    "run {run}: {request_id} acknowledged, not stored"
                ),
                Err((_, status)) => assert!(
                    !committed.contains(request_id),
                    "run {run}: {request_id} committed, yet its caller got {status}"
                ),
            }
        }
        for (_, outcome) in &outcomes {
            // Refused by the draining server (UNAVAILABLE), beyond its GOAWAY's last
            // stream (which the h2 client reports as a GOAWAY error: never processed,
            // safe to retry), or never sent (the client's connection closed under a
            // queued request: CANCELLED).
            if let Err((code, status)) = outcome {
                let beyond_goaway = status.contains("GoAway(") && status.contains("NO_ERROR");
                assert!(
                    matches!(code, Code::Unavailable | Code::Cancelled) || beyond_goaway,
                    "run {run}: calls that did not commit are retryable: {status}"
                );
            }
        }
        eprintln!(
            "drain run {run}: {ok} acknowledged, {} refused",
            outcomes.len() - ok
        );
    }
}

/// Reads take no row locks: while a deletion (here, a transaction holding the
/// project's row as a deletion does) is in progress, listing and watching the
/// project's jobs and assets answer at once, with the project as it was.
#[tokio::test]
async fn reads_do_not_wait_for_a_deletion_in_progress() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "being deleted").await;
    create_job_of(&app, &t, &p.name, "render").await;
    let lock = lock_project(&app, &p.name).await;
    let quick = Duration::from_secs(2);

    let jobs = tokio::time::timeout(
        quick,
        app.jobs(&t).list_jobs(pb::ListJobsRequest {
            parent: p.name.clone(),
            ..Default::default()
        }),
    )
    .await
    .expect("ListJobs does not wait for the row lock")
    .unwrap();
    assert_eq!(jobs.into_inner().jobs.len(), 1);
    tokio::time::timeout(
        quick,
        app.assets(&t).list_assets(pb::ListAssetsRequest {
            parent: p.name.clone(),
            ..Default::default()
        }),
    )
    .await
    .expect("ListAssets does not wait for the row lock")
    .unwrap();
    let mut watch = tokio::time::timeout(
        quick,
        app.jobs(&t).watch_jobs(pb::WatchJobsRequest {
            parent: p.name.clone(),
            ..Default::default()
        }),
    )
    .await
    .expect("WatchJobs opens without waiting for the row lock")
    .unwrap()
    .into_inner();
    let first = tokio::time::timeout(quick, watch.message())
        .await
        .expect("and sends its snapshot")
        .unwrap();
    assert!(first.is_some());
    drop(lock);
}
