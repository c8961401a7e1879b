//! Keyset pagination (AIP-158): opaque tokens bound to the query that issued them.
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{AppError, AppResult};

pub const DEFAULT_PAGE_SIZE: i64 = 50;
pub const MAX_PAGE_SIZE: i64 = 1000;

/// Position after the last row of a page: rows are ordered by (create_time, id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub create_time: DateTime<Utc>,
    pub id: Uuid,
}

#[derive(Serialize, Deserialize)]
struct Token {
    v: u8,
    /// create_time in microseconds since the epoch (Postgres precision).
    t: i64,
    i: Uuid,
    /// Fingerprint of the query; a token only works for the query that made it.
    q: String,
}

/// Page size from the request: 0 means the default, larger than the maximum is clamped.
pub fn page_size(requested: i32) -> AppResult<i64> {
    match i64::from(requested) {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n < 0 => Err(AppError::invalid("page_size", "must not be negative")),
        n => Ok(n.min(MAX_PAGE_SIZE)),
    }
}

/// Short digest of everything that defines a query except the position.
pub fn fingerprint(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    URL_SAFE_NO_PAD.encode(&hasher.finalize()[..12])
}

pub fn encode(cursor: Cursor, query: &str) -> String {
    let token = Token {
        v: 1,
        t: cursor.create_time.timestamp_micros(),
        i: cursor.id,
        q: query.to_owned(),
    };
    // Serializing a struct of plain fields cannot fail.
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&token).unwrap_or_default())
}

/// The token of the next page: empty on the last one.
pub fn next_token(more: bool, last: Option<Cursor>, query: &str) -> String {
    match (more, last) {
        (true, Some(cursor)) => encode(cursor, query),
        _ => String::new(),
    }
}

/// `None` for an empty token (first page).
pub fn decode(token: &str, query: &str) -> AppResult<Option<Cursor>> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || {
        AppError::invalid(
            "page_token",
            "not a page token issued for this query (same filter, order_by and caller)",
        )
    };
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let token: Token = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    if token.v != 1 || token.q != query {
        return Err(bad());
    }
    let create_time = DateTime::from_timestamp_micros(token.t).ok_or_else(bad)?;
    Ok(Some(Cursor {
        create_time,
        id: token.i,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_foreign_tokens() {
        let c = Cursor {
            create_time: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            id: Uuid::now_v7(),
        };
        let q = fingerprint(&["alice", ""]);
        let t = encode(c, &q);
        assert_eq!(decode(&t, &q).unwrap(), Some(c));
        assert!(decode(&t, &fingerprint(&["bob", ""])).is_err());
        assert!(decode("garbage!", &q).is_err());
        assert_eq!(decode("", &q).unwrap(), None);
        assert_eq!(page_size(0).unwrap(), 50);
        assert_eq!(page_size(5000).unwrap(), 1000);
        assert!(page_size(-1).is_err());
    }
}
