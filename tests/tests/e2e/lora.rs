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

/// Live merge: the adapter baked into the graph (float weights summed; pinned in a slot of
/// the 4-bit graph) gives the greedy tokens the multi-LoRA path gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_merged_adapter_answers_as_through_its_slot() {
    let prompts = prompts();
    let adapter = seeded_adapter("merged", 21, 16, &ALL, 0.2);
    for blocks in [false, true] {
        let slotted = generation_loop(blocks, 2, 4);
        let mut through_slot = Vec::new();
        for prompt in &prompts[..3] {
            through_slot.push(ids(
                &greedy(&slotted, prompt, 16, Some(adapter.clone())).await
            ));
        }
        drop(slotted);
        let merged = merged_loop(blocks, &adapter);
        let plain = generation_loop(blocks, 0, 4);
        for (prompt, want) in prompts[..3].iter().zip(&through_slot) {
            let got = ids(&greedy(&merged, prompt, 16, None).await);
            assert_eq!(&got, want, "blocks {blocks}");
            let base = ids(&greedy(&plain, prompt, 16, None).await);
            assert_ne!(
                &base, want,
                "the adapter changes the answer (blocks {blocks})"
            );
        }
    }
}

/// Through the mesh: an addon deployed onto a deployment of its base with enable_addons
/// answers through its slot, and a deployment of the addon itself (live merge) answers the
/// same; both differ from the base.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_addon_answers_through_a_slot_and_live_merged_alike() {
    use kiln_proto::kiln_inference::v1 as infv1;
    use kiln_proto::scheduler::v1 as schv1;
    use kiln_tests::deployments::{self, on, wait_ready};
    use kiln_tests::llm::{SMOLLM2, first_chat, smollm2_asset_dir};
    use std::time::Duration;

    let assets = smollm2_asset_dir();
    let mesh = kiln_tests::library_mesh(assets.path(), None).await;
    let acme = mesh.tenant_channel("acme").await;
    first_chat(&acme, "Hi", 1, Duration::from_secs(300)).await;
    let addon =
        upload_seeded_addon(&acme, "tone", 5, 8, &["q_proj", "v_proj", "o_proj"], 0.5).await;
    let base = deploy_with_addons(&acme, "chat").await;
    let on_base =
        deployments::create_deployed_model(&acme, "acme", "tone-on-chat", &addon, &base.name)
            .await
            .unwrap();
    let merged = schv1::Deployment {
        base_model: addon.clone(),
        ..on("CPU", 1)
    };
    let merged = deployments::create(&acme, "accounts/acme", "tone", merged)
        .await
        .unwrap();
    wait_ready(&acme, &merged.name, 1).await;

    let greedy = |model: String| {
        let acme = acme.clone();
        async move {
            let request = infv1::CreateCompletionRequest {
                model,
                prompt: "The capital of France is".into(),
                max_tokens: Some(12),
                temperature: Some(0.0),
                ..Default::default()
            };
            let answer = kiln_tests::inference::client(&acme)
                .create_completion(request)
                .await?;
            Ok::<_, tonic::Status>(answer.into_inner().choices[0].text.clone())
        }
    };
    // The deployed model becomes servable once its replica holds the addon.
    let through_slot =
        kiln_tests::wait_for_ok(Duration::from_secs(60), "the addon to answer", || {
            greedy(on_base.name.clone())
        })
        .await;
    let live_merged = greedy(format!("{addon}#{}", merged.name)).await.unwrap();
    let bare = greedy(format!("{SMOLLM2}#{}", base.name)).await.unwrap();
    assert_eq!(live_merged, through_slot);
    assert_ne!(bare, through_slot, "the addon changes the answer");
    // The base's loop with slots reports the adapter in them (and its bare loop none).
    let text = mesh.scrape().await;
    let prefix = format!("kiln_llm_loaded_adapters{{model=\"{SMOLLM2}\",lora_slots=\"");
    let loaded: Vec<(String, f64)> = text
        .lines()
        .filter_map(|l| {
            let (slots, value) = l.strip_prefix(&prefix)?.split_once("\"} ")?;
            Some((slots.to_owned(), value.parse().ok()?))
        })
        .collect();
    assert!(loaded.contains(&("0".into(), 0.0)), "{text}");
    assert!(
        loaded.iter().any(|(slots, n)| slots != "0" && *n == 1.0),
        "{text}"
    );
    // A live-merged addon takes no further addons.
    let refused = deployments::create(
        &acme,
        "accounts/acme",
        "stacked",
        schv1::Deployment {
            base_model: addon.clone(),
            enable_addons: true,
            ..on("CPU", 1)
        },
    )
    .await
    .unwrap_err();
    assert!(
        refused.message().contains("takes no further addons"),
        "{refused}"
    );
    mesh.shutdown().await;
}

