//! `GET /openapi.json`: an OpenAPI 3.1 document generated at start from the same
//! descriptors and HTTP rules the edge routes by, with the proto comments.
use std::collections::{BTreeMap, BTreeSet};

use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

use super::rules::Binding;

fn comment(file: &prost_types::FileDescriptorProto, path: &[i32]) -> Option<String> {
    let info = file.source_code_info.as_ref()?;
    let loc = info.location.iter().find(|l| l.path == path)?;
    let text = loc.leading_comments.as_deref().unwrap_or("").trim();
    (!text.is_empty()).then(|| text.lines().map(str::trim).collect::<Vec<_>>().join("\n"))
}

fn field_comment(f: &FieldDescriptor) -> Option<String> {
    comment(f.parent_file().file_descriptor_proto(), f.path())
}

/// Schema of a field's value (one element for lists).
fn value_schema(kind: Kind, refs: &mut BTreeSet<String>) -> Value {
    match kind {
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
        Kind::Bool => json!({"type": "boolean"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Uint32 | Kind::Fixed32 => {
            json!({"type": "integer", "format": "int32"})
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
            json!({"type": "string", "format": "int64", "description": "64-bit integer as a decimal string"})
        }
        Kind::Float | Kind::Double => json!({"type": "number"}),
        Kind::Enum(e) => {
            json!({"type": "string", "enum": e.values().map(|v| v.name().to_owned()).collect::<Vec<_>>()})
        }
        Kind::Message(m) => match m.full_name() {
            "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
            "google.protobuf.Duration" => {
                json!({"type": "string", "description": "seconds with an `s` suffix, e.g. `1.5s`"})
            }
            "google.protobuf.FieldMask" => {
                json!({"type": "string", "description": "comma-separated field paths"})
            }
            "google.protobuf.Struct" => json!({"type": "object", "additionalProperties": true}),
            "google.protobuf.Value" => json!({}),
            "google.protobuf.Empty" => json!({"type": "object"}),
            name => {
                refs.insert(name.to_owned());
                json!({"$ref": format!("#/components/schemas/{name}")})
            }
        },
    }
}

fn field_schema(f: &FieldDescriptor, refs: &mut BTreeSet<String>) -> Value {
    let mut s = if f.is_map() {
        let Kind::Message(entry) = f.kind() else {
            unreachable!("maps are messages")
        };
        json!({"type": "object", "additionalProperties": value_schema(entry.map_entry_value_field().kind(), refs)})
    } else if f.is_list() {
        json!({"type": "array", "items": value_schema(f.kind(), refs)})
    } else {
        value_schema(f.kind(), refs)
    };
    if let (Some(c), Value::Object(o)) = (field_comment(f), &mut s) {
        o.insert("description".into(), Value::String(c));
    }
    s
}

fn message_schema(
    m: &MessageDescriptor,
    skip: &BTreeSet<String>,
    refs: &mut BTreeSet<String>,
) -> Value {
    let mut props = Map::new();
    for f in m.fields() {
        if skip.contains(f.name()) {
            continue;
        }
        props.insert(f.json_name().to_owned(), field_schema(&f, refs));
    }
    let mut s = json!({"type": "object", "properties": props});
    if let Some(c) = comment(m.parent_file_descriptor_proto(), m.path()) {
        s["description"] = Value::String(c);
    }
    s
}

pub fn document(pool: &DescriptorPool, bindings: &[Binding]) -> Value {
    let mut refs = BTreeSet::new();
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for b in bindings {
        let input = b.rpc.input();
        let path_fields: BTreeSet<String> =
            b.template.vars.iter().map(|v| v.field.clone()).collect();
        let top_path_fields: BTreeSet<String> = path_fields
            .iter()
            .map(|f| f.split('.').next().unwrap_or(f).to_owned())
            .collect();
        let mut parameters: Vec<Value> = path_fields
            .iter()
            .map(|f| json!({"name": f, "in": "path", "required": true, "schema": {"type": "string"}, "description": format!("resource name bound to `{f}`")}))
            .collect();
        if b.body.is_empty() {
            for f in input.fields() {
                if top_path_fields.contains(f.name())
                    || (matches!(f.kind(), Kind::Message(_)) && !is_wkt(&f))
                {
                    continue;
                }
                let mut p = json!({"name": f.json_name(), "in": "query", "schema": field_schema(&f, &mut refs)});
                if f.is_list() {
                    p["explode"] = Value::Bool(true);
                }
                parameters.push(p);
            }
        }
        parameters.push(json!({"name": "timeout", "in": "query", "schema": {"type": "string"}, "description": "deadline, e.g. `5s`"}));
        let mut op = json!({
            "operationId": format!("{}.{}", b.rpc.parent_service().name(), b.rpc.name()),
            "tags": [b.rpc.parent_service().name()],
            "parameters": parameters,
            "responses": {"default": {"description": "an error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
        });
        if let Some(c) = comment(b.rpc.parent_file().file_descriptor_proto(), b.rpc.path()) {
            op["description"] = Value::String(c);
        }
        if !b.body.is_empty() {
            let schema = if b.body == "*" {
                message_schema(&input, &top_path_fields, &mut refs)
            } else {
                input
                    .get_field_by_name(&b.body)
                    .map(|f| field_schema(&f, &mut refs))
                    .unwrap_or(json!({}))
            };
            op["requestBody"] =
                json!({"required": true, "content": {"application/json": {"schema": schema}}});
        }
        let output = b.rpc.output();
        let out_schema = if b.response_body.is_empty() {
            value_schema(Kind::Message(output.clone()), &mut refs)
        } else {
            output
                .get_field_by_name(&b.response_body)
                .map(|f| field_schema(&f, &mut refs))
                .unwrap_or(json!({}))
        };
        op["responses"]["200"] = if b.rpc.is_server_streaming() {
            json!({"description": "a stream: one `{\"result\": ...}` JSON object per line, and a final `{\"error\": ...}` line if it fails; with `Accept: text/event-stream`, Server-Sent Events (`id` = sequence, a final `status` event; resume with `Last-Event-ID`)",
            "content": {
                "application/x-ndjson": {"schema": {"type": "object", "properties": {"result": out_schema.clone(), "error": {"$ref": "#/components/schemas/Status"}}}},
                "text/event-stream": {"schema": {"type": "string"}}
            }})
        } else {
            json!({"description": "OK", "content": {"application/json": {"schema": out_schema}}})
        };
        paths
            .entry(b.template.display())
            .or_default()
            .insert(b.method.as_str().to_ascii_lowercase(), op);
    }

    let mut schemas = Map::new();
    let mut done = BTreeSet::new();
    while let Some(name) = refs.iter().find(|r| !done.contains(*r)).cloned() {
        done.insert(name.clone());
        if let Some(m) = pool.get_message_by_name(&name) {
            let schema = message_schema(&m, &BTreeSet::new(), &mut refs);
            schemas.insert(name, schema);
        }
    }
    schemas.insert(
        "Status".into(),
        json!({"type": "object", "properties": {"code": {"type": "integer"}, "status": {"type": "string"}, "message": {"type": "string"}, "details": {"type": "array", "items": {"type": "object"}}}}),
    );
    schemas.insert("Error".into(), json!({"type": "object", "properties": {"error": {"$ref": "#/components/schemas/Status"}}, "required": ["error"]}));

    json!({
        "openapi": "3.1.0",
        "info": {"title": "mediaplane", "version": env!("CARGO_PKG_VERSION"), "description": "The mediaplane API over HTTP/JSON, transcoded from the gRPC services by their google.api.http rules."},
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
        }
    })
}

fn is_wkt(f: &FieldDescriptor) -> bool {
    matches!(f.kind(), Kind::Message(m) if m.full_name().starts_with("google.protobuf.") && m.full_name() != "google.protobuf.Struct")
}
