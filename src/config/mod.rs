//! One typed configuration, validated once at start.
//!
//! Sources, strongest first: command-line flags, environment variables, the optional
//! TOML file (`--config` / `MEDIAPLANE_CONFIG`, keys are the flag names with `_`), then
//! the defaults. Every setting is declared once, below, with its type, its parser and
//! its default (clap's `default_value`, shown by `--help`); the file's values become
//! the flags' defaults ([`with_file_defaults`]), so clap applies the precedence and
//! parses every source the same way. A bad value is reported with the flag, variable
//! and file key that name it, before anything binds or connects.
use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

pub mod limits;
mod sources;
mod values;

pub use limits::{ConnectionLimits, LimitArgs, Limits, Quotas, Rate, RateLimits};
use sources::key;
pub use sources::{
    ParseError, defaults_of, explain, parse_with_file, read_file, with_file_defaults,
};
pub use values::AdminAddr;
use values::*;

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/mediaplane";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Settings shared by `serve`, `migrate` and `token`.
#[derive(clap::Args, Debug, Clone)]
pub struct SettingsArgs {
    /// TOML file with any of the settings below (keys: flag names with `_` for `-`).
    #[arg(long, env = "MEDIAPLANE_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Address serving gRPC (h2c), grpc-web and HTTP.
    #[arg(long, env = "MEDIAPLANE_ADDR", default_value = "127.0.0.1:8080", value_parser = parse_addr)]
    pub addr: SocketAddr,
    /// Address of the admin listener (`GET /metrics`), never the public port; `off`:
    /// no listener and no call metrics.
    #[arg(long, env = "MEDIAPLANE_ADMIN_ADDR", default_value = "127.0.0.1:9090", value_parser = parse_admin_addr)]
    pub admin_addr: AdminAddr,
    /// OTLP/gRPC endpoint spans are exported to, e.g. `http://otel-collector:4317`
    /// (default: none; trace context is still propagated).
    #[arg(long, env = "MEDIAPLANE_OTLP_ENDPOINT", value_parser = url(&["http", "https"]))]
    pub otlp_endpoint: Option<String>,
    /// How often queue figures (depth, oldest job) are read from Postgres for `/metrics`.
    #[arg(long, env = "MEDIAPLANE_QUEUE_FIGURES_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub queue_figures_interval: Duration,
    /// Postgres URL; the database is created if missing.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, default_value = DEFAULT_DATABASE_URL, value_parser = secret_url(&["postgres", "postgresql"]))]
    pub database_url: Secret,
    /// Database connections per instance.
    #[arg(long, env = "MEDIAPLANE_DB_POOL_SIZE", default_value = "16", value_parser = number::<u32>(1, 1000))]
    pub db_pool_size: u32,
    /// Redis URL (job events to watchers, worker wake-ups).
    #[arg(long, env = "REDIS_URL", hide_env_values = true, default_value = DEFAULT_REDIS_URL, value_parser = secret_url(&["redis", "rediss"]))]
    pub redis_url: Secret,
    /// Prefix of every Redis key and channel.
    #[arg(long, env = "MEDIAPLANE_REDIS_PREFIX", default_value = "mediaplane", value_parser = parse_redis_prefix)]
    pub redis_prefix: String,
    /// HS256 secret for bearer tokens (at least 32 bytes). Unset: `serve` generates one
    /// and prints a token for the user `local`.
    #[arg(long, env = "MEDIAPLANE_JWT_SECRET", hide_env_values = true, value_parser = key_material)]
    pub jwt_secret: Option<Secret>,
    /// PEM file with an RSA (RS256) or Ed25519 (EdDSA) public key; tokens signed with
    /// it are accepted too.
    #[arg(long, env = "MEDIAPLANE_JWT_PUBLIC_KEY", value_name = "PATH")]
    pub jwt_public_key: Option<PathBuf>,
    /// Required `aud` of every token when set (default: not checked).
    #[arg(long, env = "MEDIAPLANE_JWT_AUDIENCE", value_parser = non_empty)]
    pub jwt_audience: Option<String>,
    /// Required `iss` of every token when set (default: not checked).
    #[arg(long, env = "MEDIAPLANE_JWT_ISSUER", value_parser = non_empty)]
    pub jwt_issuer: Option<String>,
    /// Longest token lifetime accepted (`exp` - `iat`).
    #[arg(long, env = "MEDIAPLANE_JWT_MAX_LIFETIME", default_value = "30d", value_parser = parse_duration)]
    pub jwt_max_lifetime: Duration,
    /// Browser origins allowed by CORS, comma-separated (`*` for any).
    #[arg(long, env = "MEDIAPLANE_CORS_ORIGINS", default_value = "", value_parser = parse_cors_origins)]
    pub cors_origins: CorsOrigins,
    /// How long browsers may cache a CORS preflight.
    #[arg(long, env = "MEDIAPLANE_CORS_MAX_AGE", default_value = "10m", value_parser = parse_duration)]
    pub cors_max_age: Duration,
    /// `human` or `json`. Filter with RUST_LOG.
    #[arg(long, env = "MEDIAPLANE_LOG_FORMAT", default_value = "human", value_parser = parse_log_format)]
    pub log_format: LogFormat,
    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "MEDIAPLANE_MAX_MESSAGE_BYTES", default_value = "4194304", value_parser = number::<usize>(1024, 256 * 1024 * 1024))]
    pub max_message_bytes: usize,
    /// HTTP/2 streams one connection may have open at once.
    #[arg(long, env = "MEDIAPLANE_MAX_CONCURRENT_STREAMS", default_value = "1024", value_parser = number::<u32>(1, 100_000))]
    pub max_concurrent_streams: u32,
    /// Longest a unary call may take, unless the client's `grpc-timeout` is shorter.
    #[arg(long, env = "MEDIAPLANE_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// On SIGTERM/SIGINT, how long in-flight calls get to finish.
    #[arg(long, env = "MEDIAPLANE_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// How often Postgres and Redis are probed for health.
    #[arg(long, env = "MEDIAPLANE_HEALTH_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub health_interval: Duration,
    /// Idle AcquireJobs calls re-check the queue this often, in case a Redis wake-up
    /// was lost.
    #[arg(long, env = "MEDIAPLANE_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// How often each instance looks for expired leases.
    #[arg(long, env = "MEDIAPLANE_REAP_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub reap_interval: Duration,
    /// First retry delay; doubles per attempt, with jitter.
    #[arg(long, env = "MEDIAPLANE_RETRY_BASE", default_value = "1s", value_parser = parse_duration)]
    pub retry_base: Duration,
    /// Longest retry delay.
    #[arg(long, env = "MEDIAPLANE_RETRY_MAX", default_value = "5m", value_parser = parse_duration)]
    pub retry_max: Duration,
    /// Watch streams re-read Postgres this often even when Redis is quiet.
    #[arg(long, env = "MEDIAPLANE_WATCH_RESYNC", default_value = "30s", value_parser = parse_duration)]
    pub watch_resync: Duration,
    /// Finished jobs (and their events) are deleted after this long.
    #[arg(long, env = "MEDIAPLANE_JOB_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub job_retention: Duration,
    /// Job events kept for resuming watches.
    #[arg(long, env = "MEDIAPLANE_EVENT_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub event_retention: Duration,
    /// Where asset bytes go: `file:///dir` or `s3://bucket[/prefix]`.
    #[arg(long, env = "MEDIAPLANE_STORAGE_URL", default_value = "file://./data/assets", value_parser = parse_storage_url)]
    pub storage_url: String,
    /// S3 endpoint for S3-compatible services (MinIO, Ceph, R2...) (default: AWS).
    #[arg(long, env = "MEDIAPLANE_S3_ENDPOINT", value_parser = base_url)]
    pub s3_endpoint: Option<String>,
    /// S3 region.
    #[arg(long, env = "MEDIAPLANE_S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,
    /// S3 access key id.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    pub s3_access_key_id: Option<String>,
    /// S3 secret access key.
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true, value_parser = |s: &str| Ok::<_, String>(Secret::new(s)))]
    pub s3_secret_access_key: Option<Secret>,
    /// Largest asset, in bytes (default: 5 GiB).
    #[arg(long, env = "MEDIAPLANE_MAX_ASSET_BYTES", default_value = "5368709120", value_parser = number::<i64>(1, 5 * 1024 * 1024 * 1024 * 1024))]
    pub max_asset_bytes: i64,
    /// Bytes of READY assets one project may hold (default: 100 GiB).
    #[arg(long, env = "MEDIAPLANE_PROJECT_QUOTA_BYTES", default_value = "107374182400", value_parser = number::<i64>(1, u64::MAX / 2))]
    pub project_quota_bytes: i64,
    /// Longest lifetime of a signed URL.
    #[arg(long, env = "MEDIAPLANE_SIGNED_URL_MAX_TTL", default_value = "24h", value_parser = parse_duration)]
    pub signed_url_max_ttl: Duration,
    /// How long after its URLs expire an unfinished direct upload is kept (a PUT started
    /// just before expiry may still be running); then its bytes go and its asset FAILS.
    #[arg(long, env = "MEDIAPLANE_DIRECT_UPLOAD_GRACE", default_value = "1h", value_parser = parse_duration)]
    pub direct_upload_grace: Duration,
    /// Base URL clients reach this service at, for signed URLs (default: http://ADDR).
    #[arg(long, env = "MEDIAPLANE_PUBLIC_URL", value_parser = base_url)]
    pub public_url: Option<String>,
    /// Key for signed URLs (at least 32 bytes) (default: derived from the JWT secret).
    #[arg(long, env = "MEDIAPLANE_URL_SIGNING_KEY", hide_env_values = true, value_parser = key_material)]
    pub url_signing_key: Option<Secret>,
    #[command(flatten)]
    pub limits: LimitArgs,
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

