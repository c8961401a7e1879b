//! What storage accepts, and how client input is quoted back in errors.
//!
//! Validation is the contract with Postgres: whatever passes it must be storable, or
//! the client gets a 500 for its own mistake (and, in a shared group commit, costs
//! other callers theirs). Postgres `text` and `jsonb` refuse NUL; `timestamptz` ends
//! in the year 294276; deep JSON costs stack in every decoder on the way.
use chrono::{DateTime, Datelike, Utc};

/// Client input quoted in an error message at most this many characters.
pub const MAX_QUOTE: usize = 64;
/// Error messages are cut at this many bytes, whatever built them.
pub const MAX_MESSAGE: usize = 1024;
/// Levels of nesting accepted in a Struct (metadata, job input and result).
pub const MAX_JSON_DEPTH: usize = 32;
/// Timestamps accepted from clients: years 1 to 9999 (RFC 3339's range, well inside
/// Postgres's).
pub const MIN_YEAR: i32 = 1;
pub const MAX_YEAR: i32 = 9999;

/// `s` for an error message: at most [`MAX_QUOTE`] characters, marked when cut.
pub fn quote(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTE) {
        None => s.escape_debug().to_string(),
        Some((cut, _)) => format!(
            "{}… ({} bytes, truncated)",
            s[..cut].escape_debug(),
            s.len()
        ),
    }
}

/// `message` cut to [`MAX_MESSAGE`] bytes (on a character boundary), marked when cut.
pub fn bounded(message: String) -> String {
    if message.len() <= MAX_MESSAGE {
        return message;
    }
    let mut cut = MAX_MESSAGE - 16;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… (truncated)", &message[..cut])
}

/// Text Postgres can store: no NUL character.
pub fn storable(s: &str) -> bool {
    !s.contains('\0')
}

/// Why a JSON value cannot be stored as given, if it cannot; `above` is the number of
/// arrays and objects around it.
pub fn check_json_value(value: &serde_json::Value, above: usize) -> Result<(), String> {
    use serde_json::Value as V;
    match value {
        V::String(s) if !storable(s) => Err("strings may not contain NUL (\\u0000)".into()),
        V::Array(items) => {
            deeper(above)?;
            items
                .iter()
                .try_for_each(|v| check_json_value(v, above + 1))
        }
        V::Object(map) => check_json(map, above),
        _ => Ok(()),
    }
}

/// [`check_json_value`] for an object inside `above` arrays and objects.
pub fn check_json(
    map: &serde_json::Map<String, serde_json::Value>,
    above: usize,
) -> Result<(), String> {
    deeper(above)?;
    map.iter().try_for_each(|(k, v)| {
        if !storable(k) {
            return Err("keys may not contain NUL (\\u0000)".into());
        }
        check_json_value(v, above + 1)
    })
}

fn deeper(above: usize) -> Result<(), String> {
    if above >= MAX_JSON_DEPTH {
        Err(format!("nested deeper than {MAX_JSON_DEPTH} levels"))
    } else {
        Ok(())
    }
}

/// A timestamp inside the accepted years.
pub fn storable_time(t: DateTime<Utc>) -> bool {
    (MIN_YEAR..=MAX_YEAR).contains(&t.year())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_bounded_and_marked() {
        assert_eq!(quote("abc"), "abc");
        let long = "é".repeat(1000);
        let q = quote(&long);
        assert!(q.ends_with("(2000 bytes, truncated)"), "{q}");
        assert!(q.chars().count() < 100);
        assert!(bounded("x".repeat(5000)).len() <= MAX_MESSAGE);
    }

    #[test]
    fn json_depth_and_nul() {
        let mut v = serde_json::json!(1);
        for _ in 0..MAX_JSON_DEPTH {
            v = serde_json::json!([v]);
        }
        assert!(check_json_value(&v, 0).is_ok());
        assert!(check_json_value(&serde_json::json!([v]), 0).is_err());
        assert!(check_json_value(&serde_json::json!({"a\u{0}": 1}), 0).is_err());
        assert!(check_json_value(&serde_json::json!({"a": "b\u{0}"}), 0).is_err());
    }
}
