//! One typed configuration, validated once at start.
//!
//! Sources, strongest first: command-line flags, environment variables, the optional
//! TOML file (`--config` / `MEDIAPLANE_CONFIG`, keys are the flag names with `_`), then
//! the defaults below. Every value is parsed here, before anything binds or connects,
//! and a bad one is reported with the flag, variable and file key that name it.
use std::{collections::BTreeMap, fmt, net::SocketAddr, path::PathBuf, time::Duration};

pub mod limits;
pub use limits::{ConnectionLimits, Limits, Quotas, Rate, RateLimits};

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/mediaplane";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 1024;
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_DB_POOL_SIZE: u32 = 16;
const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_CORS_MAX_AGE: Duration = Duration::from_secs(600);

/// Settings shared by `serve`, `migrate` and `token`. Every field is optional here so
/// the file and the defaults can fill what flags and environment leave out.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct SettingsArgs {
    /// TOML file with any of the settings below (keys: flag names with `_` for `-`).
    #[arg(long, env = "MEDIAPLANE_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Address serving gRPC (h2c), grpc-web and HTTP [default: 127.0.0.1:8080].
    #[arg(long, env = "MEDIAPLANE_ADDR")]
    pub addr: Option<String>,
    /// Address of the admin listener (`GET /metrics`), never the public port; `off`:
    /// no listener and no call metrics [default: 127.0.0.1:9090].
    #[arg(long, env = "MEDIAPLANE_ADMIN_ADDR")]
    pub admin_addr: Option<String>,
    /// OTLP/gRPC endpoint spans are exported to, e.g. `http://otel-collector:4317`
    /// [default: none; trace context is still propagated].
    #[arg(long, env = "MEDIAPLANE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// How often queue figures (depth, oldest job) are read from Postgres for
    /// `/metrics` [default: 5s].
    #[arg(long, env = "MEDIAPLANE_QUEUE_FIGURES_INTERVAL")]
    pub queue_figures_interval: Option<String>,
    /// Postgres URL; the database is created if missing
    /// [default: postgres://postgres@127.0.0.1:5432/mediaplane].
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Database connections per instance [default: 16].
    #[arg(long, env = "MEDIAPLANE_DB_POOL_SIZE")]
    pub db_pool_size: Option<String>,
    /// Redis URL (job events to watchers, worker wake-ups) [default: redis://127.0.0.1:6379].
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key and channel [default: mediaplane].
    #[arg(long, env = "MEDIAPLANE_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// HS256 secret for bearer tokens (at least 32 bytes). Unset: `serve` generates one
    /// and prints a token for the user `local`.
    #[arg(long, env = "MEDIAPLANE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM file with an RSA (RS256) or Ed25519 (EdDSA) public key; tokens signed with
    /// it are accepted too.
    #[arg(long, env = "MEDIAPLANE_JWT_PUBLIC_KEY", value_name = "PATH")]
    pub jwt_public_key: Option<PathBuf>,
    /// Required `aud` of every token when set [default: not checked].
    #[arg(long, env = "MEDIAPLANE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Required `iss` of every token when set [default: not checked].
    #[arg(long, env = "MEDIAPLANE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Longest token lifetime accepted (`exp` - `iat`) [default: 30d].
    #[arg(long, env = "MEDIAPLANE_JWT_MAX_LIFETIME")]
    pub jwt_max_lifetime: Option<String>,
    /// Browser origins allowed by CORS, comma-separated (`*` for any) [default: none].
    #[arg(long, env = "MEDIAPLANE_CORS_ORIGINS")]
    pub cors_origins: Option<String>,
    /// How long browsers may cache a CORS preflight [default: 10m].
    #[arg(long, env = "MEDIAPLANE_CORS_MAX_AGE")]
    pub cors_max_age: Option<String>,
    /// `human` or `json` [default: human]. Filter with RUST_LOG.
    #[arg(long, env = "MEDIAPLANE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Largest gRPC message accepted or sent, in bytes [default: 4194304].
    #[arg(long, env = "MEDIAPLANE_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<String>,
    /// HTTP/2 streams one connection may have open at once [default: 1024].
    #[arg(long, env = "MEDIAPLANE_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<String>,
    /// Longest a unary call may take, unless the client's `grpc-timeout` is shorter [default: 30s].
    #[arg(long, env = "MEDIAPLANE_REQUEST_TIMEOUT")]
    pub request_timeout: Option<String>,
    /// On SIGTERM/SIGINT, how long in-flight calls get to finish [default: 10s].
    #[arg(long, env = "MEDIAPLANE_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<String>,
    /// How often Postgres and Redis are probed for health [default: 2s].
    #[arg(long, env = "MEDIAPLANE_HEALTH_INTERVAL")]
    pub health_interval: Option<String>,
    /// Idle AcquireJobs calls re-check the queue this often, in case a Redis wake-up
    /// was lost [default: 1s].
    #[arg(long, env = "MEDIAPLANE_POLL_INTERVAL")]
    pub poll_interval: Option<String>,
    /// How often each instance looks for expired leases [default: 1s].
    #[arg(long, env = "MEDIAPLANE_REAP_INTERVAL")]
    pub reap_interval: Option<String>,
    /// First retry delay; doubles per attempt, with jitter [default: 1s].
    #[arg(long, env = "MEDIAPLANE_RETRY_BASE")]
    pub retry_base: Option<String>,
    /// Longest retry delay [default: 5m].
    #[arg(long, env = "MEDIAPLANE_RETRY_MAX")]
    pub retry_max: Option<String>,
    /// Watch streams re-read Postgres this often even when Redis is quiet [default: 30s].
    #[arg(long, env = "MEDIAPLANE_WATCH_RESYNC")]
    pub watch_resync: Option<String>,
    /// Finished jobs (and their events) are deleted after this long [default: 7d].
    #[arg(long, env = "MEDIAPLANE_JOB_RETENTION")]
    pub job_retention: Option<String>,
    /// Job events kept for resuming watches [default: 24h].
    #[arg(long, env = "MEDIAPLANE_EVENT_RETENTION")]
    pub event_retention: Option<String>,
    /// Where asset bytes go: `file:///dir` or `s3://bucket[/prefix]` [default: file://./data/assets].
    #[arg(long, env = "MEDIAPLANE_STORAGE_URL")]
    pub storage_url: Option<String>,
    /// S3 endpoint for S3-compatible services (MinIO, Ceph, R2...) [default: AWS].
    #[arg(long, env = "MEDIAPLANE_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region [default: us-east-1].
    #[arg(long, env = "MEDIAPLANE_S3_REGION")]
    pub s3_region: Option<String>,
    /// S3 access key id.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    pub s3_access_key_id: Option<String>,
    /// S3 secret access key.
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub s3_secret_access_key: Option<String>,
    /// Largest asset, in bytes [default: 5368709120 (5 GiB)].
    #[arg(long, env = "MEDIAPLANE_MAX_ASSET_BYTES")]
    pub max_asset_bytes: Option<String>,
    /// Bytes of READY assets one project may hold [default: 107374182400 (100 GiB)].
    #[arg(long, env = "MEDIAPLANE_PROJECT_QUOTA_BYTES")]
    pub project_quota_bytes: Option<String>,
    /// Longest lifetime of a signed URL [default: 24h].
    #[arg(long, env = "MEDIAPLANE_SIGNED_URL_MAX_TTL")]
    pub signed_url_max_ttl: Option<String>,
    /// Base URL clients reach this service at, for signed URLs [default: http://ADDR].
    #[arg(long, env = "MEDIAPLANE_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Key for signed URLs (at least 32 bytes) [default: derived from the JWT secret].
    #[arg(long, env = "MEDIAPLANE_URL_SIGNING_KEY", hide_env_values = true)]
    pub url_signing_key: Option<String>,
    #[command(flatten)]
    pub limits: limits::LimitArgs,
}

