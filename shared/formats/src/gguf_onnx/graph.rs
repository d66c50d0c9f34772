//! A llama-family decoder-with-past graph in the HF-optimum convention:
//! inputs `input_ids [batch, seq]`, `attention_mask [batch, past + seq]`,
//! `position_ids [batch, seq]`, `past_key_values.N.key|value [batch, kv_heads, past, head_dim]`;
//! outputs `logits [batch, seq, vocab]` and `present.N.key|value [batch, kv_heads, past + seq,
//! head_dim]`. RMSNorm, rotary embeddings (HF's half rotation, with the file's theta),
//! grouped-query attention (query heads grouped per key/value head, no copies of the cache),
//! SwiGLU, and the output projection tied to the token embedding, in standard ONNX operators
//! (opset 17): the float32 graph, which tract serves too. Weights kept in blocks go through
//! ONNX Runtime's `MatMulNBits` (com.microsoft), in the graph of [`super::contrib`].

use super::builder::{Builder, attr_int, attr_ints};
use super::offsets::{Q41, folded_matmul};
use crate::onnx_proto::elem_type::{FLOAT, INT64};
use crate::onnx_proto::{Dim, GraphProto, ModelProto, OperatorSetIdProto, value_info};

/// The network's shape, from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub eps: f32,
    pub rope_theta: f32,
    /// Rows of the rotary tables: the context length.
    pub max_positions: usize,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// A weight: `[rows, cols]` row-major f32 (a linear layer as `[in, out]`, ready for MatMul).
pub struct Weight {
    pub dims: Vec<i64>,
    pub values: Vec<f32>,
}

/// A linear layer's weight: float `[in, out]`, or blocks for ONNX Runtime's `MatMulNBits`
/// (`[out, in / 32, bytes per block]`, with a scale and a float zero point per block).
pub enum Linear {
    Float(Weight),
    Blocks {
        inputs: usize,
        outputs: usize,
        bits: u32,
        packed: Vec<u8>,
        scales: Vec<f32>,
        /// Per output and block (`[out][block]`): added times the block's input sum.
        offsets: Option<Vec<f32>>,
    },
}

/// Names the weights of layer `layer` (or the model's with `None`): `attn_q`, `attn_k`,
/// `attn_v`, `attn_output`, `ffn_gate`, `ffn_up`, `ffn_down`, `attn_norm`, `ffn_norm`;
/// `token_embd` `[vocab, hidden]`, `output_norm`.
pub trait Weights {
    fn weight(&mut self, layer: Option<usize>, name: &str) -> Result<Weight, String>;
    /// A linear layer (`attn_q`, …, `ffn_down`); float unless the checkpoint is served in blocks.
    fn linear(&mut self, layer: usize, name: &str) -> Result<Linear, String> {
        self.weight(Some(layer), name).map(Linear::Float)
    }
    /// The output projection in blocks, when served so; `None`: the transposed embedding.
    fn output_blocks(&mut self) -> Result<Option<Linear>, String> {
        Ok(None)
    }
}

/// `x · W` for a linear layer, as MatMul or MatMulNBits.
pub(super) fn matmul(b: &mut Builder, x: &str, w: Linear, init: &str, hint: &str) -> String {
    match w {
        Linear::Float(w) => {
            let w = b.f32_tensor(init, &w.dims, &w.values);
            b.op("MatMul", &[x, &w], vec![], hint)
        }
        Linear::Blocks {
            inputs,
            outputs,
            bits,
            packed,
            scales,
            offsets,
        } => {
            if let Some(offsets) = &offsets {
                let w = Q41 {
                    inputs,
                    outputs,
                    packed: &packed,
                    scales: &scales,
                    offsets,
                };
                return folded_matmul(b, x, w, init, hint);
            }
            nbits_matmul(
                b,
                x,
                init,
                hint,
                [inputs, outputs, bits as usize],
                packed,
                &scales,
            )
        }
    }
}

