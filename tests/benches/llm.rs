//! Text generation on SmolLM2-135M-Instruct through Kiln's gRPC API against llama.cpp on the
//! same GGUF, in one run: `cargo bench -p kiln-tests --bench llm [-- MAX_TOKENS THREADS ROUNDS]`.
//!
//! Kiln serves the prepared 4-bit graph (`prefer_int4`, the default) on ONNX Runtime with
//! THREADS intra-op threads; 1, 4 and 16 concurrent greedy chat streams, each asking for
//! MAX_TOKENS tokens: aggregate decode tokens/s (completion tokens over the wall time of the
//! whole round; the median of ROUNDS rounds, default 3, as one 64-token stream lasts under a
//! second) and the median time to the first content chunk over all rounds. llama.cpp runs through
//! llama-cpp-python's batched API (tests/python/llama_baseline.py, requirements-reference.txt)
//! with THREADS threads: the K prompts prefilled in one batch, then one token of every stream
//! a step, as its server's slots run. The CPU features its kernels were built with are printed.
//! Each stream count runs on Kiln and then on llama.cpp, back to back.

use std::time::{Duration, Instant};

use kiln_inference::config::InferenceConfig;
use kiln_tests::asset;
use kiln_tests::bench::{Args, block_on, median, ms};
use kiln_tests::llm::{GGUF, first_chat, smollm2_asset_dir, timed_stream};
use kiln_tests::python::Script;

/// The generation loops' decode steps: seconds in them (`_sum`) and how many (`_count`).
const STEPS: &str = "kiln_llm_decode_step_duration_seconds";

const QUESTIONS: [&str; 4] = [
    "Write a long story about a dragon who learns to paint.",
    "Explain how a bicycle works, in detail.",
    "Describe a day in the life of a lighthouse keeper.",
    "Write a letter to a friend about your summer holiday.",
];

fn main() {
    let args = Args::from_env();
    let (max_tokens, threads): (i32, usize) = (args.get(0, 64), args.get(1, 2));
    let rounds: usize = args.get(2, 3).max(1);
    block_on(None, async move {
        let assets = smollm2_asset_dir();
        let inference = InferenceConfig {
            backend: "onnxruntime".into(),
            intra_op_threads: threads,
            max_sequences: 16,
            ..Default::default()
        };
        let mesh = kiln_tests::library_mesh(assets.path(), Some(inference)).await;
        let ch = mesh.tenant_channel("bench").await;
        first_chat(&ch, QUESTIONS[0], 2, Duration::from_secs(600)).await;
        // Each stream count runs Kiln's rounds, then llama.cpp's, so both sides of a ratio are
        // measured within a minute of each other: this VM's speed drifts more than that.
        let (mut kiln, mut llama) = (Vec::new(), Vec::new());
        for streams in [1usize, 4, 16] {
            let (mut rates, mut ttft, mut tokens) = (Vec::new(), Vec::<Duration>::new(), 0);
            let steps_before = mesh.histogram_totals(STEPS).await;
            for _round in 0..rounds {
                let start = Instant::now();
                let results =
                    futures::future::join_all((0..streams).map(|i| {
                        timed_stream(ch.clone(), QUESTIONS[i % QUESTIONS.len()], max_tokens)
                    }))
                    .await;
                let wall = start.elapsed().as_secs_f64();
                let round_tokens: usize = results.iter().map(|r| r.1).sum();
                rates.push(round_tokens as f64 / wall);
                ttft.extend(results.iter().map(|r| r.0));
                tokens = round_tokens;
            }
            let (seconds, steps) = mesh.histogram_totals(STEPS).await;
            let step = (seconds - steps_before.0) / (steps - steps_before.1).max(1.0);
            kiln.push((streams, median(&mut rates), median(&mut ttft), tokens, step));
            // The script blocks for its whole run: the mesh's tasks move off this worker.
            let baseline = tokio::task::block_in_place(|| {
                Script::new("llama_baseline.py")
                    .arg("--gguf", asset(GGUF).display())
                    .arg("--threads", threads)
                    .arg("--max-tokens", max_tokens)
                    .arg("--rounds", rounds)
                    .arg("--streams", streams)
                    .run()
            });
            llama.push(
                baseline
                    .map_err(|e| eprintln!("llama.cpp baseline failed: {e}"))
                    .ok(),
            );
        }
        mesh.shutdown().await;

        println!(
            "SmolLM2-135M-Instruct, greedy chat streams of up to {max_tokens} tokens, {threads} threads"
        );
        if let Some(features) = llama
            .iter()
            .flatten()
            .find_map(|v| v["cpu_features"].as_str())
        {
            println!("llama.cpp's CPU kernels: {}", features.trim());
        }
        println!(
            "streams  kiln tok/s  kiln TTFT p50  llama.cpp tok/s  llama.cpp TTFT p50  kiln/llama.cpp  (median of {rounds} rounds)"
        );
        for ((streams, rate, ttft, tokens, step), llama) in kiln.into_iter().zip(&llama) {
            let l = llama.as_ref().map(|v| &v["streams"][streams.to_string()]);
            let lrate = l.and_then(|l| l["tokens_per_s"].as_f64());
            let lttft = l.and_then(|l| l["ttft_ms_p50"].as_f64());
            println!(
                "{streams:>7}  {rate:>10.1}  {:>10.1} ms  {:>15}  {:>15}  {:>14}   ({tokens} tokens a round; Kiln's decode step {:.2} ms)",
                ms(ttft),
                lrate.map(|r| format!("{r:.1}")).unwrap_or("-".into()),
                lttft.map(|t| format!("{t:.1} ms")).unwrap_or("-".into()),
                lrate
                    .map(|r| format!("{:.2}", rate / r))
                    .unwrap_or("-".into()),
                step * 1e3,
            );
        }
    });
}
