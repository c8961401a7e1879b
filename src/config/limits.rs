//! Settings of the limits against abuse (docs/limits.md): request rates per principal
//! and class of call, connection caps and deadlines, and quotas per owner. Parsed here
//! once; `crate::guard` enforces the rates and caps, the domain the quotas.
use std::time::Duration;

use super::{ConfigError, parse_duration, parse_opt, parse_range};

#[derive(clap::Args, Debug, Default, Clone)]
pub struct LimitArgs {
    /// Request rate limits, `on` or `off` [default: on].
    #[arg(long, env = "MEDIAPLANE_RATE_LIMITS")]
    pub rate_limits: Option<String>,
    /// Reads (Get, List, signed URLs) per principal, as RATE/UNIT[:BURST] [default: 200/s:400].
    #[arg(long, env = "MEDIAPLANE_LIMIT_READS")]
    pub limit_reads: Option<String>,
    /// Writes (Create, Update, Delete, Cancel, Retry) per principal [default: 100/s:200].
    #[arg(long, env = "MEDIAPLANE_LIMIT_WRITES")]
    pub limit_writes: Option<String>,
    /// Worker calls (Acquire, Report, Complete, Fail) per worker-role principal [default: 2000/s:4000].
    #[arg(long, env = "MEDIAPLANE_LIMIT_WORKER")]
    pub limit_worker: Option<String>,
    /// Streams opened (watches, uploads, downloads) per principal [default: 20/s:100].
    #[arg(long, env = "MEDIAPLANE_LIMIT_STREAMS")]
    pub limit_streams: Option<String>,
    /// Calls without a valid token, per client IP [default: 20/s:40].
    #[arg(long, env = "MEDIAPLANE_LIMIT_ANONYMOUS")]
    pub limit_anonymous: Option<String>,
    /// Instances sharing the limits: while Redis is unreachable each one allows this
    /// share of every budget on its own [default: 1].
    #[arg(long, env = "MEDIAPLANE_LIMIT_INSTANCES")]
    pub limit_instances: Option<String>,
    /// Open connections per instance; capped further by the file-descriptor limit [default: 10000].
    #[arg(long, env = "MEDIAPLANE_MAX_CONNECTIONS")]
    pub max_connections: Option<String>,
    /// Open connections per client IP [default: 1000].
    #[arg(long, env = "MEDIAPLANE_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<String>,
    /// A new connection must send its first bytes within this [default: 10s].
    #[arg(long, env = "MEDIAPLANE_FIRST_BYTE_TIMEOUT")]
    pub first_byte_timeout: Option<String>,
    /// A new connection must complete its HTTP/2 handshake or send its first request
    /// within this [default: 20s].
    #[arg(long, env = "MEDIAPLANE_HANDSHAKE_TIMEOUT")]
    pub handshake_timeout: Option<String>,
    /// A connection with no call open is closed after this [default: 5m].
    #[arg(long, env = "MEDIAPLANE_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// Watch streams one principal may hold open on one instance [default: 100].
    #[arg(long, env = "MEDIAPLANE_MAX_WATCH_STREAMS")]
    pub max_watch_streams: Option<String>,
    /// Uploads one principal may have in progress on one instance [default: 8].
    #[arg(long, env = "MEDIAPLANE_MAX_UPLOADS")]
    pub max_uploads: Option<String>,
    /// Projects one owner may have [default: 1000].
    #[arg(long, env = "MEDIAPLANE_QUOTA_PROJECTS")]
    pub quota_projects: Option<String>,
    /// Jobs not yet finished (waiting, queued, running) one owner may have [default: 1000000].
    #[arg(long, env = "MEDIAPLANE_QUOTA_ACTIVE_JOBS")]
    pub quota_active_jobs: Option<String>,
    /// Asset bytes one owner may hold, uploads in progress included [default: 1099511627776 (1 TiB)].
    #[arg(long, env = "MEDIAPLANE_QUOTA_STORAGE_BYTES")]
    pub quota_storage_bytes: Option<String>,
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

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            reads: Rate::per_second(200, 400),
            writes: Rate::per_second(100, 200),
            worker: Rate::per_second(2000, 4000),
            streams: Rate::per_second(20, 100),
            anonymous: Rate::per_second(20, 40),
            instances: 1,
        }
    }
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
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_connections_per_ip: 1_000,
            first_byte_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(300),
            max_watch_streams: 100,
            max_uploads: 8,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    pub projects: i64,
    pub active_jobs: i64,
    pub storage_bytes: i64,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            projects: 1_000,
            active_jobs: 1_000_000,
            storage_bytes: 1 << 40,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// `None`: rate limits are off.
    pub rates: Option<RateLimits>,
    pub connections: ConnectionLimits,
    pub quotas: Quotas,
}

