//! The llama forward the trainer differentiates: the serving graph's network (RMSNorm, HF's
//! half rotation, grouped-query attention, SwiGLU, output tied to the embedding) written with
//! candle's composed operations only. candle's fused rms-norm, softmax and rotary kernels
//! have no backward pass and would silently stop the gradient; every operation here has one.

use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{D, DType, Device, Result, Tensor};
use kiln_formats::{LlamaCheckpoint, LlamaConfig};

use crate::adapter::{Adapter, Module};
use crate::frozen::frozen_matmul;
use crate::fused::{self, RopeTables};

/// A block's frozen weights, `[in, out]`; the projections that read the same input side by
/// side, so that each input is multiplied once (fewer, wider matrix products).
struct Layer {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    /// q | k | v.
    qkv: Tensor,
    o: Tensor,
    /// gate | up.
    gate_up: Tensor,
    down: Tensor,
}

/// The frozen base model.
pub struct Base {
    config: LlamaConfig,
    /// `[vocab, hidden]`.
    embed: Tensor,
    /// `[hidden, vocab]`: the tied output projection.
    output: Tensor,
    norm: Tensor,
    layers: Vec<Layer>,
    /// The fused CPU kernels (`fused.rs`) for the elementwise stretches, or candle's composed
    /// operations (other devices; and the reference the fused kernels are tested against).
    fused: bool,
}

