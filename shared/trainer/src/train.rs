//! The training loop, one optimizer step at a time so that its caller can report progress and
//! stop between steps: examples in a seeded order per epoch, each step's examples split into
//! passes that fit a token budget (gradient accumulation), the loss averaged over the learned
//! tokens of the whole step.

use std::path::Path;

use candle_core::{Result, Tensor, backprop::GradStore};
use rand::SeedableRng;
use rand::seq::SliceRandom;

use crate::adapter::Adapter;
use crate::model::{Base, backward_from};
use crate::optim::{AdamW, learning_rate};

/// One training example: its tokens, and which of them the model learns to predict
/// (`learned[i]`: the loss counts token `i` given the tokens before it; `learned[0]` is
/// ignored).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub learned: Vec<bool>,
}

impl Example {
    /// The tokens up to the last learned one: what follows it changes no loss.
    fn trimmed(mut self) -> Option<Self> {
        let last = self.learned.iter().skip(1).rposition(|&l| l)? + 1;
        self.tokens.truncate(last + 1);
        self.learned.truncate(last + 1);
        Some(self)
    }

    fn learned_count(&self) -> usize {
        self.learned.iter().skip(1).filter(|&&l| l).count()
    }
}

/// How to train.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    pub epochs: usize,
    pub learning_rate: f64,
    /// Steps of linear warm-up.
    pub warmup_steps: usize,
    /// Examples per optimizer step.
    pub batch_size: usize,
    /// The most tokens (padding included) one forward and backward pass holds; a step whose
    /// examples hold more accumulates the gradients of several passes.
    pub pass_tokens: usize,
    pub weight_decay: f64,
    /// Seeds the order of the examples in each epoch.
    pub seed: u64,
    /// The threads that train (the matrix products and the fused kernels); 0: one per core.
    pub threads: usize,
}

/// Where training stands after a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Steps done, from 1.
    pub step: usize,
    pub total_steps: usize,
    /// The epoch of that step, from 1.
    pub epoch: usize,
    /// The step's mean loss per learned token.
    pub loss: f64,
    pub learning_rate: f64,
    /// Tokens of the examples trained on so far.
    pub tokens: u64,
}

/// A training run of an adapter on a base.
pub struct Trainer<'a> {
    base: &'a Base,
    adapter: Adapter,
    optimizer: AdamW,
    options: TrainOptions,
    examples: Vec<Example>,
    tokens: u64,
    /// The trainer's own threads: the main thread of a step is one of them, so that a matrix
    /// product shares the work with the others rather than handing it to a separate pool
    /// and waiting (on two cores, ~5% more tokens/s).
    pool: std::sync::Arc<rayon::ThreadPool>,
}

impl<'a> Trainer<'a> {
    /// Fails when no example has a token to learn.
    pub fn new(
        base: &'a Base,
        adapter: Adapter,
        examples: Vec<Example>,
        options: TrainOptions,
    ) -> Result<Self> {
        let examples: Vec<Example> = examples.into_iter().filter_map(Example::trimmed).collect();
        if examples.is_empty() {
            candle_core::bail!("no example has a token to learn");
        }
        let optimizer = AdamW::new(&adapter.vars(), options.weight_decay)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(options.threads)
            .thread_name(|i| format!("kiln-train-{i}"))
            .build()
            .map_err(|e| candle_core::Error::Msg(format!("the training threads: {e}")))?;
        Ok(Self {
            pool: std::sync::Arc::new(pool),
            base,
            adapter,
            optimizer,
            options,
            examples,
            tokens: 0,
        })
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.examples.len().div_ceil(self.options.batch_size.max(1))
    }

    pub fn total_steps(&self) -> usize {
        self.options.epochs * self.steps_per_epoch()
    }

    pub fn set_warmup_steps(&mut self, steps: usize) {
        self.options.warmup_steps = steps;
    }

    /// Tokens of the examples trained on so far.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Steps done.
    pub fn steps_done(&self) -> usize {
        self.optimizer.steps
    }

    pub fn adapter(&self) -> &Adapter {
        &self.adapter
    }

    pub fn into_adapter(self) -> Adapter {
        self.adapter
    }

    /// Runs the next optimizer step; `None` when every epoch is done.
    pub fn step(&mut self) -> Result<Option<Progress>> {
        let pool = self.pool.clone();
        pool.install(|| self.step_here())
    }

    fn step_here(&mut self) -> Result<Option<Progress>> {
        let done = self.optimizer.steps;
        let total = self.total_steps();
        if done >= total {
            return Ok(None);
        }
        let per_epoch = self.steps_per_epoch();
        let epoch = done / per_epoch;
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.options.seed ^ epoch as u64);
        order.shuffle(&mut rng);
        let batch = self.options.batch_size.max(1);
        let start = (done % per_epoch) * batch;
        let chosen: Vec<&Example> = order[start..(start + batch).min(order.len())]
            .iter()
            .map(|&i| &self.examples[i])
            .collect();

