//! Live merge: one adapter baked into a float graph. A linear's weight `W [in, out]` becomes
//! `W + Aᵀ·Bᵀ` (the scale is in B), so serving it costs nothing more than the base. A graph in
//! 4-bit blocks is not merged: requantizing would change its outputs, and even an exact side
//! branch of constants computes in other kernels than the slot path, which its int8-quantized
//! activations turn into other answers; it serves the adapter pinned in a LoRA slot instead.

use std::collections::HashMap;

use prost::Message;

use super::{NODE, linear_of, wire, with_graph};
use crate::onnx_proto::NodeProto;
use crate::onnx_proto::elem_type::FLOAT;
use crate::peft::{LoraLinear, LoraWeights};

/// GraphProto.initializer; TensorProto fields.
const INITIALIZER: u64 = 5;
const DIMS: u64 = 1;
const DATA_TYPE: u64 = 2;
const NAME: u64 = 8;
const RAW_DATA: u64 = 9;

/// The serialized `model` with `adapter` merged into its float linears; `None` when the graph
/// keeps 4-bit blocks (MatMulNBits) or linears side by side, which are not merged. Every linear the adapter adapts
/// must be in the graph with the adapter's features.
pub fn merge_lora(model: &[u8], adapter: &LoraWeights) -> Result<Option<Vec<u8>>, String> {
    let merged = with_graph(model, |graph| {
        Ok(merge_graph(graph, adapter)?.map(|graph| (graph, ())))
    })?;
    Ok(merged.map(|(model, ())| model))
}

fn merge_graph(graph: &[u8], adapter: &LoraWeights) -> Result<Option<Vec<u8>>, String> {
    let fields = wire::fields(graph)?;
    // The weight each adapted MatMul reads takes its update.
    let mut weights: HashMap<String, &LoraLinear> = HashMap::new();
    let mut done = Vec::new();
    for field in &fields {
        let (NODE, Some(raw)) = (field.number, field.payload) else {
            continue;
        };
        let node = NodeProto::decode(raw).map_err(|e| format!("a node does not decode: {e}"))?;
        if node.op_type == "MatMulNBits" {
            return Ok(None);
        }
        let Some((layer, modules)) = linear_of(&node) else {
            continue;
        };
        // Linears side by side (a graph on ONNX Runtime's fused operators) are not merged.
        let [module] = modules[..] else {
            return Ok(None);
        };
        let key = (layer, module);
        let Some(linear) = adapter.linears.get(&key) else {
            continue;
        };
        let weight = node.input.get(1).cloned().unwrap_or_default();
        weights.insert(weight, linear);
        done.push(key);
    }
    if let Some(missing) = adapter.linears.keys().find(|k| !done.contains(k)) {
        return Err(format!(
            "the adapter adapts layer {}'s {}, which the graph does not have",
            missing.0, missing.1
        ));
    }
    let mut out = Vec::with_capacity(graph.len());
    for field in &fields {
        match (field.number, field.payload) {
            (INITIALIZER, Some(tensor)) => {
                let name = wire::string(tensor, NAME)?;
                match weights.get(&name) {
                    Some(linear) => wire::put_bytes(
                        &mut out,
                        INITIALIZER,
                        &merged_weight(tensor, &name, linear)?,
                    ),
                    None => out.extend_from_slice(field.whole),
                }
            }
            _ => out.extend_from_slice(field.whole),
        }
    }
    Ok(Some(out))
}

/// The float initializer `tensor` (`[in, out]`, raw little-endian data) plus `Aᵀ·Bᵀ`, every
/// other field kept.
fn merged_weight(tensor: &[u8], name: &str, linear: &LoraLinear) -> Result<Vec<u8>, String> {
    let dims = wire::int64s(tensor, DIMS)?;
    let data_type = wire::int64s(tensor, DATA_TYPE)?;
    if dims != [linear.inputs as i64, linear.outputs as i64] || data_type != [i64::from(FLOAT)] {
        return Err(format!(
            "weight {name} is {dims:?} (type {data_type:?}); the adapter needs float [{}, {}]",
            linear.inputs, linear.outputs
        ));
    }
    let mut out = Vec::with_capacity(tensor.len());
    let mut found = false;
    for field in wire::fields(tensor)? {
        let (RAW_DATA, Some(raw)) = (field.number, field.payload) else {
            out.extend_from_slice(field.whole);
            continue;
        };
        if raw.len() != 4 * linear.inputs * linear.outputs {
            return Err(format!("weight {name} holds {} bytes", raw.len()));
        }
        let rank = linear.a.len() / linear.inputs;
        let mut w: Vec<f32> = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        for i in 0..linear.inputs {
            let row = &mut w[i * linear.outputs..(i + 1) * linear.outputs];
            for k in 0..rank {
                let a = linear.a[k * linear.inputs + i];
                for (o, value) in row.iter_mut().enumerate() {
                    *value += a * linear.b[o * rank + k];
                }
            }
        }
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        wire::put_bytes(&mut out, RAW_DATA, &bytes);
        found = true;
    }
    if !found {
        return Err(format!(
            "weight {name} keeps its values outside raw_data (external data or float_data), \
             which live merge does not rewrite"
        ));
    }
    Ok(out)
}
