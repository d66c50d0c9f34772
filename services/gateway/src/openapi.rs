//! `GET /openapi.json`: the OpenAPI 3.1 document of the edge, generated from the route table
//! and the contract's message descriptors (one definition of each field).

use std::collections::BTreeMap;

use axum::response::{IntoResponse, Response};
use prost_reflect::{Cardinality, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

use crate::mesh;
use crate::routes::{ROUTES, Shape};

pub async fn document() -> Response {
    axum::Json(build()).into_response()
}

fn build() -> Value {
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut schemas = BTreeMap::new();
    for route in ROUTES {
        let path = template(route.path);
        let mut operation = Map::new();
        operation.insert(
            "operationId".into(),
            operation_id(route.rpc, route.path).into(),
        );
        let parameters: Vec<Value> = path_parameters(route.path)
            .into_iter()
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        operation.insert("parameters".into(), parameters.into());
        if route.shape == Shape::Unimplemented || route.rpc.is_empty() {
            operation.insert("description".into(), "Not offered by Kiln: 501.".into());
        } else {
            let method = mesh::method(route.rpc);
            let (request, answer) = (method.input(), method.output());
            let body = match route.shape {
                Shape::CreateFlat { field, .. } | Shape::Update { field } => request
                    .get_field_by_name(field)
                    .and_then(|f| f.kind().as_message().cloned()),
                Shape::CreateWrapped | Shape::Custom => Some(request.clone()),
                _ => None,
            };
            if let Some(body) = body.filter(|_| route.method != "GET" && route.method != "DELETE") {
                operation.insert(
                    "requestBody".into(),
                    json!({"content": {"application/json": {"schema": reference(&body, &mut schemas)}}}),
                );
            }
            operation.insert(
                "responses".into(),
                json!({
                    "200": {"description": "OK", "content": {"application/json": {"schema": reference(&answer, &mut schemas)}}},
                    "default": {"description": "A google.rpc error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                }),
            );
        }
        paths
            .entry(path)
            .or_default()
            .insert(route.method.to_ascii_lowercase(), Value::Object(operation));
    }
    for prefix in ["/v1", "/inference/v1"] {
        for (path, rpc) in [
            (
                "chat/completions",
                "kiln.inference.v1.InferenceService/CreateChatCompletion",
            ),
            (
                "completions",
                "kiln.inference.v1.InferenceService/CreateCompletion",
            ),
            (
                "embeddings",
                "kiln.inference.v1.InferenceService/CreateEmbeddings",
            ),
        ] {
            let method = mesh::method(rpc);
            paths.entry(format!("{prefix}/{path}")).or_default().insert(
                "post".into(),
                json!({
                    "operationId": format!("{}{}", if prefix == "/v1" { "" } else { "inference_" }, path.replace('/', "_")),
                    "requestBody": {"content": {"application/json": {"schema": reference(&method.input(), &mut schemas)}}},
                    "responses": {"200": {"description": "OK; with stream: true, server-sent events of chunks", "content": {"application/json": {"schema": reference(&method.output(), &mut schemas)}}}},
                }),
            );
        }
    }
    let mut components: Map<String, Value> = schemas.into_iter().collect();
    components.insert(
        "Error".into(),
        json!({"type": "object", "properties": {"code": {"type": "integer"}, "status": {"type": "string"}, "message": {"type": "string"}, "details": {"type": "array"}}}),
    );
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Kiln", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    })
}

/// `accounts/{}/models/{}:prepare` -> `/v1/accounts/{account}/models/{model}:prepare`.
pub fn template(path: &str) -> String {
    let names = path_parameters(path);
    let mut names = names.iter();
    let parts: Vec<String> = path
        .split('/')
        .map(|part| match part.strip_prefix("{}") {
            Some(rest) => format!("{{{}}}{rest}", names.next().expect("a name per parameter")),
            None => part.to_owned(),
        })
        .collect();
    format!("/v1/{}", parts.join("/"))
}

/// The path parameters' names: each collection's singular + `_id` (`account_id`, `model_id`).
fn path_parameters(path: &str) -> Vec<String> {
    let parts: Vec<&str> = path.split('/').collect();
    parts
        .windows(2)
        .filter(|w| w[1].starts_with("{}"))
        .map(|w| {
            let collection = w[0];
            let singular = collection.strip_suffix('s').unwrap_or(collection);
            format!("{}_id", snake(singular))
        })
        .collect()
}

fn operation_id(rpc: &str, path: &str) -> String {
    match rpc.rsplit_once('/') {
        Some((_, method)) if !rpc.is_empty() => {
            let verb = path.rsplit_once(':').map(|(_, v)| v).unwrap_or_default();
            format!(
                "{method}{}",
                if verb.is_empty() {
                    String::new()
                } else {
                    format!("_{verb}")
                }
            )
        }
        _ => path.replace(['/', '{', '}', ':'], "_"),
    }
}

fn snake(camel: &str) -> String {
    let mut out = String::new();
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn reference(message: &MessageDescriptor, schemas: &mut BTreeMap<String, Value>) -> Value {
    let name = message.full_name().to_owned();
    if let Some(schema) = well_known(&name) {
        return schema;
    }
    if !schemas.contains_key(&name) {
        schemas.insert(name.clone(), Value::Null);
        let mut properties = Map::new();
        for field in message.fields() {
            properties.insert(field.json_name().to_owned(), field_schema(&field, schemas));
        }
        schemas.insert(
            name.clone(),
            json!({"type": "object", "properties": properties}),
        );
    }
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn well_known(name: &str) -> Option<Value> {
    Some(match name {
        "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
        "google.protobuf.Duration" => json!({"type": "string", "example": "3600s"}),
        "google.protobuf.FieldMask" => json!({"type": "string"}),
        _ => return None,
    })
}

fn field_schema(field: &FieldDescriptor, schemas: &mut BTreeMap<String, Value>) -> Value {
    if field.is_map() {
        let value = field
            .kind()
            .as_message()
            .and_then(|entry| entry.get_field_by_name("value"))
            .map(|v| kind_schema(&v.kind(), schemas))
            .unwrap_or(json!({}));
        return json!({"type": "object", "additionalProperties": value});
    }
    let item = kind_schema(&field.kind(), schemas);
    match field.cardinality() {
        Cardinality::Repeated => json!({"type": "array", "items": item}),
        _ => item,
    }
}

fn kind_schema(kind: &Kind, schemas: &mut BTreeMap<String, Value>) -> Value {
    match kind {
        Kind::Double | Kind::Float => json!({"type": "number"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Uint32 | Kind::Fixed32 => {
            json!({"type": "integer"})
        }
        // proto3 JSON writes 64-bit integers as strings.
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
            json!({"type": "string", "format": "int64"})
        }
        Kind::Bool => json!({"type": "boolean"}),
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "format": "byte"}),
        Kind::Enum(e) => {
            let names: Vec<String> = e
                .values()
                .map(|v| crate::json::public_enum_name(v.name()).to_owned())
                .collect();
            json!({"type": "string", "enum": names})
        }
        Kind::Message(m) => reference(m, schemas),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_has_every_route_with_its_schemas() {
        let document = build();
        for route in ROUTES {
            let path = template(route.path);
            assert!(
                document["paths"][&path][route.method.to_ascii_lowercase()].is_object(),
                "{} {path}",
                route.method
            );
        }
        let create = &document["paths"]["/v1/accounts/{account_id}/models"]["post"];
        assert_eq!(
            create["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/kiln.registry.v1.CreateModelRequest"
        );
        let model = &document["components"]["schemas"]["kiln.registry.v1.Model"];
        assert_eq!(model["properties"]["createTime"]["format"], "date-time");
        assert_eq!(model["properties"]["displayName"]["type"], "string");
        let kinds = &document["components"]["schemas"]["kiln.registry.v1.Model"]["properties"]["kind"]
            ["enum"];
        assert!(
            kinds.as_array().unwrap().contains(&"HF_PEFT_ADDON".into()),
            "{kinds}"
        );
        assert_eq!(
            template("accounts/{}/users/{}/apiKeys:delete"),
            "/v1/accounts/{account_id}/users/{user_id}/apiKeys:delete"
        );
    }
}
