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

/// QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED, and RUNNING -> QUEUED on a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
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
                    "unsupported term `{}`: expected state = STATE or kind = \"KIND\"",
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
                other => {
                    return Err(format!(
                        "cannot filter on `{}`: use state or kind",
                        super::text::quote(other)
                    ));
                }
            }
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty() && self.kinds.is_empty()
    }

    pub fn matches(&self, state: JobState, kind: &str) -> bool {
        (self.states.is_empty() || self.states.contains(&state))
            && (self.kinds.is_empty() || self.kinds.iter().any(|k| k == kind))
    }

    pub fn canonical(&self) -> String {
        let mut states: Vec<_> = self.states.iter().map(|s| s.as_str()).collect();
        states.sort();
        let mut kinds = self.kinds.clone();
        kinds.sort();
        format!("{}|{}", states.join(","), kinds.join(","))
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
    fn filters() {
        let f = JobFilter::parse(r#"state = RUNNING AND kind = "render""#).unwrap();
        assert!(f.matches(JobState::Running, "render"));
        assert!(!f.matches(JobState::Queued, "render"));
        assert!(JobFilter::parse("owner = x").is_err());
        assert!(valid_kind("render.4k") && !valid_kind("Render") && !valid_kind(""));
    }
}
