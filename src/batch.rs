//! Group commit. Calls of one kind (CreateProject, CreateJob, worker writes) that arrive while
//! earlier ones are being committed share the next transaction instead of each taking
//! a connection, a BEGIN, a COMMIT and an fsync. Nothing waits for a batch to fill:
//! an idle server commits a call at once, and batches grow only when calls queue up
//! behind busy lanes, which is exactly when sharing pays.
use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::{Mutex, mpsc, oneshot};

use crate::{AppError, AppResult};

type Pending<T, R> = (T, oneshot::Sender<AppResult<R>>);

pub struct Batcher<T, R> {
    tx: mpsc::Sender<Pending<T, R>>,
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// `lanes` transactions may be in flight at once, each with at most `max` calls.
    /// `run` returns one result per call, in order.
    pub fn spawn<F, Fut>(lanes: usize, max: usize, run: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<AppResult<R>>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Pending<T, R>>(lanes * max);
        let rx = Arc::new(Mutex::new(rx));
        let run = Arc::new(run);
        for _ in 0..lanes {
            let (rx, run) = (rx.clone(), run.clone());
            tokio::spawn(async move {
                loop {
                    let batch = {
                        let mut rx = rx.lock().await;
                        let Some(first) = rx.recv().await else {
                            return;
                        };
                        let mut batch = vec![first];
                        while batch.len() < max {
                            match rx.try_recv() {
                                Ok(next) => batch.push(next),
                                Err(_) => break,
                            }
                        }
                        batch
                    };
                    // A caller that gave up (deadline, cancelled stream) is not run: it
                    // was never told anything, so nothing may happen on its behalf.
                    let (calls, replies): (Vec<T>, Vec<_>) =
                        batch.into_iter().filter(|(_, r)| !r.is_closed()).unzip();
                    if calls.is_empty() {
                        continue;
                    }
                    let n = calls.len();
                    // Its own task, so a panic fails this batch's calls, not the lane.
                    let results = match tokio::spawn(run(calls)).await {
                        Ok(results) if results.len() == n => results,
                        Ok(_) => (0..n)
                            .map(|_| Err(AppError::internal("batch returned the wrong count")))
                            .collect(),
                        Err(e) => (0..n)
                            .map(|_| Err(AppError::internal(format!("batch failed: {e}"))))
                            .collect(),
                    };
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(result);
                    }
                }
            });
        }
        Self { tx }
    }

    pub async fn call(&self, call: T) -> AppResult<R> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((call, reply))
            .await
            .map_err(|_| AppError::Unavailable("job engine stopped".into()))?;
        rx.await
            .map_err(|_| AppError::internal("job engine dropped a call"))?
    }
}

/// Groups whose statement failed as a whole (counted for operators: each one is a
/// caller whose input passed validation and still failed in storage, or a fault).
static GROUP_FAILURES: AtomicU64 = AtomicU64::new(0);

pub fn group_failures() -> u64 {
    GROUP_FAILURES.load(Ordering::Relaxed)
}

/// Runs `calls` as one group with `tx`, one result per call. If the group fails as a
/// whole, it is split in halves, each tried as a group of its own, and so on down to
/// the call that fails alone: one bad call among n costs about 2·log2(n) extra
/// transactions, not n, and never another caller's outcome. A dependency outage
/// (UNAVAILABLE) fails the group at once: splitting cannot help.
pub async fn shared_or_alone<'a, T, R, F, Fut>(calls: &'a [T], tx: F) -> Vec<AppResult<R>>
where
    F: Fn(&'a [T]) -> Fut,
    Fut: Future<Output = AppResult<Vec<AppResult<R>>>> + 'a,
{
    let mut out: Vec<Option<AppResult<R>>> = calls.iter().map(|_| None).collect();
    let whole = 0..calls.len();
    let mut level = vec![whole];
    while !level.is_empty() {
        let outcomes =
            futures::future::join_all(level.iter().map(|range| tx(&calls[range.clone()]))).await;
        let mut next = Vec::new();
        for (range, outcome) in level.into_iter().zip(outcomes) {
            match outcome {
                Ok(results) if results.len() == range.len() => {
                    for (slot, result) in out[range].iter_mut().zip(results) {
                        *slot = Some(result);
                    }
                }
                Ok(_) => {
                    for slot in &mut out[range] {
                        *slot = Some(Err(AppError::internal("group returned the wrong count")));
                    }
                }
                Err(e) if range.len() == 1 || matches!(e, AppError::Unavailable(_)) => {
                    if range.len() == 1 {
                        out[range.start] = Some(Err(e));
                    } else {
                        let message = e.to_string();
                        for slot in &mut out[range] {
                            *slot = Some(Err(AppError::Unavailable(message.clone())));
                        }
                    }
                }
                Err(e) => {
                    GROUP_FAILURES.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, calls = range.len(), "group failed; splitting it to find the call that fails");
                    let mid = range.start + range.len() / 2;
                    next.push(range.start..mid);
                    next.push(mid..range.end);
                }
            }
        }
        level = next;
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(AppError::internal("no result"))))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A group "statement" over numbers that fails whole when it holds a 13.
    async fn run(group: &[u32], transactions: &AtomicUsize) -> AppResult<Vec<AppResult<u32>>> {
        transactions.fetch_add(1, Ordering::Relaxed);
        if group.contains(&13) {
            return Err(AppError::internal("value out of range"));
        }
        Ok(group.iter().map(|n| Ok(n * 2)).collect())
    }

    #[tokio::test]
    async fn a_failing_call_is_found_by_halving_and_costs_no_one_else() {
        let calls: Vec<u32> = (0..64).collect();
        let transactions = AtomicUsize::new(0);
        let results = shared_or_alone(&calls, |g| run(g, &transactions)).await;
        for (n, result) in calls.iter().zip(&results) {
            match result {
                Ok(v) => assert_eq!(*v, n * 2),
                Err(_) => assert_eq!(*n, 13),
            }
        }
        assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
        // The whole group, then two halves at each of log2(64) = 6 levels.
        assert_eq!(transactions.load(Ordering::Relaxed), 1 + 2 * 6);
    }

    #[tokio::test]
    async fn an_outage_fails_the_group_without_splitting() {
        let calls: Vec<u32> = (0..8).collect();
        let transactions = AtomicUsize::new(0);
        let results = shared_or_alone(&calls, |_| {
            transactions.fetch_add(1, Ordering::Relaxed);
            async { Err::<Vec<AppResult<u32>>, _>(AppError::Unavailable("db down".into())) }
        })
        .await;
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(AppError::Unavailable(_))))
        );
        assert_eq!(transactions.load(Ordering::Relaxed), 1);
    }
}
