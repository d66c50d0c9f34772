//! The inference engine on the real embedding model: both backends against reference
//! vectors made independently, batching, the gRPC API with usage events, errors, the Open
//! Inference Protocol through an independent client (tritonclient), and a node on its own.

use std::time::Duration;

use kiln_core::auth::Principal;
use kiln_inference::config::Batching;
use kiln_inference::embeddings;
use kiln_inference::engine::Engine;
use kiln_inference::tensor::TensorData;
use kiln_proto::inference as oipv2;
use kiln_proto::kiln_inference::v1 as infv1;
use kiln_tests::events::next_usage;
use kiln_tests::inference::*;
use kiln_tests::{TestMesh, expect_code};
use tonic::Code;

async fn embed_local(engine: &Engine, texts: &[String]) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
    let model = engine
        .model(&Principal::service(), "model", LOCAL_MINILM)
        .await
        .expect("model loads");
    let ids = embeddings::tokenize(&model, texts, false).expect("tokenize");
    let out = embeddings::embed(&model, ids.clone()).await.expect("embed");
    (ids, out.into_iter().map(|e| e.vector).collect())
}

const NO_BATCHING: Batching = Batching {
    max_batch_size: 1,
    max_queue_delay: Duration::ZERO,
    instances: 1,
};

#[tokio::test]
async fn embeddings_match_the_reference_on_both_backends() {
    let reference = reference();
    let cache = tempfile::tempdir().unwrap();
    let mut per_backend = Vec::new();
    for backend in ["tract", "onnxruntime"] {
        let engine = local_engine(backend, Batching::default(), 2, cache.path());
        let (ids, vectors) = embed_local(&engine, &reference.sentences).await;
        assert_eq!(
            ids, reference.token_ids,
            "{backend}: token ids differ from the reference"
        );
        for (i, (got, want)) in vectors.iter().zip(&reference.embeddings).enumerate() {
            let cos = cosine(got, want);
            assert!(cos >= 0.999, "{backend}: sentence {i} cosine {cos} < 0.999");
            let norm: f32 = got.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!(
                (norm - 1.0).abs() < 1e-4,
                "{backend}: not normalised ({norm})"
            );
        }
        let least_close = reference
            .close_pairs
            .iter()
            .map(|&(a, b)| cosine(&vectors[a], &vectors[b]))
            .fold(f32::MAX, f32::min);
        let most_unrelated = reference
            .unrelated_pairs
            .iter()
            .map(|&(a, b)| cosine(&vectors[a], &vectors[b]))
            .fold(f32::MIN, f32::max);
        assert!(
            least_close > most_unrelated,
            "{backend}: close pairs ({least_close}) must score above unrelated ones ({most_unrelated})"
        );
        let loaded = engine
            .model(&Principal::service(), "model", LOCAL_MINILM)
            .await
            .unwrap();
        assert_eq!(loaded.backend, backend);
        per_backend.push(vectors);
    }
    for (i, (t, o)) in per_backend[0].iter().zip(&per_backend[1]).enumerate() {
        let cos = cosine(t, o);
        assert!(
            cos >= 0.9999,
            "sentence {i}: tract and onnxruntime differ (cosine {cos})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_answers_equal_unbatched_ones_and_a_burst_of_64_succeeds() {
    let reference = reference();
    let cache = tempfile::tempdir().unwrap();
    let alone = local_engine("onnxruntime", NO_BATCHING, 1, cache.path());
    let batched = local_engine(
        "onnxruntime",
        // Two instances: passes run side by side on copies of the model.
        Batching {
            max_batch_size: 16,
            max_queue_delay: Duration::from_millis(20),
            instances: 2,
        },
        1,
        cache.path(),
    );
    let (_, want) = embed_local(&alone, &reference.sentences).await;
    // 64 concurrent requests of one sentence each, of varied lengths, through the batcher.
    let model = batched
        .model(&Principal::service(), "model", LOCAL_MINILM)
        .await
        .unwrap();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let model = model.clone();
            let text = reference.sentences[i % reference.sentences.len()].clone();
            tokio::spawn(async move {
                let ids = embeddings::tokenize(&model, &[text], false).unwrap();
                let out = embeddings::embed(&model, ids).await.unwrap();
                (i, out.into_iter().next().unwrap().vector)
            })
        })
        .collect();
    for task in tasks {
        let (i, got) = task.await.expect("request succeeds");
        let want = &want[i % reference.sentences.len()];
        let diff = max_abs_diff(&got, want);
        assert!(diff < 1e-4, "request {i}: batched answer differs by {diff}");
    }
    let (passes, jobs) = model.runner().unwrap().stats().get();
    assert_eq!(jobs, 64);
    assert!(
        passes < 64,
        "the burst must have shared forward passes ({passes} for 64)"
    );
}

