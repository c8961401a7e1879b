//! JobsService over gRPC: client methods (owner-scoped) and worker methods (role
//! `worker`), all through the engine.
//!
//! The longest adapter because JobsService is the largest service (thirteen RPCs);
//! each handler is only validation and conversion, as in the other adapters.
use std::{pin::Pin, time::Duration};

use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::convert::{datetime, duration, struct_to_json};
use crate::{
    AppError,
    auth::{Caller, caller},
    domain::job::Fenced,
    domain::{
        Violations,
        job::{self, Dependency, DependencyScope, JobError, JobFilter, NewJob},
        names::{AssetName, JobName, ProjectName},
        page, text,
    },
    engine::{Engine, LeaseOp},
    proto::{EncodedJobEvent, v1 as pb},
    quotas::{Quota, Quotas},
};

#[derive(Clone)]
pub struct JobsApi {
    engine: Engine,
    quotas: Quotas,
    /// Bytes of jobs one response may hold (ListJobs, AcquireJobs, batch answers).
    page_budget: usize,
    /// The longest a request may take: the calls layer bounds unary calls with it, and
    /// a worker session each of its requests.
    request_timeout: std::time::Duration,
}

impl JobsApi {
    pub fn new(
        engine: Engine,
        quotas: Quotas,
        max_message_bytes: usize,
        request_timeout: std::time::Duration,
    ) -> Self {
        Self {
            engine,
            quotas,
            page_budget: super::page_budget(max_message_bytes),
            request_timeout,
        }
    }
}

impl JobsApi {
    pub(super) fn request_timeout(&self) -> std::time::Duration {
        self.request_timeout
    }

    /// Cancelled when the server starts shutting down (worker sessions end then).
    pub(super) fn draining(&self) -> tokio_util::sync::CancellationToken {
        self.engine.settings.draining.clone()
    }

    pub(super) fn metrics(&self) -> &crate::metrics::Metrics {
        &self.engine.settings.metrics
    }

