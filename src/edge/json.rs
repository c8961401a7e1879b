//! Canonical proto3 JSON written straight from encoded protobuf, driven by the
//! message descriptor: the unary response path of the edge without decoding into a
//! `DynamicMessage` first (an allocation per field, and an encode/decode round trip
//! per well-known type). The output is what prost-reflect's serializer gives with the
//! edge's options (camelCase names, defaults emitted, int64 as strings, enum names);
//! a unit test holds the two together. Anything this writer does not handle (`Any`,
//! groups, a message field repeated on the wire, invalid UTF-8, out-of-range
//! times) returns `None` and the caller takes the prost-reflect path.
use std::{collections::BTreeMap, fmt::Write as _};

use base64::{Engine as _, prelude::BASE64_STANDARD};
use prost::Message as _;
use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};

#[derive(Clone, Copy)]
enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Len(&'a [u8]),
}

/// The message in `bytes` as JSON, or `None` to fall back.
pub fn render(desc: &MessageDescriptor, bytes: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(bytes.len() * 2 + 16);
    message(desc, bytes, &mut out)?;
    Some(out)
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(value);
        }
    }
    None
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if buf.len() < n {
        return None;
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Some(head)
}

/// Every field occurrence in wire order.
fn fields(mut buf: &[u8]) -> Option<Vec<(u32, Wire<'_>)>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let number = u32::try_from(key >> 3).ok()?;
        let value = match key & 7 {
            0 => Wire::Varint(varint(&mut buf)?),
            1 => Wire::Fixed64(u64::from_le_bytes(take(&mut buf, 8)?.try_into().ok()?)),
            2 => {
                let n = usize::try_from(varint(&mut buf)?).ok()?;
                Wire::Len(take(&mut buf, n)?)
            }
            5 => Wire::Fixed32(u32::from_le_bytes(take(&mut buf, 4)?.try_into().ok()?)),
            _ => return None, // groups
        };
        out.push((number, value));
    }
    Some(out)
}

fn message(desc: &MessageDescriptor, bytes: &[u8], out: &mut String) -> Option<()> {
    if desc.full_name().starts_with("google.protobuf.") {
        return well_known(desc, bytes, out);
    }
    let wire = fields(bytes)?;
    out.push('{');
    let mut first = true;
    let mut oneofs_seen = Vec::new();
    for field in desc.fields() {
        let number = field.number();
        let found: Vec<Wire> = wire
            .iter()
            .filter(|(n, _)| *n == number)
            .map(|(_, v)| *v)
            .collect();
        if let Some(oneof) = field.containing_oneof() {
            if found.is_empty() {
                continue;
            }
            // Two members of one oneof on the wire: leave the merge rules to prost-reflect.
            if oneofs_seen.contains(&oneof.name().to_owned()) {
                return None;
            }
            oneofs_seen.push(oneof.name().to_owned());
        }
        if found.is_empty() && !field.is_list() && field.supports_presence() {
            continue;
        }
        if !first {
            out.push(',');
        }
        first = false;
        string(field.json_name(), out);
        out.push(':');
        if field.is_map() {
            map(&field, &found, out)?;
        } else if field.is_list() {
            list(&field.kind(), &found, out)?;
        } else {
            match found.last() {
                None => default(&field.kind(), out)?,
                Some(_) if found.len() > 1 && matches!(field.kind(), Kind::Message(_)) => {
                    return None;
                }
                Some(v) => value(&field.kind(), *v, out)?,
            }
        }
    }
    out.push('}');
    Some(())
}

fn map(field: &FieldDescriptor, found: &[Wire], out: &mut String) -> Option<()> {
    let Kind::Message(entry) = field.kind() else {
        return None;
    };
    let key_field = entry.map_entry_key_field();
    let value_field = entry.map_entry_value_field();
    // Later entries win, as in a decoded map.
    let mut entries = BTreeMap::new();
    for w in found {
        let Wire::Len(bytes) = w else { return None };
        let (mut key, mut val) = (None, None);
        for (n, v) in fields(bytes)? {
            if n == 1 {
                key = Some(v);
            } else if n == 2 {
                val = Some(v);
            }
        }
        let mut k = String::new();
        match key {
            None => default(&key_field.kind(), &mut k)?,
            Some(v) => value(&key_field.kind(), v, &mut k)?,
        }
        // Map keys are JSON strings whatever their type.
        if !k.starts_with('"') {
            k = format!("\"{k}\"");
        }
        let mut v = String::new();
        match val {
            None => default(&value_field.kind(), &mut v)?,
            Some(w) => value(&value_field.kind(), w, &mut v)?,
        }
        entries.insert(k, v);
    }
    out.push('{');
    for (i, (k, v)) in entries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push(':');
        out.push_str(v);
    }
    out.push('}');
    Some(())
}

