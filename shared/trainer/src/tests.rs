//! The trainer on a tiny random llama: gradients against finite differences, the loss mask,
//! gradient accumulation, checkpoints, and overfitting a handful of examples.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use kiln_formats::{LAYER_WEIGHTS, LlamaCheckpoint, LlamaConfig, Weight};
use rand::{Rng, SeedableRng};

use crate::model::backward_from;
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
        threads: 2,
    }
}

/// The summed loss of `tokens` (every token after the first learned) under `adapter`, and
/// its gradients as the trainer takes them.
fn loss(base: &Base, adapter: &Adapter, tokens: &[u32]) -> (f64, GradStore) {
    let ids = Tensor::new(tokens, base.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let hidden = base.hidden(&ids, Some(adapter)).unwrap();
    let n = tokens.len() - 1;
    let hidden = hidden.narrow(0, 0, n).unwrap();
    let targets = Tensor::new(&tokens[1..], base.device()).unwrap();
    let (nll, grad) = base.head_loss(&hidden, &targets, true).unwrap();
    (nll, backward_from(&hidden, &grad.unwrap()).unwrap())
}

/// An adapter whose B matrices are not zero (at zero A would get no gradient).
fn busy_adapter(base: &Base) -> Adapter {
    let dev = base.device();
    let adapter = Adapter::init(all_modules(4), base.config(), DType::F64, dev, 3).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for (i, var) in adapter.vars().into_iter().enumerate() {
        if i % 2 == 1 {
            let shape = var.as_tensor().shape().clone();
            let values: Vec<f64> = (0..shape.elem_count())
                .map(|_| rng.random_range(-0.3..0.3))
                .collect();
            var.set(&Tensor::from_vec(values, shape, dev).unwrap())
                .unwrap();
        }
    }
    adapter
}

#[test]
fn the_fused_kernels_compute_what_the_composed_operations_do() {
    let dev = Device::Cpu;
    let fused = Base::new(tiny_checkpoint(1), DType::F64, &dev).unwrap();
    let composed = Base::new(tiny_checkpoint(1), DType::F64, &dev)
        .unwrap()
        .composed();
    let adapter = busy_adapter(&fused);
    // Two sequences, the second padded: the causal softmax must keep it apart.
    let ids = Tensor::new(&[[3u32, 17, 9, 25, 1], [30, 12, 4, 0, 0]], &dev).unwrap();
    let targets = Tensor::new(&[17u32, 9, 25, 1, 12, 4, 0, 0], &dev).unwrap();
    let rows = Tensor::new(&[0u32, 1, 2, 3, 5, 6, 7, 8], &dev).unwrap();
    let run = |base: &Base| {
        let hidden = base.hidden(&ids, Some(&adapter)).unwrap();
        let picked = hidden.index_select(&rows, 0).unwrap();
        let (nll, grad) = base.head_loss(&picked, &targets, true).unwrap();
        let grads = backward_from(&picked, &grad.unwrap()).unwrap();
        let flat = |t: &Tensor| -> Vec<f64> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let grads: Vec<Vec<f64>> = adapter
            .vars()
            .iter()
            .map(|v| flat(grads.get(v.as_tensor()).expect("a gradient")))
            .collect();
        (flat(&hidden), nll, grads)
    };
    let (want_hidden, want_nll, want_grads) = run(&composed);
    let (hidden, nll, grads) = run(&fused);
    let off = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    };
    assert!(
        off(&hidden, &want_hidden) < 1e-12,
        "hidden states differ by {}",
        off(&hidden, &want_hidden)
    );
    assert!((nll - want_nll).abs() < 1e-10, "{nll} against {want_nll}");
    for (i, (got, want)) in grads.iter().zip(&want_grads).enumerate() {
        assert!(
            off(got, want) < 1e-10,
            "variable {i}: gradients differ by {}",
            off(got, want)
        );
    }
}