/// A string that never shows up in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone)]
pub struct JwtSettings {
    pub secret: Option<Secret>,
    pub public_key_pem: Option<Vec<u8>>,
    pub audience: Option<String>,
    pub issuer: Option<String>,
    pub max_lifetime: Duration,
}

pub const DEFAULT_JWT_MAX_LIFETIME: Duration = Duration::from_secs(30 * 86400);

impl Default for JwtSettings {
    fn default() -> Self {
        Self {
            secret: None,
            public_key_pem: None,
            audience: None,
            issuer: None,
            max_lifetime: DEFAULT_JWT_MAX_LIFETIME,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub addr: SocketAddr,
    /// `None`: metrics off.
    pub admin_addr: Option<SocketAddr>,
    pub otlp_endpoint: Option<String>,
    pub queue_figures_interval: Duration,
    pub database_url: Secret,
    pub db_pool_size: u32,
    pub redis_url: Secret,
    pub redis_prefix: String,
    pub jwt: JwtSettings,
    pub cors_origins: CorsOrigins,
    pub cors_max_age: Duration,
    pub log_format: LogFormat,
    pub max_message_bytes: usize,
    pub max_concurrent_streams: u32,
    pub request_timeout: Duration,
    pub drain_timeout: Duration,
    pub health_interval: Duration,
    pub poll_interval: Duration,
    pub reap_interval: Duration,
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub watch_resync: Duration,
    pub job_retention: Duration,
    pub event_retention: Duration,
    pub storage: StorageSettings,
    pub max_asset_bytes: i64,
    pub project_quota_bytes: i64,
    pub signed_url_max_ttl: Duration,
    /// `None`: `http://{addr}` as bound.
    pub public_url: Option<String>,
    pub url_signing_key: Option<Secret>,
    pub limits: Limits,
}

/// Where asset bytes are kept ([`crate::storage`] opens it).
#[derive(Debug, Clone)]
pub struct StorageSettings {
    /// `file:///abs/dir`, `file://./relative` or `s3://bucket[/prefix]`.
    pub url: String,
    pub s3_endpoint: Option<String>,
    pub s3_region: String,
    pub s3_access_key_id: Option<String>,
    pub s3_secret_access_key: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    None,
    Any,
    List(Vec<String>),
}

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

/// Where a setting can be given, for error messages: read off the clap definition,
/// so every flag is a file key too and no second list can fall behind.
struct Key {
    name: String,
    env: String,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (--{}, `{}` in the config file)",
            self.env,
            self.name.replace('_', "-"),
            self.name
        )
    }
}

