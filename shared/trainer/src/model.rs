//! The llama forward the trainer differentiates: the serving graph's network (RMSNorm, HF's
//! half rotation, grouped-query attention, SwiGLU, output tied to the embedding) written with
//! candle's composed operations only. candle's fused rms-norm, softmax and rotary kernels
//! have no backward pass and would silently stop the gradient; every operation here has one.

use candle_core::{D, DType, Device, Result, Tensor};
use kiln_formats::{LlamaCheckpoint, LlamaConfig};

use crate::adapter::{Adapter, Module};
use crate::frozen::frozen_matmul;

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
        Ok(Self {
            config,
            embed,
            output,
            norm,
            layers,
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
        let (cos, sin) = self.rotary(seq)?;
        let mask = causal_mask(seq, self.dtype(), self.device())?;
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?;
        for (l, layer) in self.layers.iter().enumerate() {
            // `y` (the base's product for `module`) plus the adapter's branch on `x`.
            let adapted = |module: Module, x: &Tensor, y: Tensor| -> Result<Tensor> {
                match adapter
                    .map(|a| a.branch(l, module, x))
                    .transpose()?
                    .flatten()
                {
                    Some(branch) => y + branch,
                    None => Ok(y),
                }
            };
            let h = rms_norm(&x, &layer.attn_norm, c.eps)?;
            let heads = |t: Tensor, n: usize| {
                t.reshape((batch, seq, n, head_dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let qkv = frozen_matmul(&h, &layer.qkv)?;
            let kv_width = c.kv_heads * head_dim;
            let q = adapted(Module::Q, &h, qkv.narrow(1, 0, c.hidden)?)?;
            let k = adapted(Module::K, &h, qkv.narrow(1, c.hidden, kv_width)?)?;
            let v = adapted(Module::V, &h, qkv.narrow(1, c.hidden + kv_width, kv_width)?)?;
            let q = rotate(&heads(q, c.heads)?, &cos, &sin)?;
            let k = rotate(&heads(k, c.kv_heads)?, &cos, &sin)?;
            let v = heads(v, c.kv_heads)?;
            // Query heads grouped by the key/value head they share: [b, kv, groups·seq, d].
            let q = q.reshape((batch, c.kv_heads, groups * seq, head_dim))?;
            let scores = (q.matmul(&k.t()?)? / (head_dim as f64).sqrt())?
                .reshape((batch, c.kv_heads, groups, seq, seq))?
                .broadcast_add(&mask)?;
            let probs = softmax(&scores)?.reshape((batch, c.kv_heads, groups * seq, seq))?;
            let attended = probs
                .matmul(&v)?
                .reshape((batch, c.heads, seq, head_dim))?
                .transpose(1, 2)?
                .reshape((rows, c.hidden))?;
            let o = frozen_matmul(&attended, &layer.o)?;
            x = (x + adapted(Module::O, &attended, o)?)?;
            let h = rms_norm(&x, &layer.ffn_norm, c.eps)?;
            let gate_up = frozen_matmul(&h, &layer.gate_up)?;
            let gate = adapted(Module::Gate, &h, gate_up.narrow(1, 0, c.ffn)?)?;
            let up = adapted(Module::Up, &h, gate_up.narrow(1, c.ffn, c.ffn)?)?;
            let gated = (gate.silu()? * up)?;
            let down = frozen_matmul(&gated, &layer.down)?;
            x = (x + adapted(Module::Down, &gated, down)?)?;
        }
        rms_norm(&x, &self.norm, c.eps)
    }

    /// The logits `[rows, vocab]` of hidden states `[rows, hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        frozen_matmul(hidden, &self.output)
    }

    /// `cos` and `sin` `[seq, head_dim]` of HF's half rotation.
    fn rotary(&self, seq: usize) -> Result<(Tensor, Tensor)> {
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
        let table =
            |v: Vec<f64>| Tensor::from_vec(v, (seq, d), self.device())?.to_dtype(self.dtype());
        Ok((table(cos)?, table(sin)?))
    }
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

/// The summed negative log-likelihood of `targets [n]` under `logits [n, vocab]`.
pub(crate) fn nll_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?;
    (log_sum - picked)?.sum_all()
}
