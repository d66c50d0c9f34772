//! LoRA adapters of SmolLM2 for the suites: PEFT files with seeded weights, and SmolLM2's
//! generation loop on a prepared bundle (with LoRA slots or without), driven directly.

use std::path::PathBuf;
use std::sync::Arc;

use kiln_formats::LoraWeights;
use kiln_inference::generation::llm::{
    Adapter, Event, Finish, Llm, LlmLimits, LlmShape, LoraOptions, SequenceRequest,
};
use kiln_inference::generation::sampling::{Sampled, SamplingParams};

use crate::inference::load_session;
use crate::llm::bundle;

/// SmolLM2-135M's linear layers: (HF module, in, out), in each of its 30 layers.
pub const MODULES: [(&str, usize, usize); 7] = [
    ("q_proj", 576, 576),
    ("k_proj", 576, 192),
    ("v_proj", 576, 192),
    ("o_proj", 576, 576),
    ("gate_proj", 576, 1536),
    ("up_proj", 576, 1536),
    ("down_proj", 1536, 576),
];
pub const LAYERS: usize = 30;
/// All seven of them (`target_modules: all-linear`).
pub const ALL: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// splitmix64: the suites' seeded numbers, the same on every machine.
pub struct Numbers(u64);

impl Numbers {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// A PEFT adapter of SmolLM2 (`adapter_config.json`, `adapter_model.safetensors`) of rank
/// `r` on `modules` of every layer, with weights drawn from `seed`: A uniform in
/// ±1/sqrt(in) (PEFT's initial scale), B uniform in ±`b_scale` (0: zeros, an adapter that
/// changes nothing). lora_alpha = 2r, so the scale is 2 (with `rslora`, 2·sqrt(r)).
pub fn seeded_lora(
    seed: u64,
    r: usize,
    modules: &[&str],
    b_scale: f32,
    rslora: bool,
) -> (Vec<u8>, Vec<u8>) {
    let mut numbers = Numbers(seed);
    let mut linears = std::collections::BTreeMap::new();
    for layer in 0..LAYERS {
        for &(module, inputs, outputs) in MODULES.iter().filter(|(m, ..)| modules.contains(m)) {
            let bound = 1.0 / (inputs as f32).sqrt();
            let a = (0..r * inputs).map(|_| numbers.uniform() * bound).collect();
            let b = (0..outputs * r)
                .map(|_| numbers.uniform() * b_scale)
                .collect();
            let linear = kiln_formats::LoraLinear {
                inputs,
                outputs,
                a,
                b,
            };
            linears.insert((layer, module), linear);
        }
    }
    let base = "HuggingFaceTB/SmolLM2-135M-Instruct";
    let (config, weights) = kiln_formats::write_peft_adapter(r, 2.0 * r as f64, base, &linears);
    if !rslora {
        return (config, weights);
    }
    let mut config: serde_json::Value = serde_json::from_slice(&config).unwrap();
    config["use_rslora"] = true.into();
    (serde_json::to_vec(&config).unwrap(), weights)
}

/// The weights of an adapter's two files, as the engine reads them.
pub fn lora_weights(config: &[u8], weights: &[u8]) -> LoraWeights {
    let config = kiln_formats::read_adapter_config("adapter_config.json", config).unwrap();
    kiln_formats::read_lora_weights(&config, weights, "adapter_model.safetensors").unwrap()
}

/// A [`seeded_lora`] as a request carries it.
pub fn seeded_adapter(
    name: &str,
    seed: u64,
    r: usize,
    modules: &[&str],
    b_scale: f32,
) -> Arc<Adapter> {
    let (config, weights) = seeded_lora(seed, r, modules, b_scale, false);
    Arc::new(Adapter {
        key: format!("{name}-{seed}"),
        name: name.into(),
        weights: Arc::new(lora_weights(&config, &weights)),
    })
}

/// SmolLM2's prepared graph (`blocks`: INT4), with LoRA slots when `lora_slots` > 0.
pub fn graph(blocks: bool, lora_slots: usize) -> PathBuf {
    let plain = bundle(blocks).join("model.onnx");
    if lora_slots == 0 {
        return plain;
    }
    kiln_inference::engine::with_lora_slots(&plain).unwrap()
}

/// SmolLM2's generation loop with `adapter` live-merged, as the engine serves an addon
/// deployed as a model of its own: merged into the float weights, or pinned in a LoRA slot of
/// the 4-bit graph.
pub fn merged_loop(blocks: bool, adapter: &Arc<Adapter>) -> Llm {
    let plain = bundle(blocks).join("model.onnx");
    match kiln_inference::engine::with_merged_adapter(&plain, adapter).unwrap() {
        Some(merged) => generation_loop_on(&merged, blocks, 0, None, 4),
        None => generation_loop_on(&graph(blocks, 1), blocks, 1, Some(adapter.clone()), 4),
    }
}

/// SmolLM2's generation loop on ONNX Runtime (2 threads) over [`graph`].
pub fn generation_loop(blocks: bool, lora_slots: usize, max_batch: usize) -> Llm {
    generation_loop_on(
        &graph(blocks, lora_slots),
        blocks,
        lora_slots,
        None,
        max_batch,
    )
}

/// SmolLM2's generation loop on ONNX Runtime (2 threads) over the graph at `path`.
pub fn generation_loop_on(
    path: &std::path::Path,
    blocks: bool,
    lora_slots: usize,
    pinned: Option<Arc<Adapter>>,
    max_batch: usize,
) -> Llm {
    let session = load_session("onnxruntime", path, 2);
    let tokenizer =
        kiln_inference::engine::load_tokenizer(&bundle(blocks).join("tokenizer.json")).unwrap();
    let shape = LlmShape {
        layers: LAYERS,
        kv_heads: 3,
        head_dim: 64,
        context_length: 2048,
        eos: vec![2],
        // The 4-bit graph attends with GroupQueryAttention.
        kv_in_place: blocks,
    };
    let limits = LlmLimits {
        max_batch,
        prefill_chunk: 256,
        max_kv_tokens: 65536,
        queue_capacity: 64,
        prefix_cache_bytes: 64 << 20,
    };
    Llm::start(
        "smollm2",
        session,
        shape,
        Arc::new(tokenizer),
        limits,
        LoraOptions {
            slots: lora_slots,
            pinned,
        },
    )
    .unwrap()
}

/// What a greedy sequence gave: its tokens with their log-probabilities, or the failure.
pub type Greedy = Result<Vec<Sampled>, String>;

/// Starts a greedy sequence of `prompt` through `adapter`; its answer comes from [`finish`].
pub fn submit(
    llm: &Llm,
    prompt: &[u32],
    max_tokens: usize,
    adapter: Option<Arc<Adapter>>,
) -> tokio::sync::mpsc::UnboundedReceiver<Event> {
    let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
    let params = SamplingParams {
        temperature: 0.0,
        logprobs: true,
        ..Default::default()
    };
    llm.submit(SequenceRequest {
        prompt: prompt.to_vec(),
        params,
        max_tokens,
        stops: Vec::new(),
        choice: 0,
        adapter,
        events,
    })
    .unwrap_or_else(|e| panic!("submitted: {e:?}"));
    receiver
}

/// The tokens of a sequence [`submit`] started, once it finishes.
pub async fn finish(mut events: tokio::sync::mpsc::UnboundedReceiver<Event>) -> Greedy {
    let mut tokens = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Token { sampled, .. } => tokens.push(sampled),
            Event::Finished { finish, .. } => {
                assert!(matches!(finish, Finish::Stop | Finish::Length));
                return Ok(tokens);
            }
            Event::Failed(why) => return Err(why),
        }
    }
    Err("the loop went away".into())
}