/// `x · W` through ONNX Runtime's MatMulNBits without zero points (its fast kernels assume
/// 2^(bits-1)): `packed` is `[outputs, inputs / 32, 32·bits / 8]` with a scale per block,
/// the initializers `{init}.q` and `{init}.scales`.
pub(super) fn nbits_matmul(
    b: &mut Builder,
    x: &str,
    init: &str,
    hint: &str,
    [inputs, outputs, bits]: [usize; 3],
    packed: Vec<u8>,
    scales: &[f32],
) -> String {
    let blocks = inputs / 32;
    let packed = b.u8_tensor(
        &format!("{init}.q"),
        &[outputs as i64, blocks as i64, (32 * bits / 8) as i64],
        packed,
    );
    let scales = b.f32_tensor(
        &format!("{init}.scales"),
        &[(outputs * blocks) as i64],
        scales,
    );
    b.op_in(
        "com.microsoft",
        "MatMulNBits",
        &[x, &packed, &scales],
        vec![
            attr_int("K", inputs as i64),
            attr_int("N", outputs as i64),
            attr_int("bits", bits as i64),
            attr_int("block_size", 32),
            // int8 activations with int8 dot products, as llama.cpp does.
            attr_int("accuracy_level", 4),
        ],
        hint,
    )
}

/// The float32 weight `name` of layer `layer` (or the model's, with `None`) as an initializer.
pub(super) fn load(
    b: &mut Builder,
    weights: &mut dyn Weights,
    layer: Option<usize>,
    name: &str,
) -> Result<String, String> {
    let w = weights.weight(layer, name)?;
    let init = match layer {
        Some(l) => format!("blk.{l}.{name}"),
        None => name.to_owned(),
    };
    Ok(b.f32_tensor(&init, &w.dims, &w.values))
}

/// `x · W` for the linear layer `name` (`attn_q`, …, `ffn_down`) of layer `layer`.
pub(super) fn layer_matmul(
    b: &mut Builder,
    weights: &mut dyn Weights,
    layer: usize,
    name: &str,
    x: &str,
    hint: &str,
) -> Result<String, String> {
    let w = weights.linear(layer, name)?;
    Ok(matmul(b, x, w, &format!("blk.{layer}.{name}"), hint))
}

/// `[batch, seq, hidden]` into heads `[batch, heads, seq, head_dim]` (`shape` is
/// `[0, 0, heads, head_dim]`).
fn split_heads(b: &mut Builder, x: &str, shape: &str, hint: &str) -> String {
    let x = b.op("Reshape", &[x, shape], vec![], hint);
    swap_heads_and_seq(b, &x, hint)
}

/// The heads' outputs `[batch, kv_heads, group, seq, head_dim]` back into `[batch, seq, hidden]`
/// (`shapes`: `[0, heads, -1, head_dim]`, then `[0, 0, hidden]` once the heads are transposed
/// next to each other).
fn merge_heads(b: &mut Builder, x: &str, shapes: [&str; 2], hint: &str) -> String {
    let x = b.op("Reshape", &[x, shapes[0]], vec![], hint);
    let x = swap_heads_and_seq(b, &x, hint);
    b.op("Reshape", &[&x, shapes[1]], vec![], hint)
}

/// `[batch, heads, seq, head_dim]` and `[batch, seq, heads, head_dim]` into each other.
fn swap_heads_and_seq(b: &mut Builder, x: &str, hint: &str) -> String {
    b.op(
        "Transpose",
        &[x],
        vec![attr_ints("perm", &[0, 2, 1, 3])],
        hint,
    )
}

/// The graph input of layer `layer`'s cached keys or values (`kind`: `key` or `value`).
pub(super) fn past_name(layer: usize, kind: &str) -> String {
    format!("past_key_values.{layer}.{kind}")
}

/// The graph output of layer `layer`'s keys or values, the cache's and this step's.
pub(super) fn present_name(layer: usize, kind: &str) -> String {
    format!("present.{layer}.{kind}")
}

/// Appends this step's keys or values `new` of layer `layer` to the cache on the sequence
/// axis; returns the `present` output.
fn append_to_cache(b: &mut Builder, layer: usize, kind: &str, new: &str) -> String {
    let present = present_name(layer, kind);
    b.op_to(
        "Concat",
        &[&past_name(layer, kind), new],
        &[&present],
        vec![attr_int("axis", 2)],
    );
    present
}

