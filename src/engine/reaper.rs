//! Background duties every instance runs: expired leases and retention.
use tokio_util::sync::CancellationToken;

use super::Engine;

/// Retention runs once per this many reap ticks (a minute at the default 1s).
const PRUNE_EVERY_TICKS: u32 = 60;

pub fn spawn(engine: Engine, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut reap = tokio::time::interval(engine.settings.reap_interval);
        reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut prune = tokio::time::interval(engine.settings.reap_interval * PRUNE_EVERY_TICKS);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = reap.tick() => {
                    // Drain in batches when many leases expired at once.
                    loop {
                        match engine.reap_expired().await {
                            Ok(100..) => continue,
                            Ok(_) => break,
                            Err(e) => {
                                tracing::warn!(error = %e, "reaping expired leases failed");
                                break;
                            }
                        }
                    }
                }
                _ = prune.tick() => match engine.prune().await {
                    Ok((0, 0)) => {}
                    Ok((jobs, events)) => tracing::info!(jobs, events, "pruned finished jobs and old events"),
                    Err(e) => tracing::warn!(error = %e, "pruning failed"),
                },
            }
        }
    });
}
