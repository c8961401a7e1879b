//! Background duties every instance runs: expired leases and retention.
use tokio_util::sync::CancellationToken;

use super::Engine;

/// Retention runs once per this many reap ticks (a minute at the default 1s).
const PRUNE_EVERY_TICKS: u32 = 60;

/// Expired leases handled per transaction; a full batch means more may be waiting.
pub(super) const REAP_BATCH: usize = 100;

/// Reaping and pruning run as two tasks: a long prune (a backlog after a shorter
/// retention, or a statement waiting on a lock) never holds up expired leases.
pub fn spawn(engine: Engine, stop: CancellationToken) {
    let reaper = engine.clone();
    let reaping = stop.clone();
    tokio::spawn(async move {
        let mut reap = tokio::time::interval(reaper.settings.reap_interval);
        reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = reaping.cancelled() => return,
                _ = reap.tick() => loop {
                    // Drain in batches when many leases expired at once.
                    match reaper.reap_expired().await {
                        Ok(n) if n >= REAP_BATCH => continue,
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "reaping expired leases failed");
                            break;
                        }
                    }
                },
            }
        }
    });
    tokio::spawn(async move {
        let mut prune = tokio::time::interval(engine.settings.reap_interval * PRUNE_EVERY_TICKS);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = prune.tick() => match engine.prune().await {
                    Ok((0, 0)) => {}
                    Ok((jobs, events)) => tracing::info!(jobs, events, "pruned finished jobs and old events"),
                    Err(e) => tracing::warn!(error = %e, "pruning failed"),
                },
            }
        }
    });
}
