//! Live progress: subscribe first, then read Postgres, then follow events; any sign
//! of a gap (sequence jump, lagging, Redis reconnect, the periodic resync) sends the
//! watcher back to Postgres. Postgres is the only source of what watchers are told.
use std::collections::VecDeque;

use futures::StreamExt;
use tokio::sync::broadcast::{self};
use tonic::Status;

use super::{Engine, event, hub::Signal};
use crate::{
    AppError, AppResult,
    auth::Caller,
    db,
    domain::{
        job::JobFilter,
        names::{JobName, ProjectName},
    },
    proto::{
        EncodedJobEvent,
        v1::{self as pb, job_event::Type as EventType},
    },
};

mod job;
mod project;

use job::JobWatcher;
use project::{ProjectWatcher, View};

pub type EventStream = futures::stream::BoxStream<'static, Result<EncodedJobEvent, Status>>;

fn is_terminal(event: &pb::JobEvent) -> bool {
    event.job.as_ref().is_some_and(|j| {
        matches!(
            pb::job::State::try_from(j.state),
            Ok(pb::job::State::Succeeded | pb::job::State::Failed | pb::job::State::Cancelled)
        )
    })
}

enum Flow {
    Continue,
    Done,
}

/// A watcher behind a stream: events it has decided wait in `queued`; `step` waits
/// for the next signal (or the periodic resync) and queues what it calls for.
trait Watcher: Send + 'static {
    fn queued(&mut self) -> &mut VecDeque<EncodedJobEvent>;

    fn step<'a>(
        &'a mut self,
        rx: &'a mut broadcast::Receiver<Signal>,
        resync: &'a mut tokio::time::Interval,
    ) -> impl Future<Output = AppResult<Flow>> + Send + 'a;
}

/// The stream of a watcher. It runs inside the stream itself (polled by the
/// connection's stream task), not in a task of its own: one wake-up per event per
/// watcher and no channel between. A client that reads slowly stops the polling, its
/// broadcast receiver lags, and it gets the newest state instead of a backlog.
/// Queued events first, then a step at a time until `Done` or an error (sent last).
fn into_stream<W: Watcher>(
    watcher: W,
    rx: broadcast::Receiver<Signal>,
    resync: tokio::time::Interval,
    done: bool,
    metrics: crate::metrics::Metrics,
) -> EventStream {
    let failed: Option<Status> = None;
    // Counted open until the stream is dropped.
    let open = metrics.watch_opened();
    futures::stream::unfold(
        (watcher, rx, resync, done, failed, open),
        |(mut w, mut rx, mut resync, mut done, mut failed, open)| async move {
            loop {
                if let Some(event) = w.queued().pop_front() {
                    open.0.event_delivered();
                    return Some((Ok(event), (w, rx, resync, done, failed, open)));
                }
                if let Some(status) = failed.take() {
                    return Some((Err(status), (w, rx, resync, true, None, open)));
                }
                if done {
                    return None;
                }
                match w.step(&mut rx, &mut resync).await {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Done) => done = true,
                    // What was queued before the error goes first.
                    Err(e) => (done, failed) = (true, Some(e.into())),
                }
            }
        },
    )
    .boxed()
}

impl Engine {
    /// The current snapshot (or what was missed after `after_sequence`), then every
    /// change, ending after the terminal event.
    pub async fn watch_job(
        &self,
        caller: &Caller,
        name: JobName,
        after_sequence: i64,
    ) -> AppResult<EventStream> {
        let rx = self.hub.job(name.job);
        let mut watcher = JobWatcher {
            engine: self.clone(),
            owner: caller.owner_scope().map(str::to_owned),
            name,
            out: VecDeque::new(),
            last: 0,
            replaying: false,
        };
        let job = watcher.current().await?;
        let flow = if after_sequence > 0 && after_sequence < job.sequence {
            watcher.last = after_sequence;
            watcher.catch_up().await?
        } else if after_sequence >= job.sequence && after_sequence > 0 {
            watcher.last = job.sequence;
            if job.state.is_terminal() {
                Flow::Done
            } else {
                Flow::Continue
            }
        } else {
            watcher.send(event(&job, EventType::Snapshot))
        };
        let period = self.settings.watch_resync;
        let resync = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let metrics = self.settings.metrics.clone();
        Ok(into_stream(
            watcher,
            rx,
            resync,
            matches!(flow, Flow::Done),
            metrics,
        ))
    }

    /// Snapshots of the project's jobs that match `filter` (newest 1,000), then every
    /// change to a matching job while the stream is open.
    pub async fn watch_jobs(
        &self,
        caller: &Caller,
        project: ProjectName,
        filter: JobFilter,
    ) -> AppResult<EventStream> {
        let rx = self.hub.project(project.0);
        let owner = caller.owner_scope().map(str::to_owned);
        {
            let mut conn = self.db.get().await?;
            db::projects::owner_of(
                &mut conn,
                owner.as_deref(),
                project.0,
                db::projects::Lock::None,
            )
            .await?
            .ok_or_else(|| AppError::NotFound(format!("project {project}")))?;
        }
        let watcher = ProjectWatcher {
            engine: self.clone(),
            owner,
            project: project.0,
            filter,
            out: VecDeque::new(),
            view: View::default(),
            pending: VecDeque::new(),
            synced: None,
        };
        // The first tick is at once: the stream starts with the snapshots.
        let resync = tokio::time::interval(self.settings.watch_resync);
        Ok(into_stream(
            watcher,
            rx,
            resync,
            false,
            self.settings.metrics.clone(),
        ))
    }
}
