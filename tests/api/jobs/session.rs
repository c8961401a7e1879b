//! WorkerSession: the worker protocol over one bidirectional stream. The same
//! expectations as the unary calls: fencing on every write, a dead worker's jobs back
//! after their lease, cancel reaching the worker, two instances, the worker budget.
use std::collections::HashMap;

use mediaplane::config::{Rate, RateLimits};
use pb::{worker_session_request::Request as Ask, worker_session_response::Response as Answer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::*;

/// A worker's session: requests go out with ids, answers are matched back to them.
struct Session {
    tx: mpsc::Sender<pb::WorkerSessionRequest>,
    answers: tonic::Streaming<pb::WorkerSessionResponse>,
    next_id: u64,
    early: HashMap<u64, Answer>,
}

impl Session {
    async fn open(app: &TestApp, token: &str) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(64);
        let answers = app
            .jobs(token)
            .worker_session(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self {
            tx,
            answers,
            next_id: 1,
            early: HashMap::new(),
        })
    }

    async fn send(&mut self, request: Option<Ask>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.tx
            .send(pb::WorkerSessionRequest {
                id,
                request,
                traceparent: String::new(),
            })
            .await
            .expect("session open");
        id
    }

    async fn answer(&mut self, id: u64) -> Answer {
        if let Some(answer) = self.early.remove(&id) {
            return answer;
        }
        loop {
            let next = tokio::time::timeout(Duration::from_secs(20), self.answers.message())
                .await
                .expect("an answer in time")
                .expect("the stream stays open")
                .expect("an answer, not the end");
            let answer = next.response.expect("every answer has a response");
            if next.id == id {
                return answer;
            }
            self.early.insert(next.id, answer);
        }
    }

    async fn ask(&mut self, request: Ask) -> Answer {
        let id = self.send(Some(request)).await;
        self.answer(id).await
    }

    async fn acquire(&mut self, max: i32, lease: f64, wait: f64) -> Vec<pb::LeasedJob> {
        match self
            .ask(Ask::AcquireJobs(acquire_request(max, lease, wait)))
            .await
        {
            Answer::AcquireJobs(r) => r.jobs,
            other => panic!("expected leased jobs, got {other:?}"),
        }
    }
}

/// What this file's worker asks to lease.
fn acquire_request(max: i32, lease: f64, wait: f64) -> pb::AcquireJobsRequest {
    pb::AcquireJobsRequest {
        worker_id: "session-1".into(),
        kinds: vec!["render".into()],
        max_jobs: max,
        lease_duration: secs(lease),
        wait_timeout: secs(wait),
    }
}

/// Leases lapse and failed jobs return within a fraction of a second.
fn quick_reaping(s: &mut mediaplane::config::Settings) {
    s.reap_interval = Duration::from_millis(100);
    s.retry_base = Duration::from_millis(50);
    s.retry_max = Duration::from_millis(100);
}

fn progress_request(l: &pb::LeasedJob, percent: i32) -> Ask {
    Ask::ReportProgress(pb::ReportProgressRequest {
        name: l.job.as_ref().unwrap().name.clone(),
        lease_id: l.lease_id.clone(),
        progress_percent: percent,
        current_step: "session step".into(),
        message: String::new(),
    })
}

fn fail_request(l: &pb::LeasedJob) -> Ask {
    Ask::FailJob(pb::FailJobRequest {
        name: l.job.as_ref().unwrap().name.clone(),
        lease_id: l.lease_id.clone(),
        error: Some(tonic_types::pb::Status {
            code: Code::Internal as i32,
            message: "gpu fell over".into(),
            details: vec![],
        }),
        retryable: true,
        retry_after: None,
    })
}

/// Waits for the watched job's SUCCEEDED event.
async fn succeeded(watcher: &mut tonic::Streaming<pb::JobEvent>) {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), watcher.next())
            .await
            .expect("SUCCEEDED in time")
            .expect("the watch stays open")
            .unwrap();
        if state(&event) == State::Succeeded {
            return;
        }
    }
}

