//! LLM serving on SmolLM2-135M-Instruct: the GGUF prepared into an ONNX decoder-with-past
//! bundle, checked against llama.cpp (tests/data/llm/reference.json), then served through the
//! gRPC API: chat with the model's template, streaming, stop sequences, seeds, usage and
//! continuous batching.

use std::time::Duration;

use futures::StreamExt;
use kiln_inference::backend::{Backends, LoadOptions};
use kiln_inference::tensor::{Tensor, TensorData};
use kiln_proto::kiln_inference::v1 as infv1;
use kiln_tests::inference::{client, ort_library};
use kiln_tests::llm::*;
use kiln_tests::{TestMesh, wait_for};
use tonic::Code;

/// Teacher-forced next-token predictions of every reference prompt, all prompts in one
/// right-padded batch (the graph masks the padding).
fn predictions(backend: &str, blocks: bool, reference: &Reference) -> Vec<Vec<u32>> {
    let backends = Backends::standard(Some(&ort_library()));
    let mut session = backends
        .get(backend)
        .unwrap()
        .load(
            &bundle(blocks).join("model.onnx"),
            &LoadOptions {
                intra_op_threads: 2,
                ..Default::default()
            },
        )
        .unwrap();
    let batch = reference.prompts.len();
    let width = reference
        .prompts
        .iter()
        .map(|p| p.tokens.len())
        .max()
        .unwrap();
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    let mut positions = Vec::new();
    for p in &reference.prompts {
        for i in 0..width {
            ids.push(p.tokens.get(i).map_or(0, |&t| i64::from(t)));
            mask.push(i64::from(i < p.tokens.len()));
            positions.push(i as i64);
        }
    }
    let t = |v: Vec<i64>| Tensor::new(vec![batch, width], TensorData::I64(v)).unwrap();
    let mut inputs = vec![
        ("input_ids".to_owned(), t(ids)),
        ("attention_mask".to_owned(), t(mask)),
        ("position_ids".to_owned(), t(positions)),
    ];
    for info in session.inputs().to_vec() {
        if info.name.starts_with("past_key_values.") {
            let shape = vec![batch, info.shape[1] as usize, 0, info.shape[3] as usize];
            inputs.push((
                info.name.clone(),
                Tensor::new(shape, TensorData::F32(vec![])).unwrap(),
            ));
        }
    }
    let logits_at = session
        .outputs()
        .iter()
        .position(|o| o.name == "logits")
        .unwrap();
    let outputs = session.run(inputs).unwrap();
    let logits = &outputs[logits_at];
    let vocab = logits.shape[2];
    let TensorData::F32(values) = &logits.data else {
        panic!("FP32 logits")
    };
    reference
        .prompts
        .iter()
        .enumerate()
        .map(|(b, p)| {
            (0..p.tokens.len())
                .map(|i| {
                    let row = &values[(b * width + i) * vocab..(b * width + i + 1) * vocab];
                    kiln_inference::generation::sampling::argmax(row)
                })
                .collect()
        })
        .collect()
}