/// `tests/data/llm/lora/reference.json`: llama.cpp with the same adapter in its own GGUF-LoRA
/// format (made by make_reference.py beside it).
#[derive(serde::Deserialize)]
struct LlamaCppReference {
    seed: u64,
    r: usize,
    b_scale: f32,
    modules: Vec<String>,
    prompts: Vec<LlamaCppPrompt>,
}

#[derive(serde::Deserialize)]
struct LlamaCppPrompt {
    tokens: Vec<u32>,
    argmax_next: Vec<u32>,
    argmax_margin: Vec<f32>,
    argmax_next_without: Vec<u32>,
}

/// Against an independent implementation: teacher-forced next-token predictions of the
/// reference prompts through the LoRA slots agree with llama.cpp's with the same adapter
/// (converted to its format, its q rows permuted as its converter does), as the base graph
/// agrees with llama.cpp without one; and they follow llama.cpp where the adapter changes its
/// answer.
#[test]
fn slots_predict_like_llama_cpp_with_the_same_adapter() {
    let reference: LlamaCppReference = kiln_tests::data_json("llm/lora/reference.json");
    let modules: Vec<&str> = reference.modules.iter().map(String::as_str).collect();
    let (config, weights) = seeded_lora(
        reference.seed,
        reference.r,
        &modules,
        reference.b_scale,
        false,
    );
    let weights = lora_weights(&config, &weights);
    let prompts: Vec<&[u32]> = reference.prompts.iter().map(|p| &p.tokens[..]).collect();
    let (batch, width) = (
        prompts.len(),
        prompts.iter().map(|p| p.len()).max().unwrap(),
    );
    let (mut ids, mut mask, mut positions) = (Vec::new(), Vec::new(), Vec::new());
    for p in &prompts {
        for i in 0..width {
            ids.push(p.get(i).map_or(0, |&t| i64::from(t)));
            mask.push(i64::from(i < p.len()));
            positions.push(i as i64);
        }
    }
    // A strong adapter flattens the logits: where llama.cpp's top two are within CLEAR of each
    // other, its int8 activations and Kiln's float ones legitimately pick differently. Where
    // they are not, the two must agree (a wrong scale, module or row order does not).
    const CLEAR: f32 = 0.5;
    for (blocks, floor) in [(false, 0.97), (true, 0.95)] {
        let mut session = kiln_tests::inference::load_session("onnxruntime", &graph(blocks, 1), 2);
        let resident = alone_in_slots(session.inputs(), &weights, batch);
        session.set_resident(resident).unwrap();
        let (values, vocab) = kiln_tests::llm::decoder_logits(
            session.as_mut(),
            [batch, width],
            ids.clone(),
            mask.clone(),
            positions.clone(),
        );
        let (mut agree, mut total, mut changed, mut followed) = (0, 0, 0, 0);
        let (mut clear, mut clear_agree) = (0, 0);
        for (b, p) in reference.prompts.iter().enumerate() {
            for i in 0..p.tokens.len() {
                let row = &values[(b * width + i) * vocab..(b * width + i + 1) * vocab];
                let got = kiln_inference::generation::sampling::argmax(row);
                total += 1;
                agree += usize::from(got == p.argmax_next[i]);
                if p.argmax_margin[i] >= CLEAR {
                    clear += 1;
                    clear_agree += usize::from(got == p.argmax_next[i]);
                }
                if p.argmax_next[i] != p.argmax_next_without[i] {
                    changed += 1;
                    followed += usize::from(got == p.argmax_next[i]);
                }
            }
        }
        let rate = clear_agree as f64 / clear as f64;
        eprintln!(
            "blocks {blocks}: top-1 agreement with llama.cpp + adapter {agree}/{total}, \
             {clear_agree}/{clear} where its margin is at least {CLEAR}; where the adapter \
             changes llama.cpp's answer, {followed}/{changed}"
        );
        assert!(
            rate >= floor,
            "blocks {blocks}: clear agreement {rate:.3} < {floor}"
        );
        assert!(clear >= total / 2, "{clear} of {total} clear positions");
        assert!(
            changed >= total / 4,
            "the adapter changes {changed} of {total} answers only"
        );
        assert!(
            followed as f64 >= 0.7 * changed as f64,
            "Kiln follows llama.cpp on {followed} of the {changed} answers the adapter changes"
        );
    }
}