#[test]
fn gradients_match_finite_differences_through_every_layer() {
    let dev = Device::Cpu;
    let base = Base::new(tiny_checkpoint(1), DType::F64, &dev).unwrap();
    let adapter = busy_adapter(&base);
    let tokens = [3u32, 17, 9, 25, 1, 30, 12];
    let (_, grads) = loss(&base, &adapter, &tokens);

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
                loss(&base, &adapter, &tokens).0
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

#[test]
fn the_loss_head_in_chunks_is_the_loss_of_the_whole_logits() {
    let dev = Device::Cpu;
    let base = Base::new(tiny_checkpoint(5), DType::F64, &dev).unwrap();
    let rows = 7;
    let values: Vec<f64> = (0..rows * 16)
        .map(|i| ((i * 37 % 11) as f64 - 5.0) / 4.0)
        .collect();
    let hidden = Var::from_vec(values, (rows, 16), &dev).unwrap();
    let targets = Tensor::new(&[3u32, 31, 0, 17, 17, 9, 22], &dev).unwrap();

    // The reference: log-softmax of the whole logits, differentiated by candle.
    let logits = base.logits(hidden.as_tensor()).unwrap();
    let log_sum = logits.exp().unwrap().sum_keepdim(1).unwrap().log().unwrap();
    let picked = logits.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap();
    let reference = (log_sum - picked).unwrap().sum_all().unwrap();
    let want_grad = reference.backward().unwrap();
    let want_grad: Vec<f64> = want_grad
        .get(hidden.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want = reference.to_scalar::<f64>().unwrap();
    assert!(want > 1.0);

    for chunk in [1, 3, 7, 100] {
        let (nll, grad) = base
            .head_loss_in_chunks(hidden.as_tensor(), &targets, true, chunk)
            .unwrap();
        assert!(
            (nll - want).abs() < 1e-10,
            "chunks of {chunk}: {nll} against {want}"
        );
        let grad: Vec<f64> = grad.unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let err = grad
            .iter()
            .zip(&want_grad)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            err < 1e-10,
            "chunks of {chunk}: the gradient is off by {err}"
        );
        let (again, none) = base
            .head_loss_in_chunks(hidden.as_tensor(), &targets, false, chunk)
            .unwrap();
        assert_eq!((again, none.is_none()), (nll, true));
    }
}

#[test]
fn an_adapter_of_some_modules_adds_its_branches_in_their_columns() {
    // Against the adapter merged into the base's weights: W + scale · A · B.
    let dev = Device::Cpu;
    let mut checkpoint = tiny_checkpoint(6);
    let base = Base::new(tiny_checkpoint(6), DType::F64, &dev).unwrap();
    let some = LoraConfig {
        modules: vec![Module::K, Module::Up],
        ..all_modules(4)
    };
    let adapter = Adapter::init(some, base.config(), DType::F64, &dev, 9).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let vars: BTreeMap<String, &Var> = adapter
        .var_names()
        .into_iter()
        .zip(adapter.vars())
        .collect();
    for var in vars.values() {
        let shape = var.as_tensor().shape().clone();
        let values: Vec<f64> = (0..shape.elem_count())
            .map(|_| rng.random_range(-0.5..0.5))
            .collect();
        var.set(&Tensor::from_vec(values, shape, &dev).unwrap())
            .unwrap();
    }
    for l in 0..2 {
        for module in [Module::K, Module::Up] {
            let var = |ab: &str| vars[&format!("{l}.{}.{ab}", module.peft_name())].as_tensor();
            let delta = (var("a").matmul(var("b")).unwrap() * adapter.config().scale()).unwrap();
            let delta: Vec<f64> = delta.flatten_all().unwrap().to_vec1().unwrap();
            let weight = checkpoint
                .tensors
                .get_mut(&format!("blk.{l}.{}", module.gguf_name()))
                .unwrap();
            for (w, d) in weight.values.iter_mut().zip(delta) {
                *w = (f64::from(*w) + d) as f32;
            }
        }
    }
    let merged = Base::new(checkpoint, DType::F64, &dev).unwrap();
    let ids = Tensor::new(&[[3u32, 17, 9, 25, 1]], &dev).unwrap();
    let hidden = |base: &Base, a: Option<&Adapter>| -> Vec<f64> {
        let h = base.hidden(&ids, a).unwrap();
        h.flatten_all().unwrap().to_vec1().unwrap()
    };
    let got = hidden(&base, Some(&adapter));
    let off = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    };
    let want = hidden(&merged, None);
    assert!(off(&got, &want) < 1e-4, "off by {}", off(&got, &want));
    assert!(
        off(&got, &hidden(&base, None)) > 1e-2,
        "the branches change the output"
    );
}
