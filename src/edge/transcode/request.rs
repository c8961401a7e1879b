//! A REST call's request message: built from the path variables, the query, the
//! JSON body (by the binding's `body`), `Last-Event-ID` and `Range`, following the
//! `google.api.http` mapping rules.

use axum::{
    http::{HeaderMap, Method, StatusCode, header},
    response::Response,
};
use base64::Engine;
use prost_reflect::{
    DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, ReflectMessage, Value,
};

use crate::edge::rules::{self, Binding};

use super::Edge;
use crate::edge::errors::{bad, http_error};

/// The request message of a REST call, and what the query says besides fields.
pub(super) struct Built {
    pub msg: DynamicMessage,
    /// `?timeout=5s`: the call's deadline.
    pub timeout: Option<String>,
    /// `?access_token=`: EventSource cannot send headers.
    pub query_token: Option<String>,
}

impl Edge {
    /// Builds the request message: the JSON body (by the binding's `body`), then path
    /// variables, then query parameters, then `Last-Event-ID` and `Range`; a PATCH
    /// without `update_mask` gets the fields present in the body as its mask.
    pub(super) fn build_message(
        &self,
        b: &Binding,
        parts: &http::request::Parts,
        vars: &[(String, String)],
        query: &str,
        body: &[u8],
        range: Option<(u64, Option<u64>)>,
    ) -> Result<Built, Box<Response>> {
        let input = b.rpc.input();
        let mut msg = DynamicMessage::new(input.clone());
        let mut body_keys = Vec::new();
        if !b.body.is_empty() && !body.is_empty() {
            let json: serde_json::Value = serde_json::from_slice(body)
                .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
            if b.body == "*" {
                msg = self.parse_json(input.clone(), json, "")?;
            } else {
                if let serde_json::Value::Object(m) = &json {
                    body_keys = m.keys().cloned().collect();
                }
                let field = input
                    .get_field_by_name(&b.body)
                    .ok_or_else(|| bad(format!("no body field {}", b.body)))?;
                let value = match field.kind() {
                    Kind::Message(m) => {
                        Value::Message(self.parse_json(m, json, &format!("{}.", b.body))?)
                    }
                    _ => return Err(bad("only message body fields are supported")),
                };
                msg.set_field(&field, value);
            }
        }
        for (path, value) in vars {
            set_path(&mut msg, path, value)
                .map_err(|e| bad(format!("path parameter {path}: {e}")))?;
        }
        let mut timeout = None;
        // EventSource cannot send headers: a browser passes its token as `access_token`.
        let mut query_token = None;
        for (key, value) in form_urlencoded(query) {
            if key == "timeout" {
                timeout = Some(value);
                continue;
            }
            if key == "access_token" {
                query_token = Some(value);
                continue;
            }
            if key == "alt" {
                continue;
            }
            if vars.iter().any(|(p, _)| p == &key) {
                continue;
            }
            set_path(&mut msg, &key, &value)
                .map_err(|e| bad(format!("query parameter {key}: {e}")))?;
        }
        // Last-Event-ID resumes a stream after the last event the client saw.
        if let Some(last) = parts
            .headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            && let Some(f) = input.get_field_by_name("after_sequence")
        {
            let seq: i64 = last
                .trim()
                .parse()
                .map_err(|_| bad("Last-Event-ID must be a sequence number"))?;
            msg.set_field(&f, Value::I64(seq));
        }
        if let Some((start, end)) = range {
            let (Some(off), Some(len)) = (
                input.get_field_by_name("offset"),
                input.get_field_by_name("length"),
            ) else {
                return Err(bad("this stream does not take a Range"));
            };
            // Checked: `bytes=0-18446744073709551615` is a valid header, not a length.
            let length = end.map_or(0, |e| e.saturating_sub(start).saturating_add(1));
            msg.set_field(&off, Value::I64(i64::try_from(start).unwrap_or(i64::MAX)));
            msg.set_field(&len, Value::I64(i64::try_from(length).unwrap_or(i64::MAX)));
        }
        // PATCH without update_mask: the fields present in the body.
        if parts.method == Method::PATCH
            && let Some(mask) = input.get_field_by_name("update_mask")
            && !msg.has_field(&mask)
            && !body_keys.is_empty()
            && let Kind::Message(body_desc) = input
                .get_field_by_name(&b.body)
                .map(|f| f.kind())
                .unwrap_or(Kind::Bool)
        {
            let paths: Vec<Value> = body_keys
                .iter()
                .filter_map(|k| {
                    body_desc
                        .get_field_by_json_name(k)
                        .or_else(|| body_desc.get_field_by_name(k))
                })
                .filter(|f| !matches!(f.name(), "name" | "etag"))
                .map(|f| Value::String(f.name().to_owned()))
                .collect();
            if let Kind::Message(fm) = mask.kind() {
                let mut m = DynamicMessage::new(fm.clone());
                if let Some(pf) = fm.get_field_by_name("paths") {
                    m.set_field(&pf, Value::List(paths));
                }
                msg.set_field(&mask, Value::Message(m));
            }
        }
        Ok(Built {
            msg,
            timeout,
            query_token,
        })
    }