/// Builds the graph.
pub fn build(config: &LlamaConfig, weights: &mut dyn Weights) -> Result<ModelProto, String> {
    let c = config;
    let hd = c.head_dim();
    let group = c.heads / c.kv_heads;
    let mut b = Builder::default();

    // Constants.
    let eps = b.f32_tensor("eps", &[], &[c.eps]);
    let one = b.f32_tensor("one", &[], &[1.0]);
    let neg_big = b.f32_tensor("neg_big", &[], &[-1e9]);
    let zero_f = b.f32_tensor("zero_f", &[], &[0.0]);
    let scale = b.f32_tensor("scale", &[], &[1.0 / (hd as f32).sqrt()]);
    let i0 = b.i64_tensor("i0", &[], &[0]);
    let i1 = b.i64_tensor("i1", &[], &[1]);
    let ax0 = b.i64_tensor("ax0", &[1], &[0]);
    let ax1 = b.i64_tensor("ax1", &[1], &[1]);
    let ax2 = b.i64_tensor("ax2", &[1], &[2]);
    let ax123 = b.i64_tensor("ax123", &[3], &[1, 2, 3]);
    let shape_heads = b.i64_tensor("shape_heads", &[4], &[0, 0, c.heads as i64, hd as i64]);
    let shape_kv = b.i64_tensor("shape_kv", &[4], &[0, 0, c.kv_heads as i64, hd as i64]);
    let shape_grouped = b.i64_tensor(
        "shape_grouped",
        &[5],
        &[0, c.kv_heads as i64, group as i64, -1, hd as i64],
    );
    let shape_ungrouped =
        b.i64_tensor("shape_ungrouped", &[4], &[0, c.heads as i64, -1, hd as i64]);
    let shape_hidden = b.i64_tensor("shape_hidden", &[3], &[0, 0, c.hidden as i64]);
    let half_start = b.i64_tensor("half_start", &[1], &[0]);
    let half_mid = b.i64_tensor("half_mid", &[1], &[(hd / 2) as i64]);
    let half_end = b.i64_tensor("half_end", &[1], &[hd as i64]);
    let last_axis = b.i64_tensor("last_axis", &[1], &[-1]);

    // Rotary tables [max_positions, head_dim]: HF's cat(freqs, freqs).
    let mut cos = Vec::with_capacity(c.max_positions * hd);
    let mut sin = Vec::with_capacity(c.max_positions * hd);
    for pos in 0..c.max_positions {
        for d in 0..hd {
            let j = d % (hd / 2);
            let inv_freq = (c.rope_theta as f64).powf(-(2.0 * j as f64) / hd as f64);
            let angle = pos as f64 * inv_freq;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    let cos_table = b.f32_tensor("rope_cos", &[c.max_positions as i64, hd as i64], &cos);
    let sin_table = b.f32_tensor("rope_sin", &[c.max_positions as i64, hd as i64], &sin);
    drop((cos, sin));

    // Per position: [batch, 1, seq, head_dim] to broadcast over heads.
    let cos_pos = b.op("Gather", &[&cos_table, "position_ids"], vec![], "cos");
    let cos_pos = b.op("Unsqueeze", &[&cos_pos, &ax1], vec![], "cos");
    let sin_pos = b.op("Gather", &[&sin_table, "position_ids"], vec![], "sin");
    let sin_pos = b.op("Unsqueeze", &[&sin_pos, &ax1], vec![], "sin");

    // Attention bias [batch, 1, 1, seq, past + seq]: causal within the window, and masked
    // (padding) positions of attention_mask.
    let dim1 = |b: &mut Builder, input: &str, shape_hint: &str, hint: &str| -> String {
        let shape = b.op("Shape", &[input], vec![], shape_hint);
        b.op("Gather", &[&shape, &i1], vec![attr_int("axis", 0)], hint)
    };
    let seq = dim1(&mut b, "input_ids", "ids_shape", "seq");
    let total = dim1(&mut b, "attention_mask", "mask_shape", "total");
    let past = b.op("Sub", &[&total, &seq], vec![], "past");
    let rows = b.op("Range", &[&i0, &seq, &i1], vec![], "rows");
    let rows = b.op("Add", &[&rows, &past], vec![], "rows_abs");
    let rows = b.op("Unsqueeze", &[&rows, &ax1], vec![], "rows");
    let cols = b.op("Range", &[&i0, &total, &i1], vec![], "cols");
    let cols = b.op("Unsqueeze", &[&cols, &ax0], vec![], "cols");
    let future = b.op("Greater", &[&cols, &rows], vec![], "future");
    let causal = b.op("Where", &[&future, &neg_big, &zero_f], vec![], "causal");
    let mask_f = b.op(
        "Cast",
        &["attention_mask"],
        vec![attr_int("to", FLOAT as i64)],
        "mask_f",
    );
    let masked = b.op("Sub", &[&one, &mask_f], vec![], "masked");
    let padding = b.op("Mul", &[&masked, &neg_big], vec![], "padding");
    let padding = b.op("Unsqueeze", &[&padding, &ax123], vec![], "padding");
    let bias = b.op("Add", &[&padding, &causal], vec![], "bias");

    let rms_norm = |b: &mut Builder, x: &str, weight: &str, hint: &str| -> String {
        let sq = b.op("Mul", &[x, x], vec![], hint);
        let mean = b.op(
            "ReduceMean",
            &[&sq],
            vec![attr_ints("axes", &[-1]), attr_int("keepdims", 1)],
            hint,
        );
        let var = b.op("Add", &[&mean, &eps], vec![], hint);
        let root = b.op("Sqrt", &[&var], vec![], hint);
        let normed = b.op("Div", &[x, &root], vec![], hint);
        b.op("Mul", &[&normed, weight], vec![], hint)
    };
    let rotate = |b: &mut Builder, x: &str, hint: &str| -> String {
        let first = b.op(
            "Slice",
            &[x, &half_start, &half_mid, &last_axis],
            vec![],
            hint,
        );
        let second = b.op(
            "Slice",
            &[x, &half_mid, &half_end, &last_axis],
            vec![],
            hint,
        );
        let neg = b.op("Neg", &[&second], vec![], hint);
        let rotated = b.op("Concat", &[&neg, &first], vec![attr_int("axis", -1)], hint);
        let a = b.op("Mul", &[x, &cos_pos], vec![], hint);
        let r = b.op("Mul", &[&rotated, &sin_pos], vec![], hint);
        b.op("Add", &[&a, &r], vec![], hint)
    };

    let embedding = load(&mut b, weights, None, "token_embd")?;
    let mut x = b.op("Gather", &[&embedding, "input_ids"], vec![], "embed");
    for l in 0..c.layers {
        let h = format!("l{l}");
        let attn_norm = load(&mut b, weights, Some(l), "attn_norm")?;
        let xn = rms_norm(&mut b, &x, &attn_norm, &h);
        let q = layer_matmul(&mut b, weights, l, "attn_q", &xn, &h)?;
        let k = layer_matmul(&mut b, weights, l, "attn_k", &xn, &h)?;
        let v = layer_matmul(&mut b, weights, l, "attn_v", &xn, &h)?;
        let q = split_heads(&mut b, &q, &shape_heads, &h);
        let k = split_heads(&mut b, &k, &shape_kv, &h);
        let v = split_heads(&mut b, &v, &shape_kv, &h);
        let q = rotate(&mut b, &q, &h);
        let k = rotate(&mut b, &k, &h);
        let present_k = append_to_cache(&mut b, l, "key", &k);
        let present_v = append_to_cache(&mut b, l, "value", &v);
        // Query heads grouped per key/value head: [batch, kv_heads, group, seq, head_dim]
        // against keys [batch, kv_heads, 1, head_dim, total] (MatMul broadcasts the group).
        let q = b.op("Mul", &[&q, &scale], vec![], &h);
        let q = b.op("Reshape", &[&q, &shape_grouped], vec![], &h);
        let kt = b.op(
            "Transpose",
            &[&present_k],
            vec![attr_ints("perm", &[0, 1, 3, 2])],
            &h,
        );
        let kt = b.op("Unsqueeze", &[&kt, &ax2], vec![], &h);
        let scores = b.op("MatMul", &[&q, &kt], vec![], &h);
        let scores = b.op("Add", &[&scores, &bias], vec![], &h);
        let probs = b.op("Softmax", &[&scores], vec![attr_int("axis", -1)], &h);
        let vg = b.op("Unsqueeze", &[&present_v, &ax2], vec![], &h);
        let ctx = b.op("MatMul", &[&probs, &vg], vec![], &h);
        let ctx = merge_heads(&mut b, &ctx, [&shape_ungrouped, &shape_hidden], &h);
        let attn = layer_matmul(&mut b, weights, l, "attn_output", &ctx, &h)?;
        x = b.op("Add", &[&x, &attn], vec![], &h);

        let ffn_norm = load(&mut b, weights, Some(l), "ffn_norm")?;
        let xn = rms_norm(&mut b, &x, &ffn_norm, &h);
        let gate = layer_matmul(&mut b, weights, l, "ffn_gate", &xn, &h)?;
        let up = layer_matmul(&mut b, weights, l, "ffn_up", &xn, &h)?;
        let act = b.op("Sigmoid", &[&gate], vec![], &h);
        let act = b.op("Mul", &[&gate, &act], vec![], &h);
        let act = b.op("Mul", &[&act, &up], vec![], &h);
        let down = layer_matmul(&mut b, weights, l, "ffn_down", &act, &h)?;
        x = b.op("Add", &[&x, &down], vec![], &h);
    }
    let output_norm = load(&mut b, weights, None, "output_norm")?;
    let xn = rms_norm(&mut b, &x, &output_norm, "final");
    output_logits(&mut b, weights, &xn, &embedding)?;
    Ok(decoder_model(b, c))
}

/// The `logits` output: `xn` through the tied output projection (the embedding transposed,
/// or its blocks).
pub(super) fn output_logits(
    b: &mut Builder,
    weights: &mut dyn Weights,
    xn: &str,
    embedding: &str,
) -> Result<(), String> {
    let logits = match weights.output_blocks()? {
        Some(blocks) => matmul(b, xn, blocks, "lm_head", "lm_head"),
        None => {
            let embedding_t = b.op(
                "Transpose",
                &[embedding],
                vec![attr_ints("perm", &[1, 0])],
                "lm_head",
            );
            b.op("MatMul", &[xn, &embedding_t], vec![], "lm_head")
        }
    };
    b.op_to("Identity", &[&logits], &["logits"], vec![]);
    Ok(())
}

/// The model around the built nodes, with the decoder-with-past interface of the module doc.
pub(super) fn decoder_model(b: Builder, c: &LlamaConfig) -> ModelProto {
    let hd = c.head_dim();
    let uses_contrib = b.nodes.iter().any(|n| n.domain == "com.microsoft");

    let named = |name: &str| Dim::Symbolic(name.to_owned());
    let tokens = [named("batch_size"), named("sequence_length")];
    let kv_dims = |past: &str| {
        [
            named("batch_size"),
            Dim::Fixed(c.kv_heads as i64),
            named(past),
            Dim::Fixed(hd as i64),
        ]
    };
    let mut inputs = vec![
        value_info("input_ids", INT64, &tokens),
        value_info(
            "attention_mask",
            INT64,
            &[named("batch_size"), named("total_sequence_length")],
        ),
        value_info("position_ids", INT64, &tokens),
    ];
    let mut outputs = vec![value_info(
        "logits",
        FLOAT,
        &[
            named("batch_size"),
            named("sequence_length"),
            Dim::Fixed(c.vocab as i64),
        ],
    )];
    for l in 0..c.layers {
        for kind in ["key", "value"] {
            let past = value_info(&past_name(l, kind), FLOAT, &kv_dims("past_sequence_length"));
            let present = value_info(
                &present_name(l, kind),
                FLOAT,
                &kv_dims("total_sequence_length"),
            );
            inputs.push(past);
            outputs.push(present);
        }
    }
    ModelProto {
        ir_version: 8,
        producer_name: "kiln".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(GraphProto {
            node: b.nodes,
            name: "llama".into(),
            initializer: b.initializers,
            input: inputs,
            output: outputs,
        }),
        opset_import: std::iter::once(OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        })
        .chain(uses_contrib.then(|| OperatorSetIdProto {
            domain: "com.microsoft".into(),
            version: 1,
        }))
        .collect(),
    }
}