impl Base {
    /// The base from a checkpoint's float weights (see `kiln_formats::read_llama_checkpoint`).
    pub fn new(checkpoint: LlamaCheckpoint, dtype: DType, device: &Device) -> Result<Self> {
        let LlamaCheckpoint {
            config,
            mut tensors,
        } = checkpoint;
        let mut take = |name: &str| -> Result<Tensor> {
            let weight = tensors
                .remove(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("the checkpoint lacks {name}")))?;
            let dims: Vec<usize> = weight.dims.iter().map(|&d| d as usize).collect();
            Tensor::from_vec(weight.values, dims, device)?.to_dtype(dtype)
        };
        let embed = take("token_embd")?;
        let output = embed.t()?.contiguous()?;
        let norm = take("output_norm")?;
        let mut layers = Vec::with_capacity(config.layers);
        for l in 0..config.layers {
            let mut weight = |name: &str| take(&format!("blk.{l}.{name}"));
            let attn_norm = weight("attn_norm")?;
            let ffn_norm = weight("ffn_norm")?;
            let [q, k, v, o, gate, up, down] = Module::ALL.map(|m| weight(m.gguf_name()));
            let (o, down) = (o?, down?);
            layers.push(Layer {
                attn_norm,
                ffn_norm,
                qkv: Tensor::cat(&[q?, k?, v?], 1)?.contiguous()?,
                o,
                gate_up: Tensor::cat(&[gate?, up?], 1)?.contiguous()?,
                down,
            });
        }
        let fused = device.is_cpu() && matches!(dtype, DType::F32 | DType::F64);
        Ok(Self {
            config,
            embed,
            output,
            norm,
            layers,
            fused,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// The final hidden states `[batch · seq, hidden]` of `ids [batch, seq]` (each row from
    /// position 0; padding goes at the end, where the causal mask keeps it from every real
    /// token), with `adapter`'s branches added.
    pub fn hidden(&self, ids: &Tensor, adapter: Option<&Adapter>) -> Result<Tensor> {
        let (batch, seq) = ids.dims2()?;
        let c = &self.config;
        let head_dim = c.head_dim();
        let groups = c.heads / c.kv_heads;
        let rows = batch * seq;
        let tables = self.tables(seq)?;
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?;
        for (l, layer) in self.layers.iter().enumerate() {
            // `y` (the base's products for `modules`, side by side) plus the adapter's branches
            // on `x`, added as one (zeros for a module it leaves alone).
            let adapted = |modules: &[Module], x: &Tensor, y: Tensor| -> Result<Tensor> {
                let Some(adapter) = adapter else {
                    return Ok(y);
                };
                let branches = modules
                    .iter()
                    .map(|&m| adapter.branch(l, m, x))
                    .collect::<Result<Vec<_>>>()?;
                if branches.iter().all(Option::is_none) {
                    return Ok(y);
                }
                let parts = branches
                    .into_iter()
                    .zip(modules)
                    .map(|(branch, m)| match branch {
                        Some(b) => Ok(b),
                        None => Tensor::zeros((x.dim(0)?, m.shape(c).1), y.dtype(), y.device()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                y + Tensor::cat(&parts, 1)?
            };
            let h = self.rms_norm(&x, &layer.attn_norm)?;
            let heads = |t: Tensor, n: usize| {
                t.reshape((batch, seq, n, head_dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let qkv = frozen_matmul(&h, &layer.qkv)?;
            let kv_width = c.kv_heads * head_dim;
            let qkv = adapted(&[Module::Q, Module::K, Module::V], &h, qkv)?;
            let q = qkv.narrow(1, 0, c.hidden)?;
            let k = qkv.narrow(1, c.hidden, kv_width)?;
            let v = qkv.narrow(1, c.hidden + kv_width, kv_width)?;
            let q = heads(self.rotate(&q, &tables)?, c.heads)?;
            let k = heads(self.rotate(&k, &tables)?, c.kv_heads)?;
            let v = heads(v, c.kv_heads)?;
            // Query heads grouped by the key/value head they share: [b, kv, groups·seq, d],
            // row r the query at position r % seq.
            let q = q.reshape((batch, c.kv_heads, groups * seq, head_dim))?;
            let probs = self.attention_probs(&q.matmul(&k.t()?)?, &tables, groups)?;
            let attended = probs
                .matmul(&v)?
                .reshape((batch, c.heads, seq, head_dim))?
                .transpose(1, 2)?
                .reshape((rows, c.hidden))?;
            let o = frozen_matmul(&attended, &layer.o)?;
            x = (x + adapted(&[Module::O], &attended, o)?)?;
            let h = self.rms_norm(&x, &layer.ffn_norm)?;
            let gate_up = frozen_matmul(&h, &layer.gate_up)?;
            let gate_up = adapted(&[Module::Gate, Module::Up], &h, gate_up)?;
            let gated = self.swiglu(&gate_up)?;
            let down = frozen_matmul(&gated, &layer.down)?;
            x = (x + adapted(&[Module::Down], &gated, down)?)?;
        }
        self.rms_norm(&x, &self.norm)
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        if self.fused {
            fused::rms_norm(x, weight, self.config.eps)
        } else {
            rms_norm(x, weight, self.config.eps)
        }
    }

    /// The rotary embedding of `x [batch · seq, heads · head_dim]`.
    fn rotate(&self, x: &Tensor, tables: &Tables) -> Result<Tensor> {
        match tables {
            Tables::Fused(rope) => fused::rope(x, rope),
            Tables::Composed { cos, sin, .. } => {
                let (rows, width) = x.dims2()?;
                let (seq, _, d) = cos.dims3()?;
                let x = x.reshape((rows / seq, seq, width / d, d))?;
                rotate(&x, cos, sin)?.reshape((rows, width))
            }
        }
    }

    /// Softmax over the keys of `scores [b, kv, groups · seq, seq] / √head_dim`, causal.
    fn attention_probs(&self, scores: &Tensor, tables: &Tables, groups: usize) -> Result<Tensor> {
        let scale = 1.0 / (self.config.head_dim() as f64).sqrt();
        match tables {
            Tables::Fused(_) => fused::causal_softmax(scores, scale),
            Tables::Composed { mask, .. } => {
                let (b, kv, rows, seq) = scores.dims4()?;
                let masked = (scores * scale)?
                    .reshape((b, kv, groups, rows / groups, seq))?
                    .broadcast_add(mask)?;
                softmax(&masked)?.reshape((b, kv, rows, seq))
            }
        }
    }

    /// `silu(gate) · up` of `gate_up [rows, 2 · ffn]`, gate | up.
    fn swiglu(&self, gate_up: &Tensor) -> Result<Tensor> {
        if self.fused {
            return fused::swiglu(gate_up);
        }
        let ffn = self.config.ffn;
        gate_up.narrow(1, 0, ffn)?.silu()? * gate_up.narrow(1, ffn, ffn)?
    }

    /// The same base on candle's composed operations only.
    #[cfg(test)]
    pub(crate) fn composed(mut self) -> Self {
        self.fused = false;
        self
    }

    /// The logits `[rows, vocab]` of hidden states `[rows, hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        hidden.matmul(&self.output)
    }

    /// What every layer of a forward over `seq` positions shares, built once: the rotary
    /// tables, and for the composed path the causal mask.
    fn tables(&self, seq: usize) -> Result<Tables> {
        let rope = self.rotary(seq);
        if self.fused {
            return Ok(Tables::Fused(rope));
        }
        let table = |v: &[f64]| {
            Tensor::from_slice(v, (seq, 1, rope.head_dim), self.device())?.to_dtype(self.dtype())
        };
        Ok(Tables::Composed {
            cos: table(&rope.cos)?,
            sin: table(&rope.sin)?,
            mask: causal_mask(seq, self.dtype(), self.device())?,
        })
    }

    /// The `[seq, head_dim]` `cos` and `sin` tables of HF's half rotation.
    fn rotary(&self, seq: usize) -> RopeTables {
        let d = self.config.head_dim();
        let theta = f64::from(self.config.rope_theta);
        let mut cos = Vec::with_capacity(seq * d);
        let mut sin = Vec::with_capacity(seq * d);
        for t in 0..seq {
            for i in 0..d {
                // As the serving graph's tables: HF's cat(freqs, freqs).
                let j = i % (d / 2);
                let angle = t as f64 * theta.powf(-(2.0 * j as f64) / d as f64);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        RopeTables {
            seq,
            head_dim: d,
            cos: Arc::new(cos),
            sin: Arc::new(sin),
        }
    }
}

/// A forward's tables, as the path in use takes them.
enum Tables {
    Fused(RopeTables),
    /// `cos` and `sin` `[seq, 1, head_dim]`; `mask` `[seq, seq]`.
    Composed {
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
    },
}

/// `x / √(mean(x²) + eps) · weight` over the last dimension.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let rms = (x.sqr()?.mean_keepdim(D::Minus1)? + f64::from(eps))?.sqrt()?;
    x.broadcast_div(&rms)?.broadcast_mul(weight)
}

/// Softmax over the last dimension.
fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// HF's half rotation of `x [batch, heads, seq, d]`.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let first = x.narrow(D::Minus1, 0, half)?;
    let second = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// `[seq, seq]`: 0 where a position may attend, −∞ above the diagonal.
fn causal_mask(seq: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (seq, seq), device)?.to_dtype(dtype)
}

/// Logit elements one chunk of the loss head holds (64 MB in f32; 341 rows of SmolLM2's
/// vocabulary): wide enough products, without the whole `[rows, vocab]` at once.
const HEAD_CHUNK_ELEMENTS: usize = 1 << 24;

impl Base {
    /// The summed negative log-likelihood of `targets [n]` after hidden states `[n, hidden]`
    /// (taken as constants), and with `gradient` its gradient with respect to them:
    /// `(softmax(logits) − onehot(target)) · Wᵀ`, written out rather than traced. A chunk of
    /// rows at a time, so that the `[n, vocab]` logits (100 MB a pass for SmolLM2's vocabulary
    /// of 49,152) never exist whole, nor the four temporaries of their softmax.
    pub(crate) fn head_loss(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
        gradient: bool,
    ) -> Result<(f64, Option<Tensor>)> {
        let chunk = (HEAD_CHUNK_ELEMENTS / self.config.vocab).max(1);
        self.head_loss_in_chunks(hidden, targets, gradient, chunk)
    }

    /// [`Base::head_loss`], `chunk` rows at a time.
    pub(crate) fn head_loss_in_chunks(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
        gradient: bool,
        chunk: usize,
    ) -> Result<(f64, Option<Tensor>)> {
        let hidden = hidden.detach();
        let rows = hidden.dim(0)?;
        let mut nll = 0.0;
        let mut grads = Vec::with_capacity(rows.div_ceil(chunk));
        for start in (0..rows).step_by(chunk) {
            let len = chunk.min(rows - start);
            let h = hidden.narrow(0, start, len)?;
            let t = targets.narrow(0, start, len)?.unsqueeze(1)?;
            let logits = h.matmul(&self.output)?;
            let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?)?;
            let exp = shifted.exp()?;
            let sum = exp.sum_keepdim(D::Minus1)?;
            let picked = shifted.gather(&t, 1)?;
            let chunk_nll = (sum.log()? - picked)?.sum_all()?;
            nll += chunk_nll.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if gradient {
                let probs = exp.broadcast_div(&sum)?;
                let minus_one =
                    Tensor::full(-1f32, (len, 1), self.device())?.to_dtype(self.dtype())?;
                let grad_logits = probs.scatter_add(&t, &minus_one, 1)?;
                grads.push(grad_logits.matmul(&self.embed)?);
            }
        }
        let grad = if gradient {
            Some(Tensor::cat(&grads, 0)?)
        } else {
            None
        };
        Ok((nll, grad))
    }
}

/// The gradients of every variable behind `hidden`, given the loss's gradient with respect to
/// `hidden` (see [`Base::head_loss`]): the backward pass of `sum(hidden · grad)`.
pub(crate) fn backward_from(hidden: &Tensor, grad: &Tensor) -> Result<GradStore> {
    (hidden * grad.detach())?.sum_all()?.backward()
}
