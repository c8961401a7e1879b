//! Labels: small string maps used for filtering (AIP-122 style constraints).
use std::collections::BTreeMap;

use super::{Violations, text::quote};

pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_LEN: usize = 63;

pub fn valid_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && key.len() <= MAX_LABEL_LEN
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

pub fn validate(field: &str, labels: &BTreeMap<String, String>, v: &mut Violations) {
    if labels.len() > MAX_LABELS {
        v.add(field, format!("at most {MAX_LABELS} labels"));
    }
    for (key, value) in labels {
        if !valid_key(key) {
            v.add(
                format!("{field}[{}]", quote(key)),
                "keys are 1 to 63 lowercase letters, digits, `_` or `-`, starting with a letter",
            );
        }
        if value.chars().count() > MAX_LABEL_LEN || value.chars().any(char::is_control) {
            v.add(
                format!("{field}[{}]", quote(key)),
                "values are at most 63 characters without control characters",
            );
        }
    }
}

/// A parsed list filter over labels: `labels.k = "v" AND labels.k2:*`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelFilter {
    /// Labels that must have exactly this value.
    pub equals: BTreeMap<String, String>,
    /// Labels that must be present.
    pub present: Vec<String>,
}

impl LabelFilter {
    pub fn parse(filter: &str) -> Result<Self, String> {
        let mut out = Self::default();
        let filter = filter.trim();
        if filter.is_empty() {
            return Ok(out);
        }
        for term in split_and(filter) {
            let term = term.trim();
            let rest = term.strip_prefix("labels.").ok_or_else(|| {
                format!(
                    "unsupported term `{}`: expected labels.KEY = \"VALUE\" or labels.KEY:*",
                    quote(term)
                )
            })?;
            if let Some((key, value)) = rest.split_once('=') {
                let key = key.trim();
                let value = unquote(value.trim())
                    .filter(|v| super::text::storable(v))
                    .ok_or_else(|| {
                        format!(
                            "the value in `{}` must be a quoted string without NUL",
                            quote(term)
                        )
                    })?;
                check_key(key)?;
                if let Some(previous) = out.equals.insert(key.to_owned(), value.clone())
                    && previous != value
                {
                    // Two different values for one key can never match; say so rather than return nothing.
                    return Err(format!(
                        "label `{}` is given two different values",
                        quote(key)
                    ));
                }
            } else if let Some(key) = rest.strip_suffix(":*") {
                let key = key.trim();
                check_key(key)?;
                out.present.push(key.to_owned());
            } else {
                return Err(format!(
                    "unsupported term `{}`: expected labels.KEY = \"VALUE\" or labels.KEY:*",
                    quote(term)
                ));
            }
        }
        Ok(out)
    }

    /// Canonical text, part of a page token's query fingerprint.
    pub fn canonical(&self) -> String {
        let mut parts: Vec<String> = self
            .equals
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        let mut present = self.present.clone();
        present.sort();
        present.dedup();
        parts.extend(present.into_iter().map(|k| format!("{k}:*")));
        parts.join("&")
    }
}

fn check_key(key: &str) -> Result<(), String> {
    if valid_key(key) {
        Ok(())
    } else {
        Err(format!("`{}` is not a valid label key", quote(key)))
    }
}

/// Splits on ` AND ` (case-sensitive, as AIP-160) outside of quotes.
fn split_and(filter: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut in_quotes, mut escaped) = (0, false, false);
    let bytes = filter.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if in_quotes {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_quotes = false;
            }
        } else if b == b'"' {
            in_quotes = true;
        } else if bytes[i..].starts_with(b" AND ") {
            parts.push(&filter[start..i]);
            i += 5;
            start = i;
            continue;
        }
        i += 1;
    }
    parts.push(&filter[start..]);
    parts
}

fn unquote(s: &str) -> Option<String> {
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_terms() {
        let f = LabelFilter::parse(r#"labels.env = "prod AND x" AND labels.team:*"#).unwrap();
        assert_eq!(f.equals.get("env").map(String::as_str), Some("prod AND x"));
        assert_eq!(f.present, vec!["team".to_owned()]);
        assert!(LabelFilter::parse("display_name = \"x\"").is_err());
        assert!(LabelFilter::parse("labels.env = prod").is_err());
        assert!(LabelFilter::parse("labels.Env = \"x\"").is_err());
    }
}
