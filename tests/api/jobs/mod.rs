//! Jobs: state machine, worker protocol, fencing, fan-out across instances. The
//! helpers every jobs test shares are here; the tests are in one file per behaviour.
use std::time::Duration;

use mediaplane::proto::v1::{self as pb, job::State};
use prost_types::{Duration as PbDuration, Struct, Value, value::Kind};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::helpers::*;

mod creating;
mod fencing;
mod leasing;
mod next;
mod retention;
mod session;
mod watching;

pub(super) fn worker() -> String {
    worker_token()
}

/// A worker token of the fleet's own subject (leases are bound to the subject that
/// acquired them), narrowed to one kind.
pub(super) fn fleet_token_for(kind: &str) -> String {
    mediaplane::auth::mint(
        &mediaplane::config::Secret::new(SECRET),
        "fleet",
        &["worker".into()],
        &[kind.into()],
        Duration::from_secs(60),
    )
    .unwrap()
}

pub(super) fn secs(s: f64) -> Option<PbDuration> {
    Some(PbDuration {
        seconds: s.trunc() as i64,
        nanos: (s.fract() * 1e9) as i32,
    })
}

pub(super) fn job(kind: &str) -> pb::Job {
    let input = Struct {
        fields: [(
            "prompt".to_owned(),
            Value {
                kind: Some(Kind::StringValue("a cat".into())),
            },
        )]
        .into(),
    };
    pb::Job {
        kind: kind.into(),
        input: Some(input),
        ..Default::default()
    }
}

pub(super) async fn create_job(app: &TestApp, t: &str, project: &str, j: pb::Job) -> pb::Job {
    app.jobs(t)
        .create_job(pb::CreateJobRequest {
            parent: project.into(),
            job: Some(j),
            request_id: String::new(),
            key: String::new(),
        })
        .await
        .expect("create job")
        .into_inner()
}

pub(super) async fn acquire(
    app: &TestApp,
    worker_id: &str,
    kinds: &[&str],
    max: i32,
    lease: f64,
    wait: f64,
) -> Vec<pb::LeasedJob> {
    acquire_as(app, &worker(), worker_id, kinds, max, lease, wait).await
}

pub(super) async fn acquire_as(
    app: &TestApp,
    token: &str,
    worker_id: &str,
    kinds: &[&str],
    max: i32,
    lease: f64,
    wait: f64,
) -> Vec<pb::LeasedJob> {
    app.jobs(token)
        .acquire_jobs(pb::AcquireJobsRequest {
            worker_id: worker_id.into(),
            kinds: kinds.iter().map(|k| k.to_string()).collect(),
            max_jobs: max,
            lease_duration: secs(lease),
            wait_timeout: secs(wait),
        })
        .await
        .expect("acquire")
        .into_inner()
        .jobs
}

/// An AcquireJobs call for "render" jobs that waits up to 20 s, running in the background.
/// What a waiting AcquireJobs (see `spawn_acquire`) returned, woken within `secs`
/// (less than its 20 s wait: an empty return at the wait's end fails too).
pub(super) async fn woken(
    waiting: impl Future<Output = Result<Vec<pb::LeasedJob>, tokio::task::JoinError>>,
    secs: u64,
) -> Vec<pb::LeasedJob> {
    tokio::time::timeout(Duration::from_secs(secs), waiting)
        .await
        .expect("woken before the wait ends")
        .unwrap()
}

pub(super) fn spawn_acquire(
    app: &TestApp,
    worker_id: &str,
    max: i32,
) -> tokio::task::JoinHandle<Vec<pb::LeasedJob>> {
    let mut c = app.jobs(&worker());
    let worker_id = worker_id.to_owned();
    tokio::spawn(async move {
        c.acquire_jobs(pb::AcquireJobsRequest {
            worker_id,
            kinds: vec!["render".into()],
            max_jobs: max,
            lease_duration: secs(30.0),
            wait_timeout: secs(20.0),
        })
        .await
        .expect("acquire")
        .into_inner()
        .jobs
    })
}

