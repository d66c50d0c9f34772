//! The control plane: a REST call becomes the request message of its route's RPC (path, query
//! and body merged as the public API's three body styles put them), and the answer comes back
//! as the public API's JSON.

use axum::response::{IntoResponse, Response};
use http::{HeaderMap, Method, StatusCode, Uri};
use prost_reflect::{Kind, MessageDescriptor};
use serde_json::{Map, Value};

use crate::errors::{ApiError, Style};
use crate::json::{self, Names};
use crate::mesh::{self, Caller};
use crate::routes::{self, Found, Matched, Shape};
use crate::{Edge, uploads};

/// Any call under `/v1/` that is not an inference route.
pub async fn handle(
    edge: Edge,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let path = uri.path().trim_start_matches("/v1/");
    let path = percent_decode(path);
    let matched = match routes::find(&method, &path) {
        Found::Route(matched) => matched,
        Found::WrongMethod(allowed) => {
            let status = tonic::Status::unimplemented(format!(
                "{method} is not a method of /v1/{path}; it takes {}",
                allowed.join(", ")
            ));
            let mut response = ApiError::new(status, Style::Control).into_response();
            *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            if let Ok(allow) = allowed.join(", ").parse() {
                response.headers_mut().insert(http::header::ALLOW, allow);
            }
            return after_reading(body, &edge, response).await;
        }
        Found::Nothing => {
            let status = tonic::Status::not_found(format!("no route for {method} /v1/{path}"));
            let response = ApiError::new(status, Style::Control).into_response();
            return after_reading(body, &edge, response).await;
        }
    };
    let caller = match Caller::from_headers(&headers) {
        Ok(caller) => caller,
        Err(err) => return after_reading(body, &edge, err.into_response()).await,
    };
    let query = query_pairs(&uri);
    let answer = match matched.route.shape {
        Shape::Edge(route) => {
            uploads::handle(
                &edge,
                route,
                &matched.resource,
                &caller,
                &query,
                &headers,
                body,
            )
            .await
        }
        _ => match read_json(body, edge.max_json_bytes).await {
            Ok(body) => call(&edge, &matched, &caller, &query, body).await,
            Err(err) => Err(err),
        },
    };
    match answer {
        Ok(value) => axum::Json(value).into_response(),
        Err(err) => err.into_response(),
    }
}

/// `response`, once the request's body is read (up to the JSON limit): a body left unread
/// makes the server close the keep-alive connection, racing the client's next request on it.
async fn after_reading(body: axum::body::Body, edge: &Edge, response: Response) -> Response {
    let limit = usize::try_from(edge.max_json_bytes).unwrap_or(usize::MAX);
    let _ = axum::body::to_bytes(body, limit).await;
    response
}

/// The route's RPC with the request the call describes.
async fn call(
    edge: &Edge,
    matched: &Matched,
    caller: &Caller,
    query: &[(String, String)],
    body: Map<String, Value>,
) -> Result<Value, ApiError> {
    let route = &matched.route;
    if route.shape == Shape::Unimplemented {
        let status = tonic::Status::unimplemented(format!(
            "{} {} is not offered by Kiln",
            route.method,
            crate::openapi::template(route.path)
        ));
        return Err(ApiError::new(status, Style::Control));
    }
    let method = mesh::method(route.rpc);
    let request = request_json(&method.input(), matched, query, body)?;
    let message = json::message(method.input(), Value::Object(request), Style::Control)?;
    let answer = edge
        .mesh
        .unary(caller, &method, message)
        .await
        .map_err(|status| ApiError::new(status, Style::Control))?;
    let value = json::value(&answer, Names::Public);
    if method.name() == "ValidateModelUpload" {
        return validation_answer(value);
    }
    Ok(value)
}

