//! One WatchJob stream: the job's snapshot or the events missed, then its changes.
use std::collections::VecDeque;

use tokio::sync::broadcast::{self, error::RecvError};

use crate::engine::{Engine, event, hub::Signal};
use crate::{
    AppError, AppResult, db,
    domain::{job::Job, names::JobName},
    proto::{
        EncodedJobEvent,
        v1::{self as pb, job_event::Type as EventType},
    },
};

use super::{Flow, Watcher, is_terminal};

/// One WatchJob stream (see `into_stream`).
pub(super) struct JobWatcher {
    pub(super) engine: Engine,
    pub(super) owner: Option<String>,
    pub(super) name: JobName,
    /// Events decided but not yet taken by the stream.
    pub(super) out: VecDeque<EncodedJobEvent>,
    /// Sequence of the last event queued.
    pub(super) last: i64,
    /// Replaying stored events, and the last page read was full: read the next one
    /// when the client has taken this one.
    pub(super) replaying: bool,
}

/// Stored events replayed per query. Each carries the whole job (whose input may be
/// 256 KiB), so a watcher resuming far behind reads them a page at a time as its client
/// takes them, not all at once.
const REPLAY_PAGE: i64 = 32;

impl JobWatcher {
    pub(super) fn send(&mut self, event: pb::JobEvent) -> Flow {
        let encoded = EncodedJobEvent::new(&event);
        self.send_encoded(&event, encoded)
    }

    /// `encoded` is `event`, encoded (shared with the instance's other watchers).
    pub(super) fn send_encoded(&mut self, event: &pb::JobEvent, encoded: EncodedJobEvent) -> Flow {
        self.last = event.sequence;
        self.out.push_back(encoded);
        if is_terminal(event) {
            Flow::Done
        } else {
            Flow::Continue
        }
    }

    pub(super) async fn current(&self) -> AppResult<Job> {
        let mut conn = self.engine.db.get().await?;
        db::jobs::get(
            &mut conn,
            self.owner.as_deref(),
            self.name.project,
            self.name.job,
        )
        .await?
        .ok_or_else(|| AppError::NotFound(format!("job {}", self.name)))
    }

    pub(super) async fn snapshot(&mut self) -> AppResult<Flow> {
        let job = self.current().await?;
        if job.sequence <= self.last {
            return Ok(if job.state.is_terminal() {
                Flow::Done
            } else {
                Flow::Continue
            });
        }
        Ok(self.send(event(&job, EventType::Snapshot)))
    }

    /// Queues what was missed after `self.last`: the events themselves when they are
    /// all still stored, else a snapshot.
    pub(super) async fn catch_up(&mut self) -> AppResult<Flow> {
        self.replaying = false;
        let (events, oldest) = {
            let mut conn = self.engine.db.get().await?;
            db::jobs::events_after(&mut conn, self.name.job, self.last, REPLAY_PAGE).await?
        };
        let complete = oldest.is_some_and(|o| o <= self.last + 1) && !events.is_empty();
        if !complete {
            return self.snapshot().await;
        }
        let full_page = events.len() as i64 == REPLAY_PAGE;
        for (ty, job) in events {
            let ty = EventType::try_from(i32::from(ty))
                .map_err(|_| AppError::internal(format!("stored event type {ty}")))?;
            if job.sequence != self.last + 1 {
                return self.snapshot().await;
            }
            if let Flow::Done = self.send(event(&job, ty)) {
                return Ok(Flow::Done);
            }
        }
        if full_page {
            self.replaying = true;
            return Ok(Flow::Continue);
        }
        // Events may lag the row by nothing (same transaction), but be sure.
        self.snapshot().await
    }
}

impl Watcher for JobWatcher {
    fn queued(&mut self) -> &mut VecDeque<EncodedJobEvent> {
        &mut self.out
    }

    async fn step(
        &mut self,
        rx: &mut broadcast::Receiver<Signal>,
        resync: &mut tokio::time::Interval,
    ) -> AppResult<Flow> {
        if self.replaying {
            return self.catch_up().await;
        }
        tokio::select! {
            signal = rx.recv() => match signal {
                Ok(Signal::Event(ev)) if ev.event.sequence <= self.last => Ok(Flow::Continue),
                Ok(Signal::Event(ev)) if ev.event.sequence == self.last + 1 => {
                    Ok(self.send_encoded(&ev.event, ev.encoded.clone()))
                }
                Ok(Signal::Event(_)) | Ok(Signal::Resync) => self.catch_up().await,
                // Too slow: the newest state, not a backlog.
                Err(RecvError::Lagged(missed)) => {
                    self.engine.settings.metrics.events_superseded(missed);
                    self.snapshot().await
                }
                Err(RecvError::Closed) => Err(AppError::Unavailable("event hub closed".into())),
            },
            _ = resync.tick() => self.catch_up().await,
        }
    }
}
