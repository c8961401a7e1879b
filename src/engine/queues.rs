//! Queues: the `Queue` resource (settings and figures), and which kinds' queues
//! restrict leasing, which the leasing path asks often and so reads from a copy at most
//! a second old. A stale copy only delays: the plain leasing statement itself skips
//! restricted kinds, and the limited path checks each queue's row under its lock.
use std::{
    collections::HashSet,
    sync::RwLock,
    time::{Duration, Instant},
};

use crate::{
    AppError, AppResult, db,
    domain::queue::{Queue, QueueFigures, QueueSettings},
};

use super::Engine;

/// How old the copy of the restricted kinds may get.
const RESTRICTED_TTL: Duration = Duration::from_secs(1);
/// How often a worker waiting on a restricted kind looks again without a wake-up: a
/// start rate frees a slot with no event to say so.
pub(super) const RESTRICTED_POLL: Duration = Duration::from_millis(200);

#[derive(Default)]
pub(super) struct Restricted(RwLock<Option<(Instant, HashSet<String>)>>);

impl Restricted {
    /// Those of `kinds` restricted when last read, unless that read is stale.
    fn fresh_among(&self, kinds: &[String]) -> Option<Vec<String>> {
        let read = self.0.read().unwrap_or_else(|p| p.into_inner());
        read.as_ref()
            .filter(|(at, _)| at.elapsed() < RESTRICTED_TTL)
            .map(|(_, all)| kinds.iter().filter(|k| all.contains(*k)).cloned().collect())
    }

    fn set(&self, kinds: HashSet<String>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), kinds));
    }

    /// Whether `kind` was restricted when last read (no read here).
    pub(super) fn contains(&self, kind: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|(_, kinds)| kinds.contains(kind))
    }
}

/// A queue with what it holds.
pub struct QueueView {
    pub queue: Queue,
    pub figures: QueueFigures,
    pub figures_time: chrono::DateTime<chrono::Utc>,
}

impl Engine {
    /// The restricted kinds among `kinds`, from the copy (read again when stale).
    pub(super) async fn restricted_among(&self, kinds: &[String]) -> AppResult<Vec<String>> {
        if let Some(among) = self.restricted.fresh_among(kinds) {
            return Ok(among);
        }
        let mut conn = self.conn().await?;
        let all: HashSet<String> = db::queues::restricted(&mut conn)
            .await?
            .into_iter()
            .collect();
        let among = kinds.iter().filter(|k| all.contains(*k)).cloned().collect();
        self.restricted.set(all);
        Ok(among)
    }

    pub(super) fn is_restricted(&self, kind: &str) -> bool {
        self.restricted.contains(kind)
    }

    /// Wake-ups for workers waiting on a limited kind when worker writes end runs:
    /// each freed a slot.
    pub(super) fn freed<'a>(
        &self,
        jobs: impl IntoIterator<Item = &'a crate::domain::job::Job>,
    ) -> super::Wake {
        let mut wake = super::Wake::new();
        for job in jobs {
            if job.state != crate::domain::job::JobState::Running && self.is_restricted(&job.kind) {
                *wake.entry(job.kind.clone()).or_default() += 1;
            }
        }
        wake
    }

    pub async fn get_queue(&self, kind: &str) -> AppResult<QueueView> {
        let mut conn = self.conn().await?;
        let queue = db::queues::get(&mut conn, kind)
            .await?
            .unwrap_or_else(|| Queue::unconfigured(kind));
        let figures = db::queues::figures(&mut conn, Some(kind))
            .await?
            .pop()
            .unwrap_or_else(|| QueueFigures {
                kind: kind.to_owned(),
                ..Default::default()
            });
        Ok(QueueView {
            queue,
            figures,
            figures_time: chrono::Utc::now(),
        })
    }

    /// Configured queues and the kinds with jobs waiting, queued, running or finished
    /// in the last minute, by kind.
    pub async fn list_queues(&self) -> AppResult<Vec<QueueView>> {
        let mut conn = self.conn().await?;
        let configured = db::queues::list(&mut conn).await?;
        let figures = db::queues::figures(&mut conn, None).await?;
        let now = chrono::Utc::now();
        let mut kinds: Vec<String> = configured
            .iter()
            .map(|q| q.kind.clone())
            .chain(figures.iter().map(|f| f.kind.clone()))
            .collect();
        kinds.sort();
        kinds.dedup();
        Ok(kinds
            .into_iter()
            .map(|kind| QueueView {
                queue: configured
                    .iter()
                    .find(|q| q.kind == kind)
                    .cloned()
                    .unwrap_or_else(|| Queue::unconfigured(&kind)),
                figures: figures
                    .iter()
                    .find(|f| f.kind == kind)
                    .cloned()
                    .unwrap_or_else(|| QueueFigures {
                        kind: kind.clone(),
                        ..Default::default()
                    }),
                figures_time: now,
            })
            .collect())
    }

    /// Writes a queue's settings; `expected`: the revision the caller read (0 for a
    /// queue never configured), or `None` to write whatever is there. Workers waiting
    /// on the kind are woken: a resumed or raised queue has jobs for them.
    pub async fn update_queue(
        &self,
        kind: &str,
        settings: &QueueSettings,
        expected: Option<i64>,
    ) -> AppResult<QueueView> {
        {
            let mut conn = self.conn().await?;
            match db::queues::put(&mut conn, kind, settings, expected).await? {
                db::queues::Updated::Done(_) => {}
                db::queues::Updated::Stale => {
                    return Err(AppError::Aborted(format!(
                        "queue queues/{kind} changed since it was read (etag mismatch); read it again"
                    )));
                }
            }
        }
        // This instance sees the change at once; the others within RESTRICTED_TTL.
        *self.restricted.0.write().unwrap_or_else(|p| p.into_inner()) = None;
        self.publish(Vec::new(), super::Wake::from([(kind.to_owned(), 1024)]));
        self.get_queue(kind).await
    }
}