#[test]
fn unavailable_backends_say_why() {
    use kiln_inference::backend::{Backends, Device};
    let backends = Backends::standard(Some(&ort_library()));
    let cuda = backends
        .choose(Some("onnxruntime"), Device::Cuda(0))
        .err()
        .expect("the CPU library has no CUDA provider");
    assert!(cuda.contains("CUDA"), "{cuda}");
    // Nothing runs on CUDA here: the reason names both backends.
    let none = backends
        .choose(None, Device::Cuda(0))
        .err()
        .expect("no CUDA backend");
    assert!(
        none.contains("CUDA") && none.contains("tract runs on CPU only"),
        "{none}"
    );
    assert_eq!(
        backends.choose(None, Device::Cpu).unwrap().name(),
        "onnxruntime"
    );
    let unknown = backends
        .choose(Some("tensorrt"), Device::Cpu)
        .err()
        .unwrap();
    assert!(
        unknown.contains("no backend named \"tensorrt\""),
        "{unknown}"
    );
}

/// A mesh whose library holds the embedding model only.
async fn mesh_with_minilm() -> (TestMesh, tempfile::TempDir) {
    let assets = minilm_asset_dir();
    let mesh = kiln_tests::library_mesh(assets.path(), None).await;
    (mesh, assets)
}