/// Every setting's file key (the flag's name with `_`), except `config` itself.
fn keys() -> Vec<Key> {
    let command = <SettingsArgs as clap::Args>::augment_args(clap::Command::new("settings"));
    command
        .get_arguments()
        .filter(|a| a.get_id() != "config")
        .map(|a| Key {
            name: a.get_id().to_string(),
            env: a
                .get_env()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_default(),
        })
        .collect()
}

fn key(name: &str) -> Key {
    keys()
        .into_iter()
        .find(|k| k.name == name)
        .unwrap_or_else(|| Key {
            name: name.to_owned(),
            env: String::new(),
        })
}

impl Settings {
    /// Defaults only: what tests start from before changing fields.
    pub fn defaults() -> Self {
        Self::from_sources(&SettingsArgs::default(), &BTreeMap::new())
            .unwrap_or_else(|e| unreachable!("defaults are valid: {e}"))
    }

    /// Reads the config file named by `args` (if any) and resolves every setting.
    pub fn load(args: &SettingsArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => BTreeMap::new(),
        };
        Self::from_sources(args, &file)
    }

    fn from_sources(
        args: &SettingsArgs,
        file: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let get = |name: &str, arg: &Option<String>| -> Option<String> {
            arg.clone().or_else(|| file.get(name).cloned())
        };
        let path_arg = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());

        let addr = parse_opt("addr", get("addr", &args.addr), |s| {
            s.parse::<SocketAddr>()
                .map_err(|_| "expected host:port with an IP address, like 127.0.0.1:8080".into())
        })?
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
        let admin_addr = parse_opt("admin_addr", get("admin_addr", &args.admin_addr), |s| {
            if s.eq_ignore_ascii_case("off") {
                return Ok(None);
            }
            s.parse::<SocketAddr>().map(Some).map_err(|_| {
                "expected `off` or host:port with an IP address, like 127.0.0.1:9090".into()
            })
        })?
        .unwrap_or_else(|| Some(SocketAddr::from(([127, 0, 0, 1], 9090))));
        let otlp_endpoint = parse_opt(
            "otlp_endpoint",
            get("otlp_endpoint", &args.otlp_endpoint),
            |s| check_url(s, &["http", "https"]).map(|_| s.to_owned()),
        )?;
        let database_url = parse_opt(
            "database_url",
            get("database_url", &args.database_url),
            |s| check_url(s, &["postgres", "postgresql"]).map(|_| Secret::new(s)),
        )?
        .unwrap_or_else(|| Secret::new(DEFAULT_DATABASE_URL));
        let redis_url = parse_opt("redis_url", get("redis_url", &args.redis_url), |s| {
            check_url(s, &["redis", "rediss"]).map(|_| Secret::new(s))
        })?
        .unwrap_or_else(|| Secret::new(DEFAULT_REDIS_URL));
        let redis_prefix = parse_opt(
            "redis_prefix",
            get("redis_prefix", &args.redis_prefix),
            |s| {
                if !s.is_empty() && s.len() <= 64 && !s.contains(char::is_whitespace) {
                    Ok(s.to_owned())
                } else {
                    Err("expected 1 to 64 characters without spaces".into())
                }
            },
        )?
        .unwrap_or_else(|| "mediaplane".to_owned());
        let db_pool_size = parse_opt(
            "db_pool_size",
            get("db_pool_size", &args.db_pool_size),
            |s| parse_range(s, 1, 1000),
        )?
        .map_or(DEFAULT_DB_POOL_SIZE, |v| v as u32);

        let secret = match get("jwt_secret", &args.jwt_secret) {
            None => None,
            Some(s) if s.len() >= 32 => Some(Secret::new(s)),
            Some(_) => {
                return Err(ConfigError(format!(
                    "{} is too short: use at least 32 random bytes (e.g. `openssl rand -hex 32`)",
                    key("jwt_secret")
                )));
            }
        };
        let public_key_pem = match get("jwt_public_key", &path_arg(&args.jwt_public_key)) {
            None => None,
            Some(path) => Some(std::fs::read(&path).map_err(|e| {
                ConfigError(format!(
                    "{}: cannot read {path}: {e}",
                    key("jwt_public_key")
                ))
            })?),
        };

        let cors_origins = match get("cors_origins", &args.cors_origins) {
            None => CorsOrigins::None,
            Some(s) if s.trim() == "*" => CorsOrigins::Any,
            Some(s) => {
                let mut list = Vec::new();
                for origin in s.split(',').map(str::trim).filter(|o| !o.is_empty()) {
                    check_origin(origin).map_err(|why| {
                        ConfigError(format!("invalid {}: {origin:?} {why}", key("cors_origins")))
                    })?;
                    list.push(origin.to_owned());
                }
                if list.is_empty() {
                    CorsOrigins::None
                } else {
                    CorsOrigins::List(list)
                }
            }
        };

        let log_format = parse_opt(
            "log_format",
            get("log_format", &args.log_format),
            |s| match s.to_ascii_lowercase().as_str() {
                "human" | "text" | "pretty" => Ok(LogFormat::Human),
                "json" => Ok(LogFormat::Json),
                _ => Err("expected `human` or `json`".into()),
            },
        )?
        .unwrap_or(LogFormat::Human);
        let max_message_bytes = parse_opt(
            "max_message_bytes",
            get("max_message_bytes", &args.max_message_bytes),
            |s| parse_range(s, 1024, 256 * 1024 * 1024),
        )?
        .map_or(DEFAULT_MAX_MESSAGE_BYTES, |v| v as usize);
        let max_concurrent_streams = parse_opt(
            "max_concurrent_streams",
            get("max_concurrent_streams", &args.max_concurrent_streams),
            |s| parse_range(s, 1, 100_000),
        )?
        .map_or(DEFAULT_MAX_CONCURRENT_STREAMS, |v| v as u32);

        let duration = |name: &str,
                        arg: &Option<String>,
                        default: Duration|
         -> Result<Duration, ConfigError> {
            Ok(parse_opt(name, get(name, arg), parse_duration)?.unwrap_or(default))
        };

        Ok(Settings {
            addr,
            admin_addr,
            otlp_endpoint,
            queue_figures_interval: duration(
                "queue_figures_interval",
                &args.queue_figures_interval,
                Duration::from_secs(5),
            )?,
            database_url,
            db_pool_size,
            redis_url,
            redis_prefix,
            jwt: JwtSettings {
                secret,
                public_key_pem,
                audience: parse_opt(
                    "jwt_audience",
                    get("jwt_audience", &args.jwt_audience),
                    non_empty,
                )?,
                issuer: parse_opt("jwt_issuer", get("jwt_issuer", &args.jwt_issuer), non_empty)?,
                max_lifetime: duration(
                    "jwt_max_lifetime",
                    &args.jwt_max_lifetime,
                    DEFAULT_JWT_MAX_LIFETIME,
                )?,
            },
            cors_origins,
            cors_max_age: duration("cors_max_age", &args.cors_max_age, DEFAULT_CORS_MAX_AGE)?,
            log_format,
            max_message_bytes,
            max_concurrent_streams,
            request_timeout: duration(
                "request_timeout",
                &args.request_timeout,
                DEFAULT_REQUEST_TIMEOUT,
            )?,
            drain_timeout: duration("drain_timeout", &args.drain_timeout, DEFAULT_DRAIN_TIMEOUT)?,
            health_interval: duration(
                "health_interval",
                &args.health_interval,
                DEFAULT_HEALTH_INTERVAL,
            )?,
            poll_interval: duration("poll_interval", &args.poll_interval, Duration::from_secs(1))?,
            reap_interval: duration("reap_interval", &args.reap_interval, Duration::from_secs(1))?,
            retry_base: duration("retry_base", &args.retry_base, Duration::from_secs(1))?,
            retry_max: duration("retry_max", &args.retry_max, Duration::from_secs(300))?,
            watch_resync: duration("watch_resync", &args.watch_resync, Duration::from_secs(30))?,
            job_retention: duration(
                "job_retention",
                &args.job_retention,
                Duration::from_secs(7 * 86400),
            )?,
            event_retention: duration(
                "event_retention",
                &args.event_retention,
                Duration::from_secs(86400),
            )?,
            storage: StorageSettings {
                url: parse_opt("storage_url", get("storage_url", &args.storage_url), |s| {
                    if s.starts_with("file://") || s.starts_with("s3://") {
                        Ok(s.to_owned())
                    } else {
                        Err("expected file:///dir or s3://bucket[/prefix]".into())
                    }
                })?
                .unwrap_or_else(|| "file://./data/assets".to_owned()),
                s3_endpoint: parse_opt(
                    "s3_endpoint",
                    get("s3_endpoint", &args.s3_endpoint),
                    |s| {
                        check_url(s, &["http", "https"]).map(|_| s.trim_end_matches('/').to_owned())
                    },
                )?,
                s3_region: get("s3_region", &args.s3_region)
                    .unwrap_or_else(|| "us-east-1".to_owned()),
                s3_access_key_id: get("s3_access_key_id", &args.s3_access_key_id),
                s3_secret_access_key: get("s3_secret_access_key", &args.s3_secret_access_key)
                    .map(Secret::new),
            },
            max_asset_bytes: parse_opt(
                "max_asset_bytes",
                get("max_asset_bytes", &args.max_asset_bytes),
                |s| parse_range(s, 1, 5 * 1024 * 1024 * 1024 * 1024),
            )?
            .map_or(5 * 1024 * 1024 * 1024, |v| v as i64),
            project_quota_bytes: parse_opt(
                "project_quota_bytes",
                get("project_quota_bytes", &args.project_quota_bytes),
                |s| parse_range(s, 1, u64::MAX / 2),
            )?
            .map_or(100 * 1024 * 1024 * 1024, |v| v as i64),
            signed_url_max_ttl: duration(
                "signed_url_max_ttl",
                &args.signed_url_max_ttl,
                Duration::from_secs(86400),
            )?,
            public_url: parse_opt("public_url", get("public_url", &args.public_url), |s| {
                check_url(s, &["http", "https"]).map(|_| s.trim_end_matches('/').to_owned())
            })?,
            limits: limits::parse(&args.limits, &|name, arg| get(name, arg))?,
            url_signing_key: match get("url_signing_key", &args.url_signing_key) {
                None => None,
                Some(k) if k.len() >= 32 => Some(Secret::new(k)),
                Some(_) => {
                    return Err(ConfigError(format!(
                        "{} is too short: use at least 32 random bytes",
                        key("url_signing_key")
                    )));
                }
            },
        })
    }
}