pub(super) async fn progress(
    app: &TestApp,
    leased: &pb::LeasedJob,
    percent: i32,
    step: &str,
) -> Result<pb::ReportProgressResponse, tonic::Status> {
    let name = leased.job.as_ref().unwrap().name.clone();
    app.jobs(&worker())
        .report_progress(pb::ReportProgressRequest {
            name,
            lease_id: leased.lease_id.clone(),
            progress_percent: percent,
            current_step: step.into(),
            message: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

pub(super) async fn complete(
    app: &TestApp,
    leased: &pb::LeasedJob,
) -> Result<pb::Job, tonic::Status> {
    let result = Struct {
        fields: [(
            "frames".to_owned(),
            Value {
                kind: Some(Kind::NumberValue(240.0)),
            },
        )]
        .into(),
    };
    app.jobs(&worker())
        .complete_job(pb::CompleteJobRequest {
            name: leased.job.as_ref().unwrap().name.clone(),
            lease_id: leased.lease_id.clone(),
            result: Some(result),
            output_assets: vec![],
        })
        .await
        .map(|r| r.into_inner())
}

pub(super) async fn fail(
    app: &TestApp,
    leased: &pb::LeasedJob,
    retryable: bool,
    retry_after: Option<PbDuration>,
) -> Result<pb::Job, tonic::Status> {
    app.jobs(&worker())
        .fail_job(pb::FailJobRequest {
            name: leased.job.as_ref().unwrap().name.clone(),
            lease_id: leased.lease_id.clone(),
            error: Some(tonic_types::pb::Status {
                code: Code::Internal as i32,
                message: "gpu fell over".into(),
                details: vec![],
            }),
            retryable,
            retry_after,
        })
        .await
        .map(|r| r.into_inner())
}

pub(super) async fn get(app: &TestApp, t: &str, name: &str) -> pb::Job {
    app.jobs(t)
        .get_job(pb::GetJobRequest { name: name.into() })
        .await
        .expect("get job")
        .into_inner()
}

/// Opens a WatchJob stream for `name` after `after_sequence`.
pub(super) async fn watch(
    app: &TestApp,
    token: &str,
    name: &str,
    after_sequence: i64,
) -> tonic::Streaming<pb::JobEvent> {
    app.jobs(token)
        .watch_job(pb::WatchJobRequest {
            name: name.to_owned(),
            after_sequence,
        })
        .await
        .expect("watch job")
        .into_inner()
}

pub(super) async fn collect(
    stream: &mut tonic::Streaming<pb::JobEvent>,
    timeout: Duration,
) -> Vec<pb::JobEvent> {
    let mut out = Vec::new();
    while let Ok(Some(item)) = tokio::time::timeout(timeout, stream.next()).await {
        out.push(item.expect("watch stream item"));
    }
    out
}

/// The first page of a project's jobs, newest first.
pub(super) async fn list_first_page(
    app: &TestApp,
    token: &str,
    parent: &str,
) -> pb::ListJobsResponse {
    app.jobs(token)
        .list_jobs(pb::ListJobsRequest {
            parent: parent.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// How many events Postgres keeps for the job `name`.
pub(super) async fn stored_events(app: &TestApp, name: &str) -> i64 {
    use diesel_async::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let id = uuid::Uuid::parse_str(name.rsplit('/').next().unwrap()).unwrap();
    let mut conn = <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(
        &app.db.url(),
    )
    .await
    .unwrap();
    diesel::sql_query("SELECT count(*) AS n FROM job_events WHERE job_id = $1")
        .bind::<diesel::sql_types::Uuid, _>(id)
        .get_result::<Count>(&mut conn)
        .await
        .unwrap()
        .n
}

pub(super) fn state(e: &pb::JobEvent) -> State {
    State::try_from(e.job.as_ref().unwrap().state).unwrap()
}

/// One completion of a BatchCompleteJobs request.
pub(super) fn completion(leased: &pb::LeasedJob) -> pb::CompleteJobRequest {
    pb::CompleteJobRequest {
        name: leased.job.as_ref().unwrap().name.clone(),
        lease_id: leased.lease_id.clone(),
        ..Default::default()
    }
}

/// The code of each result of a batch; OK for a completed job.
pub(super) fn outcomes(results: &[pb::CompleteJobResult]) -> Vec<Code> {
    use pb::complete_job_result::Outcome;
    results
        .iter()
        .map(
            |r| match r.outcome.as_ref().expect("an outcome per result") {
                Outcome::Job(job) => {
                    assert_eq!(job.state(), State::Succeeded);
                    Code::Ok
                }
                Outcome::Error(status) => Code::from(status.code),
            },
        )
        .collect()
}
