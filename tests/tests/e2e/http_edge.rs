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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fireworks_sdk_runs_a_whole_project_through_the_rest_api() {
    let assets = kiln_tests::llm::smollm2_asset_dir();
    let mesh = kiln_tests::library_mesh(assets.path(), None).await;
    let (key, acme) = mesh.tenant("acme").await;
    first_chat(&acme, "Hi", 1, Duration::from_secs(300)).await;
    let adapter = tempfile::tempdir().unwrap();
    let (config, weights) = kiln_tests::lora::seeded_lora(5, 8, &["q_proj", "v_proj"], 0.5, false);
    std::fs::write(adapter.path().join("adapter_config.json"), config).unwrap();
    std::fs::write(adapter.path().join("adapter_model.safetensors"), weights).unwrap();
    let got = run(Script::new("fireworks_client.py")
        .arg("--base-url", mesh.http_url())
        .arg("--key", &key)
        .arg("--account", "acme")
        .arg("--base-model", SMOLLM2)
        .arg("--adapter-dir", adapter.path().display()))
    .await;
    eprintln!("{got:#}");

    // Datasets, both upload paths, paging and the download.
    assert_eq!(
        got["dataset_created"]["name"],
        "accounts/acme/datasets/sums"
    );
    assert_eq!(got["dataset_created"]["state"], "UPLOADING");
    assert_eq!(got["dataset_upload"]["id"], "accounts/acme/datasets/sums");
    assert_eq!(got["dataset"]["state"], "READY");
    assert_eq!(got["dataset"]["example_count"], "8", "int64 as a string");
    let signed = &got["signed_upload"];
    assert_eq!(signed["wrong_size"], 400, "{signed}");
    assert_eq!(signed["forged"], 403, "{signed}");
    assert_eq!(signed["put"], 200, "{signed}");
    assert_eq!(signed["state"], "READY");
    assert_eq!(got["download_equal"], true);
    assert_eq!(
        got["dataset_pages"],
        serde_json::json!([
            "accounts/acme/datasets/sums",
            "accounts/acme/datasets/sums-signed"
        ])
    );

    // The addon: the public kind name both ways, files through signed URLs, a PATCH of one field.
    let model = &got["model"];
    assert_eq!(model["kind"], "HF_PEFT_ADDON");
    assert_eq!(model["state"], "READY", "{model}");
    assert_eq!(model["puts"], serde_json::json!([200, 200]));
    assert_eq!(model["description"], "adds numbers");
    assert_eq!(
        model["display_name"], "Sums addon",
        "a PATCH leaves what it does not send"
    );
    assert_eq!(
        got["model_pages"],
        serde_json::json!(["accounts/acme/models/sums-addon"])
    );

    // The deployment, the addon on it, and its answers (whole and streamed agree; the addon
    // changes the base's answer).
    assert_eq!(got["deployment"]["state"], "READY");
    assert_eq!(got["deployment"]["enable_addons"], true);
    let chat = &got["chat"];
    assert!(!chat["text"].as_str().unwrap().is_empty(), "{chat}");
    assert_eq!(chat["streamed"], chat["text"]);
    assert_ne!(chat["text"], chat["base_text"], "{chat}");
    // The deployment's base is a deployed model of its own beside the addon.
    let listed = chat["lora_list"].as_array().unwrap();
    assert!(listed.contains(&chat["deployed_model"]), "{chat}");
    assert_eq!(listed.len(), 2, "{chat}");
    assert_eq!(chat["lora_state"], "DEPLOYED");

    let job = &got["job"];
    assert_eq!(
        job["name"],
        "accounts/acme/supervisedFineTuningJobs/sums-tune"
    );
    assert_eq!(job["dataset"], "accounts/acme/datasets/sums");
    assert_eq!(
        (job["epochs"].clone(), job["lora_rank"].clone()),
        (1.into(), 4.into())
    );
    assert_eq!(job["listed"], serde_json::json!([job["name"].clone()]));
    assert_eq!(job["resume"]["status"], 501, "{job}");

    let users = &got["users"];
    assert_eq!(users["user"], "accounts/acme/users/bob");
    assert_eq!(
        users["listed"],
        serde_json::json!([users["key_id"].clone()])
    );
    assert_eq!(users["bob_sees"].as_array().unwrap().len(), 2, "{users}");
    assert_eq!(
        users["users"],
        serde_json::json!(["accounts/acme/users/bob", "accounts/acme/users/owner"])
    );
    assert_eq!(users["after_delete"]["status"], 401, "{users}");

    let errors = &got["errors"];
    let expect = |name: &str, class: &str, status: u64, code: &str, retry: &str| {
        let e = &errors[name];
        assert_eq!(
            (
                e["class"].as_str(),
                e["status"].as_u64(),
                e["code"].as_str(),
                e["retry"].as_str()
            ),
            (Some(class), Some(status), Some(code), Some(retry)),
            "{name}: {e}"
        );
    };
    expect("missing", "NotFoundError", 404, "NOT_FOUND", "false");
    expect("exists", "ConflictError", 409, "ALREADY_EXISTS", "false");
    expect(
        "bad_id",
        "BadRequestError",
        400,
        "INVALID_ARGUMENT",
        "false",
    );
    expect("other_account", "NotFoundError", 404, "NOT_FOUND", "false");
    expect(
        "bad_key",
        "AuthenticationError",
        401,
        "UNAUTHENTICATED",
        "false",
    );

    let after = &got["after_delete"];
    assert_eq!(after["datasets"], serde_json::json!([]));
    assert_eq!(after["models"], serde_json::json!([]));
    assert_eq!(after["deployments"], serde_json::json!([]));
    mesh.shutdown().await;
}

