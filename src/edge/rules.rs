//! `google.api.http` rules read from the descriptors, and the path templates of
//! `google/api/http.proto`: literals, `*`, `**`, `{field.path=pattern}` and `:verb`.
use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum Seg {
    Literal(String),
    /// One segment.
    Star,
    /// Any number of segments (last only).
    DoubleStar,
}

/// A variable: the field path it sets and the template segments it covers.
#[derive(Debug, Clone, PartialEq)]
pub struct Var {
    pub field: String,
    pub start: usize,
    pub end: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub segs: Vec<Seg>,
    pub vars: Vec<Var>,
    pub verb: Option<String>,
}

impl Template {
    pub fn parse(template: &str) -> Result<Self, String> {
        let path = template
            .strip_prefix('/')
            .ok_or_else(|| format!("template {template:?} must start with /"))?;
        // The verb is after the last ':' that is outside braces.
        let (mut depth, mut verb_at) = (0, None);
        for (i, c) in path.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ':' if depth == 0 => verb_at = Some(i),
                _ => {}
            }
        }
        let (path, verb) = match verb_at {
            Some(i) => (&path[..i], Some(path[i + 1..].to_owned())),
            None => (path, None),
        };
        let mut t = Template {
            segs: Vec::new(),
            vars: Vec::new(),
            verb,
        };
        let mut rest = path;
        while !rest.is_empty() {
            if let Some(inner) = rest.strip_prefix('{') {
                let close = inner
                    .find('}')
                    .ok_or_else(|| format!("unclosed variable in {template:?}"))?;
                let (field, pattern) = inner[..close]
                    .split_once('=')
                    .unwrap_or((&inner[..close], "*"));
                let start = t.segs.len();
                for p in pattern.split('/') {
                    t.segs.push(seg(p));
                }
                t.vars.push(Var {
                    field: field.to_owned(),
                    start,
                    end: t.segs.len(),
                });
                rest = &inner[close + 1..];
            } else {
                let end = rest.find('/').unwrap_or(rest.len());
                t.segs.push(seg(&rest[..end]));
                rest = &rest[end..];
            }
            rest = rest.strip_prefix('/').unwrap_or(rest);
        }
        if t.segs.iter().rev().skip(1).any(|s| *s == Seg::DoubleStar) {
            return Err(format!("`**` must be the last segment in {template:?}"));
        }
        Ok(t)
    }

    /// Matches raw (still percent-encoded) path segments; returns `field -> value`.
    pub fn matches(&self, path: &str) -> Option<Vec<(String, String)>> {
        let path = path.strip_prefix('/')?;
        let path = match &self.verb {
            Some(verb) => path.strip_suffix(verb.as_str())?.strip_suffix(':')?,
            // As grpc-gateway does: a `:` in the last segment starts a verb, so only
            // templates with that verb can match.
            None if path
                .rsplit('/')
                .next()
                .is_some_and(|last| last.contains(':')) =>
            {
                return None;
            }
            None => path,
        };
        let raw: Vec<&str> = path.split('/').collect();
        // Position in the request of each template segment.
        let mut spans = Vec::with_capacity(self.segs.len());
        let mut i = 0;
        for (k, s) in self.segs.iter().enumerate() {
            match s {
                Seg::Literal(l) => {
                    if raw.get(i).map(|r| decode(r, true)) != Some(l.clone()) {
                        return None;
                    }
                    spans.push(i..i + 1);
                    i += 1;
                }
                Seg::Star => {
                    if raw.get(i).is_none_or(|r| r.is_empty()) {
                        return None;
                    }
                    spans.push(i..i + 1);
                    i += 1;
                }
                Seg::DoubleStar => {
                    let _ = k;
                    spans.push(i..raw.len());
                    i = raw.len();
                }
            }
        }
        if i != raw.len() {
            return None;
        }
        let mut out = Vec::new();
        for v in &self.vars {
            let from = spans[v.start].start;
            let to = spans[v.end - 1].end;
            // A single-segment variable decodes everything, `%2F` included; a
            // multi-segment one keeps `%2F` so the value's own slashes stay apart.
            let single = v.end - v.start == 1 && self.segs[v.start] == Seg::Star;
            let value = raw[from..to]
                .iter()
                .map(|r| decode(r, single))
                .collect::<Vec<_>>()
                .join("/");
            out.push((v.field.clone(), value));
        }
        Some(out)
    }

    /// OpenAPI-style rendering: `/v1/{name}`.
    pub fn display(&self) -> String {
        let mut out = String::new();
        let mut k = 0;
        while k < self.segs.len() {
            out.push('/');
            if let Some(v) = self.vars.iter().find(|v| v.start == k) {
                out.push_str(&format!("{{{}}}", v.field));
                k = v.end;
                continue;
            }
            out.push_str(match &self.segs[k] {
                Seg::Literal(l) => l,
                Seg::Star => "*",
                Seg::DoubleStar => "**",
            });
            k += 1;
        }
        if let Some(verb) = &self.verb {
            out.push(':');
            out.push_str(verb);
        }
        out
    }
}

