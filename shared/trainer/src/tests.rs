//! The trainer on a tiny random llama: gradients against finite differences, the loss mask,
//! gradient accumulation, checkpoints, and overfitting a handful of examples.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use kiln_formats::{LAYER_WEIGHTS, LlamaCheckpoint, LlamaConfig, Weight};
use rand::{Rng, SeedableRng};

use crate::model::nll_sum;
use crate::{Adapter, Base, Example, LoraConfig, Module, TrainOptions, Trainer};

const VOCAB: usize = 32;

/// 2 layers, hidden 16, 4 query heads sharing 2 key/value heads, ffn 32, vocab 32.
fn tiny_checkpoint(seed: u64) -> LlamaCheckpoint {
    let config = LlamaConfig {
        layers: 2,
        hidden: 16,
        heads: 4,
        kv_heads: 2,
        ffn: 32,
        vocab: VOCAB,
        eps: 1e-5,
        rope_theta: 10_000.0,
        max_positions: 64,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut random = |dims: &[usize], scale: f32, offset: f32| Weight {
        dims: dims.iter().map(|&d| d as i64).collect(),
        values: (0..dims.iter().product())
            .map(|_| offset + scale * rng.random_range(-1.0f32..1.0))
            .collect(),
    };
    let mut tensors = BTreeMap::new();
    tensors.insert("token_embd".into(), random(&[VOCAB, 16], 1.0, 0.0));
    tensors.insert("output_norm".into(), random(&[16], 0.2, 1.0));
    for l in 0..config.layers {
        for name in LAYER_WEIGHTS {
            let weight = match name {
                "attn_norm" | "ffn_norm" => random(&[16], 0.2, 1.0),
                _ => {
                    let module = Module::ALL
                        .into_iter()
                        .find(|m| m.gguf_name() == name)
                        .unwrap();
                    let (i, o) = module.shape(&config);
                    random(&[i, o], 0.5, 0.0)
                }
            };
            tensors.insert(format!("blk.{l}.{name}"), weight);
        }
    }
    LlamaCheckpoint { config, tensors }
}

fn all_modules(rank: usize) -> LoraConfig {
    LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        modules: Module::ALL.to_vec(),
    }
}

fn example(tokens: &[u32], learned_from: usize) -> Example {
    Example {
        tokens: tokens.to_vec(),
        learned: (0..tokens.len()).map(|i| i >= learned_from).collect(),
    }
}

fn options(epochs: usize, learning_rate: f64) -> TrainOptions {
    TrainOptions {
        epochs,
        learning_rate,
        warmup_steps: 0,
        batch_size: 4,
        pass_tokens: 4096,
        weight_decay: 0.0,
        seed: 7,
    }
}