/// One greedy sequence, alone.
pub async fn greedy(
    llm: &Llm,
    prompt: &[u32],
    max_tokens: usize,
    adapter: Option<Arc<Adapter>>,
) -> Greedy {
    finish(submit(llm, prompt, max_tokens, adapter)).await
}

/// The token ids of a greedy answer.
pub fn ids(answer: &Greedy) -> Vec<u32> {
    answer
        .as_ref()
        .expect("answered")
        .iter()
        .map(|s| s.token)
        .collect()
}

/// The resident inputs of a session over a graph with LoRA slots (whose `inputs` these are)
/// that holds `weights` alone in its slots, with a mask sending all `batch` rows through it:
/// every `lora.{l}.{m}.a` input as `Aᵀ [in, r]` and `.b` as `Bᵀ [r, out]` (zeros where the
/// adapter leaves the linear alone).
pub fn alone_in_slots(
    inputs: &[kiln_inference::backend::TensorInfo],
    weights: &LoraWeights,
    batch: usize,
) -> Vec<(String, kiln_inference::tensor::Tensor)> {
    use kiln_inference::tensor::{Tensor, TensorData};
    let rank = weights.rank;
    let tensor = |shape: Vec<usize>, values| Tensor::new(shape, TensorData::F32(values)).unwrap();
    let dim = |name: &str, axis: usize| {
        let info = inputs.iter().find(|t| t.name == name).expect(name);
        info.shape[axis] as usize
    };
    let mut resident = Vec::new();
    for info in inputs {
        let Some(slot) = info
            .name
            .strip_prefix("lora.")
            .and_then(|n| n.strip_suffix(".a"))
        else {
            continue;
        };
        let (layer, module) = slot.split_once('.').unwrap();
        let b_name = format!("lora.{slot}.b");
        let (features, outputs) = (dim(&info.name, 0), dim(&b_name, 1));
        let (mut a, mut b) = (vec![0f32; features * rank], vec![0f32; rank * outputs]);
        if let Some(l) = weights.linears.get(&(layer.parse().unwrap(), module)) {
            for k in 0..rank {
                for i in 0..features {
                    a[i * rank + k] = l.a[k * features + i];
                }
                for o in 0..outputs {
                    b[k * outputs + o] = l.b[o * rank + k];
                }
            }
        }
        resident.push((info.name.clone(), tensor(vec![features, rank], a)));
        resident.push((b_name, tensor(vec![rank, outputs], b)));
    }
    resident.push((
        kiln_formats::LORA_MASK.to_owned(),
        tensor(vec![batch, 1, rank], vec![1.0; batch * rank]),
    ));
    resident
}