        let learned: usize = chosen.iter().map(|e| e.learned_count()).sum();
        let vars = self.adapter.vars();
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut loss_sum = 0.0;
        for pass in passes(chosen, self.options.pass_tokens) {
            let (nll, store) = self.pass_loss(&pass, true)?;
            loss_sum += nll;
            let store = store.expect("asked for gradients");
            for (sum, var) in grads.iter_mut().zip(&vars) {
                // Detached: a gradient's own graph reaches back into the pass's activations,
                // which must not outlive the step.
                if let Some(g) = store.get(var.as_tensor()).map(Tensor::detach) {
                    *sum = Some(match sum.take() {
                        Some(s) => (s + g)?,
                        None => g,
                    });
                }
            }
            self.tokens += pass.iter().map(|e| e.tokens.len() as u64).sum::<u64>();
        }
        // The passes' losses were summed; the step's loss is their mean per learned token.
        let scale = 1.0 / learned as f64;
        let grads = grads
            .into_iter()
            .map(|g| g.map(|g| g * scale).transpose())
            .collect::<Result<Vec<_>>>()?;
        let lr = learning_rate(
            self.options.learning_rate,
            done,
            self.options.warmup_steps,
            total,
        );
        self.optimizer.step(&vars, &grads, lr)?;
        Ok(Some(Progress {
            step: done + 1,
            total_steps: total,
            epoch: epoch + 1,
            loss: loss_sum * scale,
            learning_rate: lr,
            tokens: self.tokens,
        }))
    }

    /// The mean loss per learned token of `examples` under the adapter as it is.
    pub fn evaluate(&self, examples: &[Example]) -> Result<f64> {
        self.pool.install(|| self.evaluate_here(examples))
    }

    fn evaluate_here(&self, examples: &[Example]) -> Result<f64> {
        let kept: Vec<Example> = examples
            .iter()
            .cloned()
            .filter_map(Example::trimmed)
            .collect();
        let learned: usize = kept.iter().map(Example::learned_count).sum();
        if learned == 0 {
            candle_core::bail!("no evaluation example has a token to learn");
        }
        let mut sum = 0.0;
        for pass in passes(kept.iter().collect(), self.options.pass_tokens) {
            sum += self.pass_loss(&pass, false)?.0;
        }
        Ok(sum / learned as f64)
    }

    /// The summed loss of one pass over `examples`, and its gradients when `backward`.
    fn pass_loss(&self, examples: &[&Example], backward: bool) -> Result<(f64, Option<GradStore>)> {
        let seq = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(0);
        let mut ids = vec![0u32; examples.len() * seq];
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (b, e) in examples.iter().enumerate() {
            ids[b * seq..b * seq + e.tokens.len()].copy_from_slice(&e.tokens);
            for i in 1..e.tokens.len() {
                if e.learned[i] {
                    rows.push((b * seq + i - 1) as u32);
                    targets.push(e.tokens[i]);
                }
            }
        }
        let device = self.base.device();
        let ids = Tensor::from_vec(ids, (examples.len(), seq), device)?;
        let hidden = self.base.hidden(&ids, Some(&self.adapter))?;
        let picked = hidden.index_select(&Tensor::new(rows.as_slice(), device)?, 0)?;
        let targets = Tensor::new(targets.as_slice(), device)?;
        let (value, grad) = self.base.head_loss(&picked, &targets, backward)?;
        let grads = grad.map(|g| backward_from(&picked, &g)).transpose()?;
        Ok((value, grads))
    }

    /// Writes the state to go on from this step (adapter, optimizer moments, steps and
    /// tokens) to `path` (safetensors).
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let mut tensors = std::collections::HashMap::new();
        let device = self.base.device();
        for ((name, var), (m, v)) in self
            .adapter
            .var_names()
            .into_iter()
            .zip(self.adapter.vars())
            .zip(&self.optimizer.moments)
        {
            tensors.insert(format!("{name}.m"), m.clone());
            tensors.insert(format!("{name}.v"), v.clone());
            tensors.insert(name, var.as_tensor().clone());
        }
        let counters = [self.optimizer.steps as i64, self.tokens as i64];
        tensors.insert("counters".into(), Tensor::new(&counters, device)?);
        candle_core::safetensors::save(&tensors, path)
    }

    /// Takes up the state [`Trainer::save_checkpoint`] wrote, for the same adapter shape.
    pub fn resume(&mut self, path: &Path) -> Result<()> {
        let device = self.base.device().clone();
        let dtype = self.base.dtype();
        let mut saved = candle_core::safetensors::load(path, &device)?;
        let mut take = |name: &str| {
            saved
                .remove(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("the checkpoint lacks {name}")))
        };
        for ((name, var), (m, v)) in self
            .adapter
            .var_names()
            .into_iter()
            .zip(self.adapter.vars())
            .zip(&mut self.optimizer.moments)
        {
            var.set(&take(&name)?.to_dtype(dtype)?)?;
            *m = take(&format!("{name}.m"))?.to_dtype(dtype)?;
            *v = take(&format!("{name}.v"))?.to_dtype(dtype)?;
        }
        let counters: Vec<i64> = take("counters")?.to_vec1()?;
        self.optimizer.steps = counters[0] as usize;
        self.tokens = counters[1] as u64;
        Ok(())
    }
}

/// `examples` in passes of at most `budget` padded tokens (one example per pass at least),
/// longest first so that each pass pads little.
fn passes(mut examples: Vec<&Example>, budget: usize) -> Vec<Vec<&Example>> {
    examples.sort_by_key(|e| std::cmp::Reverse(e.tokens.len()));
    let mut out: Vec<Vec<&Example>> = Vec::new();
    for e in examples {
        match out.last_mut() {
            // Sorted: the pass's first example is its longest.
            Some(pass) if pass[0].tokens.len() * (pass.len() + 1) <= budget => pass.push(e),
            _ => out.push(vec![e]),
        }
    }
    out
}
