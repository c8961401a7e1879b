//! Every conversion between the wire (`proto::v1`, protobuf well-known types) and
//! the domain, in one place: the API handlers, the engine's watch streams and the
//! client tools all convert through here. Well-known types are below; each
//! resource has a file.
pub mod asset;
pub mod job;
pub mod project;
pub mod queue;

use chrono::{DateTime, Utc};
use prost_types::{ListValue, Struct, Timestamp, Value, value::Kind};

pub fn timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// `google.protobuf.Struct` to a JSON object; `Err` names the first value JSON or
/// Postgres cannot hold (NaN, NUL, nesting past the limit).
pub fn struct_to_json(s: Struct) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let map = s
        .fields
        .into_iter()
        .map(|(k, v)| value_to_json(v).map(|v| (k, v)).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    crate::domain::text::check_json(&map, 0)?;
    Ok(map)
}

fn value_to_json(v: Value) -> Result<serde_json::Value, &'static str> {
    Ok(match v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => b.into(),
        Some(Kind::StringValue(s)) => s.into(),
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(n)
            .map(serde_json::Value::Number)
            .ok_or("numbers must be finite (no NaN or Infinity)")?,
        Some(Kind::StructValue(s)) => serde_json::Value::Object(
            s.fields
                .into_iter()
                .map(|(k, v)| value_to_json(v).map(|v| (k, v)))
                .collect::<Result<_, _>>()?,
        ),
        Some(Kind::ListValue(l)) => l
            .values
            .into_iter()
            .map(value_to_json)
            .collect::<Result<Vec<_>, _>>()?
            .into(),
    })
}

pub fn json_to_struct(map: serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct {
        fields: map
            .into_iter()
            .map(|(k, v)| (k, json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(v: serde_json::Value) -> Value {
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(ListValue {
            values: a.into_iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(json_to_struct(o)),
    };
    Value { kind: Some(kind) }
}

/// Largest `google.protobuf.Duration` (about 10,000 years, per its definition).
const MAX_DURATION_SECS: i64 = 315_576_000_000;

/// A valid, non-negative Duration; `None` for negative or out-of-range values.
pub fn duration(d: &prost_types::Duration) -> Option<std::time::Duration> {
    if !(0..=MAX_DURATION_SECS).contains(&d.seconds) || !(0..1_000_000_000).contains(&d.nanos) {
        return None;
    }
    Some(std::time::Duration::new(d.seconds as u64, d.nanos as u32))
}

/// A valid Timestamp inside the years storage accepts.
pub fn datetime(t: &Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)
        .filter(|t| crate::domain::text::storable_time(*t))
}