/// The summed loss of `tokens` (every token after the first learned) under `adapter`.
fn loss(base: &Base, adapter: &Adapter, tokens: &[u32]) -> Tensor {
    let ids = Tensor::new(tokens, base.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let hidden = base.hidden(&ids, Some(adapter)).unwrap();
    let n = tokens.len() - 1;
    let logits = base.logits(&hidden.narrow(0, 0, n).unwrap()).unwrap();
    let targets = Tensor::new(&tokens[1..], base.device()).unwrap();
    nll_sum(&logits, &targets).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn gradients_match_finite_differences_through_every_layer() {
    let dev = Device::Cpu;
    let base = Base::new(tiny_checkpoint(1), DType::F64, &dev).unwrap();
    let adapter = Adapter::init(all_modules(4), base.config(), DType::F64, &dev, 3).unwrap();
    // B starts at zero, which would leave A without gradient: give it values.
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for (i, var) in adapter.vars().into_iter().enumerate() {
        if i % 2 == 1 {
            let shape = var.as_tensor().shape().clone();
            let values: Vec<f64> = (0..shape.elem_count())
                .map(|_| rng.random_range(-0.3..0.3))
                .collect();
            var.set(&Tensor::from_vec(values, shape, &dev).unwrap())
                .unwrap();
        }
    }
    let tokens = [3u32, 17, 9, 25, 1, 30, 12];
    let grads = loss(&base, &adapter, &tokens).backward().unwrap();

    // Layer 0's A and B of every module: their gradient crosses both layers' norms,
    // rotary embeddings, softmax and SwiGLU on its way back.
    let vars = adapter.vars();
    let names = adapter.var_names();
    let mut checked = 0;
    for (var, name) in vars.iter().zip(&names) {
        if !name.starts_with("0.") {
            continue;
        }
        let analytic = grads.get(var.as_tensor()).expect("a gradient reaches it");
        let analytic: Vec<f64> = analytic.flatten_all().unwrap().to_vec1().unwrap();
        let original: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let shape = var.as_tensor().shape().clone();
        for &at in &[0, original.len() / 2, original.len() - 1] {
            let h = 1e-6;
            let at_value = |delta: f64| {
                let mut v = original.clone();
                v[at] += delta;
                var.set(&Tensor::from_vec(v, shape.clone(), &dev).unwrap())
                    .unwrap();
                scalar(&loss(&base, &adapter, &tokens))
            };
            let numeric = (at_value(h) - at_value(-h)) / (2.0 * h);
            var.set(&Tensor::from_vec(original.clone(), shape.clone(), &dev).unwrap())
                .unwrap();
            let err = (numeric - analytic[at]).abs() / numeric.abs().max(1e-3);
            assert!(
                err < 1e-5,
                "{name}[{at}]: backprop {} against finite differences {numeric}",
                analytic[at]
            );
            assert!(numeric.abs() > 1e-6, "{name}[{at}] has no effect at all");
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * 7 * 3);
}

#[test]
fn only_learned_tokens_count() {
    let dev = Device::Cpu;
    let base = Base::new(tiny_checkpoint(2), DType::F64, &dev).unwrap();
    let adapter = Adapter::init(all_modules(4), base.config(), DType::F64, &dev, 3).unwrap();
    let trainer = Trainer::new(&base, adapter, vec![example(&[1, 2], 1)], options(1, 0.0)).unwrap();
    let a = trainer.evaluate(&[example(&[5, 6, 7, 8, 9], 3)]).unwrap();
    // Other prompt tokens change the context, not what is counted: the same learned tokens
    // after a different unlearned prefix give a different loss, but a different token after
    // the last learned one, or one more unlearned token there, gives the same.
    let mut trailing = example(&[5, 6, 7, 8, 9, 31, 30], 3);
    trailing.learned[5] = false;
    trailing.learned[6] = false;
    assert_eq!(a, trainer.evaluate(&[trailing]).unwrap());
    let b = trainer.evaluate(&[example(&[4, 6, 7, 8, 9], 3)]).unwrap();
    assert_ne!(a, b);
    // The mean over learned tokens: two copies give the same mean.
    let twice = [example(&[5, 6, 7, 8, 9], 3), example(&[5, 6, 7, 8, 9], 3)];
    assert!((trainer.evaluate(&twice).unwrap() - a).abs() < 1e-12);
    assert!(trainer.evaluate(&[example(&[5, 6], 2)]).is_err());
}

#[test]
fn accumulated_passes_and_resumed_checkpoints_train_like_one_uninterrupted_run() {
    let dev = Device::Cpu;
    let base = Base::new(tiny_checkpoint(3), DType::F64, &dev).unwrap();
    let examples = vec![
        example(&[1, 2, 3, 4, 5, 6], 2),
        example(&[7, 8, 9], 1),
        example(&[10, 11, 12, 13], 3),
        example(&[14, 15, 16, 17, 18], 1),
        example(&[19, 20], 1),
    ];
    let fresh = || Adapter::init(all_modules(4), base.config(), DType::F64, &dev, 11).unwrap();
    let weights = |t: &Trainer<'_>| -> Vec<f64> {
        t.adapter()
            .vars()
            .iter()
            .flat_map(|v| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            })
            .collect()
    };
    let mut opts = options(3, 1e-2);
    opts.batch_size = 3;
    opts.warmup_steps = 2;
    let mut whole = Trainer::new(&base, fresh(), examples.clone(), opts.clone()).unwrap();
    assert_eq!(whole.total_steps(), 6);
    let mut losses = Vec::new();
    while let Some(p) = whole.step().unwrap() {
        losses.push(p.loss);
    }
    assert_eq!(losses.len(), 6);

    // One example per pass: the same steps.
    let mut small = opts.clone();
    small.pass_tokens = 1;
    let mut accumulated = Trainer::new(&base, fresh(), examples.clone(), small).unwrap();
    let mut accumulated_losses = Vec::new();
    while let Some(p) = accumulated.step().unwrap() {
        accumulated_losses.push(p.loss);
    }
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-10);
    assert!(
        close(&losses, &accumulated_losses),
        "{losses:?} {accumulated_losses:?}"
    );
    assert!(close(&weights(&whole), &weights(&accumulated)));

    // Stopped after 4 steps, resumed by another trainer.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.safetensors");
    let mut first = Trainer::new(&base, fresh(), examples.clone(), opts.clone()).unwrap();
    for _ in 0..4 {
        first.step().unwrap();
    }
    first.save_checkpoint(&path).unwrap();
    let mut second = Trainer::new(&base, fresh(), examples, opts).unwrap();
    second.resume(&path).unwrap();
    assert_eq!(second.steps_done(), 4);
    let fifth = second.step().unwrap().unwrap();
    assert_eq!((fifth.step, fifth.epoch), (5, 3));
    assert!((fifth.loss - losses[4]).abs() < 1e-10);
    second.step().unwrap();
    assert!(second.step().unwrap().is_none());
    assert!(close(&weights(&whole), &weights(&second)));
}

