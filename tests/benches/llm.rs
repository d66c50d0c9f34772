//! Text generation on SmolLM2-135M-Instruct through Kiln's gRPC API against llama.cpp on the
//! same GGUF, in one run: `cargo bench -p kiln-tests --bench llm [-- MAX_TOKENS THREADS]`.
//!
//! Kiln serves the prepared 4-bit graph (`prefer_int4`, the default) on ONNX Runtime with
//! THREADS intra-op threads; 1, 4 and 16 concurrent greedy chat streams, each asking for
//! MAX_TOKENS tokens: aggregate decode tokens/s (completion tokens over the wall time of the
//! whole round) and the median time to the first content chunk. llama.cpp runs through llama-cpp-python (tests/python/llama_baseline.py,
//! requirements-reference.txt) with THREADS threads.

use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_inference::config::InferenceConfig;
use kiln_proto::kiln_inference::v1 as infv1;
use kiln_tests::inference::client;
use kiln_tests::llm::{GGUF, SMOLLM2, smollm2_asset_dir};
use kiln_tests::{asset, wait_for};

const QUESTIONS: [&str; 4] = [
    "Write a long story about a dragon who learns to paint.",
    "Explain how a bicycle works, in detail.",
    "Describe a day in the life of a lighthouse keeper.",
    "Write a letter to a friend about your summer holiday.",
];

fn request(i: usize, max_tokens: i32) -> infv1::CreateChatCompletionRequest {
    infv1::CreateChatCompletionRequest {
        model: SMOLLM2.into(),
        messages: vec![infv1::ChatMessage {
            role: "user".into(),
            content: QUESTIONS[i % QUESTIONS.len()].into(),
            name: String::new(),
        }],
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..Default::default()
    }
}

/// One stream: (time to first content, completion tokens).
async fn stream(ch: kiln_tests::AuthedChannel, i: usize, max_tokens: i32) -> (Duration, usize) {
    let start = Instant::now();
    let mut s = client(&ch)
        .stream_chat_completion(request(i, max_tokens))
        .await
        .unwrap()
        .into_inner();
    let mut first = None;
    let mut tokens = 0;
    while let Some(chunk) = s.next().await {
        let chunk = chunk.unwrap();
        if first.is_none()
            && chunk
                .choices
                .iter()
                .any(|c| !c.delta.as_ref().unwrap().content.is_empty())
        {
            first = Some(start.elapsed());
        }
        if let Some(u) = chunk.usage {
            tokens = u.completion_tokens as usize;
        }
    }
    (first.unwrap_or_default(), tokens)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let max_tokens: i32 = args.first().and_then(|s| s.parse().ok()).unwrap_or(64);
    let threads: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let assets = smollm2_asset_dir();
        let mesh = kiln_tests::library_mesh(
            assets.path(),
            Some(InferenceConfig {
                backend: "onnxruntime".into(),
                intra_op_threads: threads,
                max_sequences: 16,
                ..Default::default()
            }),
        )
        .await;
        let admin = mesh.admin().await;
        let key = kiln_tests::tenant(&admin, "bench").await;
        let ch = mesh.channel(Some(&key)).await;
        wait_for(Duration::from_secs(600), "SmolLM2 to be served", || {
            let ch = ch.clone();
            async move { client(&ch).create_chat_completion(request(0, 2)).await.ok() }
        })
        .await;
        let mut kiln = Vec::new();
        for streams in [1usize, 4, 16] {
            let start = Instant::now();
            let results = futures::future::join_all((0..streams).map(|i| stream(ch.clone(), i, max_tokens))).await;
            let wall = start.elapsed().as_secs_f64();
            let tokens: usize = results.iter().map(|r| r.1).sum();
            let mut ttft: Vec<Duration> = results.iter().map(|r| r.0).collect();
            ttft.sort();
            kiln.push((streams, tokens as f64 / wall, ttft[ttft.len() / 2], tokens));
        }
        mesh.shutdown().await;

        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/llama_baseline.py");
        let out = std::process::Command::new("python3")
            .arg(script)
            .args(["--gguf", &asset(GGUF).display().to_string()])
            .args(["--threads", &threads.to_string(), "--max-tokens", &max_tokens.to_string()])
            .output()
            .expect("python3 runs (tests/python/requirements-reference.txt installed)");
        let llama: Option<serde_json::Value> = if out.status.success() {
            serde_json::from_slice(&out.stdout).ok()
        } else {
            eprintln!("llama.cpp baseline failed: {}", String::from_utf8_lossy(&out.stderr));
            None
        };
        println!("SmolLM2-135M-Instruct, greedy chat streams of up to {max_tokens} tokens, {threads} threads");
        println!("streams  kiln tok/s  kiln TTFT p50  llama.cpp tok/s  llama.cpp TTFT p50  kiln/llama.cpp");
        for (streams, rate, ttft, tokens) in kiln {
            let l = llama.as_ref().map(|v| &v["streams"][streams.to_string()]);
            let lrate = l.and_then(|l| l["tokens_per_s"].as_f64());
            let lttft = l.and_then(|l| l["ttft_ms_p50"].as_f64());
            println!(
                "{streams:>7}  {rate:>10.1}  {:>10.1} ms  {:>15}  {:>15}  {:>14}   ({tokens} tokens)",
                ttft.as_secs_f64() * 1e3,
                lrate.map(|r| format!("{r:.1}")).unwrap_or("-".into()),
                lttft.map(|t| format!("{t:.1} ms")).unwrap_or("-".into()),
                lrate.map(|r| format!("{:.2}", rate / r)).unwrap_or("-".into()),
            );
        }
    });
}