fn seg(s: &str) -> Seg {
    match s {
        "*" => Seg::Star,
        "**" => Seg::DoubleStar,
        l => Seg::Literal(l.to_owned()),
    }
}

/// Every escape decoded, `%2F` too: query parameters, `grpc-message`.
pub fn decode_all(s: &str) -> String {
    decode(s, true)
}

/// Percent-decoding (the edge's only one); `%2F` stays encoded unless `slash` is true.
/// A `%` not followed by two hex digits is kept as it is.
pub fn decode(s: &str, slash: bool) -> String {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            let b = hi << 4 | lo;
            if b == b'/' && !slash {
                out.extend_from_slice(&bytes[i..i + 3]);
            } else {
                out.push(b);
            }
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One HTTP binding of an RPC.
#[derive(Debug, Clone)]
pub struct Binding {
    pub method: http::Method,
    pub template: Template,
    pub rpc: MethodDescriptor,
    /// `*`, a field path, or empty (no body).
    pub body: String,
    pub response_body: String,
}

/// Every binding of every annotated RPC in `pool`, additional bindings included.
pub fn bindings(pool: &DescriptorPool) -> Result<Vec<Binding>, String> {
    let ext = pool
        .get_extension_by_name("google.api.http")
        .ok_or("google.api.http is not in the descriptors")?;
    let mut out = Vec::new();
    for service in pool.services() {
        for rpc in service.methods() {
            let options = rpc.options();
            if !options.has_extension(&ext) {
                continue;
            }
            if let Value::Message(rule) = options.get_extension(&ext).as_ref() {
                collect(rule, &rpc, &mut out, true)?;
            }
        }
    }
    Ok(out)
}

fn text(m: &DynamicMessage, field: &str) -> String {
    m.get_field_by_name(field)
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn collect(
    rule: &DynamicMessage,
    rpc: &MethodDescriptor,
    out: &mut Vec<Binding>,
    top: bool,
) -> Result<(), String> {
    let mut pattern = None;
    for (verb, method) in [
        ("get", http::Method::GET),
        ("put", http::Method::PUT),
        ("post", http::Method::POST),
        ("delete", http::Method::DELETE),
        ("patch", http::Method::PATCH),
    ] {
        if rule.has_field_by_name(verb) {
            pattern = Some((method, text(rule, verb)));
        }
    }
    if let Some(Value::Message(custom)) = rule.get_field_by_name("custom").as_deref()
        && rule.has_field_by_name("custom")
    {
        let kind = text(custom, "kind");
        pattern = Some((
            http::Method::from_bytes(kind.as_bytes()).map_err(|e| e.to_string())?,
            text(custom, "path"),
        ));
    }
    if let Some((method, path)) = pattern {
        let template = Template::parse(&path).map_err(|e| format!("{}: {e}", rpc.full_name()))?;
        out.push(Binding {
            method,
            template,
            rpc: rpc.clone(),
            body: text(rule, "body"),
            response_body: text(rule, "response_body"),
        });
    }
    if top && let Some(Value::List(more)) = rule.get_field_by_name("additional_bindings").as_deref()
    {
        for m in more {
            if let Value::Message(m) = m {
                collect(m, rpc, out, false)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rule forms our own API does not use: additional bindings, custom verbs,
    /// response_body, a body field, `**`.
    #[test]
    fn every_rule_form_is_read_from_descriptors() {
        let pool = super::super::test_pool(
            r#"syntax = "proto3";
package t;
import "google/api/annotations.proto";
service S {
  rpc Get(Req) returns (Resp) {
    option (google.api.http) = {
      get: "/v1/{name=shelves/*/books/*}"
      response_body: "book"
      additional_bindings { get: "/v1/{name=books/**}" }
      additional_bindings { custom { kind: "HEAD" path: "/v1/{name=shelves/*}:peek" } }
    };
  }
  rpc Put(Req) returns (Resp) {
    option (google.api.http) = { put: "/v1/{name=shelves/*}" body: "book" };
  }
}
message Book { string title = 1; }
message Req { string name = 1; Book book = 2; }
message Resp { Book book = 1; int64 count = 2; }
"#,
        );
        let b = bindings(&pool).unwrap();
        let shown: Vec<(String, String, String, String)> = b
            .iter()
            .map(|b| {
                (
                    b.method.to_string(),
                    b.template.display(),
                    b.body.clone(),
                    b.response_body.clone(),
                )
            })
            .collect();
        assert_eq!(
            shown,
            vec![
                ("GET".into(), "/v1/{name}".into(), "".into(), "book".into()),
                ("GET".into(), "/v1/{name}".into(), "".into(), "".into()),
                (
                    "HEAD".into(),
                    "/v1/{name}:peek".into(),
                    "".into(),
                    "".into()
                ),
                ("PUT".into(), "/v1/{name}".into(), "book".into(), "".into()),
            ]
        );
        assert_eq!(
            b[1].template.matches("/v1/books/a/b/c").unwrap()[0].1,
            "books/a/b/c"
        );
        assert!(b[0].template.matches("/v1/books/a").is_none());
        assert_eq!(
            b[2].template.matches("/v1/shelves/s1:peek").unwrap()[0].1,
            "shelves/s1"
        );
    }

    #[test]
    fn templates() {
        let t = Template::parse("/v1/{name=projects/*/jobs/*}:cancel").unwrap();
        assert_eq!(
            t.matches("/v1/projects/p1/jobs/j1:cancel").unwrap(),
            vec![("name".to_owned(), "projects/p1/jobs/j1".to_owned())]
        );
        assert!(t.matches("/v1/projects/p1/jobs/j1").is_none());
        assert!(t.matches("/v1/projects/p1:cancel").is_none());
        assert!(
            Template::parse("/v1/{name=projects/*/jobs/*}")
                .unwrap()
                .matches("/v1/projects/p/jobs/j:watch")
                .is_none()
        );
        let t = Template::parse("/v1/{project.name=projects/*}").unwrap();
        assert_eq!(
            t.matches("/v1/projects/abc").unwrap()[0],
            ("project.name".to_owned(), "projects/abc".to_owned())
        );
        let t = Template::parse("/v1/files/{path=**}").unwrap();
        assert_eq!(t.matches("/v1/files/a/b%2Fc/d").unwrap()[0].1, "a/b%2Fc/d");
        let t = Template::parse("/v1/things/{id}").unwrap();
        assert_eq!(
            t.matches("/v1/things/a%2Fb").unwrap()[0].1,
            "a/b",
            "single-segment variables decode %2F"
        );
        assert_eq!(
            Template::parse("/v1/{parent=projects/*}/jobs:batchCreate")
                .unwrap()
                .display(),
            "/v1/{parent}/jobs:batchCreate"
        );
        assert!(Template::parse("/v1/**/x").is_err());
    }
}
