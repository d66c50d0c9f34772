//! The decoder graph of [`super::graph`] on ONNX Runtime's fused operators, for bundles only
//! ONNX Runtime serves (4-bit blocks): the same inputs and outputs, about half the nodes.
//! Each was a run of five to ten small operators, and on a 135M model a decode step is
//! dominated by the dispatch of small operators, not by arithmetic.
//!
//! - `SimplifiedLayerNormalization` (RMSNorm), and `SkipSimplifiedLayerNormalization` (the
//!   residual add and the next RMSNorm in one pass);
//! - the linears that share an input as one product: q|k|v (`blk.{l}.attn_q+attn_k+attn_v`),
//!   gate|up (`blk.{l}.ffn_gate+ffn_up`), in blocks when all their parts are;
//! - `GroupQueryAttention` on the packed q|k|v: the rotary embedding of queries and keys, the cache append and
//!   causal attention over each row's own past. It writes row b's new keys and values right
//!   after that row's past (`sum(attention_mask[b])` positions in all), not after the
//!   batch's padded past as a Concat does; the manifest says so (`kv_in_place`). It derives
//!   its positions from the mask, so the graph takes no `position_ids`.

use super::builder::{Builder, attr_float, attr_int};
use super::graph::{
    Linear, LlamaConfig, Weight, Weights, decoder_model, layer_matmul, load, matmul, output_logits,
    past_name, present_name,
};
use crate::onnx_proto::ModelProto;
use crate::onnx_proto::elem_type::INT32;

/// The joined name of linears merged side by side (what the LoRA slot rewrite looks for).
pub(crate) const MERGED: char = '+';

/// `x ·` the linears `names` of layer `layer` side by side, as one product.
fn merged_matmul(
    b: &mut Builder,
    weights: &mut dyn Weights,
    layer: usize,
    names: &[&str],
    x: &str,
    hint: &str,
) -> Result<String, String> {
    let parts = names
        .iter()
        .map(|name| weights.linear(layer, name))
        .collect::<Result<Vec<_>, _>>()?;
    let joined = names.join(&MERGED.to_string());
    if let Some(merged) = side_by_side(parts) {
        return Ok(matmul(b, x, merged, &format!("blk.{layer}.{joined}"), hint));
    }
    // Blocks of different kinds, or blocks and floats: one product each, joined after.
    let mut products = Vec::with_capacity(names.len());
    for name in names {
        products.push(layer_matmul(b, weights, layer, name, x, hint)?);
    }
    let products: Vec<&str> = products.iter().map(String::as_str).collect();
    Ok(b.op("Concat", &products, vec![attr_int("axis", -1)], hint))
}

/// Linears over the same input as one with their outputs side by side, when every part is
/// in blocks of one kind or every part is float.
fn side_by_side(parts: Vec<Linear>) -> Option<Linear> {
    let same_blocks = parts.windows(2).all(|pair| match pair {
        [
            Linear::Blocks {
                inputs: i0,
                bits: b0,
                offsets: o0,
                ..
            },
            Linear::Blocks {
                inputs: i1,
                bits: b1,
                offsets: o1,
                ..
            },
        ] => i0 == i1 && b0 == b1 && o0.is_some() == o1.is_some(),
        _ => false,
    });
    if same_blocks && matches!(parts.first(), Some(Linear::Blocks { .. })) {
        // Rows are outputs: blocks, scales and offsets are all by output first, so the parts
        // follow each other.
        let mut parts = parts.into_iter();
        let Some(Linear::Blocks {
            inputs,
            mut outputs,
            bits,
            mut packed,
            mut scales,
            mut offsets,
        }) = parts.next()
        else {
            unreachable!("checked above");
        };
        for part in parts {
            let Linear::Blocks {
                outputs: more,
                packed: more_packed,
                scales: more_scales,
                offsets: more_offsets,
                ..
            } = part
            else {
                unreachable!("checked above");
            };
            outputs += more;
            packed.extend(more_packed);
            scales.extend(more_scales);
            if let (Some(offsets), Some(more)) = (offsets.as_mut(), more_offsets) {
                offsets.extend(more);
            }
        }
        return Some(Linear::Blocks {
            inputs,
            outputs,
            bits,
            packed,
            scales,
            offsets,
        });
    }
    let floats: Vec<Weight> = parts
        .into_iter()
        .map(|part| match part {
            Linear::Float(w) => Some(w),
            Linear::Blocks { .. } => None,
        })
        .collect::<Option<_>>()?;
    // Float [in, out] row-major: each input row gets every part's row in turn.
    let inputs = floats[0].dims[0] as usize;
    let outputs: i64 = floats.iter().map(|w| w.dims[1]).sum();
    let mut values = Vec::with_capacity(inputs * outputs as usize);
    for i in 0..inputs {
        for w in &floats {
            let width = w.dims[1] as usize;
            values.extend_from_slice(&w.values[i * width..(i + 1) * width]);
        }
    }
    Some(Linear::Float(Weight {
        dims: vec![inputs as i64, outputs],
        values,
    }))
}

