//! Jobs on the wire.
use super::{json_to_struct, timestamp};
use crate::{
    domain::job::{Job, JobError, JobState},
    proto::v1 as pb,
};

/// Stored job error as `google.rpc.Status` (code and message).
pub fn job_error(e: JobError) -> tonic_types::pb::Status {
    tonic_types::pb::Status {
        code: e.code,
        message: e.message,
        details: vec![],
    }
}

impl From<JobState> for pb::job::State {
    fn from(s: JobState) -> Self {
        use JobState as S;
        match s {
            S::Waiting => Self::Waiting,
            S::Queued => Self::Queued,
            S::Running => Self::Running,
            S::Succeeded => Self::Succeeded,
            S::Failed => Self::Failed,
            S::Cancelled => Self::Cancelled,
        }
    }
}

impl From<Job> for pb::Job {
    fn from(j: Job) -> Self {
        use crate::domain::names::JobName;
        let Job {
            id,
            project_id,
            owner: _,
            kind,
            input,
            labels,
            state,
            priority,
            max_attempts,
            attempt,
            schedule_time,
            progress_percent,
            current_step,
            message,
            cancel_requested,
            worker_id,
            lease_id: _,
            lease_expire_time,
            result,
            output_assets,
            error,
            sequence,
            create_time,
            start_time,
            end_time,
            update_time,
            // Workers get it with their lease (LeasedJob), not every reader.
            traceparent: _,
            depends_on,
            run_anyway,
            has_dependents: _,
            concurrency_key,
        } = j;
        Self {
            name: JobName {
                project: project_id,
                job: id,
            }
            .to_string(),
            kind,
            input: Some(json_to_struct(input)),
            state: pb::job::State::from(state) as i32,
            priority,
            max_attempts,
            attempt,
            schedule_time: Some(timestamp(schedule_time)),
            progress_percent,
            current_step,
            message,
            cancel_requested,
            worker_id: worker_id.unwrap_or_default(),
            lease_expire_time: lease_expire_time.map(timestamp),
            result: result.map(json_to_struct),
            output_assets,
            error: error.map(job_error),
            labels,
            sequence,
            create_time: Some(timestamp(create_time)),
            start_time: start_time.map(timestamp),
            end_time: end_time.map(timestamp),
            update_time: Some(timestamp(update_time)),
            depends_on: depends_on
                .into_iter()
                .map(|job| {
                    JobName {
                        project: project_id,
                        job,
                    }
                    .to_string()
                })
                .collect(),
            run_anyway,
            concurrency_key,
        }
    }
}

/// A leased job's dependency as its worker gets it.
impl From<Job> for pb::Dependency {
    fn from(j: Job) -> Self {
        let name = crate::domain::names::JobName {
            project: j.project_id,
            job: j.id,
        };
        Self {
            name: name.to_string(),
            kind: j.kind,
            state: pb::job::State::from(j.state) as i32,
            result: j.result.map(json_to_struct),
            output_assets: j.output_assets,
            error: j.error.map(job_error),
        }
    }
}

/// A wire state as the domain's; `None` for UNSPECIFIED.
pub fn state_of(s: pb::job::State) -> Option<JobState> {
    Some(match s {
        pb::job::State::Unspecified => return None,
        pb::job::State::Waiting => JobState::Waiting,
        pb::job::State::Queued => JobState::Queued,
        pb::job::State::Running => JobState::Running,
        pb::job::State::Succeeded => JobState::Succeeded,
        pb::job::State::Failed => JobState::Failed,
        pb::job::State::Cancelled => JobState::Cancelled,
    })
}

impl From<crate::domain::job::JobsSummary> for pb::JobsSummary {
    fn from(s: crate::domain::job::JobsSummary) -> Self {
        use JobState as S;
        Self {
            total_jobs: s.total,
            waiting_jobs: s.count(S::Waiting),
            queued_jobs: s.count(S::Queued),
            running_jobs: s.count(S::Running),
            succeeded_jobs: s.count(S::Succeeded),
            failed_jobs: s.count(S::Failed),
            cancelled_jobs: s.count(S::Cancelled),
            progress_percent: s.progress_percent,
            done: s.done,
        }
    }
}
