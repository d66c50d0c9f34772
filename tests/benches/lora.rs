//! LoRA serving on SmolLM2-135M-Instruct, in one run:
//! `cargo bench -p kiln-tests --bench lora [-- MAX_TOKENS STREAMS]`.
//!
//! 1. Aggregate decode tokens/s (generated tokens over the wall time of the round) of STREAMS
//!    greedy sequences of MAX_TOKENS tokens each (end of sequence banned, so every round
//!    decodes the same count), through the generation loop on the prepared 4-bit graph (ONNX
//!    Runtime, 2 intra-op threads): the base on its own graph, the base on the graph with LoRA
//!    slots and nothing resident, and four adapters (rank 16 on all seven projections)
//!    spread over the streams.
//! 2. Through the mesh (`kiln dev` in process): the time from CreateDeployedModel of a new
//!    addon on a warm replica of its base to its first answered request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_inference::generation::llm::{Adapter, Event, Llm, SequenceRequest};
use kiln_inference::generation::sampling::SamplingParams;
use kiln_proto::kiln_inference::v1 as infv1;
use kiln_tests::bench::{Args, block_on};
use kiln_tests::deployments;
use kiln_tests::llm::{SMOLLM2, first_chat, reference, smollm2_asset_dir};
use kiln_tests::lora::{
    ALL, deploy_with_addons, generation_loop, seeded_adapter, upload_seeded_addon,
};

/// Decode tokens/s of `streams` sequences, stream i through `adapters[i % len]`.
async fn round(
    llm: &Llm,
    streams: usize,
    max_tokens: usize,
    adapters: &[Option<Arc<Adapter>>],
) -> f64 {
    let prompts: Vec<Vec<u32>> = reference()
        .chat
        .into_iter()
        .map(|c| c.prompt_tokens)
        .collect();
    let params = SamplingParams {
        temperature: 0.0,
        logit_bias: [(2, -100.0)].into_iter().collect(),
        ..Default::default()
    };
    let start = Instant::now();
    let mut receivers = Vec::new();
    for i in 0..streams {
        let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
        llm.submit(SequenceRequest {
            prompt: prompts[i % prompts.len()].clone(),
            params: params.clone(),
            max_tokens,
            stops: Vec::new(),
            choice: i as u64,
            adapter: adapters[i % adapters.len()].clone(),
            events,
        })
        .unwrap_or_else(|e| panic!("submitted: {e:?}"));
        receivers.push(receiver);
    }
    let mut tokens = 0;
    for mut receiver in receivers {
        while let Some(event) = receiver.recv().await {
            match event {
                Event::Token { .. } => tokens += 1,
                Event::Finished { .. } => break,
                Event::Failed(why) => panic!("a stream failed: {why}"),
            }
        }
    }
    tokens as f64 / start.elapsed().as_secs_f64()
}

/// The time from CreateDeployedModel of a new addon on a warm replica to its first answer.
async fn time_to_first_answer() -> Duration {
    let assets = smollm2_asset_dir();
    let mesh = kiln_tests::library_mesh(assets.path(), None).await;
    let acme = mesh.tenant_channel("acme").await;
    first_chat(&acme, "Hi", 1, Duration::from_secs(600)).await;
    let base = deploy_with_addons(&acme, "chat").await;
    let addon = upload_seeded_addon(&acme, "fresh", 9, 16, &ALL, 0.2).await;
    // The base answers, warm, before the addon is deployed.
    let ask = |model: String| infv1::CreateCompletionRequest {
        model,
        prompt: "Hello".into(),
        max_tokens: Some(1),
        ..Default::default()
    };
    kiln_tests::inference::client(&acme)
        .create_completion(ask(format!("{SMOLLM2}#{}", base.name)))
        .await
        .unwrap();
    let start = Instant::now();
    let deployed =
        deployments::create_deployed_model(&acme, "acme", "fresh-on-chat", &addon, &base.name)
            .await
            .unwrap();
    let mut client = kiln_tests::inference::client(&acme);
    while client
        .create_completion(ask(deployed.name.clone()))
        .await
        .is_err()
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the addon never answered"
        );
    }
    let elapsed = start.elapsed();
    mesh.shutdown().await;
    elapsed
}

fn main() {
    let args = Args::from_env();
    let (max_tokens, streams): (usize, usize) = (args.get(0, 64), args.get(1, 16));
    block_on(None, async move {
        let adapters: Vec<Option<Arc<Adapter>>> = (0..4)
            .map(|i| Some(seeded_adapter(&format!("a{i}"), 100 + i, 16, &ALL, 0.2)))
            .collect();
        // The three cases take turns, three rounds each (the medians are reported), so a
        // drift of the machine weighs on all alike; each case is warmed first (its prompts then
        // sit in the prefix cache alike). Nothing is resident in `empty` ever.
        let plain = generation_loop(true, 0, streams);
        let empty = generation_loop(true, 4, streams);
        let slotted = generation_loop(true, 4, streams);
        round(&plain, streams, 8, &[None]).await;
        round(&empty, streams, 8, &[None]).await;
        round(&slotted, streams, 8, &adapters).await;
        let (mut base, mut empty_slots, mut four) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..3 {
            base.push(round(&plain, streams, max_tokens, &[None]).await);
            empty_slots.push(round(&empty, streams, max_tokens, &[None]).await);
            four.push(round(&slotted, streams, max_tokens, &adapters).await);
        }
        drop((plain, empty, slotted));
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (base, empty_slots, four) = (
            median(&mut base),
            median(&mut empty_slots),
            median(&mut four),
        );
        let ttfa = time_to_first_answer().await;
        println!(
            "SmolLM2-135M-Instruct 4-bit, ONNX Runtime 2 threads, {streams} streams × {max_tokens} tokens, median of 3"
        );
        println!("base, its own graph:                 {base:>7.1} tokens/s");
        println!(
            "base, graph with LoRA slots (empty): {empty_slots:>7.1} tokens/s  ({:.2} of base)",
            empty_slots / base
        );
        println!(
            "4 adapters (r16, all 7 modules):     {four:>7.1} tokens/s  ({:.2} of base)",
            four / base
        );
        println!(
            "CreateDeployedModel -> first answer of a new addon on a warm replica: {:.0} ms",
            ttfa.as_secs_f64() * 1e3
        );
    });
}
