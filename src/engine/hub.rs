//! Redis fan-out for one instance: a single pattern subscription receives every job
//! event and worker wake-up published by any instance, and hands them to the local
//! watchers and waiting workers.
//!
//! Redis is a fast path only. When the subscription (re)connects, every watcher gets
//! `Resync` and re-reads Postgres, so whatever was published while this instance was
//! not listening is recovered from the source of truth.
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use prost::Message;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

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
    wake: Mutex<HashMap<String, Arc<Notify>>>,
    connected: AtomicBool,
}

/// Channel names, shared by publishers and the hub.
pub fn event_channel(prefix: &str, project: Uuid, job: Uuid) -> String {
    format!("{prefix}:ev:{project}:{job}")
}

/// Most idle workers woken by one wake-up message.
const MAX_WAKE: usize = 1024;

pub fn wake_channel(prefix: &str, kind: &str) -> String {
    format!("{prefix}:wake:{kind}")
}

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
    pub fn start(redis_url: &str, prefix: &str, stop: CancellationToken) -> Result<Self, String> {
        let client =
            redis::Client::open(redis_url).map_err(|e| format!("invalid REDIS_URL: {e}"))?;
        let hub = Self {
            inner: Arc::new(Inner {
                prefix: prefix.to_owned(),
                jobs: Mutex::default(),
                projects: Mutex::default(),
                wake: Mutex::default(),
                connected: AtomicBool::new(false),
            }),
        };
        tokio::spawn(hub.clone().run(client, stop));
        Ok(hub)
    }

    pub fn job(&self, id: Uuid) -> broadcast::Receiver<Signal> {
        subscribe(&self.inner.jobs, id, JOB_CAPACITY)
    }

    pub fn project(&self, id: Uuid) -> broadcast::Receiver<Signal> {
        subscribe(&self.inner.projects, id, PROJECT_CAPACITY)
    }

    pub fn wake(&self, kind: &str) -> Arc<Notify> {
        let mut map = self.inner.wake.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(kind.to_owned()).or_default().clone()
    }

    pub fn connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed)
    }

    async fn run(self, client: redis::Client, stop: CancellationToken) {
        let mut retry = Duration::from_millis(100);
        let mut sweep_tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            let connect = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub
                    .psubscribe(format!("{}:ev:*", self.inner.prefix))
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

    fn resync_all(&self) {
        send_all(&self.inner.jobs, &Signal::Resync);
        send_all(&self.inner.projects, &Signal::Resync);
        for notify in self
            .inner
            .wake
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            notify.notify_waiters();
        }
    }

    fn dispatch(&self, channel: &str, payload: &[u8]) {
        let Some(rest) = channel.strip_prefix(&self.inner.prefix) else {
            return;
        };
        if let Some(kind) = rest.strip_prefix(":wake:") {
            if let Some(notify) = self
                .inner
                .wake
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(kind)
            {
                // One idle worker per new job, not all of them: the rest would only
                // run empty acquires. A worker that finds nothing (another instance
                // took it) waits again; the poll interval covers anything missed.
                let jobs = std::str::from_utf8(payload)
                    .ok()
                    .and_then(|p| p.parse::<usize>().ok())
                    .unwrap_or(1);
                for _ in 0..jobs.clamp(1, MAX_WAKE) {
                    notify.notify_one();
                }
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
                let signal = Signal::Event(Arc::new(HubEvent {
                    event,
                    encoded: crate::proto::EncodedJobEvent(bytes::Bytes::copy_from_slice(payload)),
                }));
                send(&self.inner.jobs, &job, signal.clone());
                send(&self.inner.projects, &project, signal);
            }
            Err(e) => tracing::warn!(error = %e, channel, "undecodable job event"),
        }
    }
}
