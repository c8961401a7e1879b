//! The worker methods as `mediaplane worker` makes them: over one WorkerSession stream
//! (the default), or as one call each (`--no-session`). The runtime sees the same
//! four methods and the same `Status` errors either way.
//!
//! The session is opened on first use and again after it broke (the server drained,
//! the connection went): the requests in flight when it broke fail with its status, as
//! calls on a broken connection would, and the runtime retries as it does for those.
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Status};

use super::Jobs;
use crate::proto::v1 as pb;
use pb::{worker_session_request::Request as Ask, worker_session_response::Response as Answer};

type Waiting = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Result<Answer, Status>>>>>>;

#[derive(Clone)]
pub enum WorkerCalls {
    Unary(Jobs),
    Session(Session),
}

/// One worker's session, shared by its jobs.
#[derive(Clone)]
pub struct Session {
    jobs: Jobs,
    live: Arc<tokio::sync::Mutex<Option<Live>>>,
    next_id: Arc<AtomicU64>,
}

/// An open stream: where requests go, and who waits for which answer (`None` once the
/// stream ended: nobody may wait on it any more).
#[derive(Clone)]
struct Live {
    tx: mpsc::Sender<pb::WorkerSessionRequest>,
    waiting: Waiting,
}

impl Session {
    pub fn new(jobs: Jobs) -> Self {
        Self {
            jobs,
            live: Arc::default(),
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }

    async fn live(&self) -> Result<Live, Status> {
        let mut live = self.live.lock().await;
        if let Some(l) = live.as_ref()
            && !l.tx.is_closed()
            && l.waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
        {
            return Ok(l.clone());
        }
        let (tx, rx) = mpsc::channel(256);
        let mut answers = self
            .jobs
            .clone()
            .worker_session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let waiting: Waiting = Arc::new(Mutex::new(Some(HashMap::new())));
        let dispatch = waiting.clone();
        tokio::spawn(async move {
            let end = loop {
                match answers.message().await {
                    Ok(Some(answer)) => {
                        let waiter = dispatch
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .as_mut()
                            .and_then(|w| w.remove(&answer.id));
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(answer.response.ok_or_else(|| {
                                Status::internal("the server answered with no response")
                            }));
                        }
                    }
                    Ok(None) => break Status::unavailable("the worker session ended"),
                    Err(status) => break status,
                }
            };
            let orphans = dispatch.lock().unwrap_or_else(|p| p.into_inner()).take();
            for (_, waiter) in orphans.into_iter().flatten() {
                let _ = waiter.send(Err(end.clone()));
            }
        });
        let opened = Live { tx, waiting };
        *live = Some(opened.clone());
        Ok(opened)
    }

    async fn ask(&self, request: Ask, traceparent: String) -> Result<Answer, Status> {
        let live = self.live().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answered, answer) = oneshot::channel();
        match live
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            Some(waiting) => waiting.insert(id, answered),
            None => return Err(Status::unavailable("the worker session ended")),
        };
        let sent = live
            .tx
            .send(pb::WorkerSessionRequest {
                id,
                request: Some(request),
                traceparent,
            })
            .await;
        if sent.is_err() {
            return Err(Status::unavailable("the worker session ended"));
        }
        match answer.await {
            Ok(Ok(Answer::Error(e))) => Err(Status::new(Code::from_i32(e.code), e.message)),
            Ok(answer) => answer,
            Err(_) => Err(Status::unavailable("the worker session ended")),
        }
    }
}

/// The `traceparent` a request carries as metadata, for a session request's field.
fn traceparent<T>(request: &tonic::Request<T>) -> String {
    request
        .metadata()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

impl Session {
    /// `request` as the session request `ask` makes of it; its answer as `answer` reads
    /// it (`None`: an answer of another method).
    async fn call<Q, R>(
        &self,
        request: tonic::Request<Q>,
        ask: fn(Q) -> Ask,
        answer: fn(Answer) -> Option<R>,
    ) -> Result<R, Status> {
        let tp = traceparent(&request);
        answer(self.ask(ask(request.into_inner()), tp).await?)
            .ok_or_else(|| Status::internal("the server answered another method"))
    }
}

impl WorkerCalls {
    pub async fn acquire_jobs(
        &mut self,
        request: tonic::Request<pb::AcquireJobsRequest>,
    ) -> Result<pb::AcquireJobsResponse, Status> {
        match self {
            Self::Unary(jobs) => jobs.acquire_jobs(request).await.map(|r| r.into_inner()),
            Self::Session(s) => {
                s.call(request, Ask::AcquireJobs, |a| match a {
                    Answer::AcquireJobs(r) => Some(r),
                    _ => None,
                })
                .await
            }
        }
    }

    pub async fn report_progress(
        &mut self,
        request: tonic::Request<pb::ReportProgressRequest>,
    ) -> Result<pb::ReportProgressResponse, Status> {
        match self {
            Self::Unary(jobs) => jobs.report_progress(request).await.map(|r| r.into_inner()),
            Self::Session(s) => {
                s.call(request, Ask::ReportProgress, |a| match a {
                    Answer::ReportProgress(r) => Some(r),
                    _ => None,
                })
                .await
            }
        }
    }

    pub async fn batch_complete_jobs(
        &mut self,
        request: tonic::Request<pb::BatchCompleteJobsRequest>,
    ) -> Result<pb::BatchCompleteJobsResponse, Status> {
        match self {
            Self::Unary(jobs) => jobs
                .batch_complete_jobs(request)
                .await
                .map(|r| r.into_inner()),
            Self::Session(s) => {
                s.call(request, Ask::BatchCompleteJobs, |a| match a {
                    Answer::BatchCompleteJobs(r) => Some(r),
                    _ => None,
                })
                .await
            }
        }
    }

    pub async fn fail_job(
        &mut self,
        request: tonic::Request<pb::FailJobRequest>,
    ) -> Result<pb::Job, Status> {
        match self {
            Self::Unary(jobs) => jobs.fail_job(request).await.map(|r| r.into_inner()),
            Self::Session(s) => {
                s.call(request, Ask::FailJob, |a| match a {
                    Answer::FailJob(r) => Some(r),
                    _ => None,
                })
                .await
            }
        }
    }
}