/// The request message's JSON: the body placed as the route's shape says, the path's name or
/// parent, and the query parameters that are fields of the request.
fn request_json(
    request: &MessageDescriptor,
    matched: &Matched,
    query: &[(String, String)],
    body: Map<String, Value>,
) -> Result<Map<String, Value>, ApiError> {
    let resource = matched.resource.as_str();
    let parent = resource.rsplit_once('/').map(|(parent, _)| parent);
    let mut out = Map::new();
    match matched.route.shape {
        Shape::Get | Shape::Delete => {
            out.insert("name".into(), resource.into());
        }
        Shape::Custom => {
            out = body;
            out.insert("name".into(), resource.into());
        }
        Shape::List => {
            if let Some(parent) = parent {
                out.insert("parent".into(), parent.into());
            }
        }
        Shape::CreateWrapped => {
            out = body;
            if let Some(parent) = parent {
                out.insert("parent".into(), parent.into());
            }
        }
        Shape::CreateFlat { field, .. } => {
            out.insert(field.into(), Value::Object(body));
            if let Some(parent) = parent {
                out.insert("parent".into(), parent.into());
            }
        }
        Shape::Update { field } => {
            let resource_type = request
                .get_field_by_name(field)
                .and_then(|f| f.kind().as_message().cloned())
                .expect("an update request holds its resource");
            let mut mask = Vec::new();
            for key in body.keys() {
                match json::field_name(&resource_type, key) {
                    Some(name) if name != "name" => mask.push(name),
                    Some(_) => {}
                    None => {
                        return Err(ApiError::invalid(
                            key,
                            format!("is not a field of {}", resource_type.name()),
                            Style::Control,
                        ));
                    }
                }
            }
            let mut resource_body = body;
            resource_body.insert("name".into(), resource.into());
            out.insert(field.into(), Value::Object(resource_body));
            out.insert("update_mask".into(), mask_json(&mask).into());
        }
        Shape::DeleteApiKey => {
            let key_id = body
                .get("keyId")
                .or_else(|| body.get("key_id"))
                .and_then(Value::as_str)
                .filter(|id| !id.is_empty())
                .ok_or_else(|| ApiError::invalid("keyId", "is required", Style::Control))?;
            out.insert("name".into(), format!("{resource}/{key_id}").into());
        }
        Shape::Edge(_) | Shape::Unimplemented => {}
    }
    for (key, text) in query {
        let Some(field) = request
            .get_field_by_json_name(key)
            .or_else(|| request.get_field_by_name(key))
        else {
            // The clients send options Kiln has no use for (`readMask`, validation skips).
            continue;
        };
        let value = match field.kind() {
            Kind::Bool => match text.as_str() {
                "true" | "1" => Value::Bool(true),
                "false" | "0" => Value::Bool(false),
                _ => {
                    return Err(ApiError::invalid(
                        key,
                        "must be true or false",
                        Style::Control,
                    ));
                }
            },
            Kind::Message(m) if m.full_name() != "google.protobuf.FieldMask" => continue,
            _ => Value::String(text.clone()),
        };
        out.insert(field.name().to_owned(), value);
    }
    Ok(out)
}

/// A field mask in its JSON form: camelCase paths joined by commas.
fn mask_json(paths: &[String]) -> String {
    paths
        .iter()
        .map(|p| camel_case(p))
        .collect::<Vec<_>>()
        .join(",")
}

fn camel_case(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut upper = false;
    for c in snake.chars() {
        match (c, upper) {
            ('_', _) => upper = true,
            (c, true) => {
                out.extend(c.to_uppercase());
                upper = false;
            }
            (c, false) => out.push(c),
        }
    }
    out
}

