//! Jobs: the state machine, validation and retry rules.
use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, Utc};
use rand::Rng;
use uuid::Uuid;

use super::{Violations, labels};

pub const MAX_KIND_LEN: usize = 63;
pub const MAX_INPUT_BYTES: usize = 256 * 1024;
pub const MAX_RESULT_BYTES: usize = 256 * 1024;
pub const MAX_PRIORITY: i32 = 1000;
pub const DEFAULT_MAX_ATTEMPTS: i32 = 3;
pub const MAX_ATTEMPTS: i32 = 100;
pub const MAX_TEXT: usize = 1024;
pub const MAX_BATCH: usize = 1000;
pub const MAX_ACQUIRE: i32 = 100;
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
pub const MIN_LEASE: Duration = Duration::from_secs(1);
pub const MAX_LEASE: Duration = Duration::from_secs(3600);
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// Longest delay a worker may ask for before a retry.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30 * 86400);

/// Most dependencies a job may have.
pub const MAX_DEPENDENCIES: usize = 100;
pub const MAX_CONCURRENCY_KEY: usize = 128;

/// [WAITING ->] QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED, and RUNNING ->
/// QUEUED on a retry. WAITING: some dependency has not succeeded yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    Waiting,
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// From a filter value: `RUNNING`, `running`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "waiting" => Self::Waiting,
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }
}

/// `google.rpc.Status` as stored (code and message; details are not kept).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JobError {
    pub code: i32,
    pub message: String,
}

/// A stored job.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: Uuid,
    pub project_id: Uuid,
    pub owner: String,
    pub kind: String,
    pub input: serde_json::Map<String, serde_json::Value>,
    pub labels: BTreeMap<String, String>,
    pub state: JobState,
    pub priority: i32,
    pub max_attempts: i32,
    pub attempt: i32,
    pub schedule_time: DateTime<Utc>,
    pub progress_percent: i32,
    pub current_step: String,
    pub message: String,
    pub cancel_requested: bool,
    pub worker_id: Option<String>,
    pub lease_id: Option<Uuid>,
    pub lease_expire_time: Option<DateTime<Utc>>,
    pub result: Option<serde_json::Map<String, serde_json::Value>>,
    pub output_assets: Vec<String>,
    pub error: Option<JobError>,
    pub sequence: i64,
    pub create_time: DateTime<Utc>,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
    pub update_time: DateTime<Utc>,
    /// W3C trace context of the call that created the job.
    pub traceparent: Option<String>,
    /// Jobs of the same project this one waits for.
    pub depends_on: Vec<Uuid>,
    pub run_anyway: bool,
    /// Some job depended on this one while it was unfinished: its end settles them.
    pub has_dependents: bool,
    pub concurrency_key: String,
}

/// What a client may set when creating a job, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NewJob {
    pub kind: String,
    pub input: serde_json::Map<String, serde_json::Value>,
    pub labels: BTreeMap<String, String>,
    pub priority: i32,
    pub max_attempts: i32,
    pub schedule_time: Option<DateTime<Utc>>,
    pub depends_on: Vec<Dependency>,
    pub run_anyway: bool,
    pub concurrency_key: String,
}

/// A dependency as a create names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Dependency {
    /// An existing job of the same project.
    Job(Uuid),
    /// An earlier job of the same BatchCreateJobs call, by position.
    Batch(usize),
}

/// Where a create stands, for resolving `depends_on`: the project, and in a batch the
/// request's position and the keys of the requests before it.
pub struct DependencyScope<'a> {
    pub project: Uuid,
    /// `None` outside BatchCreateJobs.
    pub batch: Option<(usize, &'a std::collections::HashMap<String, usize>)>,
}

impl Dependency {
    /// One `depends_on` entry: a job name (looked for in the creating project), or in a
    /// batch `@key` / `@index` naming an earlier request (so a batch can never hold a
    /// cycle).
    pub fn parse(entry: &str, scope: &DependencyScope<'_>) -> Result<Self, String> {
        let Some(reference) = entry.strip_prefix('@') else {
            let name = super::names::JobName::parse("depends_on", entry)
                .map_err(|_| "expected a job name (projects/{project}/jobs/{job}) or, in BatchCreateJobs, @key or @index".to_owned())?;
            // A job of another project is looked for in this one, and not found there:
            // NOT_FOUND, as for any job the caller cannot see.
            return Ok(Self::Job(name.job));
        };
        let Some((at, keys)) = scope.batch else {
            return Err("`@` names a request of the same batch: only in BatchCreateJobs".into());
        };
        let index = if !reference.is_empty() && reference.bytes().all(|b| b.is_ascii_digit()) {
            reference.parse::<usize>().ok()
        } else {
            keys.get(reference).copied()
        };
        match index {
            Some(i) if i < at => Ok(Self::Batch(i)),
            _ => Err(format!(
                "`{}` names no earlier request of this batch (a job can depend only on requests before it)",
                super::text::quote(entry)
            )),
        }
    }
}

