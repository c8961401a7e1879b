//! Settings of the limits against abuse (docs/limits.md): request rates per principal
//! and class of call, connection caps and deadlines, and quotas per owner. Parsed here
//! once; `crate::guard` enforces the rates and caps, the domain the quotas.
use std::time::Duration;

use super::{number, parse_duration};

#[derive(clap::Args, Debug, Clone)]
pub struct LimitArgs {
    /// Request rate limits, `on` or `off`.
    #[arg(long, env = "MEDIAPLANE_RATE_LIMITS", default_value = "on", value_parser = on_off)]
    pub rate_limits: bool,
    /// Reads (Get, List, signed URLs) per principal, as RATE/UNIT[:BURST].
    #[arg(long, env = "MEDIAPLANE_LIMIT_READS", default_value = "200/s:400", value_parser = parse_rate)]
    pub limit_reads: Rate,
    /// Writes (Create, Update, Delete, Cancel, Retry) per principal.
    #[arg(long, env = "MEDIAPLANE_LIMIT_WRITES", default_value = "100/s:200", value_parser = parse_rate)]
    pub limit_writes: Rate,
    /// Worker calls (Acquire, Report, Complete, Fail) per worker-role principal.
    #[arg(long, env = "MEDIAPLANE_LIMIT_WORKER", default_value = "2000/s:4000", value_parser = parse_rate)]
    pub limit_worker: Rate,
    /// Streams opened (watches, uploads, downloads) per principal.
    #[arg(long, env = "MEDIAPLANE_LIMIT_STREAMS", default_value = "20/s:100", value_parser = parse_rate)]
    pub limit_streams: Rate,
    /// Calls without a valid token, per client IP.
    #[arg(long, env = "MEDIAPLANE_LIMIT_ANONYMOUS", default_value = "20/s:40", value_parser = parse_rate)]
    pub limit_anonymous: Rate,
    /// Instances sharing the limits: while Redis is unreachable each one allows this
    /// share of every budget on its own.
    #[arg(long, env = "MEDIAPLANE_LIMIT_INSTANCES", default_value = "1", value_parser = number::<u32>(1, 10_000))]
    pub limit_instances: u32,
    /// Open connections per instance; capped further by the file-descriptor limit.
    #[arg(long, env = "MEDIAPLANE_MAX_CONNECTIONS", default_value = "10000", value_parser = number::<usize>(1, 10_000_000))]
    pub max_connections: usize,
    /// Open connections per client IP.
    #[arg(long, env = "MEDIAPLANE_MAX_CONNECTIONS_PER_IP", default_value = "1000", value_parser = number::<usize>(1, 10_000_000))]
    pub max_connections_per_ip: usize,
    /// A new connection must send its first bytes within this.
    #[arg(long, env = "MEDIAPLANE_FIRST_BYTE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub first_byte_timeout: Duration,
    /// A new connection must complete its HTTP/2 handshake or send its first request
    /// within this.
    #[arg(long, env = "MEDIAPLANE_HANDSHAKE_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// A connection with no call open is closed after this.
    #[arg(long, env = "MEDIAPLANE_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Watch streams one principal may hold open on one instance.
    #[arg(long, env = "MEDIAPLANE_MAX_WATCH_STREAMS", default_value = "100", value_parser = number::<u32>(1, 1_000_000))]
    pub max_watch_streams: u32,
    /// Uploads one principal may have in progress on one instance.
    #[arg(long, env = "MEDIAPLANE_MAX_UPLOADS", default_value = "8", value_parser = number::<u32>(1, 1_000_000))]
    pub max_uploads: u32,
    /// WorkerSession streams one principal may hold open on one instance (a fleet often
    /// shares one worker token, hence more than watches).
    #[arg(long, env = "MEDIAPLANE_MAX_WORKER_SESSIONS", default_value = "1000", value_parser = number::<u32>(1, 1_000_000))]
    pub max_worker_sessions: u32,
    /// Projects one owner may have.
    #[arg(long, env = "MEDIAPLANE_QUOTA_PROJECTS", default_value = "1000", value_parser = number::<i64>(1, i64::MAX as u64))]
    pub quota_projects: i64,
    /// Jobs not yet finished (waiting, queued, running) one owner may have.
    #[arg(long, env = "MEDIAPLANE_QUOTA_ACTIVE_JOBS", default_value = "1000000", value_parser = number::<i64>(1, i64::MAX as u64))]
    pub quota_active_jobs: i64,
    /// Asset bytes one owner may hold, uploads in progress included (default: 1 TiB).
    #[arg(long, env = "MEDIAPLANE_QUOTA_STORAGE_BYTES", default_value = "1099511627776", value_parser = number::<i64>(1, i64::MAX as u64))]
    pub quota_storage_bytes: i64,
}