#[test]
fn a_handful_of_examples_is_learned_by_heart() {
    let dev = Device::Cpu;
    let base = Base::new(tiny_checkpoint(4), DType::F32, &dev).unwrap();
    let adapter = Adapter::init(all_modules(8), base.config(), DType::F32, &dev, 1).unwrap();
    let examples = vec![
        example(&[1, 2, 3, 20, 21, 22, 23], 3),
        example(&[1, 4, 5, 24, 25, 26], 3),
        example(&[1, 6, 7, 27, 28, 29, 30, 31], 3),
        example(&[1, 8, 9, 10, 11], 3),
    ];
    let mut trainer = Trainer::new(&base, adapter, examples.clone(), options(80, 1e-2)).unwrap();
    let before = trainer.evaluate(&examples).unwrap();
    let mut last = None;
    while let Some(p) = trainer.step().unwrap() {
        last = Some(p);
    }
    let last = last.unwrap();
    let after = trainer.evaluate(&examples).unwrap();
    assert!(before > 2.0, "a random model is unsure: {before}");
    assert!(after < 0.05, "learned by heart: {before} -> {after}");
    assert_eq!((last.step, last.total_steps, last.epoch), (80, 80, 80));
    assert_eq!(last.tokens, 80 * (7 + 6 + 8 + 5));

    // What it wrote is a PEFT adapter Kiln's own reader accepts, with the trained values.
    let (config, weights) = trainer.adapter().to_peft("tiny").unwrap();
    let read = kiln_formats::read_adapter_config("adapter_config.json", &config).unwrap();
    assert_eq!((read.r, read.lora_alpha), (8, 16.0));
    assert_eq!(read.target_modules.len(), 7);
    let read =
        kiln_formats::read_lora_weights(&read, &weights, "adapter_model.safetensors").unwrap();
    let warm = Adapter::from_weights(&read, 16.0, DType::F32, &dev).unwrap();
    let again = Trainer::new(&base, warm, examples.clone(), options(1, 0.0)).unwrap();
    let reread = again.evaluate(&examples).unwrap();
    assert!((reread - after).abs() < 1e-5, "{after} -> {reread}");
}
