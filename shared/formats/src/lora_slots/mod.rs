//! Multi-LoRA slots in a decoder graph. Every adapted linear layer `y = x·W` (attention q, k,
//! v, o and the MLP's gate, up, down projections) gets a side branch
//! `y += ((x·A) ⊙ lora_mask)·B` whose matrices are graph inputs: `lora.{layer}.{module}.a`
//! `[in, R]` and `.b` `[R, out]` hold the low-rank matrices of every resident adapter side by
//! side (R = the sum of their ranks), and `lora_mask [batch, 1, R]` selects, per batch row,
//! the columns of that row's adapter (all zeros: the bare base). So one pass serves a batch
//! that mixes adapters and the base, and loading an adapter only changes inputs, never the
//! session. With no adapter resident, R = 0 and the branch adds zeros.
//!
//! The rewrite works on the serialized model and copies every field it does not change byte
//! for byte, so graphs from other exporters keep what Kiln's ONNX subset does not declare.
//! It finds the linears of the graphs Kiln prepares from GGUF (weights `blk.{l}.{infix}`, in
//! float or MatMulNBits blocks) and of Hugging Face optimum exports (nodes
//! `/model/layers.{l}/{self_attn|mlp}/{module}/MatMul`).

mod merge;
mod wire;

pub use merge::merge_lora;

use std::collections::HashMap;

use prost::Message;

use crate::onnx_proto::elem_type::FLOAT;
use crate::onnx_proto::{Dim, NodeProto, value_info};
use crate::peft::MODULES;

/// Changes whenever the rewrite does (files of rewritten graphs key on it).
pub const LORA_SLOTS_VERSION: u32 = 1;

/// The per-row adapter selection input.
pub const LORA_MASK: &str = "lora_mask";

/// A linear layer that took LoRA slot inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotLinear {
    pub layer: usize,
    /// The Hugging Face module name: `q_proj`, …, `down_proj`.
    pub module: &'static str,
    pub inputs: usize,
    pub outputs: usize,
}

impl SlotLinear {
    /// Its `A` input `[inputs, R]`.
    pub fn a_input(&self) -> String {
        format!("lora.{}.{}.a", self.layer, self.module)
    }
    /// Its `B` input `[R, outputs]`.
    pub fn b_input(&self) -> String {
        format!("lora.{}.{}.b", self.layer, self.module)
    }
}

/// Adds LoRA slots to every adapted linear of the serialized `model`; returns the new model
/// and its slotted linears (in graph order).
pub fn add_lora_slots(model: &[u8]) -> Result<(Vec<u8>, Vec<SlotLinear>), String> {
    let (out, linears) =
        with_graph(model, |graph| rewrite_graph(graph).map(Some))?.expect("always rewritten");
    if linears.is_empty() {
        return Err(format!(
            "no linear layer LoRA adapts was found (looked for the weights blk.N.attn_q … of a \
             graph prepared from GGUF, and the nodes /model/layers.N/self_attn/q_proj/MatMul … \
             of an optimum export; adapted modules: {})",
            MODULES.map(|(m, _, _)| m).join(", ")
        ));
    }
    Ok((out, linears))
}

/// `model` with its graph field replaced by what `rewrite` makes of it (with a by-product),
/// every other field kept as it was; `None` when `rewrite` declines.
fn with_graph<T>(
    model: &[u8],
    rewrite: impl FnOnce(&[u8]) -> Result<Option<(Vec<u8>, T)>, String>,
) -> Result<Option<(Vec<u8>, T)>, String> {
    let fields = wire::fields(model)?;
    let mut graphs = fields.iter().filter(|f| f.number == 7);
    let (Some(graph), None) = (graphs.next().and_then(|f| f.payload), graphs.next()) else {
        return Err("the model has no graph, or more than one".into());
    };
    let Some((graph, product)) = rewrite(graph)? else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(model.len() + (1 << 16));
    for field in &fields {
        match field.number {
            // ModelProto.graph
            7 => wire::put_bytes(&mut out, 7, &graph),
            _ => out.extend_from_slice(field.whole),
        }
    }
    Ok(Some((out, product)))
}

/// GraphProto field numbers.
const NODE: u64 = 1;
const INITIALIZER: u64 = 5;
const INPUT: u64 = 11;

