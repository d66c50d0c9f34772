//! The generation loop against a stand-in graph whose answer depends on every position the
//! mask lets it see.

use std::sync::Arc;

use tokenizers::Tokenizer;

use super::*;
use crate::backend::{BackendError, Interface, Session, TensorInfo};
use crate::tensor::{Tensor, TensorData};

const VOCAB: u32 = 61;

/// The next token of the stand-in model after `context`: a sum over the tokens seen, their
/// count and the last position, so a wrong mask, position or past changes the answer.
fn next_after(context: &[u32]) -> u32 {
    let sum: u64 = context.iter().map(|&t| u64::from(t)).sum();
    ((7 * sum + 2 * context.len() as u64 - 1) % u64::from(VOCAB)) as u32
}

/// A decoder-with-past stand-in (one layer, one head, head_dim 1, the key of a position
/// being its token) that computes `next_after` over exactly the positions the attention
/// mask lets each query see, and records the (rows, tokens) of every pass. `in_place`: its
/// presents put each row's new keys right after the row's own past, and it refuses what
/// ONNX Runtime's GroupQueryAttention refuses (several rows' prompts over a past).
struct ContextSum {
    interface: Interface,
    in_place: bool,
    passes: Arc<std::sync::Mutex<Vec<(usize, usize)>>>,
    /// The first pass waits for this, so the test can queue newcomers behind it.
    gate: Option<std::sync::mpsc::Receiver<()>>,
}

impl ContextSum {
    fn new(
        passes: Arc<std::sync::Mutex<Vec<(usize, usize)>>>,
        gate: std::sync::mpsc::Receiver<()>,
        in_place: bool,
    ) -> Self {
        let info = |name: &str, dtype| TensorInfo {
            name: name.into(),
            dtype,
            shape: vec![-1, -1],
        };
        use crate::tensor::DataType;
        Self {
            interface: Interface {
                inputs: ["input_ids", "attention_mask", "position_ids"]
                    .iter()
                    .map(|n| info(n, DataType::I64))
                    .chain(
                        ["past_key_values.0.key", "past_key_values.0.value"]
                            .iter()
                            .map(|n| info(n, DataType::F32)),
                    )
                    .collect(),
                outputs: ["logits", "present.0.key", "present.0.value"]
                    .iter()
                    .map(|n| info(n, DataType::F32))
                    .collect(),
            },
            in_place,
            passes,
            gate: Some(gate),
        }
    }
}

impl Session for ContextSum {
    fn interface(&self) -> &Interface {
        &self.interface
    }
    fn run(&mut self, inputs: Vec<(String, Tensor)>) -> Result<Vec<Tensor>, BackendError> {
        if let Some(gate) = self.gate.take() {
            let _ = gate.recv();
        }
        let get = |name: &str| {
            inputs
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| BackendError::new("test", format!("no input {name}")))
        };
        let (ids, mask, positions, past) = (
            get("input_ids")?,
            get("attention_mask")?,
            get("position_ids")?,
            get("past_key_values.0.key")?,
        );
        let (TensorData::I64(ids_v), TensorData::I64(mask_v), TensorData::I64(pos_v)) =
            (&ids.data, &mask.data, &positions.data)
        else {
            return Err(BackendError::new(
                "test",
                "ids, mask and positions are int64",
            ));
        };
        let TensorData::F32(past_v) = &past.data else {
            return Err(BackendError::new("test", "the past is float32"));
        };
        let (rows, n) = (ids.shape[0], ids.shape[1]);
        let width = past.shape[2];
        let total = width + n;
        if mask.shape != [rows, total] || positions.shape != [rows, n] {
            return Err(BackendError::new(
                "test",
                "mask or positions of the wrong shape",
            ));
        }
        if self.in_place && rows > 1 && n > 1 && width > 0 {
            return Err(BackendError::new(
                "test",
                "batch_size must be 1 when sequence_length > 1 and past context is given",
            ));
        }
        self.passes.lock().unwrap().push((rows, n));
        let mut logits = vec![0.0f32; rows * n * VOCAB as usize];
        let mut present = Vec::with_capacity(rows * total);
        for r in 0..rows {
            let keys: Vec<f32> = past_v[r * width..(r + 1) * width]
                .iter()
                .copied()
                .chain(ids_v[r * n..(r + 1) * n].iter().map(|&t| t as f32))
                .collect();
            let visible = &mask_v[r * total..(r + 1) * total];
            for i in 0..n {
                // Causal: query i sees the past and the new positions up to itself.
                let (mut sum, mut count) = (0u64, 0u64);
                for p in 0..width + i + 1 {
                    if visible[p] == 1 {
                        sum += keys[p] as u64;
                        count += 1;
                    }
                }
                let pos = pos_v[r * n + i] as u64;
                let next = (7 * sum + count + pos) % u64::from(VOCAB);
                logits[(r * n + i) * VOCAB as usize + next as usize] = 1.0;
            }
            if self.in_place {
                // The row's own past (its leading visible positions), its new keys, padding.
                let own = visible[..width].iter().filter(|&&v| v == 1).count();
                let start = present.len();
                present.extend(&keys[..own]);
                present.extend(&keys[width..]);
                present.resize(start + total, 0.0);
            } else {
                present.extend(keys);
            }
        }
        let kv = Tensor {
            shape: vec![rows, 1, total, 1],
            data: TensorData::F32(present),
        };
        Ok(vec![
            Tensor {
                shape: vec![rows, n, VOCAB as usize],
                data: TensorData::F32(logits),
            },
            kv.clone(),
            kv,
        ])
    }
}

