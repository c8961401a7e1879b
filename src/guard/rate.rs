//! Request rates per key, shared by every instance through Redis (GCRA: one timestamp
//! per key, decided by one Lua script), with an in-process limiter (governor) taking
//! over while Redis is unreachable: each instance then allows its share of every
//! budget, so limits fail to local limits, never to none and never to refusing all.
//!
//! Two things keep Redis off most calls. Decisions are sent in groups: a task takes
//! every decision waiting and runs one script for all of them (the job engine's group
//! commit, for limits). And a key asks Redis for a chunk of calls at a time (an eighth
//! of its burst, at most 32) and spends them locally for up to a second, so a busy
//! principal costs one trip per chunk; a refused key is refused locally until Redis
//! said it may pass again. What an instance took and did not spend is lost (at most a
//! chunk per instance), never given twice.
use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Rate, RateLimits},
    redis::RedisPool,
};

/// The budgets: each key is counted in exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Read,
    Write,
    Worker,
    Stream,
    /// Calls without a valid token, by client IP.
    Anonymous,
}

impl Class {
    pub const ALL: [Class; 5] = [
        Class::Read,
        Class::Write,
        Class::Worker,
        Class::Stream,
        Class::Anonymous,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Read => "reads",
            Class::Write => "writes",
            Class::Worker => "worker",
            Class::Stream => "streams",
            Class::Anonymous => "anonymous",
        }
    }

    fn rate(self, rates: &RateLimits) -> Rate {
        match self {
            Class::Read => rates.reads,
            Class::Write => rates.writes,
            Class::Worker => rates.worker,
            Class::Stream => rates.streams,
            Class::Anonymous => rates.anonymous,
        }
    }
}

/// The answer for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// When refused: how long until one call would pass.
    pub retry_after: Duration,
    /// Calls left in the burst after this one (0 when refused).
    pub remaining: u32,
    /// The burst size.
    pub limit: u32,
    /// How long until the whole burst is available again.
    pub reset: Duration,
}

/// How long a decision waits for Redis before the local limiter answers instead.
const REDIS_DEADLINE: Duration = Duration::from_millis(250);
/// After Redis failed, how long the local limiter answers alone before Redis is tried again.
const REDIS_BACKOFF: Duration = Duration::from_secs(1);
/// Decisions sent to Redis in one script run at most.
const GROUP: usize = 256;
/// Keys remembered between trips to Redis; when full the memory starts over.
const KEYS_CAPACITY: usize = 100_000;
/// How long calls granted ahead by Redis may be spent locally.
const BANK_HOLD: Duration = Duration::from_secs(1);

