//! The OTLP `ExportTraceServiceRequest`, encoded straight from the SDK's span data.
//!
//! The same bytes opentelemetry-proto's structs would encode to (a test below decodes
//! ours with that crate and compares them with its own conversion), without building
//! them: no id, key or string is copied into a struct of its own first. Fields follow
//! `opentelemetry/proto/trace/v1/trace.proto` (numbers in the comments); prost's
//! encoding functions write the keys and varints.
use bytes::BufMut;
use opentelemetry::{
    Array, InstrumentationScope, KeyValue, Value,
    trace::{SpanContext, SpanId, SpanKind, Status},
};
use opentelemetry_sdk::{Resource, trace::SpanData};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

/// Reused buffers: one batch's spans, grouped by instrumentation scope.
#[derive(Default)]
pub struct Encoder {
    /// The `Resource` (ResourceSpans field 1) and its schema URL (field 3), encoded.
    resource: Vec<u8>,
    schema_url: Vec<u8>,
    /// Per scope of the current batch, its encoded spans (ScopeSpans field 2 each).
    scopes: Vec<Vec<u8>>,
    span: Vec<u8>,
}

impl Encoder {
    pub fn new(resource: &Resource) -> Self {
        let mut encoder = Self::default();
        encoder.set_resource(resource);
        encoder
    }

    pub fn set_resource(&mut self, resource: &Resource) {
        let mut body = Vec::new();
        for (key, value) in resource.iter() {
            key_value(&mut body, 1, key.as_str(), value);
        }
        self.resource.clear();
        nested(&mut self.resource, 1, &body);
        self.schema_url.clear();
        string(
            &mut self.schema_url,
            3,
            resource.schema_url().unwrap_or_default(),
        );
    }

    /// The request for `batch`: one ResourceSpans, one ScopeSpans per scope in order
    /// of first appearance, spans in batch order.
    pub fn encode(&mut self, batch: &[SpanData]) -> Vec<u8> {
        let mut scopes: Vec<&InstrumentationScope> = Vec::new();
        for buf in &mut self.scopes {
            buf.clear();
        }
        for data in batch {
            let i = match scopes
                .iter()
                .position(|s| **s == data.instrumentation_scope)
            {
                Some(i) => i,
                None => {
                    scopes.push(&data.instrumentation_scope);
                    if self.scopes.len() < scopes.len() {
                        self.scopes.push(Vec::new());
                    }
                    scopes.len() - 1
                }
            };
            self.span.clear();
            span(&mut self.span, data);
            nested(&mut self.scopes[i], 2, &self.span);
        }
        // ScopeSpans: the scope (1), its spans (2), its schema URL (3).
        let mut resource_spans = self.resource.len() + self.schema_url.len();
        let mut headers = Vec::with_capacity(scopes.len());
        for (scope, spans) in scopes.iter().zip(&self.scopes) {
            let mut header = Vec::new();
            scope_message(&mut header, scope);
            let mut tail = Vec::new();
            string(&mut tail, 3, scope.schema_url().unwrap_or_default());
            resource_spans += field_len(header.len() + spans.len() + tail.len());
            headers.push((header, tail));
        }
        let mut out = Vec::with_capacity(field_len(resource_spans));
        encode_key(1, WireType::LengthDelimited, &mut out);
        encode_varint(resource_spans as u64, &mut out);
        out.put_slice(&self.resource);
        for ((header, tail), spans) in headers.iter().zip(&self.scopes) {
            encode_key(2, WireType::LengthDelimited, &mut out);
            encode_varint((header.len() + spans.len() + tail.len()) as u64, &mut out);
            out.put_slice(header);
            out.put_slice(spans);
            out.put_slice(tail);
        }
        out.put_slice(&self.schema_url);
        out
    }
}

/// ScopeSpans field 1: `InstrumentationScope` (name 1, version 2, attributes 3).
fn scope_message(out: &mut Vec<u8>, scope: &InstrumentationScope) {
    let mut body = Vec::new();
    string(&mut body, 1, scope.name());
    string(&mut body, 2, scope.version().unwrap_or_default());
    for kv in scope.attributes() {
        key_value(&mut body, 3, kv.key.as_str(), &kv.value);
    }
    nested(out, 1, &body);
}

