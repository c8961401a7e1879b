//! Queues on the wire.
use super::timestamp;
use crate::{domain::project::etag_of, engine::QueueView, proto::v1 as pb};

impl From<QueueView> for pb::Queue {
    fn from(v: QueueView) -> Self {
        let QueueView {
            queue,
            figures,
            figures_time,
        } = v;
        let s = queue.settings;
        let age = figures.oldest_ready.map(|t| {
            let d = (figures_time - t).to_std().unwrap_or_default();
            prost_types::Duration {
                seconds: d.as_secs() as i64,
                nanos: d.subsec_nanos() as i32,
            }
        });
        Self {
            name: format!("queues/{}", queue.kind),
            paused: s.paused,
            max_running: s.max_running.unwrap_or(0),
            max_running_per_key: s.max_running_per_key.unwrap_or(0),
            start_rate: s.start_rate.map(|r| pb::StartRate {
                jobs: r.jobs,
                interval: Some(prost_types::Duration {
                    seconds: r.interval.as_secs() as i64,
                    nanos: r.interval.subsec_nanos() as i32,
                }),
            }),
            waiting_jobs: figures.waiting,
            queued_jobs: figures.queued,
            running_jobs: figures.running,
            oldest_queued_age: age,
            completions_per_minute: figures.succeeded_last_minute,
            failures_per_minute: figures.failed_last_minute,
            figures_time: Some(timestamp(figures_time)),
            etag: etag_of(queue.revision),
            update_time: queue.update_time.map(timestamp),
        }
    }
}
