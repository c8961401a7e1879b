//! The value types of settings and their parsers: clap runs them on flags,
//! environment variables and file values alike.
use std::{net::SocketAddr, time::Duration};

use super::{CorsOrigins, LogFormat, Secret};

/// A whole number from `min` to `max`, as `T`.
pub(crate) fn number<T: TryFrom<u64>>(
    min: u64,
    max: u64,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        s.trim()
            .parse::<u64>()
            .ok()
            .filter(|v| (min..=max).contains(v))
            .and_then(|v| T::try_from(v).ok())
            .ok_or_else(|| format!("expected a whole number from {min} to {max}"))
    }
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s.trim()) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be longer than zero".into()),
        Err(_) => Err("expected a duration like 500ms, 30s or 5m".into()),
    }
}

/// `Some(addr)`, or `None` for `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminAddr(pub Option<SocketAddr>);

pub(super) fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| "expected host:port with an IP address, like 127.0.0.1:8080".into())
}

pub(super) fn parse_admin_addr(s: &str) -> Result<AdminAddr, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(AdminAddr(None));
    }
    s.trim()
        .parse()
        .map(|a| AdminAddr(Some(a)))
        .map_err(|_| "expected `off` or host:port with an IP address, like 127.0.0.1:9090".into())
}

pub(super) fn url(
    schemes: &'static [&'static str],
) -> impl Fn(&str) -> Result<String, String> + Clone + Send + Sync + 'static {
    move |s: &str| check_url(s.trim(), schemes).map(|()| s.trim().to_owned())
}

pub(super) fn secret_url(
    schemes: &'static [&'static str],
) -> impl Fn(&str) -> Result<Secret, String> + Clone + Send + Sync + 'static {
    move |s: &str| check_url(s.trim(), schemes).map(|()| Secret::new(s.trim()))
}

/// An http(s) URL without its trailing slash.
pub(super) fn base_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    check_url(s, &["http", "https"]).map(|()| s.trim_end_matches('/').to_owned())
}

pub(super) fn parse_storage_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.starts_with("file://") || s.starts_with("s3://") {
        Ok(s.to_owned())
    } else {
        Err("expected file:///dir or s3://bucket[/prefix]".into())
    }
}

pub(super) fn parse_redis_prefix(s: &str) -> Result<String, String> {
    let s = s.trim();
    if !s.is_empty() && s.len() <= 64 && !s.contains(char::is_whitespace) {
        Ok(s.to_owned())
    } else {
        Err("expected 1 to 64 characters without spaces".into())
    }
}

/// Key material for HMAC: at least 32 bytes.
pub(super) fn key_material(s: &str) -> Result<Secret, String> {
    if s.trim().len() >= 32 {
        Ok(Secret::new(s.trim()))
    } else {
        Err("too short: use at least 32 random bytes (e.g. `openssl rand -hex 32`)".into())
    }
}

pub(super) fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "human" | "text" | "pretty" => Ok(LogFormat::Human),
        "json" => Ok(LogFormat::Json),
        _ => Err("expected `human` or `json`".into()),
    }
}

pub(super) fn parse_cors_origins(s: &str) -> Result<CorsOrigins, String> {
    if s.trim() == "*" {
        return Ok(CorsOrigins::Any);
    }
    let mut list = Vec::new();
    for origin in s.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        check_origin(origin).map_err(|why| format!("{origin:?} {why}"))?;
        list.push(origin.to_owned());
    }
    Ok(if list.is_empty() {
        CorsOrigins::None
    } else {
        CorsOrigins::List(list)
    })
}

pub(super) fn non_empty(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s.to_owned())
    }
}

pub(super) fn check_url(s: &str, schemes: &[&str]) -> Result<(), String> {
    match s.split_once("://") {
        Some((scheme, rest)) if schemes.contains(&scheme) && !rest.is_empty() => Ok(()),
        _ => Err(format!("expected a URL starting with {}://", schemes[0])),
    }
}

pub(super) fn check_origin(origin: &str) -> Result<(), &'static str> {
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