fn error_code(answer: &Answer) -> Code {
    match answer {
        Answer::Error(e) => Code::from_i32(e.code),
        _ => Code::Ok,
    }
}

#[tokio::test]
async fn a_session_leases_reports_and_completes_as_the_unary_calls_do() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "session").await;
    let mut created = Vec::new();
    for _ in 0..4 {
        created.push(create_job(&app, &t, &p.name, job("render")).await.name);
    }
    let mut watcher = watch(&app, &t, &created[0], 0).await;
    let mut session = Session::open(&app, &worker()).await.unwrap();

    let leased = session.acquire(2, 30.0, 0.0).await;
    assert_eq!(leased.len(), 2);
    assert_eq!(leased[0].job.as_ref().unwrap().name, created[0]);
    match session.ask(progress_request(&leased[0], 40)).await {
        Answer::ReportProgress(r) => {
            assert!(!r.cancel_requested);
            assert!(r.lease_expire_time.is_some());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(get(&app, &t, &created[0]).await.progress_percent, 40);

    // Two completions sent at once, answered each under its own id.
    let first = session
        .send(Some(Ask::CompleteJob(completion(&leased[0]))))
        .await;
    let second = session
        .send(Some(Ask::BatchCompleteJobs(pb::BatchCompleteJobsRequest {
            requests: vec![completion(&leased[1])],
            acquire: Some(acquire_request(2, 30.0, 0.0)),
        })))
        .await;
    match session.answer(second).await {
        Answer::BatchCompleteJobs(r) => {
            assert_eq!(outcomes(&r.results), vec![Code::Ok]);
            let next: Vec<_> = r
                .acquired
                .iter()
                .map(|l| l.job.as_ref().unwrap().name.clone())
                .collect();
            assert_eq!(
                next,
                created[2..].to_vec(),
                "the next jobs come with the completion"
            );
        }
        other => panic!("{other:?}"),
    }
    match session.answer(first).await {
        Answer::CompleteJob(job) => {
            assert_eq!(job.state(), State::Succeeded);
            assert_eq!(job.worker_id, "session-1");
        }
        other => panic!("{other:?}"),
    }
    for name in &created[..2] {
        assert_eq!(get(&app, &t, name).await.state(), State::Succeeded);
    }
    succeeded(&mut watcher).await;

    // A request naming no method is refused on its own; the session goes on.
    let empty = session.send(None).await;
    match session.answer(empty).await {
        Answer::Error(e) => {
            assert_eq!(Code::from_i32(e.code), Code::InvalidArgument);
            assert!(e.message.contains("request"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        session.acquire(1, 30.0, 0.0).await.is_empty(),
        "two are leased, none left"
    );
}

#[tokio::test]
async fn every_write_on_a_session_is_fenced_and_the_session_outlives_its_refusals() {
    let app = TestApp::spawn_with(quick_reaping).await;
    let t = token("alice");
    let p = create_project(&app, &t, "session fencing").await;
    let created = create_job(&app, &t, &p.name, job("render")).await;
    let mut zombie = Session::open(&app, &worker()).await.unwrap();
    let stale = zombie.acquire(1, 1.0, 0.0).await.remove(0);
    // Its lease lapses; another worker has the job now.
    let fresh = acquire(&app, "healthy", &["render"], 1, 30.0, 10.0)
        .await
        .remove(0);
    assert_eq!(fresh.job.as_ref().unwrap().attempt, 2);

    for write in [
        progress_request(&stale, 90),
        Ask::CompleteJob(completion(&stale)),
        Ask::BatchCompleteJobs(pb::BatchCompleteJobsRequest {
            requests: vec![completion(&stale)],
            acquire: None,
        }),
        fail_request(&stale),
    ] {
        match zombie.ask(write).await {
            Answer::Error(e) => {
                assert_eq!(Code::from_i32(e.code), Code::Aborted, "{e:?}");
                assert!(e.message.contains("lease"), "{}", e.message);
            }
            Answer::BatchCompleteJobs(r) => assert_eq!(outcomes(&r.results), vec![Code::Aborted]),
            other => panic!("a stale lease was accepted: {other:?}"),
        }
    }
    // A lease id that is no lease is the caller's error, as in the unary call.
    let mut forged = stale.clone();
    forged.lease_id = "not-a-lease".into();
    let answer = zombie.ask(Ask::CompleteJob(completion(&forged))).await;
    assert_eq!(error_code(&answer), Code::InvalidArgument, "{answer:?}");

    let now = get(&app, &t, &created.name).await;
    assert_eq!(now.state(), State::Running);
    assert_eq!(now.worker_id, "healthy");
    // The same session still works: it completes a job it holds.
    complete(&app, &fresh).await.unwrap();
    create_job(&app, &t, &p.name, job("render")).await;
    let mine = zombie.acquire(1, 30.0, 0.0).await.remove(0);
    let answer = zombie.ask(Ask::CompleteJob(completion(&mine))).await;
    assert_eq!(error_code(&answer), Code::Ok, "{answer:?}");
}

#[tokio::test]
async fn a_worker_killed_mid_session_keeps_its_leases_until_they_lapse_then_is_fenced() {
    let app = TestApp::spawn_with(quick_reaping).await;
    let t = token("alice");
    let p = create_project(&app, &t, "session killed").await;
    let created = create_job(&app, &t, &p.name, job("render")).await;
    let mut doomed = Session::open(&app, &worker()).await.unwrap();
    let leased = doomed.acquire(1, 2.0, 0.0).await.remove(0);
    doomed.ask(progress_request(&leased, 30)).await;
    // Killed: the stream breaks with a request in flight (a long poll).
    doomed
        .send(Some(Ask::AcquireJobs(acquire_request(1, 30.0, 20.0))))
        .await;
    drop(doomed);

    // Nothing is given back when the stream goes: the job is still the worker's ...
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now = get(&app, &t, &created.name).await;
    assert_eq!(now.state(), State::Running);
    assert_eq!(now.attempt, 1);
    // ... until its lease lapses, as for a worker that stopped heartbeating.
    let again = acquire(&app, "healthy", &["render"], 1, 30.0, 15.0)
        .await
        .remove(0);
    assert_eq!(again.job.as_ref().unwrap().name, created.name);
    assert_eq!(again.job.as_ref().unwrap().attempt, 2);
    // The dead worker's long poll took nothing with it when it went.
    create_job(&app, &t, &p.name, job("render")).await;
    assert_eq!(
        acquire(&app, "other", &["render"], 5, 30.0, 0.0)
            .await
            .len(),
        1
    );

    // Its late writes, on a new session, are refused; the job ends once.
    let mut revived = Session::open(&app, &worker()).await.unwrap();
    let late = revived.ask(Ask::CompleteJob(completion(&leased))).await;
    assert_eq!(error_code(&late), Code::Aborted, "{late:?}");
    complete(&app, &again).await.unwrap();
    let now = get(&app, &t, &created.name).await;
    assert_eq!(now.state(), State::Succeeded);
    assert_eq!(now.worker_id, "healthy");
}

#[tokio::test]
async fn cancel_reaches_a_worker_on_a_session() {
    let app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "session cancel").await;
    let running = create_job(&app, &t, &p.name, job("render")).await;
    let mut session = Session::open(&app, &worker()).await.unwrap();
    let leased = session.acquire(1, 30.0, 0.0).await.remove(0);
    app.jobs(&t)
        .cancel_job(pb::CancelJobRequest {
            name: running.name.clone(),
        })
        .await
        .unwrap();
    match session.ask(progress_request(&leased, 50)).await {
        Answer::ReportProgress(r) => assert!(r.cancel_requested),
        other => panic!("{other:?}"),
    }
    match session.ask(fail_request(&leased)).await {
        Answer::FailJob(job) => assert_eq!(job.state(), State::Cancelled, "not retried"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_session_on_one_instance_is_woken_by_a_job_created_on_another() {
    let app = TestApp::spawn().await;
    let peer = app.spawn_peer().await;
    let t = token("alice");
    let p = create_project(&app, &t, "session across").await;
    let mut session = Session::open(&peer, &worker()).await.unwrap();
    let polling = session
        .send(Some(Ask::AcquireJobs(acquire_request(1, 30.0, 20.0))))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let created = create_job(&app, &t, &p.name, job("render")).await;
    let mut watcher = watch(&app, &t, &created.name, 0).await;
    let started = std::time::Instant::now();
    let leased = match session.answer(polling).await {
        Answer::AcquireJobs(r) => r.jobs.into_iter().next().expect("woken with the job"),
        other => panic!("{other:?}"),
    };
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "woken, not polled"
    );
    assert_eq!(leased.job.as_ref().unwrap().name, created.name);
    let answer = session.ask(Ask::CompleteJob(completion(&leased))).await;
    assert_eq!(error_code(&answer), Code::Ok);
    // Watchers on the other instance see the session's writes.
    succeeded(&mut watcher).await;
}

#[tokio::test]
async fn a_session_needs_a_worker_token_and_spends_the_worker_budget_per_request() {
    let app = TestApp::spawn_with(|s| {
        s.limits.rates = Some(RateLimits {
            worker: Rate {
                interval: Duration::from_secs(10),
                burst: 4,
            },
            ..RateLimits::default()
        });
    })
    .await;
    let refused = Session::open(&app, &token("alice"))
        .await
        .err()
        .expect("refused");
    assert_eq!(refused.code(), Code::PermissionDenied);

    // Opening spends one; each request one more, answered RESOURCE_EXHAUSTED past the
    // burst without ending the session.
    let mut session = Session::open(&app, &worker()).await.unwrap();
    let mut codes = Vec::new();
    for _ in 0..5 {
        let id = session
            .send(Some(Ask::AcquireJobs(acquire_request(1, 30.0, 0.0))))
            .await;
        codes.push(error_code(&session.answer(id).await));
    }
    assert_eq!(
        codes,
        vec![
            Code::Ok,
            Code::Ok,
            Code::Ok,
            Code::ResourceExhausted,
            Code::ResourceExhausted
        ]
    );
}

#[tokio::test]
async fn a_draining_server_answers_what_a_session_sent_then_ends_it_unavailable() {
    let mut app = TestApp::spawn().await;
    let t = token("alice");
    let p = create_project(&app, &t, "session drain").await;
    create_job(&app, &t, &p.name, job("render")).await;
    let mut session = Session::open(&app, &worker()).await.unwrap();
    let leased = session.acquire(1, 30.0, 0.0).await.remove(0);
    // A long poll is in flight when the drain begins: it is answered (with nothing).
    let polling = session
        .send(Some(Ask::AcquireJobs(acquire_request(1, 30.0, 20.0))))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let server = app.begin_shutdown();
    match session.answer(polling).await {
        Answer::AcquireJobs(r) => assert!(r.jobs.is_empty()),
        other => panic!("{other:?}"),
    }
    let end = tokio::time::timeout(Duration::from_secs(5), session.answers.message())
        .await
        .expect("the session ends")
        .expect_err("with a status");
    assert_eq!(end.code(), Code::Unavailable);
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server stops")
        .unwrap()
        .unwrap();
    drop(leased);
}

#[tokio::test]
async fn the_worker_runtime_s_session_fails_its_calls_when_cut_and_reopens_after() {
    use mediaplane::client::calls::{Session as RuntimeSession, WorkerCalls};
    let app = TestApp::spawn().await;
    let proxy = ChaosProxy::start(Box::leak(app.addr.to_string().into_boxed_str())).await;
    let t = token("alice");
    let p = create_project(&app, &t, "session reopens").await;
    let client = mediaplane::client::ClientArgs {
        server: format!("http://{}", proxy.addr),
        token: worker(),
    }
    .connect()
    .await
    .unwrap();
    let mut calls = WorkerCalls::Session(RuntimeSession::new(client.jobs));
    let acquire = |wait: f64| {
        tonic::Request::new(pb::AcquireJobsRequest {
            worker_id: "runtime".into(),
            kinds: vec!["render".into()],
            max_jobs: 1,
            lease_duration: secs(30.0),
            wait_timeout: secs(wait),
        })
    };
    create_job(&app, &t, &p.name, job("render")).await;
    assert_eq!(
        calls.acquire_jobs(acquire(0.0)).await.unwrap().jobs.len(),
        1
    );

    // The connection breaks with a long poll in flight: the call fails as a call on a
    // broken connection does, and so does the next while the server is unreachable.
    let mut polling = calls.clone();
    let waiting = tokio::spawn(async move { polling.acquire_jobs(acquire(20.0)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut().await;
    let broken = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting call fails at once")
        .unwrap()
        .expect_err("no answer on a broken session");
    assert!(
        matches!(
            broken.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ),
        "{broken:?}"
    );

    // Back: the next call opens a new session and works.
    proxy.restore();
    create_job(&app, &t, &p.name, job("render")).await;
    let mut leased = Vec::new();
    for _ in 0..50 {
        match calls.acquire_jobs(acquire(0.0)).await {
            Ok(r) => {
                leased = r.jobs;
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    assert_eq!(leased.len(), 1, "leased over a new session");
    let opened = calls_started(&app, "WorkerSession", None).await;
    assert_eq!(opened, 2.0, "one session, then one more after the break");
}

#[tokio::test]
async fn a_session_ends_when_its_token_expires() {
    let app = TestApp::spawn().await;
    let expiring = expiring_token("late", &["worker"]);
    let mut session = Session::open(&app, &expiring).await.unwrap();
    assert!(
        session.acquire(1, 30.0, 0.0).await.is_empty(),
        "valid for now"
    );
    let end = tokio::time::timeout(Duration::from_secs(10), session.answers.message())
        .await
        .expect("the session ends when the token expires")
        .expect_err("with a status");
    assert_eq!(end.code(), Code::Unauthenticated, "{end:?}");
    let refused = Session::open(&app, &expiring).await.err().expect("refused");
    assert_eq!(refused.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn a_session_request_is_bounded_by_the_request_timeout_and_the_session_goes_on() {
    let app = TestApp::spawn_with(|s| s.request_timeout = Duration::from_secs(1)).await;
    let t = token("alice");
    let p = create_project(&app, &t, "session timeout").await;
    let mut session = Session::open(&app, &worker()).await.unwrap();
    // A long poll past the server's request timeout, as a unary AcquireJobs would be.
    let started = std::time::Instant::now();
    let answer = session
        .ask(Ask::AcquireJobs(acquire_request(1, 30.0, 20.0)))
        .await;
    assert_eq!(error_code(&answer), Code::DeadlineExceeded, "{answer:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // The session still serves.
    let created = create_job(&app, &t, &p.name, job("render")).await;
    let leased = session.acquire(1, 30.0, 0.0).await;
    assert_eq!(leased[0].job.as_ref().unwrap().name, created.name);
}

#[tokio::test]
async fn worker_sessions_are_capped_per_principal() {
    let app = TestApp::spawn_with(|s| s.limits.connections.max_worker_sessions = 2).await;
    let first = Session::open(&app, &worker()).await.expect("first session");
    let mut second = Session::open(&app, &worker())
        .await
        .expect("second session");
    let err = Session::open(&app, &worker())
        .await
        .err()
        .expect("a third is refused");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let quota = tonic_types::StatusExt::get_details_quota_failure(&err).expect("QuotaFailure");
    assert_eq!(quota.violations[0].subject, "open_worker_sessions");
    // Another principal has its own sessions.
    Session::open(
        &app,
        &token_with("fleet-2", &["worker"], Duration::from_secs(600)),
    )
    .await
    .expect("another principal's session");
    // The open ones still serve; a closed one gives its place back.
    assert!(second.acquire(1, 30.0, 0.0).await.is_empty());
    drop(first);
    eventually(
        Duration::from_secs(5),
        "a closed session gives its place back",
        || async { Session::open(&app, &worker()).await.is_ok() },
    )
    .await;
}