fn rewrite_graph(graph: &[u8]) -> Result<(Vec<u8>, Vec<SlotLinear>), String> {
    let fields = wire::fields(graph)?;
    // The initializers' dims by name (their data is not read).
    let mut dims: HashMap<String, Vec<i64>> = HashMap::new();
    for field in &fields {
        if let (INITIALIZER, Some(tensor)) = (field.number, field.payload) {
            dims.insert(wire::string(tensor, 8)?, wire::int64s(tensor, 1)?);
        }
        if let (INPUT, Some(input)) = (field.number, field.payload)
            && wire::string(input, 1)? == LORA_MASK
        {
            return Err(format!("the graph already has a {LORA_MASK} input"));
        }
    }
    // Q4_1 linears prepared with their block means folded in (see `gguf_onnx::offsets`) read a
    // Concat of `[x, means, means]`: its output's `x`, collected as the (topologically sorted)
    // nodes go by, before the linear that reads it.
    let mut unfolded: HashMap<String, String> = HashMap::new();
    let mut out = Vec::with_capacity(graph.len() + (1 << 16));
    let mut linears = Vec::new();
    for field in &fields {
        let (NODE, Some(raw)) = (field.number, field.payload) else {
            out.extend_from_slice(field.whole);
            continue;
        };
        let node = NodeProto::decode(raw).map_err(|e| format!("a node does not decode: {e}"))?;
        if let ("Concat", [x, means, again], [joined]) = (
            node.op_type.as_str(),
            node.input.as_slice(),
            node.output.as_slice(),
        ) && means == again
        {
            unfolded.insert(joined.clone(), x.clone());
        }
        let Some((layer, modules)) = linear_of(&node) else {
            out.extend_from_slice(field.whole);
            continue;
        };
        let [mut inputs, outputs] = features(&node, &dims)?;
        let (Some(mut x), Some(y)) = (node.input.first(), node.output.first()) else {
            return Err(format!("node {:?} has no input or output", node.name));
        };
        // A Q4_1 linear reads its input with the block means beside it; LoRA reads the input.
        if let Some(input) = unfolded.get(x) {
            x = input;
            inputs = crate::gguf_onnx::unfolded_inputs(inputs).ok_or_else(|| {
                format!(
                    "node {:?} reads block means but its K does not fold",
                    node.name
                )
            })?;
        }
        let parts = part_outputs(&modules, inputs, outputs)
            .ok_or_else(|| format!("node {:?} cannot be split into {modules:?}", node.name))?;
        let base = format!("{y}.lora_base");
        wire::put_bytes(&mut out, NODE, &with_output(raw, &base)?);
        let part_linears: Vec<SlotLinear> = modules
            .iter()
            .zip(parts)
            .map(|(&module, outputs)| SlotLinear {
                layer,
                module,
                inputs,
                outputs,
            })
            .collect();
        for branch in branches(&part_linears, x, &base, y) {
            wire::put_bytes(&mut out, NODE, &branch.encode_to_vec());
        }
        linears.extend(part_linears);
    }
    let rank = || Dim::Symbolic("lora_rank".into());
    let mut inputs = vec![value_info(
        LORA_MASK,
        FLOAT,
        &[Dim::Symbolic("batch_size".into()), Dim::Fixed(1), rank()],
    )];
    for l in &linears {
        inputs.push(value_info(
            &l.a_input(),
            FLOAT,
            &[Dim::Fixed(l.inputs as i64), rank()],
        ));
        inputs.push(value_info(
            &l.b_input(),
            FLOAT,
            &[rank(), Dim::Fixed(l.outputs as i64)],
        ));
    }
    for input in inputs {
        wire::put_bytes(&mut out, INPUT, &input.encode_to_vec());
    }
    Ok((out, linears))
}

/// The layer and HF modules a MatMul computes, if it is an adapted linear: one module, or
/// several side by side (a weight `blk.{l}.attn_q+attn_k+attn_v`).
fn linear_of(node: &NodeProto) -> Option<(usize, Vec<&'static str>)> {
    if !matches!(node.op_type.as_str(), "MatMul" | "MatMulNBits") {
        return None;
    }
    // Prepared from GGUF: the weight blk.{l}.{infix}, or its blocks blk.{l}.{infix}.q.
    if let Some(rest) = node.input.get(1).and_then(|w| w.strip_prefix("blk.")) {
        let (layer, infix) = rest.split_once('.')?;
        let infix = infix.strip_suffix(".q").unwrap_or(infix);
        let modules = infix
            .split(crate::gguf_onnx::MERGED)
            .map(|part| MODULES.iter().find(|(_, _, i)| *i == part).map(|m| m.0))
            .collect::<Option<Vec<_>>>()?;
        return Some((layer.parse().ok()?, modules));
    }
    // optimum: /model/layers.{l}/{parent}/{module}/MatMul.
    let rest = node.name.strip_prefix("/model/layers.")?;
    let mut parts = rest.split('/');
    let (layer, parent, module, op) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if op != "MatMul" || parts.next().is_some() {
        return None;
    }
    let (module, _, _) = MODULES
        .iter()
        .find(|(m, p, _)| *m == module && *p == parent)?;
    Some((layer.parse().ok()?, vec![*module]))
}