fn list(kind: &Kind, found: &[Wire], out: &mut String) -> Option<()> {
    out.push('[');
    let mut first = true;
    let mut item = |v: Wire, out: &mut String| -> Option<()> {
        if !first {
            out.push(',');
        }
        first = false;
        value(kind, v, out)
    };
    for &w in found {
        match (w, packed_width(kind)) {
            // Packed scalars: one length-delimited run of values.
            (Wire::Len(mut run), Some(width)) => {
                while !run.is_empty() {
                    let v = match width {
                        0 => Wire::Varint(varint(&mut run)?),
                        4 => Wire::Fixed32(u32::from_le_bytes(take(&mut run, 4)?.try_into().ok()?)),
                        _ => Wire::Fixed64(u64::from_le_bytes(take(&mut run, 8)?.try_into().ok()?)),
                    };
                    item(v, out)?;
                }
            }
            (v, _) => item(v, out)?,
        }
    }
    out.push(']');
    Some(())
}

/// For packable kinds, the width of one packed value (0 for varints).
fn packed_width(kind: &Kind) -> Option<usize> {
    match kind {
        Kind::Double | Kind::Fixed64 | Kind::Sfixed64 => Some(8),
        Kind::Float | Kind::Fixed32 | Kind::Sfixed32 => Some(4),
        Kind::Int32
        | Kind::Int64
        | Kind::Uint32
        | Kind::Uint64
        | Kind::Sint32
        | Kind::Sint64
        | Kind::Bool
        | Kind::Enum(_) => Some(0),
        _ => None,
    }
}

fn string(s: &str, out: &mut String) {
    // serde_json escapes exactly as the prost-reflect path does.
    if let Ok(quoted) = serde_json::to_string(s) {
        out.push_str(&quoted);
    }
}

fn float(f: f64, out: &mut String) {
    if f.is_nan() {
        out.push_str("\"NaN\"");
    } else if f == f64::INFINITY {
        out.push_str("\"Infinity\"");
    } else if f == f64::NEG_INFINITY {
        out.push_str("\"-Infinity\"");
    } else if let Ok(s) = serde_json::to_string(&f) {
        out.push_str(&s);
    }
}

fn float32(f: f32, out: &mut String) {
    if !f.is_finite() {
        float(f64::from(f), out);
    } else if let Ok(s) = serde_json::to_string(&f) {
        out.push_str(&s);
    }
}

fn default(kind: &Kind, out: &mut String) -> Option<()> {
    match kind {
        Kind::Double => float(0.0, out),
        Kind::Float => float32(0.0, out),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
            out.push_str("\"0\"")
        }
        Kind::Bool => out.push_str("false"),
        Kind::String | Kind::Bytes => out.push_str("\"\""),
        Kind::Enum(e) => string(e.default_value().name(), out),
        Kind::Message(m) => message(m, &[], out)?,
        _ => out.push('0'),
    }
    Some(())
}

fn value(kind: &Kind, w: Wire, out: &mut String) -> Option<()> {
    match (kind, w) {
        (Kind::Double, Wire::Fixed64(b)) => float(f64::from_bits(b), out),
        (Kind::Float, Wire::Fixed32(b)) => float32(f32::from_bits(b), out),
        (Kind::Int32, Wire::Varint(v)) => write!(out, "{}", v as i32).ok()?,
        (Kind::Sint32, Wire::Varint(v)) => {
            let v = v as u32;
            write!(out, "{}", ((v >> 1) as i32) ^ -((v & 1) as i32)).ok()?
        }
        (Kind::Sfixed32, Wire::Fixed32(b)) => write!(out, "{}", b as i32).ok()?,
        (Kind::Uint32, Wire::Varint(v)) => write!(out, "{}", v as u32).ok()?,
        (Kind::Fixed32, Wire::Fixed32(b)) => write!(out, "{b}").ok()?,
        (Kind::Int64, Wire::Varint(v)) => write!(out, "\"{}\"", v as i64).ok()?,
        (Kind::Sint64, Wire::Varint(v)) => {
            write!(out, "\"{}\"", ((v >> 1) as i64) ^ -((v & 1) as i64)).ok()?
        }
        (Kind::Sfixed64, Wire::Fixed64(b)) => write!(out, "\"{}\"", b as i64).ok()?,
        (Kind::Uint64, Wire::Varint(v)) | (Kind::Fixed64, Wire::Fixed64(v)) => {
            write!(out, "\"{v}\"").ok()?
        }
        (Kind::Bool, Wire::Varint(v)) => out.push_str(if v != 0 { "true" } else { "false" }),
        (Kind::String, Wire::Len(b)) => string(std::str::from_utf8(b).ok()?, out),
        (Kind::Bytes, Wire::Len(b)) => {
            out.push('"');
            out.push_str(&BASE64_STANDARD.encode(b));
            out.push('"');
        }
        (Kind::Enum(e), Wire::Varint(v)) => match e.get_value(v as i32) {
            Some(named) => string(named.name(), out),
            None => write!(out, "{}", v as i32).ok()?,
        },
        (Kind::Message(m), Wire::Len(b)) => message(m, b, out)?,
        _ => return None,
    }
    Some(())
}

