//! Redis fan-out for one instance: one subscription receives every job event published
//! by any instance (in messages of many events, `EventsMessage`), another every worker
//! wake-up, and the hub hands them to the local watchers and waiting workers.
//!
//! Redis is a fast path only. When the subscription (re)connects, every watcher gets
//! `Resync` and re-reads Postgres, so whatever was published while this instance was
//! not listening is recovered from the source of truth.
use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use prost::Message;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::wire::{EVENTS_SUFFIX, decode_events, events_channel, legacy_event_pattern};
use crate::proto::v1 as pb;

const JOB_CAPACITY: usize = 64;
const PROJECT_CAPACITY: usize = 256;

/// An event from Redis: decoded once for the watchers' decisions, and the bytes it
/// came as, which every watcher sends as they are.
#[derive(Debug)]
pub struct HubEvent {
    pub event: pb::JobEvent,
    pub encoded: crate::proto::EncodedJobEvent,
}

#[derive(Debug, Clone)]
pub enum Signal {
    Event(Arc<HubEvent>),
    /// Events may have been missed: read Postgres again.
    Resync,
}

#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    prefix: String,
    jobs: Mutex<HashMap<Uuid, broadcast::Sender<Signal>>>,
    projects: Mutex<HashMap<Uuid, broadcast::Sender<Signal>>>,
    /// Per kind, idle AcquireJobs calls in the order they started waiting.
    idle: Mutex<HashMap<String, IdleQueue>>,
    connected: AtomicBool,
    /// Receipt lag and reconnects (none in unit tests).
    metrics: Option<crate::metrics::Metrics>,
}

/// One idle AcquireJobs call: woken at most once, by whichever of its kinds gets jobs first.
struct Slot {
    /// Jobs the call would take.
    want: usize,
    woken: AtomicBool,
    /// The call saw its wake-up (see `Idle`'s drop).
    seen: AtomicBool,
    /// The kind and number of jobs the wake-up counted this call for.
    woken_for: Mutex<Option<(String, usize)>>,
    notify: Notify,
}

impl Slot {
    /// Wakes the call unless it was woken already; the permit is kept if it is not
    /// waiting yet.
    fn wake(&self, woken_for: Option<(String, usize)>) -> bool {
        {
            // Under the lock, so `Idle`'s drop sees the flag and the reason together.
            let mut reason = self.woken_for.lock().unwrap_or_else(|p| p.into_inner());
            if self.woken.swap(true, Ordering::AcqRel) {
                return false;
            }
            *reason = woken_for;
        }
        self.notify.notify_one();
        true
    }
}

#[derive(Default)]
struct IdleQueue {
    slots: VecDeque<Weak<Slot>>,
    /// Length at which finished calls are swept out of `slots`.
    prune_at: usize,
}

impl IdleQueue {
    /// Drops the registrations of calls that are done or already woken.
    fn prune(&mut self) {
        self.slots.retain(|w| {
            w.upgrade()
                .is_some_and(|s| !s.woken.load(Ordering::Acquire))
        });
    }
}

/// An idle AcquireJobs call's registration; dropping it withdraws the call.
pub struct Idle {
    slot: Arc<Slot>,
    hub: Hub,
}

impl Idle {
    /// Resolves when jobs of one of the kinds arrived (or events may have been missed).
    pub async fn woken(&self) {
        self.slot.notify.notified().await;
        self.slot.seen.store(true, Ordering::Release);
    }
}

impl Drop for Idle {
    /// A call woken while it was still looking (and then done, with other jobs) did
    /// not take the jobs it was woken for: hand the wake-up on to the next idle call,
    /// or those jobs would wait for the poll interval.
    fn drop(&mut self) {
        let unseen = {
            let mut reason = self
                .slot
                .woken_for
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if self.slot.woken.load(Ordering::Acquire) && !self.slot.seen.load(Ordering::Acquire) {
                reason.take()
            } else {
                None
            }
        };
        if let Some((kind, jobs)) = unseen {
            self.hub.wake_idle(&kind, jobs);
        }
    }
}

