//! WorkerSession: the worker methods over one bidirectional stream. Each request is
//! handled by the unary handler it names (`JobsApi::acquire_jobs`, ...), so checks,
//! fencing, limits and errors are theirs by construction; the stream adds only ids,
//! concurrency, backpressure and its own end.
//!
//! A session holds nothing of its own: no lease is tied to it, so a stream that ends
//! or breaks changes nothing, and the worker's leases lapse as a silent worker's do.
use futures::{StreamExt, stream::FuturesUnordered};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument;

use super::jobs::JobsApi;
use crate::{
    AppError,
    auth::Caller,
    guard::MessageBudget,
    metrics::Transport,
    proto::{server::jobs_service_server::JobsService, v1 as pb},
};
use pb::{worker_session_request::Request as Ask, worker_session_response::Response as Answer};

/// Requests of one session handled at once. The stream is read no further until one
/// is answered, and answers wait for the worker to read them: a worker that sends
/// faster than it reads slows itself, not the server.
const MAX_IN_FLIGHT: usize = 256;

pub type SessionStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<pb::WorkerSessionResponse, Status>> + Send>,
>;

/// Serves one session until the worker ends it, goes away or the server drains.
pub fn serve(
    api: JobsApi,
    caller: Caller,
    budget: Option<MessageBudget>,
    mut inbound: Streaming<pb::WorkerSessionRequest>,
) -> ReceiverStream<Result<pb::WorkerSessionResponse, Status>> {
    let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT);
    let draining = api.draining();
    // A unary call with an expired token is refused; a session is ended when its token
    // expires (after answering what it was given), so it is no way to outlive one.
    let expired = tokio::time::sleep(
        caller
            .valid_until()
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    );
    let session = async move {
        tokio::pin!(expired);
        let mut running = FuturesUnordered::new();
        let mut reading = true;
        let mut end = None;
        loop {
            tokio::select! {
                // The worker is gone: what runs is dropped, as its unary calls would be.
                () = tx.closed() => return,
                Some(answer) = running.next() => {
                    if tx.send(Ok(answer)).await.is_err() {
                        return;
                    }
                }
                next = inbound.message(), if reading && running.len() < MAX_IN_FLIGHT => {
                    match next {
                        Ok(Some(request)) => running.push(handle(
                            api.clone(),
                            caller.clone(),
                            budget.clone(),
                            request,
                        )),
                        Ok(None) => reading = false,
                        Err(status) => {
                            reading = false;
                            end = Some(undecodable_is_invalid(status));
                        }
                    }
                }
                () = &mut expired, if reading => {
                    reading = false;
                    end = Some(Status::unauthenticated(
                        "token expired; open a new session with a fresh token",
                    ));
                }
                () = draining.cancelled(), if reading => {
                    reading = false;
                    end = Some(Status::unavailable(
                        "server is shutting down; reconnect (to another instance)",
                    ));
                }
                else => break,
            }
            if !reading && running.is_empty() {
                break;
            }
        }
        if let Some(status) = end {
            let _ = tx.send(Err(status)).await;
        }
    };
    // Requests without a trace context of their own nest under the session's call.
    tokio::spawn(session.in_current_span());
    ReceiverStream::new(rx)
}

/// tonic reports a message it cannot decode as INTERNAL with the decoder's words; it
/// is the worker's input (see `guard::undecodable_is_invalid_argument`).
fn undecodable_is_invalid(status: Status) -> Status {
    if status.code() == Code::Internal && status.message().starts_with("failed to decode") {
        Status::invalid_argument(
            "a request message cannot be decoded (malformed, or nested too deeply)",
        )
    } else {
        status
    }
}

/// One request, answered as the method it names would answer it.
async fn handle(
    api: JobsApi,
    caller: Caller,
    budget: Option<MessageBudget>,
    request: pb::WorkerSessionRequest,
) -> pb::WorkerSessionResponse {
    let method = match &request.request {
        Some(Ask::AcquireJobs(_)) => "AcquireJobs",
        Some(Ask::ReportProgress(_)) => "ReportProgress",
        Some(Ask::CompleteJob(_)) => "CompleteJob",
        Some(Ask::BatchCompleteJobs(_)) => "BatchCompleteJobs",
        Some(Ask::FailJob(_)) => "FailJob",
        None => "",
    };
    let path = format!("/mediaplane.v1.JobsService/{method}");
    // The span and metrics of the call the request stands for, marked as this door's.
    let span = tracing::info_span!(
        "call",
        trace_id = tracing::field::Empty,
        worker_id = tracing::field::Empty,
        otel.name = %path,
        otel.kind = "server",
        rpc.transport = "worker-session",
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    if let Ok(traceparent) = http::HeaderValue::from_str(&request.traceparent)
        && !request.traceparent.is_empty()
    {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", traceparent);
        if let Some(trace_id) = crate::telemetry::join_caller(&span, &headers) {
            span.record("trace_id", trace_id);
        }
    }
    let mut timer = api.metrics().start(
        if method.is_empty() { "" } else { &path },
        Transport::WorkerSession,
    );
    // Bounded like the unary call it stands for (`request_timeout`): an AcquireJobs
    // waiting longer is answered DEADLINE_EXCEEDED, and the session goes on.
    let answer = tokio::time::timeout(api.request_timeout(), async {
        if let Some(budget) = &budget {
            budget.spend().await?;
        }
        dispatch(&api, &caller, request.request).await
    })
    .instrument(span.clone())
    .await
    .unwrap_or_else(|_| Err(Status::deadline_exceeded("deadline exceeded")));
    let code = answer.as_ref().map_or_else(Status::code, |_| Code::Ok);
    timer.finish(code);
    span.record("rpc.grpc.status_code", code as i32);
    if crate::error::is_server_fault(code) {
        span.record("otel.status_code", "ERROR");
    }
    pb::WorkerSessionResponse {
        id: request.id,
        response: Some(match answer {
            Ok(answer) => answer,
            Err(status) => Answer::Error(crate::error::rpc_status(&status)),
        }),
    }
}

async fn dispatch(api: &JobsApi, caller: &Caller, request: Option<Ask>) -> Result<Answer, Status> {
    Ok(match request {
        Some(Ask::AcquireJobs(m)) => {
            Answer::AcquireJobs(inner(api.acquire_jobs(call(caller, m)).await)?)
        }
        Some(Ask::ReportProgress(m)) => {
            Answer::ReportProgress(inner(api.report_progress(call(caller, m)).await)?)
        }
        Some(Ask::CompleteJob(m)) => {
            Answer::CompleteJob(inner(api.complete_job(call(caller, m)).await)?)
        }
        Some(Ask::BatchCompleteJobs(m)) => {
            Answer::BatchCompleteJobs(inner(api.batch_complete_jobs(call(caller, m)).await)?)
        }
        Some(Ask::FailJob(m)) => Answer::FailJob(inner(api.fail_job(call(caller, m)).await)?),
        None => {
            return Err(AppError::invalid(
                "request",
                "one of acquire_jobs, report_progress, complete_job, batch_complete_jobs or fail_job is required",
            )
            .into());
        }
    })
}

/// A unary request from the session's caller.
fn call<T>(caller: &Caller, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(caller.clone());
    request
}

fn inner<T>(answer: Result<Response<T>, Status>) -> Result<T, Status> {
    answer.map(Response::into_inner)
}