fn word_tokenizer() -> Arc<Tokenizer> {
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..VOCAB).map(|i| (format!("t{i}"), i.into())).collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    Arc::new(json.to_string().parse().expect("a word-level tokenizer"))
}

#[tokio::test]
async fn newcomers_prefill_together_and_each_generates_what_it_would_alone() {
    newcomers_prefill_together(false).await;
}

#[tokio::test]
async fn with_the_cache_in_place_too() {
    newcomers_prefill_together(true).await;
}

async fn newcomers_prefill_together(in_place: bool) {
    let passes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (open, gate) = std::sync::mpsc::channel();
    let limits = LlmLimits {
        max_batch: 16,
        prefill_chunk: 16,
        max_kv_tokens: 4096,
        queue_capacity: 64,
        // 8 bytes a token (one layer, key and value of one f32): 1024 tokens.
        prefix_cache_bytes: 8 * 1024,
    };
    let shape = LlmShape {
        layers: 1,
        kv_heads: 1,
        head_dim: 1,
        context_length: 512,
        eos: Vec::new(),
        kv_in_place: in_place,
    };
    let llm = Llm::start(
        "m",
        Box::new(ContextSum::new(passes.clone(), gate, in_place)),
        shape,
        word_tokenizer(),
        limits,
        LoraOptions::default(),
    )
    .unwrap();
    // Short prompts that fit a pass together, long ones fed in several chunks, and the
    // same 20-token prompt twice (the second waits for the first's blocks in the cache).
    let mut prompts: Vec<Vec<u32>> = [3usize, 5, 4, 7, 2, 9, 20, 33]
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            (0..len as u32)
                .map(|t| (t * 3 + i as u32 * 11) % VOCAB)
                .collect()
        })
        .collect();
    prompts.push(prompts[6].clone());
    let max_tokens = 6;
    let mut answers = Vec::new();
    for prompt in &prompts {
        let (events, answer) = tokio::sync::mpsc::unbounded_channel();
        llm.submit(SequenceRequest {
            adapter: None,
            prompt: prompt.clone(),
            params: SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            max_tokens,
            stops: Vec::new(),
            choice: 0,
            events,
        })
        .unwrap();
        answers.push(answer);
    }
    // The first pass held until everyone was queued behind it.
    open.send(()).unwrap();
    let mut cached_of = Vec::new();
    for (prompt, mut answer) in prompts.iter().zip(answers) {
        let mut context = prompt.clone();
        let mut tokens = Vec::new();
        let cached = loop {
            match answer.recv().await.expect("an event") {
                Event::Token { sampled, .. } => tokens.push(sampled.token),
                Event::Finished {
                    finish,
                    completion_tokens,
                    cached_prompt_tokens,
                    ..
                } => {
                    assert_eq!((finish, completion_tokens), (Finish::Length, max_tokens));
                    break cached_prompt_tokens;
                }
                Event::Failed(e) => panic!("failed: {e}"),
            }
        };
        let mut alone = Vec::new();
        for _ in 0..max_tokens {
            let next = next_after(&context);
            alone.push(next);
            context.push(next);
        }
        assert_eq!(tokens, alone, "prompt {prompt:?}");
        cached_of.push(cached);
    }
    // The repeated prompt waited for the first one's block and took it from the cache.
    assert_eq!((cached_of[6], cached_of[8]), (0, 16), "{cached_of:?}");
    let passes = passes.lock().unwrap().clone();
    assert!(
        passes.iter().any(|&(rows, n)| rows >= 2 && n >= 2),
        "some newcomers shared a prefill pass: {passes:?}"
    );
    for &(rows, n) in passes.iter().filter(|&&(_, n)| n >= 2) {
        assert!(
            rows * n <= 16,
            "a prefill pass stays within prefill_chunk: {passes:?}"
        );
    }
}