/// A budget: `burst` calls at once, refilled at one call per `interval` (GCRA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub interval: Duration,
    pub burst: u32,
}

impl Rate {
    pub const fn per_second(n: u32, burst: u32) -> Self {
        Self {
            interval: Duration::from_nanos(1_000_000_000 / n as u64),
            burst,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    pub reads: Rate,
    pub writes: Rate,
    pub worker: Rate,
    pub streams: Rate,
    pub anonymous: Rate,
    /// While Redis is unreachable each instance allows `1 / instances` of each budget.
    pub instances: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub first_byte_timeout: Duration,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_watch_streams: u32,
    pub max_uploads: u32,
    pub max_worker_sessions: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    pub projects: i64,
    pub active_jobs: i64,
    pub storage_bytes: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `None`: rate limits are off.
    pub rates: Option<RateLimits>,
    pub connections: ConnectionLimits,
    pub quotas: Quotas,
}

/// The defaults, as the flags' `default_value`s give them.
impl Default for Limits {
    fn default() -> Self {
        Self::from(&super::defaults_of::<LimitArgs>())
    }
}

/// The default budgets (whether rate limits are on by default or not).
impl Default for RateLimits {
    fn default() -> Self {
        Self::from(&super::defaults_of::<LimitArgs>())
    }
}

impl From<&LimitArgs> for RateLimits {
    fn from(a: &LimitArgs) -> Self {
        Self {
            reads: a.limit_reads,
            writes: a.limit_writes,
            worker: a.limit_worker,
            streams: a.limit_streams,
            anonymous: a.limit_anonymous,
            instances: a.limit_instances,
        }
    }
}

impl From<&LimitArgs> for Limits {
    fn from(a: &LimitArgs) -> Self {
        Self {
            rates: a.rate_limits.then(|| RateLimits::from(a)),
            connections: ConnectionLimits {
                max_connections: a.max_connections,
                max_connections_per_ip: a.max_connections_per_ip,
                first_byte_timeout: a.first_byte_timeout,
                handshake_timeout: a.handshake_timeout,
                idle_timeout: a.idle_timeout,
                max_watch_streams: a.max_watch_streams,
                max_uploads: a.max_uploads,
                max_worker_sessions: a.max_worker_sessions,
            },
            quotas: Quotas {
                projects: a.quota_projects,
                active_jobs: a.quota_active_jobs,
                storage_bytes: a.quota_storage_bytes,
            },
        }
    }
}

fn on_off(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err("expected `on` or `off`".into()),
    }
}

/// `RATE/UNIT[:BURST]`, e.g. `200/s`, `600/m:50`; the burst defaults to the rate.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    const USAGE: &str = "expected RATE/UNIT[:BURST] with UNIT s, m or h, like 200/s or 600/m:50";
    let (rate, burst) = match s.split_once(':') {
        Some((r, b)) => (r, Some(b)),
        None => (s, None),
    };
    let (count, unit) = rate.split_once('/').ok_or(USAGE)?;
    let count: u32 = count.trim().parse().map_err(|_| USAGE)?;
    let unit = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(USAGE.into()),
    };
    if count == 0 || count > 1_000_000 {
        return Err("the rate must be from 1 to 1000000 per unit".into());
    }
    let burst = match burst {
        Some(b) => b.trim().parse::<u32>().map_err(|_| USAGE)?,
        None => count,
    };
    if burst == 0 || burst > 1_000_000 {
        return Err("the burst must be from 1 to 1000000".into());
    }
    Ok(Rate {
        interval: unit / count,
        burst,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_and_without_burst() {
        assert_eq!(parse_rate("200/s:400").unwrap(), Rate::per_second(200, 400));
        assert_eq!(
            parse_rate("60/m").unwrap(),
            Rate {
                interval: Duration::from_secs(1),
                burst: 60
            }
        );
        for bad in ["", "10", "0/s", "10/d", "10/s:0", "x/s", "10/s:y"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }
}