/// Builds the graph (see the module doc).
pub fn build(c: &LlamaConfig, weights: &mut dyn Weights) -> Result<ModelProto, String> {
    let hd = c.head_dim();
    let mut b = Builder::default();

    // GroupQueryAttention's lengths: per row, its tokens minus one (the mask is right-padded:
    // a row's ones come first); and the width of the mask.
    let ax1 = b.i64_tensor("ax1", &[1], &[1]);
    let i1 = b.i64_tensor("i1", &[], &[1]);
    let tokens = b.op(
        "ReduceSum",
        &["attention_mask", &ax1],
        vec![attr_int("keepdims", 0)],
        "row_tokens",
    );
    let last = b.op("Sub", &[&tokens, &i1], vec![], "seqlens");
    let seqlens_k = b.op(
        "Cast",
        &[&last],
        vec![attr_int("to", INT32.into())],
        "seqlens_k",
    );
    let mask_shape = b.op("Shape", &["attention_mask"], vec![], "mask_shape");
    let total = b.op(
        "Gather",
        &[&mask_shape, &i1],
        vec![attr_int("axis", 0)],
        "total",
    );
    let total = b.op(
        "Cast",
        &[&total],
        vec![attr_int("to", INT32.into())],
        "total",
    );

    // Rotary caches [max_positions, head_dim / 2] (HF's half rotation, the file's theta).
    let half = hd / 2;
    let mut cos = Vec::with_capacity(c.max_positions * half);
    let mut sin = Vec::with_capacity(c.max_positions * half);
    for pos in 0..c.max_positions {
        for j in 0..half {
            let inv_freq = f64::from(c.rope_theta).powf(-(2.0 * j as f64) / hd as f64);
            let angle = pos as f64 * inv_freq;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    let dims = [c.max_positions as i64, half as i64];
    let cos_cache = b.f32_tensor("rope_cos", &dims, &cos);
    let sin_cache = b.f32_tensor("rope_sin", &dims, &sin);
    drop((cos, sin));

    let halves = b.i64_tensor("ffn_halves", &[2], &[c.ffn as i64, c.ffn as i64]);
    let eps = || attr_float("epsilon", c.eps);
    let embedding = load(&mut b, weights, None, "token_embd")?;
    let mut x = b.op("Gather", &[&embedding, "input_ids"], vec![], "embed");
    let attn_norm = load(&mut b, weights, Some(0), "attn_norm")?;
    let mut xn = b.op(
        "SimplifiedLayerNormalization",
        &[&x, &attn_norm],
        vec![attr_int("axis", -1), eps()],
        "l0",
    );
    // The residual stream and the next norm in one node: returns (normed, sum).
    let skip_norm = |b: &mut Builder, delta: &str, x: &str, weight: &str, hint: &str| {
        let normed = format!("{hint}_normed");
        let sum = format!("{hint}_sum");
        b.op_in_to(
            "com.microsoft",
            "SkipSimplifiedLayerNormalization",
            &[delta, x, weight],
            &[&normed, "", "", &sum],
            vec![eps()],
        );
        (normed, sum)
    };
    for l in 0..c.layers {
        let h = format!("l{l}");
        let qkv = merged_matmul(&mut b, weights, l, &["attn_q", "attn_k", "attn_v"], &xn, &h)?;
        let ctx = format!("{h}_ctx");
        b.op_in_to(
            "com.microsoft",
            "GroupQueryAttention",
            &[
                &qkv,
                "",
                "",
                &past_name(l, "key"),
                &past_name(l, "value"),
                &seqlens_k,
                &total,
                &cos_cache,
                &sin_cache,
            ],
            &[&ctx, &present_name(l, "key"), &present_name(l, "value")],
            vec![
                attr_int("num_heads", c.heads as i64),
                attr_int("kv_num_heads", c.kv_heads as i64),
                attr_int("do_rotary", 1),
                attr_int("rotary_interleaved", 0),
            ],
        );
        let attn = layer_matmul(&mut b, weights, l, "attn_output", &ctx, &h)?;
        let ffn_norm = load(&mut b, weights, Some(l), "ffn_norm")?;
        let (normed, sum) = skip_norm(&mut b, &attn, &x, &ffn_norm, &format!("{h}_ffn"));
        x = sum;
        let gate_up = merged_matmul(&mut b, weights, l, &["ffn_gate", "ffn_up"], &normed, &h)?;
        let (gate, up) = (format!("{h}_gate"), format!("{h}_up"));
        b.op_to(
            "Split",
            &[&gate_up, &halves],
            &[&gate, &up],
            vec![attr_int("axis", -1)],
        );
        let act = b.op("Sigmoid", &[&gate], vec![], &h);
        let act = b.op("Mul", &[&gate, &act], vec![], &h);
        let act = b.op("Mul", &[&act, &up], vec![], &h);
        let down = layer_matmul(&mut b, weights, l, "ffn_down", &act, &h)?;
        // The next layer's attention norm, or after the last layer the output norm.
        let next_norm = if l + 1 < c.layers {
            load(&mut b, weights, Some(l + 1), "attn_norm")?
        } else {
            load(&mut b, weights, None, "output_norm")?
        };
        let (normed, sum) = skip_norm(&mut b, &down, &x, &next_norm, &format!("{h}_out"));
        xn = normed;
        x = sum;
    }
    output_logits(&mut b, weights, &xn, &embedding)?;
    let mut model = decoder_model(b, c);
    // No position_ids: GroupQueryAttention takes positions from the mask.
    if let Some(graph) = model.graph.as_mut() {
        graph.input.retain(|i| i.name != "position_ids");
    }
    Ok(model)
}