    fn parse_json(
        &self,
        desc: MessageDescriptor,
        json: serde_json::Value,
        prefix: &str,
    ) -> Result<DynamicMessage, Box<Response>> {
        DynamicMessage::deserialize_with_options(desc, json, &self.inner.json_in).map_err(|e| {
            bad(format!(
                "invalid JSON for {}: {e}",
                if prefix.is_empty() {
                    "the body"
                } else {
                    prefix.trim_end_matches('.')
                }
            ))
        })
    }
}

pub(super) fn parse_range(
    headers: &HeaderMap,
) -> Result<Option<(u64, Option<u64>)>, Box<Response>> {
    let Some(value) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let unsatisfiable = || {
        http_error(
            StatusCode::RANGE_NOT_SATISFIABLE,
            tonic::Code::OutOfRange,
            "only one `bytes=start-[end]` range is supported",
            vec![],
        )
    };
    let spec = value.strip_prefix("bytes=").ok_or_else(unsatisfiable)?;
    let (a, b) = spec.split_once('-').ok_or_else(unsatisfiable)?;
    let start: u64 = a.trim().parse().map_err(|_| unsatisfiable())?;
    let end = match b.trim() {
        "" => None,
        e => Some(e.parse::<u64>().map_err(|_| unsatisfiable())?),
    };
    if end.is_some_and(|e| e < start) {
        return Err(unsatisfiable());
    }
    Ok(Some((start, end)))
}

/// `a=1&b.c=2&labels[k]=v` pairs, decoded.
pub(super) fn form_urlencoded(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                rules::decode_all(&k.replace('+', " ")),
                rules::decode_all(&v.replace('+', " ")),
            )
        })
        .collect()
}

/// Sets `a.b.c` (or `labels[key]`) on `msg` from text, by the field's type.
pub(super) fn set_path(msg: &mut DynamicMessage, path: &str, text: &str) -> Result<(), String> {
    let (head, rest) = match path.split_once('.') {
        Some((h, r)) if !h.contains('[') => (h, Some(r)),
        _ => (path, None),
    };
    if let Some((name, key)) = head.split_once('[') {
        let key = key.strip_suffix(']').ok_or("expected name[key]")?;
        let field = field_named(&msg.descriptor(), name)?;
        let Kind::Message(entry) = field.kind() else {
            return Err(format!("{name} is not a map"));
        };
        if !field.is_map() {
            return Err(format!("{name} is not a map"));
        }
        let value = scalar(&entry.map_entry_value_field(), text)?;
        if let Value::Map(map) = msg.get_field_mut(&field) {
            map.insert(MapKey::String(key.to_owned()), value);
        }
        return Ok(());
    }
    let field = field_named(&msg.descriptor(), head)?;
    match rest {
        Some(rest) => {
            let Kind::Message(_) = field.kind() else {
                return Err(format!("{head} has no fields"));
            };
            match msg.get_field_mut(&field) {
                Value::Message(inner) => set_path(inner, rest, text),
                _ => Err(format!("{head} has no fields")),
            }
        }
        None if field.is_list() => {
            let value = scalar(&field, text)?;
            if let Value::List(list) = msg.get_field_mut(&field) {
                list.push(value);
            }
            Ok(())
        }
        None => {
            let value = scalar(&field, text)?;
            msg.set_field(&field, value);
            Ok(())
        }
    }
}

fn field_named(desc: &MessageDescriptor, name: &str) -> Result<FieldDescriptor, String> {
    desc.get_field_by_name(name)
        .or_else(|| desc.get_field_by_json_name(name))
        .ok_or_else(|| format!("unknown field `{name}` in {}", desc.full_name()))
}

/// A single value from text: scalars, enums by name or number, and well-known types
/// in their JSON string forms (Timestamp, Duration, FieldMask).
fn scalar(field: &FieldDescriptor, text: &str) -> Result<Value, String> {
    let wrong = |what: &str| format!("{text:?} is not {what}");
    Ok(match field.kind() {
        Kind::String => Value::String(text.to_owned()),
        Kind::Bool => Value::Bool(text.parse().map_err(|_| wrong("true or false"))?),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            Value::I32(text.parse().map_err(|_| wrong("a 32-bit integer"))?)
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            Value::I64(text.parse().map_err(|_| wrong("a 64-bit integer"))?)
        }
        Kind::Uint32 | Kind::Fixed32 => {
            Value::U32(text.parse().map_err(|_| wrong("an unsigned integer"))?)
        }
        Kind::Uint64 | Kind::Fixed64 => {
            Value::U64(text.parse().map_err(|_| wrong("an unsigned integer"))?)
        }
        Kind::Float => Value::F32(text.parse().map_err(|_| wrong("a number"))?),
        Kind::Double => Value::F64(text.parse().map_err(|_| wrong("a number"))?),
        Kind::Bytes => Value::Bytes(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|_| wrong("base64"))?
                .into(),
        ),
        Kind::Enum(e) => match e.get_value_by_name(text) {
            Some(v) => Value::EnumNumber(v.number()),
            None => Value::EnumNumber(
                text.parse()
                    .map_err(|_| format!("{text:?} is not a value of {}", e.full_name()))?,
            ),
        },
        Kind::Message(m) => {
            // Well-known types take their JSON string form.
            let json = serde_json::Value::String(text.to_owned());
            Value::Message(
                DynamicMessage::deserialize(m.clone(), json)
                    .map_err(|e| format!("{text:?} is not a valid {}: {e}", m.full_name()))?,
            )
        }
    })
}
