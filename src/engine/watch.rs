//! Live progress: subscribe first, then read Postgres, then follow events; any sign
//! of a gap (sequence jump, lagging, Redis reconnect, the periodic resync) sends the
//! watcher back to Postgres. Postgres is the only source of what watchers are told.
use std::collections::{HashMap, VecDeque};

use futures::StreamExt;
use tokio::sync::broadcast::{self, error::RecvError};
use tonic::Status;
use uuid::Uuid;

use super::{Engine, event, hub::Signal};
use crate::{
    AppError, AppResult,
    auth::Caller,
    db,
    domain::{
        job::{Job, JobFilter, JobState},
        names::{JobName, ProjectName},
    },
    proto::{
        EncodedJobEvent,
        v1::{self as pb, job_event::Type as EventType},
    },
};

pub type EventStream = futures::stream::BoxStream<'static, Result<EncodedJobEvent, Status>>;

fn is_terminal(event: &pb::JobEvent) -> bool {
    event.job.as_ref().is_some_and(|j| {
        matches!(
            pb::job::State::try_from(j.state),
            Ok(pb::job::State::Succeeded | pb::job::State::Failed | pb::job::State::Cancelled)
        )
    })
}

/// One WatchJob stream (see `into_stream`).
struct JobWatcher {
    engine: Engine,
    owner: Option<String>,
    name: JobName,
    /// Events decided but not yet taken by the stream.
    out: VecDeque<EncodedJobEvent>,
    /// Sequence of the last event queued.
    last: i64,
    /// Replaying stored events, and the last page read was full: read the next one
    /// when the client has taken this one.
    replaying: bool,
}

/// Stored events replayed per query. Each carries the whole job (whose input may be
/// 256 KiB), so a watcher resuming far behind reads them a page at a time as its client
/// takes them, not all at once.
const REPLAY_PAGE: i64 = 32;

enum Flow {
    Continue,
    Done,
}

impl JobWatcher {
    fn send(&mut self, event: pb::JobEvent) -> Flow {
        let encoded = EncodedJobEvent::new(&event);
        self.send_encoded(&event, encoded)
    }

    /// `encoded` is `event`, encoded (shared with the instance's other watchers).
    fn send_encoded(&mut self, event: &pb::JobEvent, encoded: EncodedJobEvent) -> Flow {
        self.last = event.sequence;
        self.out.push_back(encoded);
        if is_terminal(event) {
            Flow::Done
        } else {
            Flow::Continue
        }
    }