/// Parses a setting that was given; `None` when it was not (the caller's default applies).
pub(crate) fn parse_opt<T>(
    name: &str,
    value: Option<String>,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, ConfigError> {
    value
        .map(|v| {
            parse(v.trim()).map_err(|why| {
                // URLs and secrets may carry passwords: never echo them.
                let shown =
                    if name.contains("url") || name.contains("secret") || name.contains("key") {
                        "<hidden>".into()
                    } else {
                        format!("{v:?}")
                    };
                ConfigError(format!("invalid {}: {shown}: {why}", key(name)))
            })
        })
        .transpose()
}

fn non_empty(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s.to_owned())
    }
}

pub(crate) fn parse_range(s: &str, min: u64, max: u64) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        _ => Err(format!("expected a whole number from {min} to {max}")),
    }
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be longer than zero".into()),
        Err(_) => Err("expected a duration like 500ms, 30s or 5m".into()),
    }
}

fn check_url(s: &str, schemes: &[&str]) -> Result<(), String> {
    match s.split_once("://") {
        Some((scheme, rest)) if schemes.contains(&scheme) && !rest.is_empty() => Ok(()),
        _ => Err(format!("expected a URL starting with {}://", schemes[0])),
    }
}

fn check_origin(origin: &str) -> Result<(), &'static str> {
    let rest = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .ok_or("must start with http:// or https://")?;
    if rest.is_empty() || rest.contains('/') {
        return Err("must be scheme://host[:port] with no path");
    }
    http::HeaderValue::from_str(origin)
        .map_err(|_| "contains characters not allowed in a header")?;
    Ok(())
}

