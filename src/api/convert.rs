//! Conversions between protobuf well-known types and domain values.
use chrono::{DateTime, Utc};
use prost_types::{ListValue, Struct, Timestamp, Value, value::Kind};

pub fn timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// `google.protobuf.Struct` to a JSON object; `Err` names the first value JSON cannot hold.
pub fn struct_to_json(s: Struct) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    s.fields
        .into_iter()
        .map(|(k, v)| value_to_json(v).map(|v| (k, v)).map_err(|e| e.to_string()))
        .collect()
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