/// One `Span`'s fields.
fn span(out: &mut Vec<u8>, data: &SpanData) {
    let sc = &data.span_context;
    bytes(out, 1, &sc.trace_id().to_bytes());
    bytes(out, 2, &sc.span_id().to_bytes());
    string(out, 3, &sc.trace_state().header());
    if data.parent_span_id != SpanId::INVALID {
        bytes(out, 4, &data.parent_span_id.to_bytes());
    }
    string(out, 5, &data.name);
    varint(out, 6, kind(&data.span_kind));
    fixed64(out, 7, nanos(data.start_time));
    fixed64(out, 8, nanos(data.end_time));
    for kv in &data.attributes {
        key_value_of(out, 9, kv);
    }
    varint(out, 10, data.dropped_attributes_count.into());
    for event in data.events.iter() {
        // Event: time 1, name 2, attributes 3, dropped attributes 4.
        let attrs: usize = event.attributes.iter().map(key_value_len).sum();
        let time = nanos(event.timestamp);
        let len = fixed64_len(time)
            + string_len(&event.name)
            + attrs
            + varint_len(event.dropped_attributes_count.into());
        encode_key(11, WireType::LengthDelimited, out);
        encode_varint(len as u64, out);
        fixed64(out, 1, time);
        string(out, 2, &event.name);
        for kv in &event.attributes {
            key_value_of(out, 3, kv);
        }
        varint(out, 4, event.dropped_attributes_count.into());
    }
    varint(out, 12, data.events.dropped_count.into());
    for link in data.links.iter() {
        // Link: trace id 1, span id 2, trace state 3, attributes 4, dropped 5, flags 6.
        let lc = &link.span_context;
        let state = lc.trace_state().header();
        let attrs: usize = link.attributes.iter().map(key_value_len).sum();
        // Ids are always written (16 and 8 bytes), and so are the flags (never 0).
        let len = 18
            + 10
            + string_len(&state)
            + attrs
            + varint_len(link.dropped_attributes_count.into())
            + 5;
        encode_key(13, WireType::LengthDelimited, out);
        encode_varint(len as u64, out);
        bytes(out, 1, &lc.trace_id().to_bytes());
        bytes(out, 2, &lc.span_id().to_bytes());
        string(out, 3, &state);
        for kv in &link.attributes {
            key_value_of(out, 4, kv);
        }
        varint(out, 5, link.dropped_attributes_count.into());
        fixed32(out, 6, flags(lc, lc.is_remote()));
    }
    varint(out, 14, data.links.dropped_count.into());
    // Status (always present): message 2, code 3 (unset 0, ok 1, error 2).
    let (code, message) = match &data.status {
        Status::Unset => (0, ""),
        Status::Ok => (1, ""),
        Status::Error { description } => (2, description.as_ref()),
    };
    encode_key(15, WireType::LengthDelimited, out);
    encode_varint((string_len(message) + varint_len(code)) as u64, out);
    string(out, 2, message);
    varint(out, 3, code);
    fixed32(out, 16, flags(sc, data.parent_span_is_remote));
}

/// `SpanFlags`: the W3C trace flags, plus "whether the parent is remote is known" and
/// that answer.
fn flags(sc: &SpanContext, remote: bool) -> u32 {
    u32::from(sc.trace_flags().to_u8()) | 0x100 | if remote { 0x200 } else { 0 }
}

fn kind(kind: &SpanKind) -> u64 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

fn nanos(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn key_value_of(out: &mut Vec<u8>, field: u32, kv: &KeyValue) {
    key_value(out, field, kv.key.as_str(), &kv.value);
}

fn key_value_len(kv: &KeyValue) -> usize {
    field_len(key_value_body_len(kv.key.as_str(), &kv.value))
}

fn key_value_body_len(key: &str, value: &Value) -> usize {
    string_len(key) + field_len(any_value_len(value))
}

/// `KeyValue`: key 1, value 2 (an `AnyValue`, always present).
fn key_value(out: &mut Vec<u8>, field: u32, key: &str, value: &Value) {
    encode_key(field, WireType::LengthDelimited, out);
    encode_varint(key_value_body_len(key, value) as u64, out);
    string(out, 1, key);
    encode_key(2, WireType::LengthDelimited, out);
    encode_varint(any_value_len(value) as u64, out);
    any_value(out, value);
}

/// `AnyValue` is a oneof: its one field is written even when it holds a default.
/// string 1, bool 2, int 3, double 4, array 5 (`ArrayValue`: values 1).
fn any_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Bool(b) => {
            encode_key(2, WireType::Varint, out);
            encode_varint(u64::from(*b), out);
        }
        Value::I64(i) => {
            encode_key(3, WireType::Varint, out);
            encode_varint(*i as u64, out);
        }
        Value::F64(f) => {
            encode_key(4, WireType::SixtyFourBit, out);
            out.put_f64_le(*f);
        }
        Value::String(s) => {
            encode_key(1, WireType::LengthDelimited, out);
            encode_varint(s.as_str().len() as u64, out);
            out.put_slice(s.as_str().as_bytes());
        }
        Value::Array(array) => {
            encode_key(5, WireType::LengthDelimited, out);
            encode_varint(array_len(array) as u64, out);
            for_each_item(array, |item| {
                encode_key(1, WireType::LengthDelimited, out);
                encode_varint(any_value_len(&item) as u64, out);
                any_value(out, &item);
            });
        }
        // A kind of value added to the API later: sent as an empty AnyValue.
        _ => {}
    }
}