type Get<'a> = dyn Fn(&str, &Option<String>) -> Option<String> + 'a;

pub(super) fn parse(args: &LimitArgs, get: &Get<'_>) -> Result<Limits, ConfigError> {
    let rate = |name: &str, arg: &Option<String>, default: Rate| {
        Ok::<_, ConfigError>(parse_opt(name, get(name, arg), parse_rate)?.unwrap_or(default))
    };
    let number = |name: &str, arg: &Option<String>, min: u64, max: u64, default: u64| {
        Ok::<_, ConfigError>(
            parse_opt(name, get(name, arg), |s| parse_range(s, min, max))?.unwrap_or(default),
        )
    };
    let duration = |name: &str, arg: &Option<String>, default: Duration| {
        Ok::<_, ConfigError>(parse_opt(name, get(name, arg), parse_duration)?.unwrap_or(default))
    };
    let on = parse_opt(
        "rate_limits",
        get("rate_limits", &args.rate_limits),
        |s| match s.to_ascii_lowercase().as_str() {
            "on" | "true" | "1" => Ok(true),
            "off" | "false" | "0" => Ok(false),
            _ => Err("expected `on` or `off`".into()),
        },
    )?
    .unwrap_or(true);
    let d = RateLimits::default();
    let rates = RateLimits {
        reads: rate("limit_reads", &args.limit_reads, d.reads)?,
        writes: rate("limit_writes", &args.limit_writes, d.writes)?,
        worker: rate("limit_worker", &args.limit_worker, d.worker)?,
        streams: rate("limit_streams", &args.limit_streams, d.streams)?,
        anonymous: rate("limit_anonymous", &args.limit_anonymous, d.anonymous)?,
        instances: number("limit_instances", &args.limit_instances, 1, 10_000, 1)? as u32,
    };
    let c = ConnectionLimits::default();
    let q = Quotas::default();
    Ok(Limits {
        rates: on.then_some(rates),
        connections: ConnectionLimits {
            max_connections: number(
                "max_connections",
                &args.max_connections,
                1,
                10_000_000,
                c.max_connections as u64,
            )? as usize,
            max_connections_per_ip: number(
                "max_connections_per_ip",
                &args.max_connections_per_ip,
                1,
                10_000_000,
                c.max_connections_per_ip as u64,
            )? as usize,
            first_byte_timeout: duration(
                "first_byte_timeout",
                &args.first_byte_timeout,
                c.first_byte_timeout,
            )?,
            handshake_timeout: duration(
                "handshake_timeout",
                &args.handshake_timeout,
                c.handshake_timeout,
            )?,
            idle_timeout: duration("idle_timeout", &args.idle_timeout, c.idle_timeout)?,
            max_watch_streams: number(
                "max_watch_streams",
                &args.max_watch_streams,
                1,
                1_000_000,
                c.max_watch_streams.into(),
            )? as u32,
            max_uploads: number(
                "max_uploads",
                &args.max_uploads,
                1,
                1_000_000,
                c.max_uploads.into(),
            )? as u32,
        },
        quotas: Quotas {
            projects: number(
                "quota_projects",
                &args.quota_projects,
                1,
                i64::MAX as u64,
                q.projects as u64,
            )? as i64,
            active_jobs: number(
                "quota_active_jobs",
                &args.quota_active_jobs,
                1,
                i64::MAX as u64,
                q.active_jobs as u64,
            )? as i64,
            storage_bytes: number(
                "quota_storage_bytes",
                &args.quota_storage_bytes,
                1,
                i64::MAX as u64,
                q.storage_bytes as u64,
            )? as i64,
        },
    })
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