/// Reads the TOML file into key -> string, rejecting keys we do not know.
fn read_file(path: &PathBuf) -> Result<BTreeMap<String, String>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
    let table: toml::Table = text.parse().map_err(|e| {
        ConfigError(format!(
            "config file {} is not valid TOML: {e}",
            path.display()
        ))
    })?;
    let mut out = BTreeMap::new();
    for (name, value) in table {
        let keys = keys();
        if !keys.iter().any(|k| k.name == name) {
            let known: Vec<_> = keys.iter().map(|k| k.name.as_str()).collect();
            return Err(ConfigError(format!(
                "unknown key `{name}` in {}; known keys: {}",
                path.display(),
                known.join(", ")
            )));
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string())
                })
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        out.insert(name, text);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Operators read the settings in docs/configuration.md: one accepted here and
    /// missing there is a setting nobody can find.
    #[test]
    fn every_setting_is_in_the_configuration_document() {
        let doc = include_str!("../../docs/configuration.md");
        let mut missing = Vec::new();
        let command = <SettingsArgs as clap::Args>::augment_args(clap::Command::new("s"));
        for arg in command.get_arguments() {
            let flag = format!("`--{}`", arg.get_long().unwrap_or_default());
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            let env = format!("`{}`", env.unwrap_or_default());
            let row = doc
                .lines()
                .any(|l| l.starts_with('|') && l.contains(&flag) && l.contains(&env));
            if !row {
                missing.push(format!("{env} {flag}"));
            }
        }
        assert!(
            missing.is_empty(),
            "not in docs/configuration.md: {missing:?}"
        );
    }

    #[test]
    fn defaults_are_valid() {
        let s = Settings::defaults();
        assert_eq!(s.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(s.database_url.expose(), DEFAULT_DATABASE_URL);
        assert_eq!(s.cors_origins, CorsOrigins::None);
    }

    #[test]
    fn file_values_fill_what_flags_leave_out() {
        let dir = std::env::temp_dir().join(format!("mediaplane-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mediaplane.toml");
        std::fs::write(
            &path,
            "addr = \"0.0.0.0:9000\"\nmax_message_bytes = 65536\ncors_origins = [\"https://a.example\", \"http://localhost:3000\"]\nrequest_timeout = \"5s\"\n",
        )
        .unwrap();
        let args = SettingsArgs {
            config: Some(path.clone()),
            request_timeout: Some("7s".into()),
            ..Default::default()
        };
        let s = Settings::load(&args).unwrap();
        assert_eq!(s.addr.to_string(), "0.0.0.0:9000");
        assert_eq!(s.max_message_bytes, 65536);
        assert_eq!(
            s.request_timeout,
            Duration::from_secs(7),
            "flags and env win over the file"
        );
        assert_eq!(
            s.cors_origins,
            CorsOrigins::List(vec![
                "https://a.example".into(),
                "http://localhost:3000".into()
            ])
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_values_name_their_key() {
        let args = SettingsArgs {
            addr: Some("nope".into()),
            ..Default::default()
        };
        let err = Settings::load(&args).unwrap_err().to_string();
        assert!(
            err.contains("MEDIAPLANE_ADDR") && err.contains("--addr"),
            "{err}"
        );

        let args = SettingsArgs {
            request_timeout: Some("soon".into()),
            ..Default::default()
        };
        let err = Settings::load(&args).unwrap_err().to_string();
        assert!(
            err.contains("MEDIAPLANE_REQUEST_TIMEOUT") && err.contains("30s"),
            "{err}"
        );

        let args = SettingsArgs {
            database_url: Some("mysql://x".into()),
            ..Default::default()
        };
        let err = Settings::load(&args).unwrap_err().to_string();
        assert!(
            err.contains("DATABASE_URL") && !err.contains("mysql"),
            "{err}"
        );

        let args = SettingsArgs {
            jwt_secret: Some("short".into()),
            ..Default::default()
        };
        let err = Settings::load(&args).unwrap_err().to_string();
        assert!(
            err.contains("MEDIAPLANE_JWT_SECRET") && !err.contains("short\""),
            "{err}"
        );
    }
}