/// One HTTP call for `http_calls.py`.
fn call(name: &str, method: &str, path: &str, key: Option<&str>, body: Option<Value>) -> Value {
    let mut call = serde_json::json!({"name": name, "method": method, "path": path, "key": key});
    if let Some(body) = body {
        call["json"] = body;
    }
    call
}

async fn http_calls(base_url: &str, calls: &[Value]) -> Value {
    run(Script::new("http_calls.py")
        .arg("--base-url", base_url)
        .arg("--calls", Value::from(calls.to_vec())))
    .await
}

/// Every google.rpc code a client can meet through the edge: its HTTP status, the body the
/// clients parse (the control plane's, or `{"error": …}` on inference routes), and whether a
/// retry can help.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_code_has_its_status_body_and_retry_advice() {
    // One serverless request a minute per account: the second is a retryable 429.
    let mut billing = kiln_billing::config::BillingConfig::default();
    billing.quotas.serverless_inference_rpm = 1;
    let assets = kiln_tests::inference::minilm_asset_dir();
    let options = kiln_tests::MeshOptions {
        billing: Some(billing),
        ..Default::default()
    };
    let mesh = kiln_tests::library_mesh_with(assets.path(), options).await;
    let warmup = mesh.tenant_channel("warmup").await;
    first_embeddings(&warmup, MINILM, &["x".to_owned()], Duration::from_secs(120)).await;
    let (key, _acme) = mesh.tenant("acme").await;
    let owner = Some(key.as_str());
    let base = "/v1/accounts/acme";
    let quota = format!("{base}/quotas/deployments");
    let calls = [
        call(
            "model",
            "POST",
            &format!("{base}/models"),
            owner,
            Some(
                serde_json::json!({"modelId": "m", "model": {"kind": "HF_BASE_MODEL", "contextLength": 512}}),
            ),
        ),
        call(
            "exists",
            "POST",
            &format!("{base}/models"),
            owner,
            Some(serde_json::json!({"modelId": "m", "model": {"kind": "HF_BASE_MODEL"}})),
        ),
        call(
            "bad_field",
            "POST",
            &format!("{base}/datasets"),
            owner,
            Some(serde_json::json!({"datasetId": "d", "dataset": {"colour": "red"}})),
        ),
        call(
            "bad_id",
            "POST",
            &format!("{base}/datasets"),
            owner,
            Some(serde_json::json!({"datasetId": "D_D", "dataset": {"format": "CHAT"}})),
        ),
        call("no_key", "GET", &format!("{base}/models"), None, None),
        call(
            "other_account",
            "GET",
            "/v1/accounts/kiln/datasets/x",
            owner,
            None,
        ),
        call(
            "max_value",
            "PATCH",
            &quota,
            owner,
            Some(serde_json::json!({"maxValue": "1000"})),
        ),
        call(
            "zero_deployments",
            "PATCH",
            &quota,
            owner,
            Some(serde_json::json!({"value": "0"})),
        ),
        call(
            "over_quota",
            "POST",
            &format!("{base}/deployments?deploymentId=d"),
            owner,
            Some(
                serde_json::json!({"baseModel": MINILM, "acceleratorType": "CPU", "acceleratorCount": 1}),
            ),
        ),
        call(
            "inference_first",
            "POST",
            "/inference/v1/embeddings",
            owner,
            Some(serde_json::json!({"model": MINILM, "input": "hi", "encoding_format": "float"})),
        ),
        call(
            "inference_rate_limited",
            "POST",
            "/inference/v1/embeddings",
            owner,
            Some(serde_json::json!({"model": MINILM, "input": "hi"})),
        ),
        call(
            "resume",
            "POST",
            &format!("{base}/supervisedFineTuningJobs/j:resume"),
            owner,
            Some(serde_json::json!({})),
        ),
        call(
            "wrong_method",
            "PUT",
            &format!("{base}/models/m"),
            owner,
            Some(serde_json::json!({})),
        ),
        call("no_route", "GET", &format!("{base}/widgets"), owner, None),
        call("openapi", "GET", "/openapi.json", None, None),
        call(
            "inference_not_found",
            "POST",
            "/inference/v1/chat/completions",
            owner,
            Some(
                serde_json::json!({"model": "accounts/acme/models/nope", "messages": [{"role": "user", "content": "hi"}]}),
            ),
        ),
        call(
            "inference_bad_param",
            "POST",
            "/inference/v1/embeddings",
            owner,
            Some(serde_json::json!({"model": "m", "input": [[1, 2]]})),
        ),
    ];
    let mut calls = calls.to_vec();
    calls.push(serde_json::json!({"name": "not_json", "method": "POST", "path": format!("{base}/datasets"), "key": key, "raw": "{oops"}));
    let got = http_calls(&mesh.http_url(), &calls).await;
    eprintln!("{got:#}");

    let expect = |name: &str, status: u64, code: &str, retry: &str| {
        let answer = &got[name];
        assert_eq!(answer["status"], status, "{name}: {answer}");
        assert_eq!(
            answer["headers"]["x-should-retry"], retry,
            "{name}: {answer}"
        );
        assert_eq!(
            answer["headers"]["content-type"], "application/json",
            "{name}"
        );
        let body = &answer["body"];
        match name.starts_with("inference") {
            true => assert_eq!(body["error"]["code"], code, "{name}: {body}"),
            false => {
                assert_eq!(body["status"], code, "{name}: {body}");
                assert!(
                    body["code"].is_u64() && body["message"].is_string(),
                    "{name}: {body}"
                );
            }
        }
        body.clone()
    };
    assert_eq!(got["model"]["status"], 200, "{}", got["model"]);
    expect("exists", 409, "ALREADY_EXISTS", "false");
    let bad = expect("bad_field", 400, "INVALID_ARGUMENT", "false");
    assert!(bad["message"].as_str().unwrap().contains("colour"), "{bad}");
    let bad = expect("bad_id", 400, "INVALID_ARGUMENT", "false");
    assert_eq!(
        bad["details"][0]["fieldViolations"][0]["field"], "dataset_id",
        "{bad}"
    );
    expect("not_json", 400, "INVALID_ARGUMENT", "false");
    expect("no_key", 401, "UNAUTHENTICATED", "false");
    expect("other_account", 404, "NOT_FOUND", "false");
    expect("max_value", 403, "PERMISSION_DENIED", "false");
    assert_eq!(
        got["zero_deployments"]["status"], 200,
        "{}",
        got["zero_deployments"]
    );
    expect("over_quota", 429, "RESOURCE_EXHAUSTED", "false");
    assert_eq!(
        got["inference_first"]["status"], 200,
        "{}",
        got["inference_first"]
    );
    let body = expect("inference_rate_limited", 429, "RESOURCE_EXHAUSTED", "true");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    let retry_after: u64 = got["inference_rate_limited"]["headers"]["retry-after"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    expect("resume", 501, "UNIMPLEMENTED", "false");
    expect("wrong_method", 405, "UNIMPLEMENTED", "false");
    assert_eq!(
        got["wrong_method"]["headers"]["allow"],
        "GET, PATCH, DELETE"
    );
    expect("no_route", 404, "NOT_FOUND", "false");
    let openapi = &got["openapi"];
    assert_eq!(openapi["status"], 200);
    assert_eq!(openapi["body"]["openapi"], "3.1.0");
    assert!(
        openapi["body"]["paths"]["/v1/accounts/{account_id}/datasets/{dataset_id}:upload"]["post"]
            .is_object()
    );
    let body = expect("inference_not_found", 404, "NOT_FOUND", "false");
    assert_eq!(body["error"]["type"], "not_found_error");
    let body = expect("inference_bad_param", 400, "INVALID_ARGUMENT", "false");
    assert_eq!(body["error"]["param"], "input");

    // The API behind the edge unreachable: 503, and a retry may help.
    mesh.shutdown().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://127.0.0.1:{}", kiln_tests::free_port());
    let config = kiln_gateway::GatewayConfig::default();
    let dead = kiln_gateway::Upstream::remote(&dead).unwrap();
    let edge = kiln_gateway::serve(&config, listener, dead, None, std::future::pending())
        .await
        .unwrap();
    let url = format!("http://{}", edge.addr);
    let got = http_calls(
        &url,
        &[call("down", "GET", "/v1/accounts/acme/models", owner, None)],
    )
    .await;
    let answer = &got["down"];
    assert_eq!(answer["status"], 503, "{answer}");
    assert_eq!(answer["body"]["status"], "UNAVAILABLE");
    assert_eq!(answer["headers"]["x-should-retry"], "true");
    edge.done.abort();
}

