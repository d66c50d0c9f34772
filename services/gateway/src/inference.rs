//! OpenAI-style inference: `chat/completions`, `completions`, `embeddings` and `models`, under
//! `/v1/` and `/inference/v1/`. The body is the contract's request after the few spellings
//! the public clients use (a string where Kiln takes a list, content parts, `stream`); the
//! answer is the contract's message, snake_case, with the fields those clients read always
//! present. A stream answers in server-sent events once its first message (or its error) is
//! known, so an error before the first token is an HTTP status.

use std::convert::Infallible;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures::{Stream, StreamExt as _};
use http::{HeaderMap, HeaderValue, header};
use prost_reflect::DynamicMessage;
use serde_json::{Map, Value};

use crate::Edge;
use crate::control::read_json;
use crate::errors::{ApiError, Style};
use crate::json::{self, Names};
use crate::mesh::{self, Caller};

const CHAT: &str = "kiln.inference.v1.InferenceService/CreateChatCompletion";
const CHAT_STREAM: &str = "kiln.inference.v1.InferenceService/StreamChatCompletion";
const COMPLETION: &str = "kiln.inference.v1.InferenceService/CreateCompletion";
const COMPLETION_STREAM: &str = "kiln.inference.v1.InferenceService/StreamCompletion";
const EMBEDDINGS: &str = "kiln.inference.v1.InferenceService/CreateEmbeddings";
const LIST_MODELS: &str = "kiln.registry.v1.ModelService/ListModels";

/// Which inference route a call took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
}

pub async fn handle(edge: Edge, endpoint: Endpoint, headers: HeaderMap, body: Body) -> Response {
    match answer(&edge, endpoint, &headers, body).await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    }
}

async fn answer(
    edge: &Edge,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let caller =
        Caller::from_headers(headers).map_err(|e| ApiError::new(e.status, Style::Inference))?;
    let body = read_json(body, edge.max_json_bytes)
        .await
        .map_err(|e| ApiError::new(e.status, Style::Inference))?;
    let request = OpenAiRequest::parse(endpoint, body)?;
    let rpc = match (endpoint, request.stream) {
        (Endpoint::Chat, false) => CHAT,
        (Endpoint::Chat, true) => CHAT_STREAM,
        (Endpoint::Completions, false) => COMPLETION,
        (Endpoint::Completions, true) => COMPLETION_STREAM,
        (Endpoint::Embeddings, _) => EMBEDDINGS,
    };
    let method = mesh::method(rpc);
    let message = json::message(
        method.input(),
        Value::Object(request.body),
        Style::Inference,
    )?;
    let fail = |status| ApiError::new(status, Style::Inference);
    if !request.stream {
        let answer = edge
            .mesh
            .unary(&caller, &method, message)
            .await
            .map_err(fail)?;
        let mut value = json::value(&answer, Names::OpenAi);
        openai_shape(&mut value, endpoint);
        if request.base64 {
            encode_embeddings(&mut value);
        }
        return Ok(axum::Json(value).into_response());
    }
    let mut stream = edge
        .mesh
        .server_streaming(&caller, &method, message)
        .await
        .map_err(fail)?;
    // The status line waits for the first message: an error before it is an HTTP error.
    let first = match stream.message().await.map_err(fail)? {
        Some(first) => first,
        None => {
            return Err(fail(tonic::Status::internal(
                "the stream ended before its first message",
            )));
        }
    };
    let events = futures::stream::once(async move { Ok(first) })
        .chain(stream)
        .map(move |item| Ok::<_, Infallible>(event(item, endpoint)))
        .chain(futures::stream::once(async {
            Ok(bytes::Bytes::from_static(b"data: [DONE]\n\n"))
        }));
    Ok(sse(events))
}