fn any_value_len(value: &Value) -> usize {
    match value {
        Value::Bool(_) => 2,
        Value::I64(i) => 1 + encoded_len_varint(*i as u64),
        Value::F64(_) => 9,
        Value::String(s) => field_len(s.as_str().len()),
        Value::Array(array) => field_len(array_len(array)),
        _ => 0,
    }
}

fn array_len(array: &Array) -> usize {
    let mut len = 0;
    for_each_item(array, |item| len += field_len(any_value_len(&item)));
    len
}

/// Each item of `array` as a scalar `Value` (strings are reference-counted or static:
/// cloning one copies no text).
fn for_each_item(array: &Array, mut f: impl FnMut(Value)) {
    match array {
        Array::Bool(v) => v.iter().for_each(|b| f(Value::Bool(*b))),
        Array::I64(v) => v.iter().for_each(|i| f(Value::I64(*i))),
        Array::F64(v) => v.iter().for_each(|x| f(Value::F64(*x))),
        Array::String(v) => v.iter().for_each(|s| f(Value::String(s.clone()))),
        _ => {}
    }
}

/// Key, length and body of a length-delimited field of `len` bytes.
fn field_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

fn nested(out: &mut Vec<u8>, field: u32, body: &[u8]) {
    encode_key(field, WireType::LengthDelimited, out);
    encode_varint(body.len() as u64, out);
    out.put_slice(body);
}

// Scalar fields are left out when they hold their default, as proto3 encoders do.

fn string_len(s: &str) -> usize {
    if s.is_empty() { 0 } else { field_len(s.len()) }
}

fn string(out: &mut Vec<u8>, field: u32, s: &str) {
    bytes(out, field, s.as_bytes());
}

fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    if !b.is_empty() {
        nested(out, field, b);
    }
}

fn varint_len(v: u64) -> usize {
    if v == 0 { 0 } else { 1 + encoded_len_varint(v) }
}

fn varint(out: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        encode_key(field, WireType::Varint, out);
        encode_varint(v, out);
    }
}

fn fixed64_len(v: u64) -> usize {
    if v == 0 { 0 } else { 9 }
}

fn fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        encode_key(field, WireType::SixtyFourBit, out);
        out.put_u64_le(v);
    }
}

