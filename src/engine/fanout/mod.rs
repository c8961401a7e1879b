//! Fan-out of committed job events, from the writer's commit to every watcher on every
//! instance: the publisher here (after commit, batched into one Redis message),
//! `wire.rs` (the message format and channel names, both directions), and `hub.rs`
//! (each instance's subscription, handing events to local watchers and wake-ups to
//! waiting workers).
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use prost::Message;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::{
    domain::job::{Job, JobState},
    proto::v1::{self as pb, job_event::Type as EventType},
    redis::RedisPool,
};

pub mod hub;
pub mod wire;

use super::Engine;

/// Per job kind, how many jobs just became available.
pub type Wake = BTreeMap<String, usize>;

/// A committed event, ready to publish.
pub struct Published {
    project: Uuid,
    job: Uuid,
    payload: Vec<u8>,
    /// What the event counts as in the job metrics, with the job's kind.
    counted: Option<(crate::metrics::JobEvent, String)>,
    /// A leased job's wait since it was ready, or an ended job's run time (seconds).
    took: Option<Took>,
}

#[derive(Clone, Copy)]
enum Took {
    Waited(f64),
    Ran(f64),
}

/// The wait (on lease) or run time (on success or failure) an event closes.
fn took(job: &Job, ty: EventType) -> Option<Took> {
    let seconds = |from: chrono::DateTime<chrono::Utc>, to: chrono::DateTime<chrono::Utc>| {
        ((to - from).num_microseconds().unwrap_or(0).max(0)) as f64 / 1e6
    };
    if ty != EventType::StateChanged {
        return None;
    }
    match job.state {
        JobState::Running => Some(Took::Waited(seconds(job.schedule_time, job.update_time))),
        JobState::Succeeded | JobState::Failed => {
            let (start, end) = (job.start_time?, job.end_time.unwrap_or(job.update_time));
            Some(Took::Ran(seconds(start, end)))
        }
        _ => None,
    }
}

pub fn event(job: &Job, ty: EventType) -> pb::JobEvent {
    pb::JobEvent {
        sequence: job.sequence,
        r#type: ty as i32,
        job: Some(job.clone().into()),
        event_time: Some(crate::convert::timestamp(job.update_time)),
    }
}

/// Per kind, how many of `jobs` became available (QUEUED): the wake-up for them.
pub(super) fn wake_for<'a>(jobs: impl IntoIterator<Item = &'a Job>) -> Wake {
    let mut kinds = Wake::new();
    for job in jobs.into_iter().filter(|j| j.state == JobState::Queued) {
        *kinds.entry(job.kind.clone()).or_default() += 1;
    }
    kinds
}

/// What to publish after commit for `changes` (the database recorded them already).
pub(super) fn to_publish(changes: &[(Job, EventType)]) -> Vec<Published> {
    changes
        .iter()
        .map(|(job, ty)| Published {
            project: job.project_id,
            job: job.id,
            payload: event(job, *ty).encode_to_vec(),
            counted: counted_as(job, *ty).map(|e| (e, job.kind.clone())),
            took: took(job, *ty),
        })
        .collect()
}

/// The job metric an event adds to, if any.
fn counted_as(job: &Job, ty: EventType) -> Option<crate::metrics::JobEvent> {
    use crate::metrics::JobEvent as E;
    match ty {
        EventType::Created => Some(E::Created),
        EventType::StateChanged => Some(match job.state {
            JobState::Running => E::Leased,
            JobState::Succeeded => E::Succeeded,
            JobState::Failed => E::Failed,
            JobState::Cancelled => E::Cancelled,
            // Released by its dependencies, not a new attempt.
            JobState::Queued if job.attempt == 0 => return None,
            JobState::Queued => E::Retried,
            JobState::Waiting => return None,
        }),
        _ => None,
    }
}

/// Batches of events (and wake-ups) queued for Redis; beyond this, new ones are dropped.
const PUBLISH_QUEUE: usize = 8192;
/// Bytes of events per Redis message (a message may pass it by one event).
const EVENTS_MESSAGE_MAX: usize = 256 * 1024;

/// The task that sends committed events to Redis: everything queued goes in one
/// message (and the wake-ups in the same pipeline), in the order the writes handed it
/// over (watchers order events by sequence and fill any gap from Postgres).
pub(super) fn spawn_publisher(
    redis: RedisPool,
    prefix: Arc<str>,
    metrics: crate::metrics::Metrics,
) -> mpsc::Sender<(Vec<Published>, Wake)> {
    let (tx, mut rx) = mpsc::channel::<(Vec<Published>, Wake)>(PUBLISH_QUEUE);
    tokio::spawn(async move {
        let mut batch = Vec::new();
        while rx.recv_many(&mut batch, PUBLISH_QUEUE).await > 0 {
            let mut pipe = redis::pipe();
            let channel = wire::events_channel(&prefix);
            let mut message = wire::EventsMessage::default();
            let mut events = 0;
            for (published, wake) in batch.drain(..) {
                events += published.len();
                for e in &published {
                    message.push(e.project, e.job, &e.payload);
                    // Bounded messages: Redis drops a subscriber whose output buffer
                    // passes its limit (32 MiB for pub/sub by default).
                    if message.bytes() >= EVENTS_MESSAGE_MAX
                        && let Some(full) = message.take()
                    {
                        pipe.cmd("PUBLISH").arg(&channel).arg(full).ignore();
                    }
                }
                for (kind, jobs) in &wake {
                    pipe.cmd("PUBLISH")
                        .arg(wire::wake_channel(&prefix, kind))
                        .arg(*jobs)
                        .ignore();
                }
            }
            if let Some(rest) = message.take() {
                pipe.cmd("PUBLISH").arg(&channel).arg(rest).ignore();
            }
            let sent = async {
                let mut conn = redis.get().await.map_err(|e| e.to_string())?;
                pipe.query_async::<()>(&mut *conn)
                    .await
                    .map_err(|e| e.to_string())
            };
            match tokio::time::timeout(Duration::from_secs(2), sent).await {
                Ok(Ok(())) => metrics.events_published(events),
                Ok(Err(e)) => {
                    tracing::warn!(redis = "down", error = %e, events, "publish failed; watchers will resync")
                }
                Err(_) => tracing::warn!(
                    redis = "down",
                    events,
                    "publish timed out; watchers will resync"
                ),
            }
        }
    });
    tx
}

impl Engine {
    /// Fan-out after commit, without waiting: the publisher sends it to Redis with
    /// whatever else is queued. Failure only costs latency (watchers resync from
    /// Postgres), so a write never waits for Redis, nor fails when it is away.
    /// `wake`: per kind, how many jobs became available (that many idle workers are woken).
    pub fn publish(&self, events: Vec<Published>, wake: Wake) {
        if events.is_empty() && wake.is_empty() {
            return;
        }
        let metrics = &self.settings.metrics;
        for e in &events {
            if let Some((event, kind)) = &e.counted {
                metrics.job_event(*event, kind);
                match e.took {
                    Some(Took::Waited(s)) => metrics.job_waited(kind, s),
                    Some(Took::Ran(s)) => metrics.job_ran(kind, s),
                    None => {}
                }
            }
        }
        let n = events.len();
        if let Err(e) = self.publisher.try_send((events, wake)) {
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "publisher queue full",
                mpsc::error::TrySendError::Closed(_) => "publisher stopped",
            };
            tracing::warn!(events = n, "{why}; events dropped, watchers will resync");
        }
    }
}