/// Creates LoRA addon `id` of SmolLM2 in acme from a [`seeded_lora`] (as [`seeded_lora`]'s
/// arguments say) and validates it; returns its name.
pub async fn upload_seeded_addon(
    acme: &crate::AuthedChannel,
    id: &str,
    seed: u64,
    r: usize,
    modules: &[&str],
    b_scale: f32,
) -> String {
    use crate::registry as reg;
    let kind = kiln_proto::registry::v1::model::Kind::LoraAddon;
    let addon = reg::create_model(acme, "acme", id, kind, Some(crate::llm::SMOLLM2)).await;
    let (config, weights) = seeded_lora(seed, r, modules, b_scale, false);
    let files: [(&str, &[u8]); 2] = [
        ("adapter_config.json", &config),
        ("adapter_model.safetensors", &weights),
    ];
    reg::upload(acme, &addon.name, &files).await.unwrap();
    assert!(reg::validate(acme, &addon.name).await.valid);
    addon.name
}

/// Deployment `id` of SmolLM2 in acme that takes addons (one CPU replica), once it is ready.
pub async fn deploy_with_addons(
    acme: &crate::AuthedChannel,
    id: &str,
) -> kiln_proto::scheduler::v1::Deployment {
    let with_addons = kiln_proto::scheduler::v1::Deployment {
        base_model: crate::llm::SMOLLM2.into(),
        enable_addons: true,
        ..crate::deployments::on("CPU", 1)
    };
    let created = crate::deployments::create(acme, "accounts/acme", id, with_addons)
        .await
        .unwrap();
    crate::deployments::wait_ready(acme, &created.name, 1).await
}
