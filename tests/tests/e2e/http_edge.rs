//! The HTTP edge with the public clients: the official `openai` client against
//! `/inference/v1`, answers compared with the same calls over gRPC.

use std::time::Duration;

use kiln_tests::inference::{MINILM, first_embeddings, max_abs_diff};
use kiln_tests::llm::{SMOLLM2, chat, first_chat};
use kiln_tests::python::Script;
use serde_json::Value;

/// A mesh with the chat model and the embedding model served, and a tenant's key.
async fn mesh_with_both() -> (kiln_tests::TestMesh, tempfile::TempDir, String) {
    let assets = kiln_tests::asset_dir_with(&["smollm2-135m-instruct", "all-minilm-l6-v2"]);
    let mesh = kiln_tests::library_mesh(assets.path(), None).await;
    let (key, acme) = mesh.tenant("acme").await;
    first_chat(&acme, "Hi", 1, Duration::from_secs(300)).await;
    first_embeddings(&acme, MINILM, &["x".to_owned()], Duration::from_secs(120)).await;
    (mesh, assets, key)
}

async fn run(script: Script) -> Value {
    let ran = tokio::task::spawn_blocking(move || script.run()).await;
    ran.unwrap().unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_chats_completes_and_embeds_as_over_grpc() {
    let (mesh, _assets, key) = mesh_with_both().await;
    let acme = mesh.channel(Some(&key)).await;
    let got = run(Script::new("openai_client.py")
        .arg("--base-url", mesh.http_url())
        .arg("--key", &key)
        .arg("--chat-model", SMOLLM2)
        .arg("--embed-model", MINILM))
    .await;

    // Chat: the same greedy answer as over gRPC, whole or streamed.
    let grpc = chat(&acme, "What is the capital of France?", 8)
        .await
        .unwrap();
    let want = grpc.choices[0].message.as_ref().unwrap().content.clone();
    let usage = grpc.usage.unwrap();
    assert_eq!(got["chat"]["text"], want.as_str(), "{got}");
    assert_eq!(got["chat"]["role"], "assistant");
    assert_eq!(got["chat"]["usage"]["prompt_tokens"], usage.prompt_tokens);
    assert_eq!(
        got["chat"]["usage"]["completion_tokens"],
        usage.completion_tokens
    );
    assert!(got["chat"]["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let streamed = &got["chat_stream"];
    assert_eq!(streamed["text"], want.as_str());
    assert!(streamed["pieces"].as_u64().unwrap() > 1, "{streamed}");
    assert_eq!(streamed["ids"], 1, "one id per stream");
    assert_eq!(streamed["roles"], serde_json::json!(["assistant"]));
    assert_eq!(streamed["usage"]["prompt_tokens"], usage.prompt_tokens);
    assert_eq!(
        streamed["usage"]["completion_tokens"],
        usage.completion_tokens
    );
    assert_eq!(streamed["finish_reason"], got["chat"]["finish_reason"]);

    // Completions: whole and streamed agree and count their tokens.
    let completion = &got["completion"];
    assert!(!completion["text"].as_str().unwrap().is_empty());
    assert_eq!(completion["streamed"], completion["text"]);
    assert_eq!(completion["usage"]["completion_tokens"], 6);

    // Embeddings: what gRPC gives, as floats and through base64 alike.
    let texts = [
        "hello world".to_owned(),
        "the edge speaks OpenAI".to_owned(),
    ];
    let grpc = kiln_tests::inference::embed(&acme, MINILM, &texts)
        .await
        .unwrap();
    let floats = got["embeddings"]["float"].as_array().unwrap();
    let decoded = got["embeddings"]["base64"].as_array().unwrap();
    assert_eq!(floats.len(), 2);
    for ((float, decoded), want) in floats.iter().zip(decoded).zip(&grpc.data) {
        let as_f32 = |v: &Value| -> Vec<f32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        };
        assert_eq!(as_f32(float).len(), 384);
        assert!(max_abs_diff(&as_f32(float), &want.embedding) < 1e-6);
        assert_eq!(
            as_f32(decoded),
            want.embedding,
            "base64 carries the exact floats"
        );
    }
    assert_eq!(got["embeddings"]["indexes"], serde_json::json!([0, 1]));
    assert_eq!(
        got["embeddings"]["prompt_tokens"],
        grpc.usage.unwrap().prompt_tokens
    );

    let models = got["models"].as_array().unwrap();
    assert!(models.contains(&Value::from(SMOLLM2)) && models.contains(&Value::from(MINILM)));

    // Errors: the status and the class the client raises, known before any token.
    let errors = &got["errors"];
    let expect = |name: &str, class: &str, status: u64, code: &str| {
        let e = &errors[name];
        assert_eq!(e["class"], class, "{name}: {e}");
        assert_eq!(e["status"], status, "{name}: {e}");
        assert_eq!(e["code"], code, "{name}: {e}");
    };
    expect("unknown_model", "NotFoundError", 404, "NOT_FOUND");
    expect(
        "bad_temperature",
        "BadRequestError",
        400,
        "INVALID_ARGUMENT",
    );
    assert_eq!(errors["bad_temperature"]["param"], "temperature");
    expect("bad_key", "AuthenticationError", 401, "UNAUTHENTICATED");
    expect("stream_unknown_model", "NotFoundError", 404, "NOT_FOUND");
    mesh.shutdown().await;
}