    async fn current(&self) -> AppResult<Job> {
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

    async fn snapshot(&mut self) -> AppResult<Flow> {
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
    async fn catch_up(&mut self) -> AppResult<Flow> {
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

struct ProjectWatcher {
    engine: Engine,
    owner: Option<String>,
    project: Uuid,
    filter: JobFilter,
    /// Events decided but not yet taken by the stream.
    out: VecDeque<EncodedJobEvent>,
    /// Jobs this stream has sent (see `View`).
    view: View,
    /// Jobs a sync found whose rows are still to read, oldest change first.
    pending: VecDeque<Uuid>,
    synced: Option<chrono::DateTime<chrono::Utc>>,
}

/// What a project stream has sent, per job: its last sequence, and whether the client
/// is showing it as matching the filter. A job that stops matching gets one last event
/// (its new state, which the client sees does not match), so a dashboard of running
/// jobs learns that one finished; after that it is sent only if it matches again.
#[derive(Default)]
struct View {
    jobs: HashMap<Uuid, Sent>,
}

struct Sent {
    sequence: i64,
    /// Sent while matching the filter, and not since left it.
    shown: bool,
    /// In a final state when sent.
    finished: bool,
    /// When it was sent (this instance's clock).
    at: chrono::DateTime<chrono::Utc>,
}

impl View {
    /// Whether a change of a job goes to the client, recording it if it does: a change
    /// newer than what was sent, of a job that matches or that the client shows.
    fn admit(
        &mut self,
        filter: &JobFilter,
        id: Uuid,
        sequence: i64,
        state: JobState,
        kind: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> bool {
        let matching = filter.matches(state, kind);
        let shown = match self.jobs.get(&id) {
            Some(sent) if sent.sequence >= sequence => return false,
            Some(sent) => sent.shown,
            None => false,
        };
        if !matching && !shown {
            return false;
        }
        self.jobs.insert(
            id,
            Sent {
                sequence,
                shown: matching,
                finished: state.is_terminal(),
                at: now,
            },
        );
        true
    }

    /// Whether the change of `id` at `sequence` (or a later one) was sent.
    fn has(&self, id: Uuid, sequence: i64) -> bool {
        self.jobs.get(&id).is_some_and(|s| s.sequence >= sequence)
    }

    /// Jobs the client shows as matching: the ones a sync checks for having left.
    fn shown(&self) -> Vec<Uuid> {
        self.jobs
            .iter()
            .filter(|(_, s)| s.shown)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Forgets what no longer needs remembering, so a long-lived stream's memory
    /// follows the jobs it shows, not every job it ever sent: a job the client does not
    /// show, sent before `since` (a sync from `since` on cannot return that change
    /// again; a newer change has a higher sequence and is judged afresh); and under an
    /// empty filter, where no job can leave it, any job sent before `since`. A finished
    /// job sent before `gone` (the retention) is deleted from Postgres or about to be.
    fn forget(
        &mut self,
        filter_is_empty: bool,
        since: chrono::DateTime<chrono::Utc>,
        gone: chrono::DateTime<chrono::Utc>,
    ) {
        self.jobs.retain(|_, s| {
            let deleted = s.finished && s.at < gone;
            !(deleted || (s.at < since && (filter_is_empty || !s.shown)))
        });
    }
}

impl ProjectWatcher {
    fn offer(&mut self, job: &Job, now: chrono::DateTime<chrono::Utc>) {
        if self.view.admit(
            &self.filter,
            job.id,
            job.sequence,
            job.state,
            &job.kind,
            now,
        ) {
            self.out
                .push_back(EncodedJobEvent::new(&event(job, EventType::Snapshot)));
        }
    }

    /// Finds the jobs changed since the last sync that the stream has not sent yet:
    /// those that match the filter, and those shown that may have left it. Their rows are
    /// read later, a page at a time as the client takes them (`next_page`): each job
    /// carries its input, and a sync may find a thousand.
    async fn sync(&mut self) -> AppResult<Flow> {
        let since = self.synced;
        let (changed, left, started) = {
            let mut conn = self.engine.db.get().await?;
            // Read before the changes: the next sync starts from here, on Postgres's
            // clock and behind every transaction still open (a change's update_time
            // is its transaction's start), so no change is missed.
            let started = db::jobs::change_horizon(&mut conn).await?;
            // A deleted project's jobs go without events: the stream ends here, as a
            // job's watch ends when its job is gone.
            if since.is_some()
                && db::projects::get(&mut conn, self.owner.as_deref(), self.project)
                    .await?
                    .is_none()
            {
                return Err(AppError::NotFound(format!(
                    "project projects/{}",
                    self.project
                )));
            }
            let changed = db::jobs::changed_since(
                &mut conn,
                self.owner.as_deref(),
                self.project,
                &self.filter,
                since,
                1000,
            )
            .await?;
            // Under an empty filter every change is in `changed` already.
            let left = match since {
                Some(since) if !self.filter.is_empty() => {
                    let shown = self.view.shown();
                    db::jobs::changed_among(
                        &mut conn,
                        self.owner.as_deref(),
                        self.project,
                        &shown,
                        since,
                    )
                    .await?
                }
                _ => Vec::new(),
            };
            (changed, left, started)
        };
        // Oldest change first; what was sent at that sequence already is not read again.
        // (A sync runs only once the previous one's pages are read: `pending` is empty.)
        let mut found = std::collections::HashSet::new();
        for (id, sequence) in left.into_iter().chain(changed.into_iter().rev()) {
            if !self.view.has(id, sequence) && found.insert(id) {
                self.pending.push_back(id);
            }
        }
        if let Some(since) = since {
            let retention = chrono::Duration::from_std(self.engine.settings.job_retention)
                .unwrap_or(chrono::Duration::MAX);
            self.view.forget(
                self.filter.is_empty(),
                since,
                started.checked_sub_signed(retention).unwrap_or(since),
            );
        }
        self.synced = Some(started);
        self.next_page().await
    }

    /// Reads the next page of the jobs a sync found, and queues those still to send.
    async fn next_page(&mut self) -> AppResult<Flow> {
        let ids: Vec<Uuid> = (0..SYNC_PAGE)
            .map_while(|_| self.pending.pop_front())
            .collect();
        let jobs = {
            let mut conn = self.engine.db.get().await?;
            db::jobs::get_many(&mut conn, self.owner.as_deref(), self.project, &ids).await?
        };
        let mut by_id: HashMap<Uuid, Job> = jobs.into_iter().map(|j| (j.id, j)).collect();
        let now = chrono::Utc::now();
        for id in ids {
            // Gone meanwhile (retention): nothing to say.
            if let Some(job) = by_id.remove(&id) {
                self.offer(&job, now);
            }
        }
        Ok(Flow::Continue)
    }
}

/// Jobs a project stream reads per query when it syncs.
const SYNC_PAGE: usize = 32;

impl Watcher for ProjectWatcher {
    fn queued(&mut self) -> &mut VecDeque<EncodedJobEvent> {
        &mut self.out
    }

    async fn step(
        &mut self,
        rx: &mut broadcast::Receiver<Signal>,
        resync: &mut tokio::time::Interval,
    ) -> AppResult<Flow> {
        if !self.pending.is_empty() {
            return self.next_page().await;
        }
        tokio::select! {
            _ = resync.tick() => self.sync().await,
            signal = rx.recv() => match signal {
                Ok(Signal::Event(ev)) => {
                    let job = ev.event.job.as_ref();
                    let id = job.and_then(|j| JobName::parse("name", &j.name).ok()).map(|n| n.job);
                    let state = job.and_then(|j| pb::job::State::try_from(j.state).ok()).and_then(crate::convert::job::state_of);
                    if let (Some(id), Some(state), Some(job)) = (id, state, job)
                        && self.view.admit(
                            &self.filter,
                            id,
                            ev.event.sequence,
                            state,
                            &job.kind,
                            chrono::Utc::now(),
                        )
                    {
                        self.out.push_back(ev.encoded.clone());
                    }
                    Ok(Flow::Continue)
                }
                Ok(Signal::Resync) => self.sync().await,
                // Too slow: the view is read again, not the backlog sent.
                Err(RecvError::Lagged(missed)) => {
                    self.engine.settings.metrics.events_superseded(missed);
                    self.sync().await
                }
                Err(RecvError::Closed) => Err(AppError::Unavailable("event hub closed".into())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap_or_default()
    }

    #[test]
    fn a_view_sends_matching_jobs_and_the_change_that_takes_one_out() {
        let running = JobFilter::parse("state = RUNNING").unwrap();
        let mut view = View::default();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        // Not shown and not matching: nothing to say.
        assert!(!view.admit(&running, a, 1, JobState::Queued, "render", at(0)));
        assert!(view.admit(&running, a, 2, JobState::Running, "render", at(1)));
        assert!(
            !view.admit(&running, a, 2, JobState::Running, "render", at(2)),
            "sent already"
        );
        assert!(view.admit(&running, a, 3, JobState::Running, "render", at(3)));
        // Leaves the filter: sent once, then no more until it matches again.
        assert!(view.admit(&running, a, 4, JobState::Queued, "render", at(4)));
        assert!(!view.admit(&running, a, 5, JobState::Queued, "render", at(5)));
        assert!(view.admit(&running, a, 6, JobState::Running, "render", at(6)));
        assert!(view.admit(&running, b, 1, JobState::Running, "render", at(6)));
        let mut shown = view.shown();
        shown.sort();
        let mut both = vec![a, b];
        both.sort();
        assert_eq!(shown, both);
    }

    #[test]
    fn a_view_forgets_what_no_sync_can_return_and_keeps_what_it_shows() {
        let running = JobFilter::parse("state = RUNNING").unwrap();
        let mut view = View::default();
        let (shown, left, recent, done) = (
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
        );
        view.admit(&running, shown, 1, JobState::Running, "render", at(0));
        view.admit(&running, left, 1, JobState::Running, "render", at(0));
        view.admit(&running, left, 2, JobState::Succeeded, "render", at(1));
        view.admit(&running, recent, 1, JobState::Running, "render", at(20));
        view.admit(&running, recent, 2, JobState::Failed, "render", at(20));
        view.forget(false, at(10), at(-100));
        let mut kept: Vec<Uuid> = view.jobs.keys().copied().collect();
        kept.sort();
        let mut want = vec![shown, recent];
        want.sort();
        assert_eq!(kept, want, "the job that left before `since` is forgotten");

        // A finished job it shows is forgotten after the retention.
        let failed = JobFilter::parse("state = FAILED").unwrap();
        let mut view = View::default();
        view.admit(&failed, done, 1, JobState::Failed, "render", at(0));
        view.forget(false, at(10), at(-1));
        assert!(view.jobs.contains_key(&done));
        view.forget(false, at(10), at(5));
        assert!(view.jobs.is_empty());

        // No filter: nothing can leave it, so only what a sync may return again is kept.
        let all = JobFilter::default();
        let mut view = View::default();
        view.admit(&all, shown, 1, JobState::Running, "render", at(0));
        view.admit(&all, recent, 1, JobState::Queued, "render", at(20));
        view.forget(true, at(10), at(-100));
        assert_eq!(view.jobs.keys().copied().collect::<Vec<_>>(), vec![recent]);
    }
}