pub fn valid_kind(kind: &str) -> bool {
    let mut chars = kind.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && kind.len() <= MAX_KIND_LEN
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
}

impl NewJob {
    pub fn validate(&self, prefix: &str, v: &mut Violations) {
        if !valid_kind(&self.kind) {
            v.add(
                format!("{prefix}kind"),
                "required: 1 to 63 lowercase letters, digits, `.`, `_` or `-`, starting with a letter",
            );
        }
        if self.priority.abs() > MAX_PRIORITY {
            v.add(
                format!("{prefix}priority"),
                format!("from -{MAX_PRIORITY} to {MAX_PRIORITY}"),
            );
        }
        if !(1..=MAX_ATTEMPTS).contains(&self.max_attempts) {
            v.add(
                format!("{prefix}max_attempts"),
                format!("from 1 to {MAX_ATTEMPTS} (0 means {DEFAULT_MAX_ATTEMPTS})"),
            );
        }
        if serde_json::to_vec(&self.input).map_or(true, |b| b.len() > MAX_INPUT_BYTES) {
            v.add(
                format!("{prefix}input"),
                format!("at most {MAX_INPUT_BYTES} bytes as JSON"),
            );
        }
        labels::validate(&format!("{prefix}labels"), &self.labels, v);
        if self.depends_on.len() > MAX_DEPENDENCIES {
            v.add(
                format!("{prefix}depends_on"),
                format!("at most {MAX_DEPENDENCIES} dependencies"),
            );
        }
        if self.concurrency_key.chars().count() > MAX_CONCURRENCY_KEY
            || !super::text::storable(&self.concurrency_key)
        {
            v.add(
                format!("{prefix}concurrency_key"),
                format!("at most {MAX_CONCURRENCY_KEY} characters, without NUL"),
            );
        }
    }

    pub fn digest(&self) -> Vec<u8> {
        use sha2::{Digest, Sha256};
        Sha256::digest(serde_json::to_vec(self).unwrap_or_default()).to_vec()
    }
}

/// Retry timing: exponential from `base`, capped at `max`, with full jitter on the
/// upper half so that failed jobs of one burst do not come back in lockstep.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn delay(&self, attempt: i32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.clamp(1, 20).saturating_sub(1) as u32)
            .min(self.max);
        let half = exp / 2;
        half + Duration::from_secs_f64(rand::rng().random_range(0.0..=half.as_secs_f64().max(0.0)))
    }
}

/// Where a running attempt goes when it fails (FailJob) or its lease expires.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AfterFailure {
    Retry { not_before: Duration },
    Fail,
    Cancel,
}

pub fn after_failure(
    attempt: i32,
    max_attempts: i32,
    cancel_requested: bool,
    retryable: bool,
    retry_after: Option<Duration>,
    backoff: &Backoff,
) -> AfterFailure {
    if cancel_requested {
        AfterFailure::Cancel
    } else if retryable && attempt < max_attempts {
        AfterFailure::Retry {
            not_before: retry_after.unwrap_or_else(|| backoff.delay(attempt)),
        }
    } else {
        AfterFailure::Fail
    }
}

/// A parsed ListJobs / WatchJobs filter: `state = RUNNING AND kind = "render"`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobFilter {
    pub states: Vec<JobState>,
    pub kinds: Vec<String>,
    /// `labels.KEY = "value"` terms: every one must hold.
    pub labels: BTreeMap<String, String>,
    /// `depends_on = "projects/p/jobs/j"`: the jobs that depend on that one.
    pub dependency: Option<Uuid>,
}

/// What a filter reads of a job, stored or on the wire.
pub trait Filterable {
    fn state(&self) -> JobState;
    fn kind(&self) -> &str;
    fn label(&self, key: &str) -> Option<&str>;
    fn depends_on(&self, job: Uuid) -> bool;
}