    /// `n` more unfinished jobs for the caller's quota (admins act for others: none).
    async fn admit_jobs(&self, caller: &Caller, n: i64) -> Result<(), Status> {
        if !caller.is_admin() {
            self.quotas.admit(Quota::ActiveJobs, &caller.sub, n).await?;
        }
        Ok(())
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<EncodedJobEvent, Status>> + Send>>;

/// Ends a watch with UNAUTHENTICATED when its caller's token expires, as a call with
/// that token would then be refused: a stream is no way to outlive one. The watcher
/// resumes with a fresh token (`after_sequence` on WatchJob; WatchJobs starts with
/// snapshots anyway).
fn until_expiry(
    inner: impl Stream<Item = Result<EncodedJobEvent, Status>> + Send + 'static,
    caller: &Caller,
) -> EventStream {
    use futures::StreamExt;
    let left = caller
        .valid_until()
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    let expired = Box::pin(tokio::time::sleep(left));
    let state = (Box::pin(inner), expired, false);
    Box::pin(futures::stream::unfold(
        state,
        |(mut inner, mut expired, ended)| async move {
            if ended {
                return None;
            }
            // The expiry first: a stream always ready would otherwise never end.
            tokio::select! {
                biased;
                () = &mut expired => Some((
                    Err(Status::unauthenticated(
                        "token expired; watch again with a fresh token",
                    )),
                    (inner, expired, true),
                )),
                item = inner.next() => item.map(|item| (item, (inner, expired, false))),
            }
        },
    ))
}

/// Bytes a created job's encoding may add to the job as requested (name, state,
/// sequence, times); measured about 150.
const CREATED_JOB_OVERHEAD: usize = 256;

/// A job as a batch answers it when the whole would not fit in one response: which job,
/// its state and sequence, and when it ended.
fn brief(job: pb::Job) -> pb::Job {
    pb::Job {
        name: job.name,
        kind: job.kind,
        state: job.state,
        attempt: job.attempt,
        sequence: job.sequence,
        end_time: job.end_time,
        update_time: job.update_time,
        ..Default::default()
    }
}

fn require_worker(caller: &Caller) -> Result<(), Status> {
    if caller.is_worker() || caller.is_admin() {
        Ok(())
    } else {
        Err(
            AppError::PermissionDenied("worker methods need a token with the `worker` role".into())
                .into(),
        )
    }
}

/// Validates a CreateJobRequest's job; field names get `prefix` (`job.`, `requests[3].job.`).
fn new_job(
    job: Option<pb::Job>,
    prefix: &str,
    scope: &DependencyScope<'_>,
    v: &mut Violations,
) -> NewJob {
    let Some(job) = job else {
        v.add(prefix.trim_end_matches('.'), "required");
        return NewJob {
            kind: String::new(),
            input: Default::default(),
            labels: Default::default(),
            priority: 0,
            max_attempts: 1,
            schedule_time: None,
            depends_on: Vec::new(),
            run_anyway: false,
            concurrency_key: String::new(),
        };
    };
    let mut depends_on = Vec::with_capacity(job.depends_on.len());
    for (i, entry) in job.depends_on.iter().enumerate() {
        match Dependency::parse(entry, scope) {
            Ok(d) if !depends_on.contains(&d) => depends_on.push(d),
            Ok(_) => {}
            Err(why) => v.add(format!("{prefix}depends_on[{i}]"), why),
        }
    }
    let input = match job.input.map(struct_to_json).transpose() {
        Ok(i) => i.unwrap_or_default(),
        Err(why) => {
            v.add(format!("{prefix}input"), why);
            Default::default()
        }
    };
    let schedule_time = job.schedule_time.as_ref().and_then(|t| {
        let parsed = datetime(t);
        if parsed.is_none() {
            v.add(
                format!("{prefix}schedule_time"),
                "not a valid timestamp between the years 1 and 9999",
            );
        }
        parsed
    });
    let new = NewJob {
        kind: job.kind,
        input,
        labels: job.labels,
        priority: job.priority,
        max_attempts: if job.max_attempts == 0 {
            job::DEFAULT_MAX_ATTEMPTS
        } else {
            job.max_attempts
        },
        schedule_time,
        depends_on,
        run_anyway: job.run_anyway,
        concurrency_key: job.concurrency_key,
    };
    new.validate(prefix, v);
    new
}

fn request_id(id: String, field: &str, v: &mut Violations) -> Option<String> {
    if id.chars().count() > 128 || !text::storable(&id) {
        v.add(field, "at most 128 characters, without NUL");
    }
    (!id.is_empty()).then_some(id)
}

fn text(value: String, field: &str, v: &mut Violations) -> String {
    if value.chars().count() > job::MAX_TEXT || !text::storable(&value) {
        v.add(
            field,
            format!("at most {} characters, without NUL", job::MAX_TEXT),
        );
    }
    value
}

/// Validates a completion of `name` (fields prefixed `requests[3].` in a batch) into
/// the write the engine applies under its lease.
fn completion(
    name: JobName,
    r: pb::CompleteJobRequest,
    prefix: &str,
    v: &mut Violations,
) -> LeaseOp {
    let result = match r.result.map(struct_to_json).transpose() {
        Ok(result) => result,
        Err(why) => {
            v.add(format!("{prefix}result"), why);
            None
        }
    };
    if result
        .as_ref()
        .is_some_and(|m| serde_json::to_vec(m).map_or(true, |b| b.len() > job::MAX_RESULT_BYTES))
    {
        v.add(
            format!("{prefix}result"),
            format!("at most {} bytes as JSON", job::MAX_RESULT_BYTES),
        );
    }
    if r.output_assets.len() > 1000 {
        v.add(format!("{prefix}output_assets"), "at most 1000 assets");
    }
    for (i, asset) in r.output_assets.iter().enumerate() {
        let field = format!("{prefix}output_assets[{i}]");
        match AssetName::parse(&field, asset) {
            Ok(a) if a.project == name.project => {}
            Ok(_) => v.add(field, "must be an asset of the job's project"),
            Err(_) => v.add(field, "expected projects/{project}/assets/{asset}"),
        }
    }
    LeaseOp::complete(result.map(serde_json::Value::Object), r.output_assets)
}

pub(super) fn positive_duration(
    d: Option<prost_types::Duration>,
    field: &str,
    default: Duration,
    min: Duration,
    max: Duration,
    v: &mut Violations,
) -> Duration {
    match d {
        None => default,
        Some(d) => match duration(&d) {
            Some(d) if d >= min && d <= max => d,
            _ => {
                v.add(field, format!("from {min:?} to {max:?}"));
                default
            }
        },
    }
}

#[tonic::async_trait]
impl crate::proto::server::jobs_service_server::JobsService for JobsApi {
    async fn create_job(
        &self,
        request: Request<pb::CreateJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = caller(&request)?;
        let pb::CreateJobRequest {
            parent,
            job,
            request_id: rid,
            // Only BatchCreateJobs resolves keys.
            key: _,
        } = request.into_inner();
        let project = ProjectName::parse("parent", &parent)?;
        let mut v = Violations::default();
        let scope = DependencyScope {
            project: project.0,
            batch: None,
        };
        let new = new_job(job, "job.", &scope, &mut v);
        let rid = request_id(rid, "request_id", &mut v);
        let new = v.into_result(new)?;
        self.admit_jobs(&caller, 1).await?;
        let mut jobs = self
            .engine
            .create(&caller, project, vec![(new, rid)])
            .await?;
        let job = jobs
            .pop()
            .ok_or_else(|| AppError::internal("create returned no job"))?;
        Ok(Response::new(job.into()))
    }

    async fn batch_create_jobs(
        &self,
        request: Request<pb::BatchCreateJobsRequest>,
    ) -> Result<Response<pb::BatchCreateJobsResponse>, Status> {
        let caller = caller(&request)?;
        // The answer repeats every job with what the server adds: a batch whose answer
        // would not fit in one response is refused before anything is written, not
        // written and then answered with an error.
        let answer = prost::Message::encoded_len(request.get_ref())
            + request.get_ref().requests.len() * CREATED_JOB_OVERHEAD;
        let pb::BatchCreateJobsRequest { parent, requests } = request.into_inner();
        let project = ProjectName::parse("parent", &parent)?;
        let mut v = Violations::default();
        if requests.is_empty() || requests.len() > job::MAX_BATCH {
            v.add(
                "requests",
                format!("1 to {} jobs per batch", job::MAX_BATCH),
            );
        } else if answer > self.page_budget {
            v.add(
                "requests",
                format!(
                    "the created jobs would not fit in one response (about {answer} bytes, at most {}): send fewer jobs per batch",
                    self.page_budget
                ),
            );
        }
        let mut jobs = Vec::with_capacity(requests.len());
        let mut keys = std::collections::HashMap::new();
        for (i, r) in requests.into_iter().enumerate() {
            if !r.parent.is_empty() && r.parent != parent {
                v.add(
                    format!("requests[{i}].parent"),
                    "must be empty or equal to the batch's parent",
                );
            }
            let scope = DependencyScope {
                project: project.0,
                batch: Some((i, &keys)),
            };
            let new = new_job(r.job, &format!("requests[{i}].job."), &scope, &mut v);
            if !r.key.is_empty() {
                if !crate::domain::labels::valid_key(&r.key) {
                    v.add(
                        format!("requests[{i}].key"),
                        "1 to 63 lowercase letters, digits, `_` or `-`, starting with a letter",
                    );
                } else if keys.insert(r.key.clone(), i).is_some() {
                    v.add(
                        format!("requests[{i}].key"),
                        "used by an earlier request of the batch",
                    );
                }
            }
            let rid = request_id(r.request_id, &format!("requests[{i}].request_id"), &mut v);
            jobs.push((new, rid));
        }
        let jobs = v.into_result(jobs)?;
        self.admit_jobs(&caller, jobs.len() as i64).await?;
        let created = self.engine.create(&caller, project, jobs).await?;
        Ok(Response::new(pb::BatchCreateJobsResponse {
            jobs: created.into_iter().map(Into::into).collect(),
        }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = caller(&request)?;
        let name = JobName::parse("name", &request.get_ref().name)?;
        Ok(Response::new(self.engine.get(&caller, name).await?.into()))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let project = ProjectName::parse("parent", &r.parent)?;
        let filter = JobFilter::parse(&r.filter).map_err(|why| AppError::invalid("filter", why))?;
        let descending = match r.order_by.split_whitespace().collect::<Vec<_>>().as_slice() {
            [] | ["create_time", "desc"] => true,
            ["create_time"] | ["create_time", "asc"] => false,
            _ => {
                return Err(AppError::invalid(
                    "order_by",
                    "supported: `create_time`, `create_time asc`, `create_time desc`",
                )
                .into());
            }
        };
        let limit = page::page_size(r.page_size)?;
        let owner = caller.owner_scope().map(str::to_owned);
        let fingerprint = page::fingerprint(&[
            "jobs",
            owner.as_deref().unwrap_or("*"),
            &r.parent,
            &filter.canonical(),
            if descending { "desc" } else { "asc" },
        ]);
        let after = page::decode(&r.page_token, &fingerprint)?;
        let query = crate::domain::job::ListJobs {
            owner,
            project: project.0,
            filter,
            limit,
            after,
            descending,
        };
        let (jobs, more) = self.engine.list(&query).await?;
        let (jobs, last, cut) = super::fit_page(jobs, self.page_budget, |j| page::Cursor {
            create_time: j.create_time,
            id: j.id,
        });
        let next_page_token = page::next_token(more || cut, last, &fingerprint);
        Ok(Response::new(pb::ListJobsResponse {
            jobs,
            next_page_token,
        }))
    }

    async fn summarize_jobs(
        &self,
        request: Request<pb::SummarizeJobsRequest>,
    ) -> Result<Response<pb::JobsSummary>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let project = ProjectName::parse("parent", &r.parent)?;
        let filter = JobFilter::parse(&r.filter).map_err(|why| AppError::invalid("filter", why))?;
        let summary = self.engine.summarize(&caller, project, &filter).await?;
        Ok(Response::new(summary.into()))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = caller(&request)?;
        let name = JobName::parse("name", &request.get_ref().name)?;
        Ok(Response::new(
            self.engine.cancel(&caller, name).await?.into(),
        ))
    }

    async fn retry_job(
        &self,
        request: Request<pb::RetryJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = caller(&request)?;
        let name = JobName::parse("name", &request.get_ref().name)?;
        Ok(Response::new(
            self.engine.retry(&caller, name).await?.into(),
        ))
    }

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let name = JobName::parse("name", &r.name)?;
        if r.after_sequence < 0 {
            return Err(AppError::invalid("after_sequence", "must not be negative").into());
        }
        let stream = self
            .engine
            .watch_job(&caller, name, r.after_sequence)
            .await?;
        Ok(Response::new(until_expiry(stream, &caller)))
    }

    async fn watch_jobs(
        &self,
        request: Request<pb::WatchJobsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let project = ProjectName::parse("parent", &r.parent)?;
        let filter = JobFilter::parse(&r.filter).map_err(|why| AppError::invalid("filter", why))?;
        let stream = self.engine.watch_jobs(&caller, project, filter).await?;
        Ok(Response::new(until_expiry(stream, &caller)))
    }

    async fn acquire_jobs(
        &self,
        request: Request<pb::AcquireJobsRequest>,
    ) -> Result<Response<pb::AcquireJobsResponse>, Status> {
        let caller = caller(&request)?;
        require_worker(&caller)?;
        let r = request.into_inner();
        tracing::Span::current().record("worker_id", r.worker_id.as_str());
        let acquire = super::acquire::Acquire::check(&caller, &r, "")?;
        let jobs = acquire.run(&self.engine, &caller, self.page_budget).await?;
        Ok(Response::new(pb::AcquireJobsResponse { jobs }))
    }

    async fn report_progress(
        &self,
        request: Request<pb::ReportProgressRequest>,
    ) -> Result<Response<pb::ReportProgressResponse>, Status> {
        let caller = caller(&request)?;
        require_worker(&caller)?;
        let r = request.into_inner();
        let name = JobName::parse("name", &r.name)?;
        let mut v = Violations::default();
        if !(0..=100).contains(&r.progress_percent) {
            v.add("progress_percent", "from 0 to 100");
        }
        let step = text(r.current_step, "current_step", &mut v);
        let message = text(r.message, "message", &mut v);
        v.into_result(())?;
        let op = LeaseOp::Fenced(Fenced::Progress {
            percent: r.progress_percent,
            step,
            message,
        });
        let job = self.engine.leased(&caller, name, &r.lease_id, op).await?;
        Ok(Response::new(pb::ReportProgressResponse {
            cancel_requested: job.cancel_requested,
            lease_expire_time: job.lease_expire_time.map(crate::convert::timestamp),
        }))
    }

    async fn complete_job(
        &self,
        request: Request<pb::CompleteJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = caller(&request)?;
        require_worker(&caller)?;
        let r = request.into_inner();
        let name = JobName::parse("name", &r.name)?;
        let lease_id = r.lease_id.clone();
        let mut v = Violations::default();
        let op = completion(name, r, "", &mut v);
        v.into_result(())?;
        Ok(Response::new(
            self.engine
                .leased(&caller, name, &lease_id, op)
                .await?
                .into(),
        ))
    }

    async fn batch_complete_jobs(
        &self,
        request: Request<pb::BatchCompleteJobsRequest>,
    ) -> Result<Response<pb::BatchCompleteJobsResponse>, Status> {
        let caller = caller(&request)?;
        require_worker(&caller)?;
        let pb::BatchCompleteJobsRequest { requests, acquire } = request.into_inner();
        // Checked before anything is written, like the completions.
        let acquire = match &acquire {
            Some(r) => {
                tracing::Span::current().record("worker_id", r.worker_id.as_str());
                Some(super::acquire::Acquire::check(&caller, r, "acquire.")?)
            }
            None => None,
        };
        let mut v = Violations::default();
        if requests.is_empty() || requests.len() > job::MAX_BATCH {
            v.add(
                "requests",
                format!("1 to {} completions per batch", job::MAX_BATCH),
            );
        }
        let mut seen = std::collections::HashSet::with_capacity(requests.len());
        let mut writes = Vec::with_capacity(requests.len());
        for (i, r) in requests.into_iter().enumerate() {
            let prefix = format!("requests[{i}].");
            let lease = v.check(crate::engine::parse_lease(
                &format!("{prefix}lease_id"),
                &r.lease_id,
            ))?;
            let Some(name) = v.check(JobName::parse(&format!("{prefix}name"), &r.name))? else {
                continue;
            };
            if !seen.insert(name.job) {
                v.add(format!("{prefix}name"), "names a job already in this batch");
            }
            let op = completion(name, r, &prefix, &mut v);
            if let Some(lease) = lease {
                writes.push((name, lease, op));
            }
        }
        let writes = v.into_result(writes)?;
        // With `acquire`, the completions and the first lease share a transaction.
        let (results, leased) = match &acquire {
            Some(acquire) => acquire.after(&self.engine, &caller, writes).await,
            None => (self.engine.leased_many(&caller, writes).await, None),
        };
        let mut response = pb::BatchCompleteJobsResponse {
            results: results
                .into_iter()
                .map(|r| pb::CompleteJobResult {
                    outcome: Some(match r {
                        Ok(job) => pb::complete_job_result::Outcome::Job(job.into()),
                        Err(e) => pb::complete_job_result::Outcome::Error(e.into_rpc_status()),
                    }),
                })
                .collect(),
            ..Default::default()
        };
        // The completions are committed: the answer must get through. Jobs with large
        // inputs or results would take it past the message limit, so then each job
        // comes in brief (the worker sent the result and has the input).
        if prost::Message::encoded_len(&response) > self.page_budget {
            for result in &mut response.results {
                if let Some(pb::complete_job_result::Outcome::Job(job)) = &mut result.outcome {
                    *job = brief(std::mem::take(job));
                }
            }
        }
        if let Some(acquire) = acquire {
            // The next jobs get the room the results left.
            let budget = self
                .page_budget
                .saturating_sub(prost::Message::encoded_len(&response));
            match acquire
                .answer_leased(&self.engine, &caller, leased, budget)
                .await
            {
                Ok(jobs) => response.acquired = jobs,
                // Committed completions are answered whatever leasing did.
                Err(e) => response.acquire_error = Some(e.into_rpc_status()),
            }
        }
        Ok(Response::new(response))
    }

    async fn worker_session(
        &self,
        request: Request<Streaming<pb::WorkerSessionRequest>>,
    ) -> Result<Response<super::session::SessionStream>, Status> {
        let caller = caller(&request)?;
        require_worker(&caller)?;
        let budget = request
            .extensions()
            .get::<crate::guard::MessageBudget>()
            .cloned();
        Ok(Response::new(Box::pin(super::session::serve(
            self.clone(),
            caller,
            budget,
            request.into_inner(),
        ))))
    }

    async fn fail_job(
        &self,
        request: Request<pb::FailJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = caller(&request)?;
        require_worker(&caller)?;
        let r = request.into_inner();
        let name = JobName::parse("name", &r.name)?;
        let mut v = Violations::default();
        let error = match r.error {
            Some(e) if e.code != 0 => JobError {
                code: e.code,
                message: text(e.message, "error.message", &mut v),
            },
            _ => {
                v.add("error", "required, with a non-OK code");
                JobError {
                    code: 2,
                    message: String::new(),
                }
            }
        };
        let retry_after = r.retry_after.map(|d| match duration(&d) {
            Some(d) if d <= job::MAX_RETRY_AFTER => d,
            _ => {
                v.add(
                    "retry_after",
                    format!(
                        "from 0s to {}",
                        humantime::format_duration(job::MAX_RETRY_AFTER)
                    ),
                );
                Duration::ZERO
            }
        });
        v.into_result(())?;
        let op = LeaseOp::Fail {
            error,
            retryable: r.retryable,
            retry_after,
        };
        Ok(Response::new(
            self.engine
                .leased(&caller, name, &r.lease_id, op)
                .await?
                .into(),
        ))
    }
}
