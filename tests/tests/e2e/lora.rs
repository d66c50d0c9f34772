//! LoRA addons on SmolLM2 through the generation loop and a graph with LoRA slots, on ONNX
//! Runtime: exactness against the base, rows of different adapters in one pass, slots that
//! evict and reload.

use std::sync::Arc;

use kiln_tests::llm::reference;
use kiln_tests::lora::*;

/// Prompts of the llama.cpp reference chats (the model's template, its system prompt).
fn prompts() -> Vec<Vec<u32>> {
    reference()
        .chat
        .into_iter()
        .map(|c| c.prompt_tokens)
        .collect()
}

const ALL: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// With no adapter resident the slotted graph answers exactly as the prepared one (the same
/// tokens with bit-identical log-probabilities), and so does an adapter whose B matrices are
/// zero: on float32 and on the 4-bit graph.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_without_an_adapter_and_a_zero_adapter_change_nothing() {
    let prompt = &prompts()[0];
    let zero = seeded_adapter("zero", 7, 8, &ALL, 0.0);
    for blocks in [false, true] {
        let plain = generation_loop(blocks, 0, 4);
        let base = greedy(&plain, prompt, 24, None).await.unwrap();
        drop(plain);
        let slotted = generation_loop(blocks, 4, 4);
        let bare = greedy(&slotted, prompt, 24, None).await.unwrap();
        let through_zero = greedy(&slotted, prompt, 24, Some(zero.clone()))
            .await
            .unwrap();
        let bits = |a: &[kiln_inference::generation::sampling::Sampled]| {
            a.iter()
                .map(|s| (s.token, s.logprob.to_bits()))
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&bare), bits(&base), "no adapter, blocks {blocks}");
        assert_eq!(
            bits(&through_zero),
            bits(&base),
            "zero adapter, blocks {blocks}"
        );
    }
}

/// Four adapters (different ranks and modules) and the bare base in one batch: each row gives
/// exactly the greedy tokens it gives alone, and the adapters do change the answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_four_adapters_and_the_base_share_a_pass_and_answer_as_alone() {
    let prompts = prompts();
    let adapters: Vec<Option<Arc<_>>> = vec![
        None,
        Some(seeded_adapter("qv", 1, 8, &["q_proj", "v_proj"], 0.5)),
        Some(seeded_adapter("all", 2, 16, &ALL, 0.2)),
        Some(seeded_adapter(
            "mlp",
            3,
            4,
            &["gate_proj", "up_proj", "down_proj"],
            0.5,
        )),
        Some(seeded_adapter(
            "attn",
            4,
            12,
            &["q_proj", "k_proj", "v_proj", "o_proj"],
            0.4,
        )),
    ];
    let llm = generation_loop(false, 4, 8);
    let prompt = &prompts[1];
    let mut alone = Vec::new();
    for adapter in &adapters {
        alone.push(ids(&greedy(&llm, prompt, 20, adapter.clone()).await));
    }
    // Together: every request queued before the loop takes any.
    let pending: Vec<_> = adapters
        .iter()
        .map(|a| submit(&llm, prompt, 20, a.clone()))
        .collect();
    let mut together = Vec::new();
    for events in pending {
        together.push(ids(&finish(events).await));
    }
    assert_eq!(together, alone);
    let changed = alone[1..].iter().filter(|a| **a != alone[0]).count();
    assert!(
        changed >= 3,
        "the adapters should change the answer: {alone:?}"
    );
}

/// Beyond the slots, the least recently used idle adapter gives up its slot; a request for it
/// later loads it again and gets the same answer as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifth_adapter_evicts_one_that_reloads_on_demand() {
    let prompt = &prompts()[2];
    let adapters: Vec<_> = (0..5)
        .map(|i| seeded_adapter(&format!("a{i}"), 10 + i, 8, &["q_proj", "v_proj"], 0.5))
        .collect();
    let llm = generation_loop(false, 4, 4);
    let mut first = Vec::new();
    for adapter in &adapters {
        first.push(ids(&greedy(&llm, prompt, 12, Some(adapter.clone())).await));
    }
    // a0 was evicted by a4; it comes back, as does a1 (evicted by a0 now).
    for i in [0, 1, 4] {
        let again = ids(&greedy(&llm, prompt, 12, Some(adapters[i].clone())).await);
        assert_eq!(again, first[i], "a{i} after eviction");
    }
    // With one slot and an adapter running, another waits for it rather than evicting it.
    let single = generation_loop(false, 1, 4);
    let long = submit(&single, prompt, 24, Some(adapters[0].clone()));
    let short = submit(&single, prompt, 12, Some(adapters[1].clone()));
    assert_eq!(ids(&finish(short).await), first[1]);
    let long = ids(&finish(long).await);
    assert!(long.starts_with(&first[0]), "{long:?} after {:?}", first[0]);
}