impl Filterable for Job {
    fn state(&self) -> JobState {
        self.state
    }
    fn kind(&self) -> &str {
        &self.kind
    }
    fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
    fn depends_on(&self, job: Uuid) -> bool {
        self.depends_on.contains(&job)
    }
}

impl JobFilter {
    pub fn parse(filter: &str) -> Result<Self, String> {
        let mut out = Self::default();
        let filter = filter.trim();
        if filter.is_empty() {
            return Ok(out);
        }
        for term in filter.split(" AND ") {
            let (field, value) = term.split_once('=').ok_or_else(|| {
                format!(
                    "unsupported term `{}`: expected state = STATE, kind = \"KIND\", labels.KEY = \"VALUE\" or depends_on = \"JOB\"",
                    super::text::quote(term.trim())
                )
            })?;
            let value = value.trim().trim_matches('"');
            match field.trim() {
                "state" => out.states.push(
                    JobState::parse(value)
                        .ok_or_else(|| format!("unknown state `{}`", super::text::quote(value)))?,
                ),
                "kind" if valid_kind(value) => out.kinds.push(value.to_owned()),
                "kind" => {
                    return Err(format!(
                        "`{}` is not a valid kind",
                        super::text::quote(value)
                    ));
                }
                "depends_on" => {
                    let name = super::names::JobName::parse("filter", value).map_err(|_| {
                        format!(
                            "`{}` is not a job name (projects/{{project}}/jobs/{{job}})",
                            super::text::quote(value)
                        )
                    })?;
                    if out.dependency.replace(name.job).is_some() {
                        return Err("depends_on is named twice".into());
                    }
                }
                field if field.starts_with("labels.") => {
                    let key = &field["labels.".len()..];
                    if !labels::valid_key(key) {
                        return Err(format!("`{}` is not a label key", super::text::quote(key)));
                    }
                    if out
                        .labels
                        .insert(key.to_owned(), value.to_owned())
                        .is_some()
                    {
                        return Err(format!(
                            "label `{}` is named twice",
                            super::text::quote(key)
                        ));
                    }
                }
                other => {
                    return Err(format!(
                        "cannot filter on `{}`: use state, kind, labels.KEY or depends_on",
                        super::text::quote(other)
                    ));
                }
            }
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
            && self.kinds.is_empty()
            && self.labels.is_empty()
            && self.dependency.is_none()
    }

    pub fn matches(&self, job: &impl Filterable) -> bool {
        (self.states.is_empty() || self.states.contains(&job.state()))
            && (self.kinds.is_empty() || self.kinds.iter().any(|k| k == job.kind()))
            && self
                .labels
                .iter()
                .all(|(k, v)| job.label(k) == Some(v.as_str()))
            && self.dependency.is_none_or(|d| job.depends_on(d))
    }

    pub fn canonical(&self) -> String {
        let mut states: Vec<_> = self.states.iter().map(|s| s.as_str()).collect();
        states.sort();
        let mut kinds = self.kinds.clone();
        kinds.sort();
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!(
            "{}|{}|{}",
            states.join(","),
            kinds.join(","),
            labels.join(",")
        )
    }
}

/// How far a set of jobs has come: jobs per state and their mean progress.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobsSummary {
    pub total: i64,
    pub by_state: BTreeMap<&'static str, i64>,
    /// 0 to 100; a SUCCEEDED job counts 100.
    pub progress_percent: f64,
    /// Every job ended.
    pub done: bool,
}

impl JobsSummary {
    /// From `(state, jobs, sum of progress)` per state.
    pub fn from_counts(rows: &[(JobState, i64, i64)]) -> Self {
        let total: i64 = rows.iter().map(|r| r.1).sum();
        let progress: i64 = rows.iter().map(|r| r.2).sum();
        Self {
            total,
            by_state: rows.iter().map(|(s, n, _)| (s.as_str(), *n)).collect(),
            progress_percent: if total == 0 {
                0.0
            } else {
                progress as f64 / total as f64
            },
            done: rows.iter().all(|(s, _, _)| s.is_terminal()),
        }
    }

    pub fn count(&self, state: JobState) -> i64 {
        self.by_state.get(state.as_str()).copied().unwrap_or(0)
    }
}