fn sse(events: impl Stream<Item = Result<bytes::Bytes, Infallible>> + Send + 'static) -> Response {
    let mut response = Body::from_stream(events).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// One server-sent event: a chunk, or an error that cut the stream.
fn event(item: Result<DynamicMessage, tonic::Status>, endpoint: Endpoint) -> bytes::Bytes {
    let value = match item {
        Ok(message) => {
            let mut value = json::value(&message, Names::OpenAi);
            openai_shape(&mut value, endpoint);
            value
        }
        Err(status) => {
            serde_json::json!({"error": {
                "message": status.message(),
                "code": kiln_core::metrics::code_name(status.code()),
            }})
        }
    };
    bytes::Bytes::from(format!("data: {value}\n\n"))
}

/// An OpenAI-style request, turned into the contract's.
#[derive(Debug)]
struct OpenAiRequest {
    body: Map<String, Value>,
    stream: bool,
    /// Embeddings as base64 of little-endian float32 (`encoding_format: "base64"`).
    base64: bool,
}

impl OpenAiRequest {
    fn parse(endpoint: Endpoint, mut body: Map<String, Value>) -> Result<Self, ApiError> {
        body.retain(|_, v| !v.is_null());
        let invalid = |field: &str, why: &str| ApiError::invalid(field, why, Style::Inference);
        let stream = match body.remove("stream") {
            None => false,
            Some(Value::Bool(b)) => b,
            Some(_) => return Err(invalid("stream", "must be true or false")),
        };
        if endpoint == Endpoint::Embeddings && stream {
            return Err(invalid("stream", "embeddings do not stream"));
        }
        // The usage always comes on the last chunk (as the public API sends it); the option
        // is accepted and needs nothing more.
        if let Some(options) = body.remove("stream_options") {
            let known = options
                .as_object()
                .is_some_and(|o| o.keys().all(|k| k == "include_usage"));
            if !known || !stream {
                return Err(invalid(
                    "stream_options",
                    "takes only include_usage, with stream: true",
                ));
            }
        }
        if let Some(format) = body.remove("response_format")
            && format.get("type").and_then(Value::as_str) != Some("text")
        {
            return Err(invalid(
                "response_format",
                "only {\"type\": \"text\"} is supported",
            ));
        }
        if let Some(max) = body.remove("max_completion_tokens") {
            body.insert("max_tokens".into(), max);
        }
        if let Some(Value::String(stop)) = body.get("stop") {
            let stop = Value::Array(vec![Value::String(stop.clone())]);
            body.insert("stop".into(), stop);
        }
        if let Some(Value::String(behavior)) = body.get_mut("context_length_exceeded_behavior") {
            *behavior = behavior.to_ascii_uppercase();
        }
        let mut base64 = false;
        match endpoint {
            Endpoint::Chat => {
                if let Some(Value::Array(messages)) = body.get_mut("messages") {
                    for (i, message) in messages.iter_mut().enumerate() {
                        flatten_content(message, i)?;
                    }
                }
            }
            Endpoint::Completions => match body.remove("prompt") {
                Some(Value::String(prompt)) => {
                    body.insert("prompt".into(), prompt.into());
                }
                Some(Value::Array(prompts)) if prompts.iter().all(Value::is_string) => {
                    body.insert("prompts".into(), Value::Array(prompts));
                }
                Some(_) => return Err(invalid("prompt", "must be a string or a list of strings")),
                None => {}
            },
            Endpoint::Embeddings => {
                match body.remove("input") {
                    Some(Value::String(text)) => {
                        body.insert("input".into(), Value::Array(vec![text.into()]));
                    }
                    Some(Value::Array(texts)) if texts.iter().all(Value::is_string) => {
                        body.insert("input".into(), Value::Array(texts));
                    }
                    Some(_) => {
                        return Err(invalid("input", "must be a string or a list of strings"));
                    }
                    None => {}
                }
                base64 = match body.remove("encoding_format") {
                    None => false,
                    Some(Value::String(f)) if f == "float" => false,
                    Some(Value::String(f)) if f == "base64" => true,
                    Some(_) => return Err(invalid("encoding_format", "must be float or base64")),
                };
            }
        }
        Ok(Self {
            body,
            stream,
            base64,
        })
    }
}

/// A chat message's `content` as one text: a string as it is, content parts joined.
fn flatten_content(message: &mut Value, index: usize) -> Result<(), ApiError> {
    let Some(object) = message.as_object_mut() else {
        return Ok(());
    };
    let field = format!("messages[{index}].content");
    match object.get("content") {
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(piece))) => text.push_str(piece),
                    _ => {
                        return Err(ApiError::invalid(
                            &field,
                            "only text parts are supported",
                            Style::Inference,
                        ));
                    }
                }
            }
            object.insert("content".into(), text.into());
        }
        Some(Value::Null) => {
            object.insert("content".into(), "".into());
        }
        _ => {}
    }
    Ok(())
}

/// The fields OpenAI clients read, present as they expect them: `created` a number, a
/// choice's `index`, `finish_reason` and `logprobs` (null until known), `usage` (null until
/// the last chunk).
fn openai_shape(value: &mut Value, endpoint: Endpoint) {
    let Some(object) = value.as_object_mut() else {
        return;
    };
    if let Some(created) = object.get("created").and_then(Value::as_str) {
        let created = created.parse::<i64>().unwrap_or_default();
        object.insert("created".into(), created.into());
    }
    let usage = object.entry("usage").or_insert(Value::Null);
    if let Value::Object(usage) = usage {
        for key in ["prompt_tokens", "completion_tokens", "total_tokens"] {
            usage.entry(key).or_insert(0.into());
        }
    }
    let Some(Value::Array(items)) = object.get_mut(if endpoint == Endpoint::Embeddings {
        "data"
    } else {
        "choices"
    }) else {
        return;
    };
    for item in items.iter_mut().filter_map(Value::as_object_mut) {
        item.entry("index").or_insert(0.into());
        if endpoint == Endpoint::Embeddings {
            continue;
        }
        match item.get("finish_reason") {
            Some(Value::String(reason)) if !reason.is_empty() => {}
            _ => {
                item.insert("finish_reason".into(), Value::Null);
            }
        }
        item.entry("logprobs").or_insert(Value::Null);
        if let Some(Value::Object(message)) = item.get_mut("message") {
            message.entry("content").or_insert("".into());
            message.entry("role").or_insert("assistant".into());
        }
    }
}