/// The well-known types the API uses; others (`Any` above all) fall back.
fn well_known(desc: &MessageDescriptor, bytes: &[u8], out: &mut String) -> Option<()> {
    match desc.full_name() {
        "google.protobuf.Timestamp" => {
            let t = prost_types::Timestamp::decode(bytes).ok()?;
            // The JSON form's range: years 1 to 9999.
            if !(-62_135_596_800..=253_402_300_799).contains(&t.seconds)
                || !(0..1_000_000_000).contains(&t.nanos)
            {
                return None;
            }
            write!(out, "\"{t}\"").ok()?;
        }
        "google.protobuf.Duration" => {
            let d = prost_types::Duration::decode(bytes).ok()?;
            if d.seconds.abs() > 315_576_000_000
                || d.nanos.abs() >= 1_000_000_000
                || (d.seconds != 0 && d.nanos != 0 && (d.seconds < 0) != (d.nanos < 0))
            {
                return None;
            }
            write!(out, "\"{d}\"").ok()?;
        }
        "google.protobuf.Struct" => json_struct(&prost_types::Struct::decode(bytes).ok()?, out)?,
        "google.protobuf.Value" => json_value(&prost_types::Value::decode(bytes).ok()?, out)?,
        "google.protobuf.ListValue" => {
            json_list(&prost_types::ListValue::decode(bytes).ok()?, out)?
        }
        "google.protobuf.Empty" => out.push_str("{}"),
        _ => return None,
    }
    Some(())
}

fn json_struct(s: &prost_types::Struct, out: &mut String) -> Option<()> {
    out.push('{');
    for (i, (k, v)) in s.fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        string(k, out);
        out.push(':');
        json_value(v, out)?;
    }
    out.push('}');
    Some(())
}

fn json_list(l: &prost_types::ListValue, out: &mut String) -> Option<()> {
    out.push('[');
    for (i, v) in l.values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        json_value(v, out)?;
    }
    out.push(']');
    Some(())
}