#[test]
fn the_prepared_graph_predicts_like_llama_cpp_on_both_backends() {
    let reference = reference();
    assert!(reference.prompts.len() >= 20);
    let tokenizer =
        kiln_inference::engine::load_tokenizer(&bundle(false).join("tokenizer.json")).unwrap();
    // The tokenizer built from the GGUF splits text as llama.cpp does.
    for case in reference
        .tokenization
        .iter()
        .map(|t| (&t.text, &t.tokens))
        .chain(reference.prompts.iter().map(|p| (&p.text, &p.tokens)))
    {
        let ids = tokenizer
            .encode(case.0.as_str(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(&ids, case.1, "tokens of {:?}", case.0);
    }
    // float32 on both backends (95% at least), the 4-bit graph on ONNX Runtime (90%).
    for (backend, blocks, floor) in [
        ("onnxruntime", false, 0.95),
        ("tract", false, 0.95),
        ("onnxruntime", true, 0.90),
    ] {
        let predicted = predictions(backend, blocks, &reference);
        let (mut agree, mut total) = (0usize, 0usize);
        for (p, got) in reference.prompts.iter().zip(&predicted) {
            for (want, got) in p.argmax_next.iter().zip(got) {
                total += 1;
                agree += usize::from(want == got);
            }
        }
        let rate = agree as f64 / total as f64;
        let graph = if blocks { "4-bit" } else { "float32" };
        eprintln!(
            "{graph} on {backend}: top-1 agreement with llama.cpp {agree}/{total} = {rate:.3}"
        );
        assert!(
            rate >= floor,
            "{graph} on {backend}: top-1 agreement {rate:.3} < {floor}"
        );
    }
}

/// A mesh whose library holds the chat model only, prepared and loaded.
async fn mesh_with_smollm2(
    inference: Option<kiln_inference::config::InferenceConfig>,
) -> (TestMesh, tempfile::TempDir, kiln_tests::AuthedChannel) {
    let assets = smollm2_asset_dir();
    let mesh = kiln_tests::library_mesh(assets.path(), inference).await;
    let admin = mesh.admin().await;
    let key = kiln_tests::tenant(&admin, "acme").await;
    let acme = mesh.channel(Some(&key)).await;
    wait_for(
        Duration::from_secs(300),
        "SmolLM2 to be prepared and served",
        || async { chat(&acme, "Hi", 1).await.ok() },
    )
    .await;
    (mesh, assets, acme)
}

fn chat_request(question: &str, max_tokens: i32) -> infv1::CreateChatCompletionRequest {
    infv1::CreateChatCompletionRequest {
        model: SMOLLM2.into(),
        messages: vec![infv1::ChatMessage {
            role: "user".into(),
            content: question.into(),
            name: String::new(),
        }],
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..Default::default()
    }
}

async fn chat(
    ch: &kiln_tests::AuthedChannel,
    question: &str,
    max_tokens: i32,
) -> Result<infv1::ChatCompletion, tonic::Status> {
    client(ch)
        .create_chat_completion(chat_request(question, max_tokens))
        .await
        .map(|r| r.into_inner())
}

/// Concatenated deltas, the finish reason and the usage of a chat stream.
async fn stream_chat(
    ch: &kiln_tests::AuthedChannel,
    request: infv1::CreateChatCompletionRequest,
) -> (String, String, infv1::Usage, usize) {
    let mut stream = client(ch)
        .stream_chat_completion(request)
        .await
        .unwrap()
        .into_inner();
    let (mut text, mut finish, mut usage, mut chunks) = (String::new(), String::new(), None, 0);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        chunks += 1;
        for c in &chunk.choices {
            text.push_str(&c.delta.as_ref().unwrap().content);
            if !c.finish_reason.is_empty() {
                finish = c.finish_reason.clone();
            }
        }
        if chunk.usage.is_some() {
            usage = chunk.usage;
        }
    }
    (
        text,
        finish,
        usage.expect("the last chunk carries usage"),
        chunks,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_answers_stream_and_count_like_the_model() {
    let (mesh, _assets, acme) = mesh_with_smollm2(None).await;
    let reference = reference();
    // The library prepares both variants (INT4 first: what ONNX Runtime serves).
    use kiln_proto::common::v1::Precision;
    use kiln_proto::registry::v1::prepared_bundle::State;
    wait_for(
        Duration::from_secs(300),
        "both bundles to be READY",
        || async {
            let model = kiln_tests::registry::models(&acme)
                .get_model(kiln_proto::registry::v1::GetModelRequest {
                    name: SMOLLM2.into(),
                })
                .await
                .unwrap()
                .into_inner();
            let mut ready: Vec<i32> = model
                .prepared_bundles
                .iter()
                .filter(|b| b.state == State::Ready as i32)
                .map(|b| b.precision)
                .collect();
            ready.sort();
            (ready == [Precision::Fp32 as i32, Precision::Int4 as i32]).then_some(())
        },
    )
    .await;

    // Greedy answers through the model's own template (with its default system prompt).
    let japan = chat(&acme, "What is the capital of Japan?", 48)
        .await
        .unwrap();
    let want = &reference.chat[0];
    assert_eq!(
        japan.choices[0].message.as_ref().unwrap().content,
        want.answer
    );
    assert_eq!(japan.choices[0].finish_reason, "stop");
    let usage = japan.usage.unwrap();
    assert_eq!(usage.prompt_tokens as usize, want.prompt_tokens.len());
    assert_eq!(usage.completion_tokens as usize, want.answer_tokens.len());
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );
    for (question, expected) in [
        ("What is the opposite of hot?", "cold"),
        ("How many days are in a week?", "7"),
    ] {
        let answer = chat(&acme, question, 48).await.unwrap();
        let text = &answer.choices[0].message.as_ref().unwrap().content;
        assert!(text.contains(expected), "{question} -> {text:?}");
    }

    // The stream says the same in pieces, then the finish reason and usage.
    let (text, finish, usage, chunks) =
        stream_chat(&acme, chat_request("What is the capital of Japan?", 48)).await;
    assert_eq!(text, want.answer);
    assert_eq!(finish, "stop");
    assert_eq!(usage.completion_tokens as usize, want.answer_tokens.len());
    assert!(chunks > 3, "{chunks} chunks");

    // max_tokens ends with "length"; a stop string cuts before it, even across tokens.
    let short = chat(&acme, "What is the capital of Japan?", 3)
        .await
        .unwrap();
    assert_eq!(short.choices[0].finish_reason, "length");
    assert_eq!(short.usage.unwrap().completion_tokens, 3);
    let mut stopped = chat_request("What is the capital of Japan?", 48);
    stopped.stop = vec![" Tok".into()];
    let stopped = client(&acme)
        .create_chat_completion(stopped)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stopped.choices[0].message.as_ref().unwrap().content,
        "The capital of Japan is"
    );
    assert_eq!(stopped.choices[0].finish_reason, "stop");

    // Seeds: the same seed samples the same text, another seed another.
    let sampled = |seed: i64| {
        let acme = acme.clone();
        async move {
            let mut r = chat_request("Write a short poem about the sea.", 24);
            r.temperature = Some(1.0);
            r.seed = Some(seed);
            client(&acme)
                .create_chat_completion(r)
                .await
                .unwrap()
                .into_inner()
                .choices[0]
                .message
                .clone()
                .unwrap()
                .content
        }
    };
    assert_eq!(sampled(42).await, sampled(42).await);
    assert_ne!(sampled(42).await, sampled(43).await);

    // Completions: raw prompt, echo, logprobs.
    let completion = client(&acme)
        .create_completion(infv1::CreateCompletionRequest {
            model: SMOLLM2.into(),
            prompt: "The capital of France is".into(),
            max_tokens: Some(4),
            temperature: Some(0.0),
            logprobs: Some(2),
            echo: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let choice = &completion.choices[0];
    assert!(
        choice.text.starts_with("The capital of France is"),
        "{:?}",
        choice.text
    );
    let logprobs = choice.logprobs.as_ref().unwrap();
    assert_eq!(logprobs.tokens.len(), 4);
    assert!(logprobs.token_logprobs.iter().all(|l| *l <= 0.0));
    assert!(logprobs.top_logprobs.iter().all(|t| t.logprobs.len() == 2));
    assert_eq!(completion.usage.unwrap().completion_tokens, 4);

    // The streamed completion says the same as the unary one (which echoed the prompt).
    let mut stream = client(&acme)
        .stream_completion(infv1::CreateCompletionRequest {
            model: SMOLLM2.into(),
            prompt: "The capital of France is".into(),
            max_tokens: Some(4),
            temperature: Some(0.0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (mut streamed, mut finish, mut last_usage) = (String::new(), String::new(), None);
    while let Some(piece) = stream.next().await {
        let piece = piece.unwrap();
        for c in &piece.choices {
            streamed.push_str(&c.text);
            if !c.finish_reason.is_empty() {
                finish = c.finish_reason.clone();
            }
        }
        last_usage = piece.usage.or(last_usage);
    }
    assert_eq!(format!("The capital of France is{streamed}"), choice.text);
    assert_eq!(finish, "length");
    assert_eq!(last_usage.expect("usage at the end").completion_tokens, 4);

    // Errors name the field.
    let err = chat(&acme, "hi", 100_000).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("max_tokens:"),
        "{}",
        err.message()
    );
    let mut bad = chat_request("hi", 5);
    bad.temperature = Some(5.0);
    let err = client(&acme).create_chat_completion(bad).await.unwrap_err();
    assert!(
        err.message().starts_with("temperature:"),
        "{}",
        err.message()
    );
    let mut bad = chat_request("hi", 5);
    bad.messages[0].role = "robot".into();
    let err = client(&acme).create_chat_completion(bad).await.unwrap_err();
    assert!(
        err.message().starts_with("messages[0].role:"),
        "{}",
        err.message()
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_each_produce_what_they_produce_alone() {
    // Float32: the INT4 graph's int8 activations let padding-order rounding flip close calls.
    let (mesh, _assets, acme) = mesh_with_smollm2(Some(kiln_inference::config::InferenceConfig {
        max_sequences: 8,
        // Small enough that prompts are fed in several chunks, large enough that newcomers
        // share prefill passes.
        prefill_chunk: 32,
        prefer_int4: false,
        ..Default::default()
    }))
    .await;
    let questions = [
        "What is the capital of Japan?",
        "How many days are in a week?",
        "Name a color.",
        "What is 2 plus 2?",
        "Say hello.",
        "What is the opposite of hot?",
        "Name an animal that can fly.",
        "What do bees make?",
    ];
    let mut alone = Vec::new();
    for q in questions {
        let answer = chat(&acme, q, 24).await.unwrap();
        alone.push(answer.choices[0].message.clone().unwrap().content);
    }
    let together = futures::future::join_all(questions.iter().map(|q| {
        let acme = acme.clone();
        async move { stream_chat(&acme, chat_request(q, 24)).await.0 }
    }))
    .await;
    assert_eq!(together, alone);

    // A client that goes away frees its sequence: with room for one sequence, a cancelled
    // long stream does not block the next request.
    mesh.shutdown().await;
    let (mesh, _assets, acme) = mesh_with_smollm2(Some(kiln_inference::config::InferenceConfig {
        max_sequences: 1,
        queue_capacity: 1,
        ..Default::default()
    }))
    .await;
    let long_request = || chat_request("Write a long story about a dragon.", 1500);
    let mut stream = client(&acme)
        .stream_chat_completion(long_request())
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    let next = tokio::time::timeout(Duration::from_secs(60), chat(&acme, "Say hello.", 8)).await;
    assert!(next.expect("the slot was freed").is_ok());

    // A full queue refuses with RESOURCE_EXHAUSTED: with one sequence running, one waiting
    // in the loop and one in its queue (capacity 1), the next is refused.
    let mut held = Vec::new();
    let refused = loop {
        match client(&acme).stream_chat_completion(long_request()).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                if held.is_empty() {
                    // Running before the others queue.
                    stream.next().await.unwrap().unwrap();
                }
                held.push(stream);
                assert!(
                    held.len() <= 3,
                    "more requests accepted than the queue holds"
                );
            }
            Err(status) => break status,
        }
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        held.len() >= 2,
        "refused too early: {} accepted",
        held.len()
    );
    drop(held);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefix_cache_serves_repeated_prompts_and_later_turns() {
    // Float32, as for batching: a prompt resumed from the cache is computed in other pieces,
    // which the INT4 graph's int8 activations may round differently.
    let (mesh, _assets, acme) = mesh_with_smollm2(Some(kiln_inference::config::InferenceConfig {
        prefer_int4: false,
        ..Default::default()
    }))
    .await;
    let mut usage_events = mesh
        .bus
        .subscribe("kiln.inference.usage.recorded")
        .await
        .expect("subscribe");
    let cached = |usage: &infv1::Usage| {
        usage
            .prompt_tokens_details
            .as_ref()
            .expect("prompt_tokens_details")
            .cached_tokens
    };
    // An answer of many tokens, so the conversation's next turn shares more whole blocks
    // with the first turn's prompt and answer than with its prompt alone.
    let question = "Describe the city of Tokyo.";
    let first = chat(&acme, question, 40).await.unwrap();
    let first_usage = first.usage.unwrap();
    let answer = first.choices[0].message.clone().unwrap().content;
    // The same prompt again: all of it but its last block comes from the cache, and the
    // answer is the same.
    let again = chat(&acme, question, 40).await.unwrap();
    let again_usage = again.usage.unwrap();
    assert_eq!(again.choices[0].message.clone().unwrap().content, answer);
    assert_eq!(again_usage.prompt_tokens, first_usage.prompt_tokens);
    let whole_blocks = (again_usage.prompt_tokens - 1) / 16 * 16;
    assert_eq!(cached(&again_usage), whole_blocks, "{again_usage:?}");
    assert!(cached(&again_usage) > cached(&first_usage));
    // Streamed, the last chunk says the same.
    let (streamed, _, stream_usage, _) = stream_chat(&acme, chat_request(question, 40)).await;
    assert_eq!(streamed, answer);
    assert_eq!(cached(&stream_usage), whole_blocks);

    // The next turn of the conversation begins with the first turn's prompt and answer.
    let mut next_turn = chat_request(question, 16);
    next_turn.messages.extend([
        infv1::ChatMessage {
            role: "assistant".into(),
            content: answer.clone(),
            name: String::new(),
        },
        infv1::ChatMessage {
            role: "user".into(),
            content: "And of France?".into(),
            name: String::new(),
        },
    ]);
    let turn = client(&acme)
        .create_chat_completion(next_turn)
        .await
        .unwrap()
        .into_inner();
    let turn_usage = turn.usage.unwrap();
    assert!(first_usage.completion_tokens >= 32, "{first_usage:?}");
    // At least 31 of the answer's tokens are in the cache (all but the last when it stopped
    // at max_tokens), so at least one more whole block than the prompt alone.
    assert!(
        cached(&turn_usage) > whole_blocks,
        "the answer's tokens were reused too: {turn_usage:?}, first {first_usage:?}"
    );
    assert_eq!(cached(&turn_usage) % 16, 0);
    assert!(cached(&turn_usage) < turn_usage.prompt_tokens);

    // Usage events carry the cached count (billing prices those tokens apart).
    let recorded = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let event = usage_events.next().await.expect("event");
            if let Some(kiln_events::Body::UsageRecorded(u)) = event.body
                && u.prompt_tokens == i64::from(turn_usage.prompt_tokens)
            {
                return u;
            }
        }
    })
    .await
    .expect("the usage event of the second turn");
    assert_eq!(
        recorded.cached_prompt_tokens,
        i64::from(cached(&turn_usage))
    );
    mesh.shutdown().await;
}