/// Finished registrations tolerated in a kind's idle queue before it is swept.
const IDLE_PRUNE_MIN: usize = 256;

fn subscribe<K: std::hash::Hash + Eq>(
    map: &Mutex<HashMap<K, broadcast::Sender<Signal>>>,
    key: K,
    capacity: usize,
) -> broadcast::Receiver<Signal> {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    map.entry(key)
        .or_insert_with(|| broadcast::channel(capacity).0)
        .subscribe()
}

fn send<K: std::hash::Hash + Eq>(
    map: &Mutex<HashMap<K, broadcast::Sender<Signal>>>,
    key: &K,
    signal: Signal,
) {
    let map = map.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(tx) = map.get(key) {
        let _ = tx.send(signal);
    }
}

fn send_all<K>(map: &Mutex<HashMap<K, broadcast::Sender<Signal>>>, signal: &Signal) {
    let map = map.lock().unwrap_or_else(|p| p.into_inner());
    for tx in map.values() {
        let _ = tx.send(signal.clone());
    }
}

/// Drops channels nobody listens to any more.
fn sweep<K>(map: &Mutex<HashMap<K, broadcast::Sender<Signal>>>) {
    map.lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|_, tx| tx.receiver_count() > 0);
}

impl Hub {
    /// Starts the subscriber task; it reconnects until `stop` fires.
    pub fn start(
        redis_url: &str,
        prefix: &str,
        metrics: crate::metrics::Metrics,
        stop: CancellationToken,
    ) -> Result<Self, String> {
        let client =
            redis::Client::open(redis_url).map_err(|e| format!("invalid REDIS_URL: {e}"))?;
        let mut hub = Self::new(prefix);
        if let Some(inner) = Arc::get_mut(&mut hub.inner) {
            inner.metrics = Some(metrics);
        }
        tokio::spawn(hub.clone().run(client, stop));
        Ok(hub)
    }