fn json_value(v: &prost_types::Value, out: &mut String) -> Option<()> {
    use prost_types::value::Kind as V;
    match &v.kind {
        None | Some(V::NullValue(_)) => out.push_str("null"),
        Some(V::NumberValue(n)) if n.is_finite() => float(*n, out),
        Some(V::NumberValue(_)) => return None,
        Some(V::StringValue(s)) => string(s, out),
        Some(V::BoolValue(b)) => out.push_str(if *b { "true" } else { "false" }),
        Some(V::StructValue(s)) => json_struct(s, out)?,
        Some(V::ListValue(l)) => json_list(l, out)?,
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
    use prost_types::{ListValue, Struct, Timestamp, Value, value::Kind as V};

    use crate::proto::v1 as pb;

    /// The fast writer and prost-reflect agree (as JSON values) on `msg`.
    fn same<M: Message>(name: &str, msg: &M) {
        let pool = DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let desc = pool.get_message_by_name(name).unwrap();
        let bytes = msg.encode_to_vec();
        let fast = super::render(&desc, &bytes).expect("rendered without fallback");
        let dynamic = DynamicMessage::decode(desc, bytes.as_slice()).unwrap();
        let mut slow = Vec::new();
        dynamic
            .serialize_with_options(
                &mut serde_json::Serializer::new(&mut slow),
                &SerializeOptions::new().skip_default_fields(false),
            )
            .unwrap();
        let fast: serde_json::Value = serde_json::from_str(&fast).expect("valid JSON");
        let slow: serde_json::Value = serde_json::from_slice(&slow).unwrap();
        assert_eq!(fast, slow, "{name}");
    }

    fn v(kind: V) -> Value {
        Value { kind: Some(kind) }
    }

    fn input() -> Struct {
        Struct {
            fields: [
                (
                    "prompt".to_owned(),
                    v(V::StringValue("a \"cat\"\n\u{e9}".into())),
                ),
                ("steps".to_owned(), v(V::NumberValue(30.0))),
                ("scale".to_owned(), v(V::NumberValue(-7.25))),
                ("hd".to_owned(), v(V::BoolValue(true))),
                ("none".to_owned(), v(V::NullValue(0))),
                (
                    "list".to_owned(),
                    v(V::ListValue(ListValue {
                        values: vec![v(V::NumberValue(1e21)), v(V::StringValue(String::new()))],
                    })),
                ),
                (
                    "nested".to_owned(),
                    v(V::StructValue(Struct {
                        fields: [("k".to_owned(), v(V::NumberValue(0.1)))].into(),
                    })),
                ),
            ]
            .into(),
        }
    }

    fn job() -> pb::Job {
        pb::Job {
            name: "projects/p/jobs/j".into(),
            kind: "render".into(),
            input: Some(input()),
            state: pb::job::State::Failed as i32,
            priority: -5,
            max_attempts: 3,
            attempt: 2,
            progress_percent: 40,
            current_step: "encode".into(),
            cancel_requested: true,
            worker_id: "w-1".into(),
            output_assets: vec!["projects/p/assets/a".into(), "projects/p/assets/b".into()],
            error: Some(tonic_types::pb::Status {
                code: 14,
                message: "lease expired".into(),
                details: vec![],
            }),
            labels: [
                ("team".to_owned(), "ads".to_owned()),
                ("a".to_owned(), String::new()),
            ]
            .into(),
            sequence: 9_007_199_254_740_993,
            create_time: Some(Timestamp {
                seconds: 1_700_000_000,
                nanos: 120_000_000,
            }),
            start_time: Some(Timestamp {
                seconds: 1_700_000_001,
                nanos: 7,
            }),
            update_time: Some(Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn matches_prost_reflect_on_the_api_messages() {
        same("mediaplane.v1.Job", &job());
        same("mediaplane.v1.Job", &pb::Job::default());
        same(
            "mediaplane.v1.ListJobsResponse",
            &pb::ListJobsResponse {
                jobs: vec![job(), pb::Job::default(), job()],
                next_page_token: "tok".into(),
            },
        );
        same(
            "mediaplane.v1.JobEvent",
            &pb::JobEvent {
                sequence: 3,
                r#type: 2,
                job: Some(job()),
                event_time: Some(Timestamp {
                    seconds: 1,
                    nanos: 999_999_999,
                }),
            },
        );
        let project = pb::Project {
            name: "projects/p".into(),
            display_name: "Spring ads".into(),
            description: "\u{1f3ac} clips".into(),
            labels: [("env".to_owned(), "prod".to_owned())].into(),
            metadata: Some(input()),
            create_time: Some(Timestamp {
                seconds: 1_700_000_000,
                nanos: 1_000,
            }),
            etag: "W/\"3\"".into(),
            ..Default::default()
        };
        same("mediaplane.v1.Project", &project);
        same(
            "mediaplane.v1.ListProjectsResponse",
            &pb::ListProjectsResponse {
                projects: vec![project.clone(); 50],
                next_page_token: String::new(),
            },
        );
        same(
            "mediaplane.v1.Asset",
            &pb::Asset {
                name: "projects/p/assets/a".into(),
                size_bytes: 1 << 40,
                sha256: "00ff".into(),
                state: pb::asset::State::Ready as i32,
                ..Default::default()
            },
        );
    }

    #[test]
    fn falls_back_on_what_it_does_not_write() {
        let pool = DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let desc = pool.get_message_by_name("mediaplane.v1.Job").unwrap();
        let with_any = pb::Job {
            error: Some(tonic_types::pb::Status {
                code: 3,
                message: "bad".into(),
                details: vec![prost_types::Any {
                    type_url: "type.googleapis.com/google.rpc.BadRequest".into(),
                    value: vec![],
                }],
            }),
            ..Default::default()
        };
        assert!(super::render(&desc, &with_any.encode_to_vec()).is_none());
        let far_future = pb::Job {
            create_time: Some(Timestamp {
                seconds: 300_000_000_000,
                nanos: 0,
            }),
            ..Default::default()
        };
        assert!(super::render(&desc, &far_future.encode_to_vec()).is_none());
        assert!(
            super::render(&desc, &[0x0a, 0x05, b'a']).is_none(),
            "truncated"
        );
    }
}