/// Waits until the library's MiniLM answers (it is imported and served in the background).
async fn minilm_served(ch: &kiln_tests::AuthedChannel) {
    first_embeddings(ch, MINILM, &["x".to_owned()], Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_over_grpc_match_the_reference_and_record_usage() {
    let (mesh, _assets) = mesh_with_minilm().await;
    let acme = mesh.tenant_channel("acme").await;
    let mut usage_events = mesh.subscribe("kiln.inference.usage.recorded").await;
    let reference = reference();
    // The library import runs in the background; the model answers once it is READY.
    let timeout = Duration::from_secs(60);
    let answer = first_embeddings(&acme, MINILM, &reference.sentences, timeout).await;
    assert_eq!(answer.object, "list");
    assert_eq!(answer.model, MINILM);
    assert_eq!(answer.data.len(), reference.sentences.len());
    for (i, (got, want)) in answer.data.iter().zip(&reference.embeddings).enumerate() {
        assert_eq!(got.index, i as i32);
        assert_eq!(got.object, "embedding");
        let cos = cosine(&got.embedding, want);
        assert!(cos >= 0.999, "sentence {i}: cosine {cos}");
    }
    let tokens: usize = reference.token_ids.iter().map(Vec::len).sum();
    let usage = answer.usage.expect("usage");
    assert_eq!(usage.prompt_tokens as usize, tokens);
    assert_eq!(usage.total_tokens as usize, tokens);
    assert_eq!(usage.completion_tokens, 0);

    // The usage event of that answer says the same, for acme's key.
    let event = next_usage(&mut usage_events, "accounts/acme").await;
    assert_eq!(event.model, MINILM);
    assert_eq!(event.api, "embeddings");
    assert_eq!(event.prompt_tokens as usize, tokens);
    assert_eq!(event.embedding_input_tokens as usize, tokens);
    assert!(
        event
            .api_key
            .starts_with("accounts/acme/users/owner/apiKeys/")
    );
    assert!(event.request_id.starts_with("embd-"));

    // dimensions keeps a prefix, re-normalised.
    let short = client(&acme)
        .create_embeddings(infv1::CreateEmbeddingsRequest {
            model: MINILM.into(),
            input: vec![reference.sentences[0].clone()],
            dimensions: Some(64),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let v = &short.data[0].embedding;
    assert_eq!(v.len(), 64);
    assert!((v.iter().map(|x| x * x).sum::<f32>().sqrt() - 1.0).abs() < 1e-4);
    mesh.shutdown().await;
}

/// The call failed with INVALID_ARGUMENT, its message beginning with `field:`.
#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(result: Result<T, tonic::Status>, field: &str) {
    let err = expect_code(result, Code::InvalidArgument);
    let prefix = format!("{field}:");
    assert!(err.message().starts_with(&prefix), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedding_errors_name_the_field_and_private_models_stay_private() {
    let (mesh, _assets) = mesh_with_minilm().await;
    let acme = mesh.tenant_channel("acme").await;
    let globex = mesh.tenant_channel("globex").await;

    // acme uploads its own copy of the model: private to acme, served from the registry's
    // files through the node's download cache.
    let private = private_minilm(&acme, "acme", "my-embedder").await;
    kiln_tests::deployments::deploy(&acme, &private).await;
    let text = vec!["A man is playing a guitar.".to_string()];
    let mine = embed(&acme, &private, &text)
        .await
        .expect("the owner embeds");
    assert_eq!(mine.data[0].embedding.len(), 384);
    let err = expect_code(embed(&globex, &private, &text).await, Code::NotFound);
    assert!(err.message().contains(&private), "{}", err.message());

    let unknown = embed(&acme, "accounts/kiln/models/no-such-model", &text).await;
    expect_code(unknown, Code::NotFound);
    assert_invalid(embed(&acme, &private, &[]).await, "input");
    assert_invalid(embed(&acme, "not a model name", &text).await, "model");

    // Over-long input: refused naming it, or cut when asked.
    let long = vec!["short".to_string(), "word ".repeat(600)];
    assert_invalid(embed(&acme, &private, &long).await, "input[1]");
    let request = |input, truncate, dimensions| infv1::CreateEmbeddingsRequest {
        model: private.clone(),
        input,
        truncate,
        dimensions,
        ..Default::default()
    };
    let cut = client(&acme)
        .create_embeddings(request(long, true, None))
        .await
        .expect("truncated")
        .into_inner();
    assert_eq!(cut.usage.unwrap().prompt_tokens, 3 + 512);
    let err = client(&acme)
        .create_embeddings(request(text.clone(), false, Some(1000)))
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with("dimensions:"),
        "{}",
        err.message()
    );

    // An embedding model is not a chat model.
    let mut chat = kiln_tests::llm::chat_request("hi", 0);
    (chat.model, chat.max_tokens, chat.temperature) = (private.clone(), None, None);
    let err = client(&acme).create_chat_completion(chat).await;
    let err = expect_code(err, Code::InvalidArgument);
    assert!(
        err.message().contains("embedding model"),
        "{}",
        err.message()
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oip_model_infer_through_tritonclient_equals_a_direct_backend_call() {
    let (mesh, _assets) = mesh_with_minilm().await;
    let (key, acme) = mesh.tenant("acme").await;
    minilm_served(&acme).await;
    let reference = reference();
    let ids = reference.sixteen_tokens().1.to_vec();
    let answer = tokio::task::spawn_blocking({
        let (addr, key, ids) = (mesh.addr, key.clone(), ids.clone());
        move || run_oip_client(addr, &key, &ids, false)
    })
    .await
    .unwrap();
    assert_eq!(answer["live"], true);
    assert_eq!(answer["ready"], true);
    assert_eq!(answer["server_name"], "kiln");
    assert_eq!(answer["model_ready"], true);
    let inputs: Vec<&str> = answer["model_metadata"]["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(inputs, ["input_ids", "attention_mask", "token_type_ids"]);
    let output = &answer["output"];
    assert_eq!(output["name"], "last_hidden_state");
    assert_eq!(output["datatype"], "FP32");
    assert_eq!(output["shape"], serde_json::json!([1, 16, 384]));
    let got: Vec<f32> = output["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();

    // The same tensor from the backend called directly, in this process.
    let mut session = load_session("onnxruntime", &minilm_dir().join("model.onnx"), 0);
    let direct = session.run(minilm_inputs(&ids)).unwrap();
    let TensorData::F32(want) = &direct[0].data else {
        panic!("FP32 output")
    };
    assert_eq!(got.len(), want.len());
    let diff = max_abs_diff(&got, want);
    assert!(
        diff < 1e-5,
        "ModelInfer differs from the direct call by {diff}"
    );

    // A malformed tensor is INVALID_ARGUMENT naming the input.
    let bad = tokio::task::spawn_blocking({
        let addr = mesh.addr;
        move || run_oip_client(addr, &key, &ids, true)
    })
    .await
    .unwrap();
    assert_eq!(bad["error_status"], "INVALID_ARGUMENT", "{bad}");
    assert!(
        bad["error_message"].as_str().unwrap().contains("input_ids"),
        "{bad}"
    );
    mesh.shutdown().await;
}

/// Runs `tests/python/oip_client.py` (tritonclient) against the mesh; its JSON answer.
fn run_oip_client(
    addr: std::net::SocketAddr,
    key: &str,
    ids: &[u32],
    bad_input: bool,
) -> serde_json::Value {
    let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
    kiln_tests::python::Script::new("oip_client.py")
        .arg("--url", addr)
        .arg("--model", MINILM)
        .arg("--api-key", key)
        .arg("--token-ids", ids.join(","))
        .switch("--bad-input", bad_input)
        .run()
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oip_errors_over_grpc() {
    let (mesh, _assets) = mesh_with_minilm().await;
    let acme = mesh.tenant_channel("acme").await;
    minilm_served(&acme).await;
    let tensor = |name: &str, datatype: &str, shape: Vec<i64>, ints: Vec<i64>| {
        oipv2::model_infer_request::InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            contents: Some(oipv2::InferTensorContents {
                int64_contents: ints,
                ..Default::default()
            }),
            ..Default::default()
        }
    };
    let infer = |model: &str, inputs| {
        let request = oipv2::ModelInferRequest {
            model_name: model.into(),
            inputs,
            ..Default::default()
        };
        let acme = acme.clone();
        async move {
            oip(&acme)
                .model_infer(request)
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let good = vec![
        tensor("input_ids", "INT64", vec![1, 3], vec![101, 7592, 102]),
        tensor("attention_mask", "INT64", vec![1, 3], vec![1, 1, 1]),
        tensor("token_type_ids", "INT64", vec![1, 3], vec![0, 0, 0]),
    ];
    // Typed contents in, raw little-endian out.
    let ok = infer(MINILM, good.clone()).await.unwrap();
    assert_eq!(ok.outputs[0].shape, vec![1, 3, 384]);
    assert_eq!(ok.raw_output_contents[0].len(), 3 * 384 * 4);

    // A malformed request is INVALID_ARGUMENT naming the input.
    let mut wrong_shape = good.clone();
    wrong_shape[1] = tensor("attention_mask", "INT64", vec![1, 3], vec![1, 1]);
    let mut missing = good.clone();
    missing.pop();
    for (inputs, named) in [(wrong_shape, "attention_mask"), (missing, "token_type_ids")] {
        let err = expect_code(infer(MINILM, inputs).await, Code::InvalidArgument);
        assert!(err.message().contains(named), "{}", err.message());
    }

    // A token id beyond the vocabulary fails inside the backend: INTERNAL with its message,
    // and the model keeps serving.
    let mut out_of_vocabulary = good.clone();
    out_of_vocabulary[0] = tensor("input_ids", "INT64", vec![1, 3], vec![101, 999_999, 102]);
    let err = expect_code(infer(MINILM, out_of_vocabulary).await, Code::Internal);
    assert!(
        err.message().starts_with("onnxruntime: "),
        "{}",
        err.message()
    );
    infer(MINILM, good.clone()).await.expect("still serving");

    let nope = "accounts/kiln/models/nope";
    expect_code(infer(nope, good).await, Code::NotFound);
    let ready = oip(&acme)
        .model_ready(oipv2::ModelReadyRequest {
            name: "accounts/kiln/models/nope".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!ready.ready);
    mesh.shutdown().await;
}

/// An inference node on its own: callers' keys checked by identity and models read from the
/// registry over gRPC (the mesh's), with the service token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_inference_node_reads_models_from_the_registry_over_grpc() {
    let (mesh, _assets) = mesh_with_minilm().await;
    let (key, acme_on_mesh) = mesh.tenant("acme").await;
    // The library is imported before the node is asked.
    minilm_served(&acme_on_mesh).await;

    let data = tempfile::tempdir().unwrap();
    let server = kiln_core::config::ServerConfig {
        data_dir: data.path().to_path_buf(),
        service_token: Some(kiln_tests::SERVICE_TOKEN.to_owned()),
        identity_url: Some(mesh.url()),
        registry_url: Some(mesh.url()),
        page_token_secret: Some("test-page-token-secret".to_owned()),
        // A node on its own, without billing: nothing is rate limited.
        enforce_quotas: false,
        ..Default::default()
    };
    let config = kiln_server::KilnConfig {
        server,
        inference: kiln_inference::config::InferenceConfig {
            ort_dylib_path: ort_library().display().to_string(),
            ..Default::default()
        },
        ..Default::default()
    };
    // The node as `kiln serve inference` runs it, with no scheduler: requests name models.
    let roles = [kiln_server::Role::Inference].into_iter().collect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = kiln_server::serve(roles, &config, listener, Some(mesh.bus.clone()))
        .await
        .unwrap();
    let node = kiln_tests::channel_to(&format!("http://{}", running.addr), Some(&key)).await;

    let reference = reference();
    let answer = embed(&node, MINILM, &reference.sentences[..2])
        .await
        .expect("the node answers");
    for (got, want) in answer.data.iter().zip(&reference.embeddings) {
        assert!(cosine(&got.embedding, want) >= 0.999);
    }
    // The bundle came through the registry into the node's own cache.
    let cached: Vec<_> = std::fs::read_dir(data.path().join("model-cache"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(cached.len(), 1, "one cached bundle");
    // Another account's private model stays invisible, and a bad key is refused.
    let one = &reference.sentences[..1];
    let secret = embed(&node, "accounts/globex/models/secret", one).await;
    expect_code(secret, Code::NotFound);
    let stranger =
        kiln_tests::channel_to(&format!("http://{}", running.addr), Some("kiln_not-a-key")).await;
    expect_code(embed(&stranger, MINILM, one).await, Code::Unauthenticated);
    running.shutdown().await.unwrap();
    mesh.shutdown().await;
}