/// A page of a project's jobs, as ListJobs asks for it.
pub struct ListJobs {
    pub owner: Option<String>,
    pub project: Uuid,
    pub filter: JobFilter,
    pub limit: i64,
    pub after: Option<super::page::Cursor>,
    /// Newest first when true.
    pub descending: bool,
}

/// A worker's write that needs no decision in Rust: progress, or a complete without
/// output assets.
#[derive(Clone)]
pub enum Fenced {
    Progress {
        percent: i32,
        step: String,
        message: String,
    },
    Complete {
        result: Option<serde_json::Value>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_and_backoff() {
        let b = Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
        };
        for attempt in 1..10 {
            let d = b.delay(attempt);
            let cap = Duration::from_secs(1 << (attempt - 1)).min(Duration::from_secs(60));
            assert!(d >= cap / 2 && d <= cap, "attempt {attempt}: {d:?}");
        }
        assert_eq!(
            after_failure(1, 3, true, true, None, &b),
            AfterFailure::Cancel
        );
        assert_eq!(
            after_failure(3, 3, false, true, None, &b),
            AfterFailure::Fail
        );
        assert_eq!(
            after_failure(1, 3, false, false, None, &b),
            AfterFailure::Fail
        );
        assert_eq!(
            after_failure(1, 3, false, true, Some(Duration::from_secs(9)), &b),
            AfterFailure::Retry {
                not_before: Duration::from_secs(9)
            }
        );
    }

    #[test]
    fn dependencies() {
        let project = Uuid::now_v7();
        let keys: std::collections::HashMap<String, usize> = [("tts".to_owned(), 1)].into();
        let in_batch = DependencyScope {
            project,
            batch: Some((2, &keys)),
        };
        let job = Uuid::now_v7();
        assert_eq!(
            Dependency::parse(&format!("projects/{project}/jobs/{job}"), &in_batch),
            Ok(Dependency::Job(job))
        );
        assert_eq!(
            Dependency::parse("@tts", &in_batch),
            Ok(Dependency::Batch(1))
        );
        assert_eq!(Dependency::parse("@0", &in_batch), Ok(Dependency::Batch(0)));
        assert!(Dependency::parse("@2", &in_batch).is_err(), "itself");
        assert!(Dependency::parse("@later", &in_batch).is_err());
        let other = Uuid::now_v7();
        assert_eq!(
            Dependency::parse(&format!("projects/{other}/jobs/{job}"), &in_batch),
            Ok(Dependency::Job(job)),
            "looked for in this project (and not found there)"
        );
        let alone = DependencyScope {
            project,
            batch: None,
        };
        assert!(Dependency::parse("@0", &alone).is_err());
    }

    #[test]
    fn filters() {
        let f = JobFilter::parse(r#"state = RUNNING AND kind = "render""#).unwrap();
        struct J(JobState, Option<&'static str>, Vec<Uuid>);
        impl Filterable for J {
            fn state(&self) -> JobState {
                self.0
            }
            fn kind(&self) -> &str {
                "render"
            }
            fn label(&self, key: &str) -> Option<&str> {
                (key == "pipeline").then_some(self.1).flatten()
            }
            fn depends_on(&self, job: Uuid) -> bool {
                self.2.contains(&job)
            }
        }
        assert!(f.matches(&J(JobState::Running, None, vec![])));
        assert!(!f.matches(&J(JobState::Queued, None, vec![])));
        let p = JobFilter::parse(r#"labels.pipeline = "post-42" AND state = WAITING"#).unwrap();
        assert!(p.matches(&J(JobState::Waiting, Some("post-42"), vec![])));
        assert!(!p.matches(&J(JobState::Waiting, None, vec![])));
        let (project, dep) = (Uuid::now_v7(), Uuid::now_v7());
        let d =
            JobFilter::parse(&format!(r#"depends_on = "projects/{project}/jobs/{dep}""#)).unwrap();
        assert!(d.matches(&J(JobState::Waiting, None, vec![dep])));
        assert!(!d.matches(&J(JobState::Waiting, None, vec![])));
        assert!(JobFilter::parse(r#"labels.a = "1" AND labels.a = "2""#).is_err());
        assert!(JobFilter::parse("owner = x").is_err());
        assert!(valid_kind("render.4k") && !valid_kind("Render") && !valid_kind(""));
    }
}