    fn new(prefix: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                prefix: prefix.to_owned(),
                jobs: Mutex::default(),
                projects: Mutex::default(),
                idle: Mutex::default(),
                connected: AtomicBool::new(false),
                metrics: None,
            }),
        }
    }

    pub fn job(&self, id: Uuid) -> broadcast::Receiver<Signal> {
        subscribe(&self.inner.jobs, id, JOB_CAPACITY)
    }

    pub fn project(&self, id: Uuid) -> broadcast::Receiver<Signal> {
        subscribe(&self.inner.projects, id, PROJECT_CAPACITY)
    }

    /// Registers an idle AcquireJobs call that would take up to `want` jobs of `kinds`.
    /// Register before looking for jobs: a wake-up that comes in between is kept.
    pub fn idle(&self, kinds: &[String], want: usize) -> Idle {
        let slot = Arc::new(Slot {
            want: want.max(1),
            woken: AtomicBool::new(false),
            seen: AtomicBool::new(false),
            woken_for: Mutex::new(None),
            notify: Notify::new(),
        });
        let mut map = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        for kind in kinds {
            let queue = map.entry(kind.clone()).or_default();
            if queue.slots.len() >= queue.prune_at.max(IDLE_PRUNE_MIN) {
                queue.prune();
                queue.prune_at = queue.slots.len() * 2;
            }
            queue.slots.push_back(Arc::downgrade(&slot));
        }
        Idle {
            slot,
            hub: self.clone(),
        }
    }

    /// Wakes the longest-idle calls for `kind` until they would take `jobs` between
    /// them: one call wanting 50 jobs is enough for 20 new ones, and the rest stay idle
    /// instead of running acquires that find nothing. Returns how many were woken.
    fn wake_idle(&self, kind: &str, jobs: usize) -> usize {
        let mut map = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        let Some(queue) = map.get_mut(kind) else {
            return 0;
        };
        let (mut left, mut woken) = (jobs.max(1), 0);
        while left > 0 {
            let Some(weak) = queue.slots.pop_front() else {
                break;
            };
            if let Some(slot) = weak.upgrade()
                && slot.wake(Some((kind.to_owned(), left.min(slot.want))))
            {
                left = left.saturating_sub(slot.want);
                woken += 1;
            }
        }
        woken
    }

    pub fn connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed)
    }

    async fn run(self, client: redis::Client, stop: CancellationToken) {
        let mut retry = Duration::from_millis(100);
        let mut sweep_tick = tokio::time::interval(Duration::from_secs(30));
        let mut subscribed_before = false;
        loop {
            let connect = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(events_channel(&self.inner.prefix)).await?;
                pubsub
                    .psubscribe(legacy_event_pattern(&self.inner.prefix))
                    .await?;
                pubsub
                    .psubscribe(format!("{}:wake:*", self.inner.prefix))
                    .await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let pubsub = tokio::select! {
                () = stop.cancelled() => return,
                r = tokio::time::timeout(Duration::from_secs(5), connect) => r,
            };
            let mut messages = match pubsub {
                Ok(Ok(pubsub)) => pubsub.into_on_message(),
                Ok(Err(e)) => {
                    tracing::warn!(redis = "down", error = %e, "job event subscription failed; retrying");
                    self.back_off(&stop, &mut retry).await;
                    continue;
                }
                Err(_) => {
                    tracing::warn!(redis = "down", "job event subscription timed out; retrying");
                    self.back_off(&stop, &mut retry).await;
                    continue;
                }
            };
            retry = Duration::from_millis(100);
            if let (true, Some(m)) = (subscribed_before, &self.inner.metrics) {
                m.redis_reconnected();
            }
            subscribed_before = true;
            self.inner.connected.store(true, Ordering::Relaxed);
            tracing::info!("subscribed to job events");
            // Anything published while we were not listening is in Postgres.
            self.resync_all();
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = sweep_tick.tick() => {
                        sweep(&self.inner.jobs);
                        sweep(&self.inner.projects);
                        self.sweep_idle();
                    }
                    msg = messages.next() => match msg {
                        Some(msg) => self.dispatch(msg.get_channel_name(), msg.get_payload_bytes()),
                        None => break,
                    },
                }
            }
            self.inner.connected.store(false, Ordering::Relaxed);
            tracing::warn!(redis = "down", "job event subscription lost; reconnecting");
        }
    }

    async fn back_off(&self, stop: &CancellationToken, retry: &mut Duration) {
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(*retry) => {}
        }
        *retry = (*retry * 2).min(Duration::from_secs(5));
    }

    fn sweep_idle(&self) {
        let mut map = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, queue| {
            queue.prune();
            !queue.slots.is_empty()
        });
    }

    fn resync_all(&self) {
        send_all(&self.inner.jobs, &Signal::Resync);
        send_all(&self.inner.projects, &Signal::Resync);
        // Wake-ups may have been missed too: every idle call looks again.
        let mut map = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        for queue in map.values_mut() {
            for slot in queue.slots.drain(..).filter_map(|w| w.upgrade()) {
                slot.wake(None);
            }
        }
    }

    fn dispatch(&self, channel: &str, payload: &[u8]) {
        let Some(rest) = channel.strip_prefix(&self.inner.prefix) else {
            return;
        };
        if let Some(kind) = rest.strip_prefix(":wake:") {
            // Enough idle workers for the new jobs, not all of them: the rest would
            // only run empty acquires. A worker that finds nothing (another instance's
            // took them) waits again; the poll interval covers anything missed.
            let jobs = std::str::from_utf8(payload)
                .ok()
                .and_then(|p| p.parse::<usize>().ok())
                .unwrap_or(1);
            self.wake_idle(kind, jobs);
            return;
        }
        if rest == EVENTS_SUFFIX {
            for (project, job, event) in decode_events(payload) {
                self.deliver(project, job, event);
            }
            return;
        }
        let Some(ids) = rest.strip_prefix(":ev:") else {
            return;
        };
        let Some((project, job)) = ids.split_once(':') else {
            return;
        };
        let (Ok(project), Ok(job)) = (Uuid::parse_str(project), Uuid::parse_str(job)) else {
            return;
        };
        self.deliver(project, job, payload);
    }

    /// Hands one encoded event to this instance's watchers of its job and project.
    fn deliver(&self, project: Uuid, job: Uuid, payload: &[u8]) {
        // Most events have no watcher on this instance: skip decoding them.
        let watched = |ids: &Mutex<HashMap<Uuid, broadcast::Sender<Signal>>>, id: &Uuid| {
            ids.lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(id)
                .is_some_and(|tx| tx.receiver_count() > 0)
        };
        if !watched(&self.inner.jobs, &job) && !watched(&self.inner.projects, &project) {
            return;
        }
        match pb::JobEvent::decode(payload) {
            Ok(event) => {
                if let (Some(m), Some(t)) = (&self.inner.metrics, &event.event_time) {
                    let committed = std::time::UNIX_EPOCH
                        + Duration::new(
                            t.seconds.max(0) as u64,
                            t.nanos.clamp(0, 999_999_999) as u32,
                        );
                    m.event_received(committed);
                }
                let signal = Signal::Event(Arc::new(HubEvent {
                    event,
                    encoded: crate::proto::Encoded(bytes::Bytes::copy_from_slice(payload)),
                }));
                send(&self.inner.jobs, &job, signal.clone());
                send(&self.inner.projects, &project, signal);
            }
            Err(e) => tracing::warn!(error = %e, %job, "undecodable job event"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn kinds(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| (*s).to_owned()).collect()
    }

    async fn is_woken(idle: &Idle) -> bool {
        tokio::time::timeout(Duration::from_millis(20), idle.woken())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn wakes_idle_calls_by_what_they_would_take() {
        let hub = Hub::new("t");
        let calls: Vec<Idle> = (0..3).map(|_| hub.idle(&kinds(&["render"]), 50)).collect();
        assert_eq!(hub.wake_idle("render", 20), 1, "one call takes all 20");
        assert!(is_woken(&calls[0]).await, "the longest idle goes first");
        assert!(!is_woken(&calls[1]).await);
        assert_eq!(hub.wake_idle("render", 120), 2);
        assert!(is_woken(&calls[1]).await && is_woken(&calls[2]).await);
        assert_eq!(hub.wake_idle("render", 5), 0, "nobody is idle any more");
        assert_eq!(hub.wake_idle("transcode", 5), 0);
    }

    #[tokio::test]
    async fn a_call_is_woken_once_whatever_its_kinds() {
        let hub = Hub::new("t");
        let both = hub.idle(&kinds(&["render", "transcode"]), 1);
        let render = hub.idle(&kinds(&["render"]), 1);
        assert_eq!(hub.wake_idle("transcode", 1), 1);
        assert!(is_woken(&both).await);
        // `both` is done: a render job wakes the next render call.
        assert_eq!(hub.wake_idle("render", 1), 1);
        assert!(is_woken(&render).await);
    }

    #[tokio::test]
    async fn a_wake_up_the_call_never_saw_goes_to_the_next_idle_call() {
        let hub = Hub::new("t");
        let busy = hub.idle(&kinds(&["render"]), 10);
        let next = hub.idle(&kinds(&["render"]), 10);
        assert_eq!(hub.wake_idle("render", 3), 1);
        assert!(!is_woken(&next).await);
        // `busy` found other jobs while it was still looking and returns.
        drop(busy);
        assert!(is_woken(&next).await);
        // A call that did see its wake-up keeps it.
        let after = hub.idle(&kinds(&["render"]), 10);
        drop(next);
        assert!(!is_woken(&after).await);
    }

    #[tokio::test]
    async fn finished_calls_do_not_pile_up() {
        let hub = Hub::new("t");
        for _ in 0..10_000 {
            drop(hub.idle(&kinds(&["render"]), 1));
        }
        let len = hub
            .inner
            .idle
            .lock()
            .unwrap()
            .get("render")
            .map_or(0, |q| q.slots.len());
        assert!(len <= IDLE_PRUNE_MIN, "{len} registrations kept");
        hub.sweep_idle();
        assert!(hub.inner.idle.lock().unwrap().is_empty());
    }
}