impl Default for JwtSettings {
    fn default() -> Self {
        Settings::defaults().jwt
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
    pub direct_upload_grace: Duration,
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

impl Settings {
    /// Defaults only (no flags, environment or file): what tests start from.
    pub fn defaults() -> Self {
        Self::from_args(&defaults_of::<SettingsArgs>())
            .unwrap_or_else(|e| unreachable!("defaults are valid: {e}"))
    }

    /// Every setting from parsed arguments (flags, environment and file already
    /// applied by clap); reads the JWT public key file.
    pub fn load(args: &SettingsArgs) -> Result<Self, ConfigError> {
        Self::from_args(args)
    }

    fn from_args(a: &SettingsArgs) -> Result<Self, ConfigError> {
        let public_key_pem = match &a.jwt_public_key {
            None => None,
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                ConfigError(format!(
                    "{}: cannot read {}: {e}",
                    key("jwt_public_key"),
                    path.display()
                ))
            })?),
        };
        Ok(Settings {
            addr: a.addr,
            admin_addr: a.admin_addr.0,
            otlp_endpoint: a.otlp_endpoint.clone(),
            queue_figures_interval: a.queue_figures_interval,
            database_url: a.database_url.clone(),
            db_pool_size: a.db_pool_size,
            redis_url: a.redis_url.clone(),
            redis_prefix: a.redis_prefix.clone(),
            jwt: JwtSettings {
                secret: a.jwt_secret.clone(),
                public_key_pem,
                audience: a.jwt_audience.clone(),
                issuer: a.jwt_issuer.clone(),
                max_lifetime: a.jwt_max_lifetime,
            },
            cors_origins: a.cors_origins.clone(),
            cors_max_age: a.cors_max_age,
            log_format: a.log_format,
            max_message_bytes: a.max_message_bytes,
            max_concurrent_streams: a.max_concurrent_streams,
            request_timeout: a.request_timeout,
            drain_timeout: a.drain_timeout,
            health_interval: a.health_interval,
            poll_interval: a.poll_interval,
            reap_interval: a.reap_interval,
            retry_base: a.retry_base,
            retry_max: a.retry_max,
            watch_resync: a.watch_resync,
            job_retention: a.job_retention,
            event_retention: a.event_retention,
            storage: StorageSettings {
                url: a.storage_url.clone(),
                s3_endpoint: a.s3_endpoint.clone(),
                s3_region: a.s3_region.clone(),
                s3_access_key_id: a.s3_access_key_id.clone(),
                s3_secret_access_key: a.s3_secret_access_key.clone(),
            },
            max_asset_bytes: a.max_asset_bytes,
            project_quota_bytes: a.project_quota_bytes,
            signed_url_max_ttl: a.signed_url_max_ttl,
            direct_upload_grace: a.direct_upload_grace,
            public_url: a.public_url.clone(),
            url_signing_key: a.url_signing_key.clone(),
            limits: Limits::from(&a.limits),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settings from a command line (no environment is read: every flag's variable is
    /// unset for the parse).
    fn parse(argv: &[&str]) -> Result<Settings, String> {
        let command = <SettingsArgs as clap::Args>::augment_args(clap::Command::new("settings"))
            .mut_args(|arg| arg.env(None::<&str>));
        let argv = std::iter::once("settings")
            .chain(argv.iter().copied())
            .map(Into::into)
            .collect();
        let matches = parse_with_file(command, argv).map_err(|e| match e {
            ParseError::Clap(e) => e.to_string(),
            ParseError::Config(e) => e.to_string(),
        })?;
        let args = <SettingsArgs as clap::FromArgMatches>::from_arg_matches(&matches)
            .map_err(|e| e.to_string())?;
        Settings::load(&args).map_err(|e| e.to_string())
    }

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
        assert_eq!(s.admin_addr, Some(SocketAddr::from(([127, 0, 0, 1], 9090))));
        assert_eq!(s.database_url.expose(), DEFAULT_DATABASE_URL);
        assert_eq!(s.cors_origins, CorsOrigins::None);
        assert_eq!(s.request_timeout, Duration::from_secs(30));
        assert_eq!(s.limits.quotas.storage_bytes, 1 << 40);
        assert_eq!(
            s.limits.rates.map(|r| r.reads),
            Some(Rate::per_second(200, 400))
        );
        let parsed = parse(&[]).unwrap();
        assert_eq!(parsed.addr, s.addr, "an empty command line is the defaults");
    }

    #[test]
    fn file_values_fill_what_flags_leave_out() {
        let dir = std::env::temp_dir().join(format!("mediaplane-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mediaplane.toml");
        std::fs::write(
            &path,
            "addr = \"0.0.0.0:9000\"\nmax_message_bytes = 65536\ncors_origins = [\"https://a.example\", \"http://localhost:3000\"]\nrequest_timeout = \"5s\"\nrate_limits = \"off\"\n",
        )
        .unwrap();
        let path_arg = path.to_str().unwrap();
        let s = parse(&["--config", path_arg, "--request-timeout", "7s"]).unwrap();
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
        assert_eq!(s.limits.rates, None);

        std::fs::write(&path, "adr = \"0.0.0.0:9000\"\n").unwrap();
        let err = parse(&["--config", path_arg]).unwrap_err();
        assert!(err.contains("unknown key `adr`"), "{err}");

        std::fs::write(&path, "request_timeout = \"soon\"\n").unwrap();
        let err = parse(&["--config", path_arg]).unwrap_err();
        assert!(
            err.contains("MEDIAPLANE_REQUEST_TIMEOUT") && err.contains("`request_timeout`"),
            "a bad value in the file names its key: {err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = parse(&["--addr", "nope"]).unwrap_err();
        assert!(
            err.contains("MEDIAPLANE_ADDR") && err.contains("--addr") && err.contains("nope"),
            "{err}"
        );

        let err = parse(&["--request-timeout", "soon"]).unwrap_err();
        assert!(
            err.contains("MEDIAPLANE_REQUEST_TIMEOUT") && err.contains("30s"),
            "{err}"
        );

        let err = parse(&["--database-url", "mysql://user:pw@x"]).unwrap_err();
        assert!(
            err.contains("DATABASE_URL") && !err.contains("pw@x"),
            "{err}"
        );

        let err = parse(&["--jwt-secret", "short"]).unwrap_err();
        assert!(
            err.contains("MEDIAPLANE_JWT_SECRET") && !err.contains("short\""),
            "{err}"
        );

        let err = parse(&["--db-pool-size", "0"]).unwrap_err();
        assert!(err.contains("from 1 to 1000"), "{err}");
        let err = parse(&["--limit-reads", "10/d"]).unwrap_err();
        assert!(err.contains("MEDIAPLANE_LIMIT_READS"), "{err}");
    }
}