#[tokio::test]
async fn a_keep_alive_connection_outlives_a_request_whose_body_the_route_does_not_need() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mesh = kiln_tests::TestMesh::start().await;
    let (key, _) = mesh.tenant("acme").await;
    // Two requests on one connection, as a client's pool sends them: a POST whose `{}` the
    // route does not use (validateUpload), its body a moment after its headers (as clients
    // write them), then the next request, which closes the connection.
    let head = |close: &str| {
        format!(
            "POST /v1/accounts/acme/datasets/none:validateUpload HTTP/1.1\r\nHost: kiln\r\n\
             Authorization: Bearer {key}\r\nContent-Type: application/json\r\n\
             Content-Length: 2\r\n{close}\r\n"
        )
    };
    let mut tcp = tokio::net::TcpStream::connect(mesh.http_addr)
        .await
        .unwrap();
    tcp.write_all(head("").as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rest = format!("{{}}{}{{}}", head("Connection: close\r\n"));
    // The server may have closed already: what it answered is read below either way.
    let _ = tcp.write_all(rest.as_bytes()).await;
    let mut answers = String::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut answers));
    read.await.expect("the edge answers").unwrap();
    assert_eq!(
        answers.matches("HTTP/1.1 404").count(),
        2,
        "both requests answered on one connection: {answers}"
    );
    mesh.shutdown().await;
}
