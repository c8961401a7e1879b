//! Queues: what operators set per job kind (pause, limits, start rate), and what a
//! queue holds.
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::Violations;

pub const MAX_LIMIT: i32 = 1_000_000;
/// The start times of the last interval are kept, one per start.
pub const MAX_RATE_JOBS: i32 = 10_000;
pub const MIN_RATE_INTERVAL: Duration = Duration::from_millis(1);
pub const MAX_RATE_INTERVAL: Duration = Duration::from_secs(86_400);

/// At most `jobs` starts per `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartRate {
    pub jobs: i32,
    pub interval: Duration,
}

/// A queue's settings; `None`: no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueSettings {
    pub paused: bool,
    pub max_running: Option<i32>,
    pub max_running_per_key: Option<i32>,
    pub start_rate: Option<StartRate>,
}

impl QueueSettings {
    pub fn validate(&self, v: &mut Violations) {
        for (field, limit) in [
            ("queue.max_running", self.max_running),
            ("queue.max_running_per_key", self.max_running_per_key),
        ] {
            if limit.is_some_and(|n| !(1..=MAX_LIMIT).contains(&n)) {
                v.add(field, format!("0 (no limit) to {MAX_LIMIT}"));
            }
        }
        if let Some(rate) = self.start_rate {
            if !(1..=MAX_RATE_JOBS).contains(&rate.jobs) {
                v.add("queue.start_rate.jobs", format!("1 to {MAX_RATE_JOBS}"));
            }
            if !(MIN_RATE_INTERVAL..=MAX_RATE_INTERVAL).contains(&rate.interval) {
                v.add(
                    "queue.start_rate.interval",
                    format!("{MIN_RATE_INTERVAL:?} to {MAX_RATE_INTERVAL:?}"),
                );
            }
        }
    }
}

/// A stored queue: its kind, settings and version.
#[derive(Debug, Clone, PartialEq)]
pub struct Queue {
    pub kind: String,
    pub settings: QueueSettings,
    pub revision: i64,
    pub update_time: Option<DateTime<Utc>>,
}

impl Queue {
    /// A kind never configured: no limits.
    pub fn unconfigured(kind: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            settings: QueueSettings::default(),
            revision: 0,
            update_time: None,
        }
    }
}

/// What one kind's queue holds, read from Postgres.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueFigures {
    pub kind: String,
    pub waiting: i64,
    pub queued: i64,
    pub running: i64,
    /// When the longest-waiting due job became due.
    pub oldest_ready: Option<DateTime<Utc>>,
    pub succeeded_last_minute: i64,
    pub failed_last_minute: i64,
}
