//! Conversions between protobuf well-known types and domain values.
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

/// Stored job error as `google.rpc.Status` (code and message).
pub fn job_error(e: crate::domain::job::JobError) -> tonic_types::pb::Status {
    tonic_types::pb::Status {
        code: e.code,
        message: e.message,
        details: vec![],
    }
}

impl From<crate::domain::job::JobState> for crate::proto::v1::job::State {
    fn from(s: crate::domain::job::JobState) -> Self {
        use crate::domain::job::JobState as S;
        match s {
            S::Queued => Self::Queued,
            S::Running => Self::Running,
            S::Succeeded => Self::Succeeded,
            S::Failed => Self::Failed,
            S::Cancelled => Self::Cancelled,
        }
    }
}

impl From<crate::domain::job::Job> for crate::proto::v1::Job {
    fn from(j: crate::domain::job::Job) -> Self {
        use crate::domain::names::JobName;
        let crate::domain::job::Job {
            id,
            project_id,
            owner: _,
            kind,
            input,
            labels,
            state,
            priority,
            max_attempts,
            attempt,
            schedule_time,
            progress_percent,
            current_step,
            message,
            cancel_requested,
            worker_id,
            lease_id: _,
            lease_expire_time,
            result,
            output_assets,
            error,
            sequence,
            create_time,
            start_time,
            end_time,
            update_time,
            // Workers get it with their lease (LeasedJob), not every reader.
            traceparent: _,
        } = j;
        Self {
            name: JobName {
                project: project_id,
                job: id,
            }
            .to_string(),
            kind,
            input: Some(json_to_struct(input)),
            state: crate::proto::v1::job::State::from(state) as i32,
            priority,
            max_attempts,
            attempt,
            schedule_time: Some(timestamp(schedule_time)),
            progress_percent,
            current_step,
            message,
            cancel_requested,
            worker_id: worker_id.unwrap_or_default(),
            lease_expire_time: lease_expire_time.map(timestamp),
            result: result.map(json_to_struct),
            output_assets,
            error: error.map(job_error),
            labels,
            sequence,
            create_time: Some(timestamp(create_time)),
            start_time: start_time.map(timestamp),
            end_time: end_time.map(timestamp),
            update_time: Some(timestamp(update_time)),
        }
    }
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