fn fixed32(out: &mut Vec<u8>, field: u32, v: u32) {
    if v != 0 {
        encode_key(field, WireType::ThirtyTwoBit, out);
        out.put_u32_le(v);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use opentelemetry::{
        Array, InstrumentationScope, KeyValue, StringValue, Value,
        trace::{
            Event, Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
        },
    };
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::{
        common::tonic::ResourceAttributesWithSchema,
        trace::tonic::group_spans_by_resource_and_scope,
    };
    use opentelemetry_sdk::{
        Resource,
        trace::{SpanData, SpanEvents, SpanLinks},
    };
    use prost::Message;

    use super::Encoder;

    fn context(seed: u8, remote: bool, state: &str) -> SpanContext {
        SpanContext::new(
            TraceId::from_bytes([seed; 16]),
            SpanId::from_bytes([seed.wrapping_add(1); 8]),
            TraceFlags::SAMPLED,
            remote,
            state.parse::<TraceState>().unwrap(),
        )
    }

    fn attributes(n: i64) -> Vec<KeyValue> {
        vec![
            KeyValue::new("request_id", format!("req-{n}")),
            KeyValue::new("rpc.grpc.status_code", n),
            KeyValue::new("negative", -n - 1),
            KeyValue::new("ratio", 0.25 * n as f64),
            KeyValue::new("zero.float", 0.0),
            KeyValue::new("flag", n % 2 == 0),
            KeyValue::new("empty", ""),
            KeyValue::new("", "empty key"),
            KeyValue::new("bools", Value::Array(Array::Bool(vec![true, false]))),
            KeyValue::new("ints", Value::Array(Array::I64(vec![0, -1, i64::MAX]))),
            KeyValue::new("floats", Value::Array(Array::F64(vec![1.5, 0.0]))),
            KeyValue::new(
                "strings",
                Value::Array(Array::String(vec![
                    StringValue::from("a"),
                    StringValue::from(""),
                    StringValue::from("é".repeat(100)),
                ])),
            ),
            KeyValue::new("no.items", Value::Array(Array::I64(vec![]))),
        ]
    }

    fn span(n: u8, scope: &InstrumentationScope) -> SpanData {
        let start = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let mut events = SpanEvents::default();
        let mut links = SpanLinks::default();
        if n % 2 == 1 {
            events.events.push(Event::new(
                "retry",
                start + Duration::from_micros(5),
                attributes(n.into()),
                1,
            ));
            events
                .events
                .push(Event::new("", SystemTime::UNIX_EPOCH, vec![], 0));
            events.dropped_count = 2;
            links
                .links
                .push(Link::new(context(n + 40, true, "k=v"), vec![], 0));
            links
                .links
                .push(Link::new(context(n + 50, false, ""), attributes(3), 4));
            links.dropped_count = 1;
        }
        SpanData {
            span_context: context(n, false, if n % 3 == 0 { "" } else { "a=1,b=2" }),
            parent_span_id: if n % 2 == 0 {
                SpanId::INVALID
            } else {
                SpanId::from_bytes([9; 8])
            },
            parent_span_is_remote: n % 4 == 1,
            span_kind: [
                SpanKind::Server,
                SpanKind::Client,
                SpanKind::Internal,
                SpanKind::Producer,
                SpanKind::Consumer,
            ][usize::from(n) % 5]
                .clone(),
            name: format!("/mediaplane.v1.ProjectsService/GetProject{n}").into(),
            start_time: start,
            end_time: start + Duration::from_millis(u64::from(n)),
            attributes: if n == 2 { vec![] } else { attributes(n.into()) },
            dropped_attributes_count: u32::from(n % 3),
            events,
            links,
            status: [
                Status::Unset,
                Status::Ok,
                Status::error("the database is unreachable"),
                Status::error(""),
            ][usize::from(n) % 4]
                .clone(),
            instrumentation_scope: scope.clone(),
        }
    }

    fn theirs(batch: Vec<SpanData>, resource: &Resource) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                batch,
                &ResourceAttributesWithSchema::from(resource),
            ),
        }
    }

    #[test]
    fn batches_encode_as_opentelemetry_proto_converts_them() {
        let ours_scope = InstrumentationScope::builder("mediaplane").build();
        let other = InstrumentationScope::builder("other")
            .with_version("1.2.3")
            .with_schema_url("https://opentelemetry.io/schemas/1.26.0")
            .with_attributes([KeyValue::new("scope.attr", 7)])
            .build();
        let resource = Resource::builder()
            .with_service_name("mediaplane")
            .with_attribute(KeyValue::new("host.cores", 2))
            .with_schema_url([], "https://opentelemetry.io/schemas/1.26.0")
            .build();
        let batch: Vec<SpanData> = (0..12u8)
            .map(|n| span(n, if n % 5 == 3 { &other } else { &ours_scope }))
            .collect();
        let mut encoder = Encoder::new(&resource);
        let ours = ExportTraceServiceRequest::decode(encoder.encode(&batch).as_slice()).unwrap();
        assert_eq!(ours, theirs(batch.clone(), &resource));
        assert_eq!(ours.resource_spans[0].scope_spans.len(), 2);

        // Buffers are reused: a second, smaller batch of one scope carries nothing over.
        let one: Vec<SpanData> = batch.iter().take(2).cloned().collect();
        let again = ExportTraceServiceRequest::decode(encoder.encode(&one).as_slice()).unwrap();
        assert_eq!(again, theirs(one, &resource));

        // And the empty resource an exporter starts with.
        let bare = Resource::builder_empty().build();
        let mut encoder = Encoder::new(&bare);
        let plain = ExportTraceServiceRequest::decode(encoder.encode(&batch).as_slice()).unwrap();
        assert_eq!(plain, theirs(batch, &bare));
    }
}