/// Embeddings as base64 of their little-endian float32 bytes.
fn encode_embeddings(value: &mut Value) {
    let Some(Value::Array(items)) = value.get_mut("data") else {
        return;
    };
    for item in items {
        if let Some(Value::Array(floats)) = item.get("embedding") {
            let bytes: Vec<u8> = floats
                .iter()
                .flat_map(|f| (f.as_f64().unwrap_or_default() as f32).to_le_bytes())
                .collect();
            let text = base64::engine::general_purpose::STANDARD.encode(bytes);
            item["embedding"] = Value::String(text);
        }
    }
}

/// `GET models`: the models a caller can name, the public library's first (OpenAI's list).
pub async fn models(edge: Edge, headers: HeaderMap) -> Response {
    let listed = async {
        let caller = Caller::from_headers(&headers)
            .map_err(|e| ApiError::new(e.status, Style::Inference))?;
        let method = mesh::method(LIST_MODELS);
        let mut data = Vec::new();
        let mut token = String::new();
        loop {
            let request = serde_json::json!({
                "parent": format!("accounts/{}", kiln_core::names::SYSTEM_ACCOUNT),
                "page_size": 200,
                "page_token": token,
            });
            let message = json::message(method.input(), request, Style::Inference)?;
            let page = edge
                .mesh
                .unary(&caller, &method, message)
                .await
                .map_err(|s| ApiError::new(s, Style::Inference))?;
            let page = json::value(&page, Names::Public);
            for model in page["models"].as_array().into_iter().flatten() {
                let name = model["name"].as_str().unwrap_or_default();
                let owner = name.split('/').nth(1).unwrap_or_default();
                let created = model["createTime"]
                    .as_str()
                    .and_then(|t| t.parse::<prost_types::Timestamp>().ok())
                    .map(|t| t.seconds)
                    .unwrap_or_default();
                data.push(serde_json::json!({
                    "id": name, "object": "model", "created": created, "owned_by": owner,
                }));
            }
            token = page["nextPageToken"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if token.is_empty() {
                break;
            }
        }
        Ok::<_, ApiError>(serde_json::json!({"object": "list", "data": data}))
    };
    match listed.await {
        Ok(value) => axum::Json(value).into_response(),
        Err(err) => err.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(endpoint: Endpoint, body: Value) -> Result<OpenAiRequest, ApiError> {
        let Value::Object(body) = body else {
            unreachable!()
        };
        OpenAiRequest::parse(endpoint, body)
    }

    #[test]
    fn the_clients_spellings_become_the_contracts() {
        let chat = parse(
            Endpoint::Chat,
            serde_json::json!({
                "model": "m", "stream": true, "stream_options": {"include_usage": true},
                "stop": "\n", "max_completion_tokens": 5,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            }),
        )
        .unwrap();
        assert!(chat.stream);
        assert_eq!(chat.body["stop"], serde_json::json!(["\n"]));
        assert_eq!(chat.body["max_tokens"], 5);
        assert_eq!(chat.body["messages"][0]["content"], "ab");
        let method = mesh::method(CHAT);
        json::message(method.input(), Value::Object(chat.body), Style::Inference).unwrap();

        let completion = parse(
            Endpoint::Completions,
            serde_json::json!({"model": "m", "prompt": ["a", "b"]}),
        )
        .unwrap();
        assert_eq!(completion.body["prompts"], serde_json::json!(["a", "b"]));

        let embeddings = parse(
            Endpoint::Embeddings,
            serde_json::json!({"model": "m", "input": "x", "encoding_format": "base64"}),
        )
        .unwrap();
        assert!(embeddings.base64);
        assert_eq!(embeddings.body["input"], serde_json::json!(["x"]));
    }

    #[test]
    fn what_kiln_cannot_do_is_refused_by_name() {
        let err = parse(
            Endpoint::Embeddings,
            serde_json::json!({"model": "m", "input": [[1, 2]]}),
        )
        .unwrap_err();
        assert!(
            err.status.message().starts_with("input:"),
            "{}",
            err.status.message()
        );
        let err = parse(
            Endpoint::Chat,
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        )
        .unwrap_err();
        assert!(
            err.status.message().starts_with("messages[0].content:"),
            "{}",
            err.status.message()
        );
        let err = parse(
            Endpoint::Chat,
            serde_json::json!({"model": "m", "stream_options": {"include_usage": true}}),
        )
        .unwrap_err();
        assert!(err.status.message().starts_with("stream_options:"));
    }

    #[test]
    fn base64_embeddings_are_little_endian_float32() {
        let mut value = serde_json::json!({"data": [{"embedding": [1.0, -0.5]}]});
        encode_embeddings(&mut value);
        let text = value["data"][0]["embedding"].as_str().unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap();
        let floats: Vec<f32> = bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(floats, [1.0, -0.5]);
    }
}
