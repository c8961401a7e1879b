//! One WatchJobs stream: the jobs of a project that match a filter, kept current.
use std::collections::{HashMap, VecDeque};

use crate::domain::job::Filterable;
use tokio::sync::broadcast::{self, error::RecvError};
use uuid::Uuid;

use crate::engine::{Engine, event, hub::Signal};
use crate::{
    AppError, AppResult, db,
    domain::{
        job::{Job, JobFilter, JobState},
        names::JobName,
    },
    proto::{
        EncodedJobEvent,
        v1::{self as pb, job_event::Type as EventType},
    },
};

use super::{Flow, Watcher};

pub(super) struct ProjectWatcher {
    pub(super) engine: Engine,
    pub(super) owner: Option<String>,
    pub(super) project: Uuid,
    pub(super) filter: JobFilter,
    /// Events decided but not yet taken by the stream.
    pub(super) out: VecDeque<EncodedJobEvent>,
    /// Jobs this stream has sent (see `View`).
    pub(super) view: View,
    /// Jobs a sync found whose rows are still to read, oldest change first.
    pub(super) pending: VecDeque<Uuid>,
    pub(super) synced: Option<chrono::DateTime<chrono::Utc>>,
}

/// What a project stream has sent, per job: its last sequence, and whether the client
/// is showing it as matching the filter. A job that stops matching gets one last event
/// (its new state, which the client sees does not match), so a dashboard of running
/// jobs learns that one finished; after that it is sent only if it matches again.
#[derive(Default)]
pub(super) struct View {
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
    pub(super) fn admit(
        &mut self,
        filter: &JobFilter,
        id: Uuid,
        sequence: i64,
        job: &impl Filterable,
        now: chrono::DateTime<chrono::Utc>,
    ) -> bool {
        let matching = filter.matches(job);
        let state = job.state();
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
    pub(super) fn has(&self, id: Uuid, sequence: i64) -> bool {
        self.jobs.get(&id).is_some_and(|s| s.sequence >= sequence)
    }

    /// Jobs the client shows as matching: the ones a sync checks for having left.
    pub(super) fn shown(&self) -> Vec<Uuid> {
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
    pub(super) fn forget(
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
    pub(super) fn offer(&mut self, job: &Job, now: chrono::DateTime<chrono::Utc>) {
        if self
            .view
            .admit(&self.filter, job.id, job.sequence, job, now)
        {
            self.out
                .push_back(EncodedJobEvent::new(&event(job, EventType::Snapshot)));
        }
    }

    /// Finds the jobs changed since the last sync that the stream has not sent yet:
    /// those that match the filter, and those shown that may have left it. Their rows are
    /// read later, a page at a time as the client takes them (`next_page`): each job
    /// carries its input, and a sync may find a thousand.
    pub(super) async fn sync(&mut self) -> AppResult<Flow> {
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
    pub(super) async fn next_page(&mut self) -> AppResult<Flow> {
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
                            &Wire(job, state),
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

/// A job as an event carries it, with its state read.
struct Wire<'a>(&'a pb::Job, JobState);

impl Filterable for Wire<'_> {
    fn state(&self) -> JobState {
        self.1
    }
    fn kind(&self) -> &str {
        &self.0.kind
    }
    fn label(&self, key: &str) -> Option<&str> {
        self.0.labels.get(key).map(String::as_str)
    }
    fn depends_on(&self, job: Uuid) -> bool {
        self.0
            .depends_on
            .iter()
            .any(|name| JobName::parse("depends_on", name).is_ok_and(|n| n.job == job))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A render job in a state, without labels or dependencies.
    struct Test(JobState);

    impl Filterable for Test {
        fn state(&self) -> JobState {
            self.0
        }
        fn kind(&self) -> &str {
            "render"
        }
        fn label(&self, _: &str) -> Option<&str> {
            None
        }
        fn depends_on(&self, _: Uuid) -> bool {
            false
        }
    }

    pub(super) fn at(secs: i64) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap_or_default()
    }

    #[test]
    pub(super) fn a_view_sends_matching_jobs_and_the_change_that_takes_one_out() {
        let running = JobFilter::parse("state = RUNNING").unwrap();
        let mut view = View::default();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        // Not shown and not matching: nothing to say.
        assert!(!view.admit(&running, a, 1, &Test(JobState::Queued), at(0)));
        assert!(view.admit(&running, a, 2, &Test(JobState::Running), at(1)));
        assert!(
            !view.admit(&running, a, 2, &Test(JobState::Running), at(2)),
            "sent already"
        );
        assert!(view.admit(&running, a, 3, &Test(JobState::Running), at(3)));
        // Leaves the filter: sent once, then no more until it matches again.
        assert!(view.admit(&running, a, 4, &Test(JobState::Queued), at(4)));
        assert!(!view.admit(&running, a, 5, &Test(JobState::Queued), at(5)));
        assert!(view.admit(&running, a, 6, &Test(JobState::Running), at(6)));
        assert!(view.admit(&running, b, 1, &Test(JobState::Running), at(6)));
        let mut shown = view.shown();
        shown.sort();
        let mut both = vec![a, b];
        both.sort();
        assert_eq!(shown, both);
    }

    #[test]
    pub(super) fn a_view_forgets_what_no_sync_can_return_and_keeps_what_it_shows() {
        let running = JobFilter::parse("state = RUNNING").unwrap();
        let mut view = View::default();
        let (shown, left, recent, done) = (
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
        );
        view.admit(&running, shown, 1, &Test(JobState::Running), at(0));
        view.admit(&running, left, 1, &Test(JobState::Running), at(0));
        view.admit(&running, left, 2, &Test(JobState::Succeeded), at(1));
        view.admit(&running, recent, 1, &Test(JobState::Running), at(20));
        view.admit(&running, recent, 2, &Test(JobState::Failed), at(20));
        view.forget(false, at(10), at(-100));
        let mut kept: Vec<Uuid> = view.jobs.keys().copied().collect();
        kept.sort();
        let mut want = vec![shown, recent];
        want.sort();
        assert_eq!(kept, want, "the job that left before `since` is forgotten");

        // A finished job it shows is forgotten after the retention.
        let failed = JobFilter::parse("state = FAILED").unwrap();
        let mut view = View::default();
        view.admit(&failed, done, 1, &Test(JobState::Failed), at(0));
        view.forget(false, at(10), at(-1));
        assert!(view.jobs.contains_key(&done));
        view.forget(false, at(10), at(5));
        assert!(view.jobs.is_empty());

        // No filter: nothing can leave it, so only what a sync may return again is kept.
        let all = JobFilter::default();
        let mut view = View::default();
        view.admit(&all, shown, 1, &Test(JobState::Running), at(0));
        view.admit(&all, recent, 1, &Test(JobState::Queued), at(20));
        view.forget(true, at(10), at(-100));
        assert_eq!(view.jobs.keys().copied().collect::<Vec<_>>(), vec![recent]);
    }
}