/// GCRA over many keys at once, each asking for up to `want` calls. KEYS: the keys;
/// ARGV: interval (µs), burst and want for each key in turn. Time is Redis's own, so
/// instances with skewed clocks agree. Returns, per key: calls granted (0: refused),
/// retry-after, remaining and reset (µs).
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[3 * i - 2])
  local burst = tonumber(ARGV[3 * i - 1])
  local want = tonumber(ARGV[3 * i])
  local tolerance = interval * burst
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local room = math.floor((now + tolerance - tat) / interval)
  if room < 1 then
    out[#out + 1] = 0
    out[#out + 1] = tat + interval - tolerance - now
    out[#out + 1] = 0
    out[#out + 1] = tat - now
  else
    local granted = math.min(room, want)
    local new_tat = tat + granted * interval
    redis.call('SET', key, new_tat, 'PX', math.floor((new_tat - now) / 1000) + 1)
    out[#out + 1] = granted
    out[#out + 1] = 0
    out[#out + 1] = math.floor((tolerance - (new_tat - now)) / interval)
    out[#out + 1] = new_tat - now
  end
end
return out
";

struct Pending {
    key: String,
    rate: Rate,
    want: u32,
    reply: oneshot::Sender<(Decision, u32)>,
}

/// What this instance knows of a key between trips to Redis.
#[derive(Default)]
struct KeyState {
    /// Refused by Redis until then (µs after `epoch`).
    refused_until: u64,
    /// Calls granted by Redis and not spent yet, usable until `banked_until`.
    banked: u32,
    banked_until: u64,
    /// Remaining burst at the last grant.
    remaining: u32,
    /// A trip to Redis for this key is under way.
    asking: bool,
}

#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

struct Inner {
    rates: RateLimits,
    prefix: String,
    to_redis: mpsc::Sender<Pending>,
    /// Each class's local limiter, with `1 / instances` of the budget.
    local: HashMap<Class, DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
    epoch: Instant,
    /// Redis is skipped until this many µs after `epoch` (0: Redis is in use).
    redis_skip_until: AtomicU64,
    /// Per key: refusals and calls granted ahead, so a busy principal costs a trip to
    /// Redis per chunk of calls, and a refused one none until it may pass again.
    keys: Mutex<HashMap<String, KeyState>>,
}

impl Limiter {
    pub fn new(rates: RateLimits, redis: RedisPool, prefix: &str, stop: CancellationToken) -> Self {
        let (to_redis, from_calls) = mpsc::channel(16 * GROUP);
        let local = Class::ALL
            .into_iter()
            .map(|class| {
                (
                    class,
                    RateLimiter::keyed(local_quota(class.rate(&rates), rates.instances)),
                )
            })
            .collect();
        let inner = Arc::new(Inner {
            rates,
            prefix: format!("{prefix}:rl:"),
            to_redis,
            local,
            clock: DefaultClock::default(),
            epoch: Instant::now(),
            redis_skip_until: AtomicU64::new(0),
            keys: Mutex::new(HashMap::new()),
        });
        tokio::spawn(decide_in_groups(redis, from_calls, stop.clone()));
        tokio::spawn(forget_old_keys(Arc::downgrade(&inner), stop));
        Self { inner }
    }

    /// Counts one call of `class` against `key` (a principal or an IP).
    pub async fn check(&self, class: Class, key: &str) -> Decision {
        let inner = &self.inner;
        let rate = class.rate(&inner.rates);
        let full_key = format!("{}{}:{key}", inner.prefix, class.as_str());
        let now = inner.now_micros();
        let want = match inner.spend_banked(&full_key, rate, now) {
            Ok(decision) => return decision,
            Err(want) => want,
        };
        if now >= inner.redis_skip_until.load(Ordering::Relaxed) {
            let (reply, answer) = oneshot::channel();
            let sent = inner.to_redis.try_send(Pending {
                key: full_key.clone(),
                rate,
                want,
                reply,
            });
            let answered = match sent {
                Ok(()) => tokio::time::timeout(REDIS_DEADLINE, answer)
                    .await
                    .ok()
                    .and_then(Result::ok),
                Err(_) => None,
            };
            if let Some((decision, granted)) = answered {
                if inner.redis_skip_until.swap(0, Ordering::Relaxed) != 0 {
                    tracing::info!("rate limits: Redis is back, limits are shared again");
                }
                inner.record(full_key, &decision, granted, now);
                return decision;
            }
            inner.record_failure(&full_key);
            // Redis is away, slow or swamped: decide here for a while.
            let skip = inner.now_micros() + REDIS_BACKOFF.as_micros() as u64;
            if inner.redis_skip_until.swap(skip, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    "rate limits: Redis unreachable, each instance enforces its share locally"
                );
            }
        } else {
            inner.record_failure(&full_key);
        }
        self.check_locally(class, full_key, rate)
    }

    fn check_locally(&self, class: Class, key: String, rate: Rate) -> Decision {
        let inner = &self.inner;
        let Some(limiter) = inner.local.get(&class) else {
            return allowed(rate, rate.burst);
        };
        let share = local_burst(rate, inner.rates.instances);
        match limiter.check_key(&key) {
            Ok(()) => allowed(rate, share.saturating_sub(1)),
            Err(not_until) => refused(rate, not_until.wait_time_from(inner.clock.now())),
        }
    }

    /// True while decisions are made locally because Redis failed.
    pub fn local_only(&self) -> bool {
        self.inner.redis_skip_until.load(Ordering::Relaxed) > self.inner.now_micros()
    }
}

impl Inner {
    fn now_micros(&self) -> u64 {
        // Never 0, which means "Redis in use" in `redis_skip_until`.
        self.epoch.elapsed().as_micros() as u64 + 1
    }

    /// A decision from what this instance holds for `key`, or how many calls to ask
    /// Redis for (a chunk, unless another trip for the key is under way).
    fn spend_banked(&self, key: &str, rate: Rate, now: u64) -> Result<Decision, u32> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if keys.len() >= KEYS_CAPACITY && !keys.contains_key(key) {
            keys.clear();
        }
        let state = keys.entry(key.to_owned()).or_default();
        if state.refused_until > now {
            return Ok(refused(
                rate,
                Duration::from_micros(state.refused_until - now),
            ));
        }
        if state.banked > 0 && state.banked_until > now {
            state.banked -= 1;
            return Ok(allowed(rate, state.remaining + state.banked));
        }
        if state.asking {
            return Err(1);
        }
        state.asking = true;
        Err(chunk(rate))
    }

    fn record(&self, key: String, decision: &Decision, granted: u32, now: u64) {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let state = keys.entry(key).or_default();
        state.asking = false;
        if decision.allowed {
            state.banked = granted.saturating_sub(1);
            state.banked_until = now + BANK_HOLD.as_micros() as u64;
            state.remaining = decision.remaining;
        } else {
            state.refused_until = now + decision.retry_after.as_micros() as u64;
        }
    }

    fn record_failure(&self, key: &str) {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(state) = keys.get_mut(key) {
            state.asking = false;
        }
    }
}

/// Calls asked of Redis at once for a key: an eighth of the burst, at most 32, so a
/// busy principal costs one round trip per chunk; calls an instance took and did not
/// spend within `BANK_HOLD` are lost, at most a chunk per instance. With small bursts
/// (below 16) every call is decided by Redis.
fn chunk(rate: Rate) -> u32 {
    (rate.burst / 8).clamp(1, 32)
}

fn allowed(rate: Rate, remaining: u32) -> Decision {
    Decision {
        allowed: true,
        retry_after: Duration::ZERO,
        remaining,
        limit: rate.burst,
        reset: Duration::ZERO,
    }
}

fn refused(rate: Rate, retry_after: Duration) -> Decision {
    Decision {
        allowed: false,
        retry_after,
        remaining: 0,
        limit: rate.burst,
        reset: rate.interval.saturating_mul(rate.burst),
    }
}

fn local_burst(rate: Rate, instances: u32) -> u32 {
    (rate.burst / instances.max(1)).max(1)
}

/// This instance's share: the same burst and refill divided among `instances`.
fn local_quota(rate: Rate, instances: u32) -> Quota {
    let burst = NonZeroU32::new(local_burst(rate, instances)).unwrap_or(NonZeroU32::MIN);
    let period = rate
        .interval
        .saturating_mul(instances.max(1))
        .max(Duration::from_nanos(1));
    Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst)
}

async fn decide_in_groups(
    redis: RedisPool,
    mut calls: mpsc::Receiver<Pending>,
    stop: CancellationToken,
) {
    let script = redis::Script::new(SCRIPT);
    let mut group = Vec::with_capacity(GROUP);
    loop {
        let got = tokio::select! {
            n = calls.recv_many(&mut group, GROUP) => n,
            () = stop.cancelled() => return,
        };
        if got == 0 {
            return;
        }
        // Calls whose caller gave up waiting are not sent.
        group.retain(|p| !p.reply.is_closed());
        if group.is_empty() {
            continue;
        }
        match run_group(&redis, &script, &group).await {
            Ok(decisions) => {
                for (pending, decision) in group.drain(..).zip(decisions) {
                    let _ = pending.reply.send(decision);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "rate limits: Redis script failed");
                // Dropping the replies makes each caller decide locally.
                group.clear();
            }
        }
    }
}

async fn run_group(
    redis: &RedisPool,
    script: &redis::Script,
    group: &[Pending],
) -> Result<Vec<(Decision, u32)>, String> {
    let mut conn = redis.get().await.map_err(|e| e.to_string())?;
    let mut invocation = script.prepare_invoke();
    for p in group {
        invocation
            .key(&p.key)
            .arg(p.rate.interval.as_micros().max(1) as u64)
            .arg(p.rate.burst)
            .arg(p.want);
    }
    let flat: Vec<i64> = invocation
        .invoke_async(&mut *conn)
        .await
        .map_err(|e| e.to_string())?;
    if flat.len() != group.len() * 4 {
        return Err(format!(
            "script answered {} values for {} keys",
            flat.len(),
            group.len()
        ));
    }
    let micros = |v: i64| Duration::from_micros(v.max(0) as u64);
    Ok(group
        .iter()
        .zip(flat.chunks_exact(4))
        .map(|(p, v)| {
            let decision = Decision {
                allowed: v[0] >= 1,
                retry_after: micros(v[1]),
                remaining: v[2].clamp(0, u32::MAX as i64) as u32,
                limit: p.rate.burst,
                reset: micros(v[3]),
            };
            (decision, v[0].clamp(0, u32::MAX as i64) as u32)
        })
        .collect())
}

/// The local limiters and the refusal cache keep one entry per key seen: drop the
/// ones whose budget has refilled.
async fn forget_old_keys(inner: std::sync::Weak<Inner>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let Some(inner) = inner.upgrade() else { return };
        for limiter in inner.local.values() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        let now = inner.now_micros();
        inner
            .keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, k| k.asking || k.refused_until > now || k.banked_until > now);
    }
}
