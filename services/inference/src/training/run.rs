//! One fine-tuning run on the node: the dataset prepared with the model's template and
//! tokenizer, the trainer stepped with a report after each step (and a way to stop), a
//! checkpoint after each epoch to resume from, and the adapter in PEFT's files.

use std::path::Path;

use kiln_formats::{LlamaCheckpoint, Manifest};
use kiln_trainer::{
    Adapter, Base, DType, Device, LoraConfig, Module, Progress, TrainOptions, Trainer,
};
use tokenizers::Tokenizer;

use super::examples::prepare;

/// The job's hyper-parameters, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub epochs: usize,
    pub learning_rate: f64,
    pub lora: LoraConfig,
    /// Longer examples are cut to this many tokens.
    pub max_tokens: usize,
    pub batch_size: usize,
    /// The most tokens one forward and backward pass holds (gradient accumulation beyond).
    pub pass_tokens: usize,
    /// Training threads; 0: one per core.
    pub threads: usize,
    /// Stop when an epoch does not lower the evaluation loss.
    pub early_stop: bool,
    pub seed: u64,
    /// What the adapter's config names as its base.
    pub base_model: String,
}

impl Settings {
    /// PEFT's usual LoRA on all seven projections, alpha twice the rank.
    pub fn lora(rank: usize) -> LoraConfig {
        LoraConfig {
            rank,
            alpha: 2.0 * rank as f64,
            modules: Module::ALL.to_vec(),
        }
    }
}

/// What a step tells its observer.
#[derive(Debug, Clone, PartialEq)]
pub struct Report<'a> {
    pub progress: Progress,
    /// The evaluation loss after the latest finished epoch, when there is an evaluation set.
    pub eval_loss: Option<f64>,
    /// The loss of every step so far, and the evaluation loss of every finished epoch.
    pub losses: &'a [f64],
    pub eval_losses: &'a [f64],
    /// Examples in the dataset, and those cut to `max_tokens`.
    pub examples: usize,
    pub truncated: usize,
    /// The checkpoint this step wrote (at the end of an epoch).
    pub checkpoint: Option<&'a Path>,
}

/// The trained adapter and how training went.
#[derive(Debug)]
pub struct Trained {
    pub adapter_config: Vec<u8>,
    pub adapter_model: Vec<u8>,
    /// The loss of each step.
    pub losses: Vec<f64>,
    pub eval_losses: Vec<f64>,
    /// Tokens trained on, over all epochs.
    pub tokens: u64,
    pub examples: usize,
    /// Examples cut to `max_tokens`.
    pub truncated: usize,
    pub early_stopped: bool,
}

/// Trains an adapter on `dataset` (validated JSONL). `observe` sees each step and returns
/// false to stop, which gives `Ok(None)`. With `checkpoint`, the state is written there after
/// each epoch and taken up from there when the file exists (a run resumed elsewhere).
#[allow(clippy::too_many_arguments)]
pub fn train(
    checkpoint: LlamaCheckpoint,
    tokenizer: &Tokenizer,
    manifest: &Manifest,
    dataset: &[u8],
    evaluation: Option<&[u8]>,
    warm_start: Option<Adapter>,
    settings: &Settings,
    checkpoint_file: Option<&Path>,
    mut observe: impl FnMut(&Report<'_>) -> bool,
) -> Result<Option<Trained>, String> {
    let prepared = prepare(dataset, tokenizer, manifest, settings.max_tokens)
        .map_err(|e| format!("dataset: {e}"))?;
    let eval = evaluation
        .map(|e| prepare(e, tokenizer, manifest, settings.max_tokens))
        .transpose()
        .map_err(|e| format!("evaluation dataset: {e}"))?;
    let (examples, truncated) = (prepared.examples.len(), prepared.truncated);
    let failed = |e: kiln_trainer::Error| format!("training failed: {e}");
    let device = Device::Cpu;
    let base = Base::new(checkpoint, DType::F32, &device).map_err(failed)?;
    let adapter = match warm_start {
        Some(adapter) => adapter,
        None => Adapter::init(
            settings.lora.clone(),
            base.config(),
            DType::F32,
            &device,
            settings.seed,
        )
        .map_err(failed)?,
    };
    let options = TrainOptions {
        epochs: settings.epochs,
        learning_rate: settings.learning_rate,
        warmup_steps: 0,
        batch_size: settings.batch_size,
        pass_tokens: settings.pass_tokens,
        weight_decay: 0.0,
        seed: settings.seed,
        threads: settings.threads,
    };
    let mut trainer = Trainer::new(&base, adapter, prepared.examples, options)
        .map_err(|e| format!("dataset: {e}"))?;
    // A tenth of the steps warm up, as many recipes do.
    trainer.set_warmup_steps(trainer.total_steps() / 10);
    if let Some(file) = checkpoint_file.filter(|f| f.is_file()) {
        trainer.resume(file).map_err(failed)?;
    }
    let per_epoch = trainer.steps_per_epoch();
    let mut losses = Vec::with_capacity(trainer.total_steps());
    let mut eval_losses = Vec::new();
    let mut early_stopped = false;
    while let Some(progress) = trainer.step().map_err(failed)? {
        losses.push(progress.loss);
        let mut checkpointed = false;
        if progress.step % per_epoch == 0 {
            if let Some(eval) = &eval {
                let loss = trainer.evaluate(&eval.examples).map_err(failed)?;
                let best = eval_losses.iter().copied().fold(f64::INFINITY, f64::min);
                eval_losses.push(loss);
                early_stopped = settings.early_stop && loss >= best;
            }
            // Not after the last step: the adapter itself is written next.
            if let Some(file) = checkpoint_file.filter(|_| progress.step < progress.total_steps) {
                trainer.save_checkpoint(file).map_err(failed)?;
                checkpointed = true;
            }
        }
        let report = Report {
            progress,
            eval_loss: eval_losses.last().copied(),
            losses: &losses,
            eval_losses: &eval_losses,
            examples,
            truncated,
            checkpoint: checkpoint_file.filter(|_| checkpointed),
        };
        if !observe(&report) {
            return Ok(None);
        }
        if early_stopped {
            break;
        }
    }
    let tokens = trainer.tokens();
    let (adapter_config, adapter_model) = trainer
        .adapter()
        .to_peft(&settings.base_model)
        .map_err(failed)?;
    Ok(Some(Trained {
        adapter_config,
        adapter_model,
        losses,
        eval_losses,
        tokens,
        examples,
        truncated,
        early_stopped,
    }))
}