/// ValidateModelUpload's answer as the public API gives it: the warnings, or a refusal that
/// says what is wrong.
fn validation_answer(value: Value) -> Result<Value, ApiError> {
    if value.get("valid").and_then(Value::as_bool) == Some(true) {
        let warnings = value
            .get("warnings")
            .cloned()
            .unwrap_or(Value::Array(vec![]));
        return Ok(serde_json::json!({ "warnings": warnings }));
    }
    let list = |key: &str| -> Vec<String> {
        value
            .get(key)
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut problems = list("errors");
    let missing = list("missingFiles");
    if !missing.is_empty() {
        problems.push(format!("missing files: {}", missing.join(", ")));
    }
    let status = tonic::Status::failed_precondition(format!(
        "the upload is not valid: {}",
        problems.join("; ")
    ));
    Err(ApiError::new(status, Style::Control))
}

/// The body as a JSON object: empty means `{}` (DELETE sends an empty JSON body).
pub async fn read_json(body: axum::body::Body, limit: u64) -> Result<Map<String, Value>, ApiError> {
    let bytes = axum::body::to_bytes(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .await
        .map_err(|e| {
            ApiError::invalid(
                "body",
                format!("unreadable or too large: {e}"),
                Style::Control,
            )
        })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(ApiError::invalid(
            "body",
            "must be a JSON object",
            Style::Control,
        )),
        Err(e) => Err(ApiError::invalid(
            "body",
            format!("not JSON: {e}"),
            Style::Control,
        )),
    }
}

pub fn query_pairs(uri: &Uri) -> Vec<(String, String)> {
    uri.query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

pub fn percent_decode(path: &str) -> String {
    form_urlencoded::parse(format!("p={}", path.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::find;

    fn matched(method: Method, path: &str) -> Matched {
        match find(&method, path) {
            Found::Route(m) => m,
            other => panic!("{path}: {other:?}"),
        }
    }

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(o) => o,
            _ => unreachable!(),
        }
    }

    fn request(method: Method, path: &str, query: &[(&str, &str)], body: Value) -> Value {
        let m = matched(method, path);
        let input = mesh::method(m.route.rpc).input();
        let query: Vec<_> = query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let json = request_json(&input, &m, &query, object(body)).unwrap();
        let message = json::message(input, Value::Object(json), Style::Control).unwrap();
        json::value(&message, Names::Public)
    }

    #[test]
    fn the_three_body_styles_fill_the_same_request_shape() {
        let wrapped = request(
            Method::POST,
            "accounts/a/models",
            &[],
            serde_json::json!({"modelId": "m", "model": {"kind": "HF_BASE_MODEL"}}),
        );
        assert_eq!(wrapped["parent"], "accounts/a");
        assert_eq!(wrapped["modelId"], "m");
        assert_eq!(wrapped["model"]["kind"], "HF_BASE_MODEL");

        let flat = request(
            Method::POST,
            "accounts/a/deployments",
            &[
                ("deploymentId", "d"),
                ("validateOnly", "true"),
                ("readMask", "x"),
            ],
            serde_json::json!({"baseModel": "accounts/kiln/models/b", "minReplicaCount": 1}),
        );
        assert_eq!(flat["parent"], "accounts/a");
        assert_eq!(flat["deploymentId"], "d");
        assert_eq!(flat["validateOnly"], true);
        assert_eq!(flat["deployment"]["baseModel"], "accounts/kiln/models/b");

        let no_id = request(
            Method::POST,
            "accounts/a/deployedModels",
            &[],
            serde_json::json!({"model": "accounts/a/models/l", "deployment": "accounts/a/deployments/d"}),
        );
        assert_eq!(no_id["deployedModel"]["model"], "accounts/a/models/l");
        assert!(no_id.get("deployedModelId").is_none());
    }

    #[test]
    fn a_patch_without_a_mask_changes_the_fields_it_sends() {
        let update = request(
            Method::PATCH,
            "accounts/a/models/m",
            &[],
            serde_json::json!({"displayName": "new", "description": "d"}),
        );
        assert_eq!(update["model"]["name"], "accounts/a/models/m");
        // The body's keys, in the order JSON objects keep them here (sorted).
        assert_eq!(update["updateMask"], "description,displayName");
        let given = request(
            Method::PATCH,
            "accounts/a/models/m",
            &[("updateMask", "description")],
            serde_json::json!({"displayName": "new", "description": "d"}),
        );
        assert_eq!(given["updateMask"], "description");
    }

    #[test]
    fn lists_take_paging_from_the_query_and_key_deletes_their_id_from_the_body() {
        let list = request(
            Method::GET,
            "accounts/a/datasets",
            &[
                ("pageSize", "2"),
                ("pageToken", "t"),
                ("filter", "x"),
                ("orderBy", "y"),
            ],
            serde_json::json!({}),
        );
        assert_eq!(list["pageSize"], 2);
        assert_eq!(
            (list["pageToken"].as_str(), list["orderBy"].as_str()),
            (Some("t"), Some("y"))
        );
        let delete = request(
            Method::POST,
            "accounts/a/users/u/apiKeys:delete",
            &[],
            serde_json::json!({"keyId": "k1"}),
        );
        assert_eq!(delete["name"], "accounts/a/users/u/apiKeys/k1");
    }

    #[test]
    fn a_field_the_resource_lacks_is_named() {
        let m = matched(Method::PATCH, "accounts/a/models/m");
        let input = mesh::method(m.route.rpc).input();
        let err = request_json(
            &input,
            &m,
            &[],
            object(serde_json::json!({"colour": "red"})),
        )
        .unwrap_err();
        assert!(
            err.status.message().starts_with("colour:"),
            "{}",
            err.status.message()
        );
    }
}
