//! LLM serving on SmolLM2-135M-Instruct: the GGUF prepared into an ONNX decoder-with-past
//! bundle, checked against llama.cpp (tests/data/llm/reference.json), then served through the
//! gRPC API: chat with the model's template, streaming, stop sequences, seeds, usage and
//! continuous batching.

use std::time::Duration;

use futures::StreamExt;
use kiln_proto::kiln_inference::v1 as infv1;
use kiln_tests::events::next_event;
use kiln_tests::inference::{client, load_session};
use kiln_tests::llm::*;
use kiln_tests::registry::get_model;
use kiln_tests::{TestMesh, expect_code, wait_for, with_key};
use tonic::Code;

/// Teacher-forced next-token predictions of every reference prompt, all prompts in one
/// right-padded batch (the graph masks the padding).
fn predictions(backend: &str, blocks: bool, reference: &Reference) -> Vec<Vec<u32>> {
    let mut session = load_session(backend, &bundle(blocks).join("model.onnx"), 2);
    let prompts: Vec<&[u32]> = reference
        .prompts
        .iter()
        .map(|p| &p.tokenized.tokens[..])
        .collect();
    let batch = prompts.len();
    let width = prompts.iter().map(|p| p.len()).max().unwrap();
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    let mut positions = Vec::new();
    for p in &prompts {
        for i in 0..width {
            ids.push(p.get(i).map_or(0, |&t| i64::from(t)));
            mask.push(i64::from(i < p.len()));
            positions.push(i as i64);
        }
    }
    let (values, vocab) = decoder_logits(session.as_mut(), [batch, width], ids, mask, positions);
    prompts
        .iter()
        .enumerate()
        .map(|(b, p)| {
            (0..p.len())
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
    let prompts = reference.prompts.iter().map(|p| &p.tokenized);
    for case in reference.tokenization.iter().chain(prompts) {
        let encoded = tokenizer.encode(case.text.as_str(), false).unwrap();
        assert_eq!(encoded.get_ids(), case.tokens, "tokens of {:?}", case.text);
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
    let acme = mesh.tenant_channel("acme").await;
    first_chat(&acme, "Hi", 1, Duration::from_secs(300)).await;
    (mesh, assets, acme)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_answers_stream_and_count_like_the_model() {
    let (mesh, _assets, acme) = mesh_with_smollm2(None).await;
    let reference = reference();
    // The library prepares both variants (INT4 first: what ONNX Runtime serves).
    use kiln_proto::common::v1::Precision;
    use kiln_proto::registry::v1::prepared_bundle::State;
    let both = [Precision::Fp32 as i32, Precision::Int4 as i32];
    wait_for(
        Duration::from_secs(300),
        "both bundles to be READY",
        || async {
            let model = get_model(&acme, SMOLLM2).await.unwrap();
            let bundles = model.prepared_bundles.iter();
            let ready = bundles.filter(|b| b.state == State::Ready as i32);
            let mut ready: Vec<i32> = ready.map(|b| b.precision).collect();
            ready.sort();
            (ready == both).then_some(())
        },
    )
    .await;

    // Greedy answers through the model's own template (with its default system prompt).
    let japan = chat(&acme, "What is the capital of Japan?", 48)
        .await
        .unwrap();
    let want = &reference.chat[0];
    assert_eq!(answer_text(&japan), want.answer);
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
        let text = answer_text(&answer);
        assert!(text.contains(expected), "{question} -> {text:?}");
    }

    // The stream says the same in pieces, then the finish reason and usage.
    let streamed = stream_chat(&acme, chat_request("What is the capital of Japan?", 48)).await;
    assert_eq!(streamed.text, want.answer);
    assert_eq!(streamed.finish, "stop");
    let completion_tokens = streamed.usage.completion_tokens as usize;
    assert_eq!(completion_tokens, want.answer_tokens.len());
    assert!(streamed.chunks > 3, "{} chunks", streamed.chunks);

    // max_tokens ends with "length"; a stop string cuts before it, even across tokens.
    let short = chat(&acme, "What is the capital of Japan?", 3)
        .await
        .unwrap();
    assert_eq!(short.choices[0].finish_reason, "length");
    assert_eq!(short.usage.unwrap().completion_tokens, 3);
    let mut stopped = chat_request("What is the capital of Japan?", 48);
    stopped.stop = vec![" Tok".into()];
    let stopped = send_chat(&acme, stopped).await.unwrap();
    assert_eq!(answer_text(&stopped), "The capital of Japan is");
    assert_eq!(stopped.choices[0].finish_reason, "stop");

    // Seeds: the same seed samples the same text, another seed another.
    let sampled = |seed: i64| {
        let acme = acme.clone();
        async move {
            let mut r = chat_request("Write a short poem about the sea.", 24);
            r.temperature = Some(1.0);
            r.seed = Some(seed);
            answer_text(&send_chat(&acme, r).await.unwrap()).to_owned()
        }
    };
    assert_eq!(sampled(42).await, sampled(42).await);
    assert_ne!(sampled(42).await, sampled(43).await);

    // Completions: raw prompt, echo, logprobs.
    let france = infv1::CreateCompletionRequest {
        model: SMOLLM2.into(),
        prompt: "The capital of France is".into(),
        max_tokens: Some(4),
        temperature: Some(0.0),
        ..Default::default()
    };
    let completion = client(&acme)
        .create_completion(infv1::CreateCompletionRequest {
            logprobs: Some(2),
            echo: true,
            ..france.clone()
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
    let streamed = read_stream(client(&acme).stream_completion(france)).await;
    let echoed = format!("The capital of France is{}", streamed.text);
    assert_eq!(echoed, choice.text);
    assert_eq!(streamed.finish, "length");
    assert_eq!(streamed.usage.completion_tokens, 4);

    // Errors name the field.
    let mut hot = chat_request("hi", 5);
    hot.temperature = Some(5.0);
    let mut robot = chat_request("hi", 5);
    robot.messages[0].role = "robot".into();
    for (request, field) in [
        (chat_request("hi", 100_000), "max_tokens:"),
        (hot, "temperature:"),
        (robot, "messages[0].role:"),
    ] {
        let err = expect_code(send_chat(&acme, request).await, Code::InvalidArgument);
        assert!(err.message().starts_with(field), "{}", err.message());
    }
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
        alone.push(answer_text(&answer).to_owned());
    }
    let together = futures::future::join_all(questions.iter().map(|q| {
        let acme = acme.clone();
        async move { stream_chat(&acme, chat_request(q, 24)).await.text }
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
    let mut usage_events = mesh.subscribe("kiln.inference.usage.recorded").await;
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
    let answer = answer_text(&first).to_owned();
    // The same prompt again: all of it but its last block comes from the cache, and the
    // answer is the same.
    let again = chat(&acme, question, 40).await.unwrap();
    let again_usage = again.usage.unwrap();
    assert_eq!(answer_text(&again), answer);
    assert_eq!(again_usage.prompt_tokens, first_usage.prompt_tokens);
    let whole_blocks = (again_usage.prompt_tokens - 1) / 16 * 16;
    assert_eq!(cached(&again_usage), whole_blocks, "{again_usage:?}");
    assert!(cached(&again_usage) > cached(&first_usage));
    // Streamed, the last chunk says the same.
    let streamed = stream_chat(&acme, chat_request(question, 40)).await;
    assert_eq!(streamed.text, answer);
    assert_eq!(cached(&streamed.usage), whole_blocks);

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
    let turn = send_chat(&acme, next_turn).await.unwrap();
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
    let prompt_tokens = i64::from(turn_usage.prompt_tokens);
    let what = "the usage of the second turn";
    let timeout = Duration::from_secs(30);
    let recorded = next_event(&mut usage_events, timeout, what, |body| match body {
        kiln_events::Body::UsageRecorded(u) if u.prompt_tokens == prompt_tokens => Some(u),
        _ => None,
    })
    .await;
    assert_eq!(
        recorded.cached_prompt_tokens,
        i64::from(cached(&turn_usage))
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_stream_stalls_no_one_and_loses_nothing() {
    let (mesh, _assets, acme) = mesh_with_smollm2(None).await;
    // A client with HTTP/2's default 64 KiB stream window (most gRPC clients have it) that
    // reads one chunk and then nothing: its stream's flow control shuts after a few hundred
    // tokens, while the server goes on generating them.
    let (key, _) = mesh.tenant("slowpoke").await;
    let plain = tonic::transport::Channel::from_shared(mesh.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let slow_ch = with_key(plain, Some(&key));
    // Counting on (greedy) is a long answer; log-probabilities make each piece a few hundred
    // bytes, so the window is full long before the end.
    let request = infv1::CreateCompletionRequest {
        model: SMOLLM2.into(),
        prompt: "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,".into(),
        max_tokens: Some(1200),
        temperature: Some(0.0),
        logprobs: Some(5),
        ..Default::default()
    };
    let mut slow = client(&slow_ch)
        .stream_completion(request)
        .await
        .unwrap()
        .into_inner();
    let first = slow.next().await.expect("a first piece").unwrap();
    let mut text: String = first.choices.iter().map(|c| c.text.clone()).collect();

    // The others are served meanwhile, each well within its deadline.
    for q in ["Say hello.", "Name a color.", "What is 2 plus 2?"] {
        let answered = tokio::time::timeout(Duration::from_secs(60), chat(&acme, q, 16)).await;
        answered.expect("not stalled by the slow reader").unwrap();
    }

    // Read at last, the slow stream holds its whole answer, to its usage.
    let mut usage = None;
    let mut finish = String::new();
    while let Some(piece) = slow.next().await {
        let piece = piece.expect("the stream goes on");
        for c in &piece.choices {
            text.push_str(&c.text);
            if !c.finish_reason.is_empty() {
                finish = c.finish_reason.clone();
            }
        }
        usage = piece.usage.or(usage);
    }
    let usage = usage.expect("the last chunk's usage");
    assert!(!finish.is_empty(), "a finish reason");
    assert!(usage.completion_tokens > 400, "a long answer: {usage:?}");
    assert!(text.contains(" 100, 101,"), "counted on: {text}");
    mesh.shutdown().await;
}