/// The outputs of each of `modules` side by side in a product of `outputs`: a llama's query
/// projection keeps the width of its input, and the parts after it share the rest evenly (keys
/// and values, or gate and up).
fn part_outputs(modules: &[&str], inputs: usize, outputs: usize) -> Option<Vec<usize>> {
    let (first, rest) = match modules {
        [single] if !single.is_empty() => return Some(vec![outputs]),
        ["q_proj", rest @ ..] => (Some(inputs), rest.len()),
        all => (None, all.len()),
    };
    let left = outputs.checked_sub(first.unwrap_or(0))?;
    if rest == 0 || left % rest != 0 {
        return None;
    }
    Some(
        first
            .into_iter()
            .chain(std::iter::repeat_n(left / rest, rest))
            .collect(),
    )
}

/// A linear's `[in, out]`: MatMulNBits' K and N, or the dims of a MatMul's weight initializer.
fn features(node: &NodeProto, dims: &HashMap<String, Vec<i64>>) -> Result<[usize; 2], String> {
    let positive = |v: i64| usize::try_from(v).ok().filter(|&v| v > 0);
    let found = if node.op_type == "MatMulNBits" {
        let attr = |name: &str| node.attribute.iter().find(|a| a.name == name).map(|a| a.i);
        attr("K").zip(attr("N"))
    } else {
        node.input
            .get(1)
            .and_then(|w| dims.get(w))
            .and_then(|d| <[i64; 2]>::try_from(d.as_slice()).ok())
            .map(|[i, o]| (i, o))
    };
    found
        .and_then(|(i, o)| Some([positive(i)?, positive(o)?]))
        .ok_or_else(|| {
            format!(
                "the weight of {:?} ({}) is not a 2-D initializer: its features are unknown",
                node.name,
                node.input.get(1).map_or("", String::as_str)
            )
        })
}

/// The node `raw` with its first output renamed to `output`, every other byte kept.
fn with_output(raw: &[u8], output: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(raw.len() + 16);
    let mut renamed = false;
    for field in wire::fields(raw)? {
        // NodeProto.output
        if field.number == 2 && !renamed {
            wire::put_bytes(&mut out, 2, output.as_bytes());
            renamed = true;
        } else {
            out.extend_from_slice(field.whole);
        }
    }
    Ok(out)
}

/// `y = base + ((x·A) ⊙ lora_mask)·B`, with the deltas of linears side by side joined.
fn branches(linears: &[SlotLinear], x: &str, base: &str, y: &str) -> Vec<NodeProto> {
    let node = |prefix: &str, op: &str, inputs: &[&str], output: &str| NodeProto {
        input: inputs.iter().map(|s| (*s).to_owned()).collect(),
        output: vec![output.to_owned()],
        name: format!("{prefix}/{op}:{output}"),
        op_type: op.to_owned(),
        ..Default::default()
    };
    let mut nodes = Vec::with_capacity(3 * linears.len() + 2);
    let mut deltas = Vec::with_capacity(linears.len());
    for linear in linears {
        let prefix = format!("lora.{}.{}", linear.layer, linear.module);
        let down = format!("{prefix}.xa");
        let masked = format!("{prefix}.xa_masked");
        let delta = format!("{prefix}.delta");
        nodes.push(node(&prefix, "MatMul", &[x, &linear.a_input()], &down));
        nodes.push(node(&prefix, "Mul", &[&down, LORA_MASK], &masked));
        nodes.push(node(
            &prefix,
            "MatMul",
            &[&masked, &linear.b_input()],
            &delta,
        ));
        deltas.push(delta);
    }
    let prefix = format!("lora.{}", linears[0].layer);
    let delta = if let [only] = deltas.as_slice() {
        only.clone()
    } else {
        let joined = format!("{y}.lora_delta");
        let inputs: Vec<&str> = deltas.iter().map(String::as_str).collect();
        let mut concat = node(&prefix, "Concat", &inputs, &joined);
        concat
            .attribute
            .push(crate::gguf_onnx::attr_int("axis", -1));
        nodes.push(concat);
        joined
    };
    nodes.push(node(&prefix, "Add", &[base, &delta], y));
    nodes
}

#[cfg(test)]
mod tests;
