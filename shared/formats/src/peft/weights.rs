//! An adapter's weights for serving: `adapter_model.safetensors` read into float32, with the
//! adapter's scale folded into `lora_B` at load (as vLLM does), so applying it is
//! `y += (x·Aᵀ)·Bᵀ` and nothing downstream can forget the scale.

use std::collections::BTreeMap;

use super::{AdapterConfig, lora_pairs};
use crate::error::FormatError;
use crate::gguf::f16_to_f32;
use crate::safetensors::{TensorEntry, header_len, read_safetensors_header};

/// One adapted linear layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraLinear {
    pub inputs: usize,
    pub outputs: usize,
    /// `lora_A` as PyTorch stores it: `[r][inputs]`.
    pub a: Vec<f32>,
    /// `lora_B` times the adapter's scale: `[outputs][r]`.
    pub b: Vec<f32>,
}

/// An adapter's linear layers, all of rank `rank`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeights {
    pub rank: usize,
    /// By `(layer, HF module)`: `(0, "q_proj")`, …
    pub linears: BTreeMap<(usize, &'static str), LoraLinear>,
}

impl LoraWeights {
    /// The memory its weights take.
    pub fn bytes(&self) -> usize {
        self.linears
            .values()
            .map(|l| 4 * (l.a.len() + l.b.len()))
            .sum()
    }
}

/// Reads the weights of an adapter whose config is `config` from the whole
/// `adapter_model.safetensors` in `bytes`. Every tensor must be a `lora_A [r, in]` /
/// `lora_B [out, r]` pair of a target module (in F32, F16 or BF16); `file` names it in errors.
pub fn read_lora_weights(
    config: &AdapterConfig,
    bytes: &[u8],
    file: &str,
) -> Result<LoraWeights, FormatError> {
    let err = |problem: String| FormatError::new(file, problem);
    let tensors = read_safetensors_header(file, bytes)?;
    let data = &bytes[8 + header_len(file, bytes)? as usize..];
    let rank = config.r as usize;
    let scale = config.scale as f32;
    let mut linears = BTreeMap::new();
    for ((layer, module), pair) in lora_pairs(config, &tensors).map_err(err)? {
        let (a_name, a) = pair.a;
        let (b_name, b) = pair.b;
        let [r_a, inputs] = matrix(a_name, a).map_err(err)?;
        let [outputs, r_b] = matrix(b_name, b).map_err(err)?;
        if r_a != rank || r_b != rank {
            return Err(err(format!(
                "tensors {a_name:?} {:?} and {b_name:?} {:?} are not of rank r = {rank}",
                a.shape, b.shape
            )));
        }
        let mut b_values = floats(b, data);
        for v in &mut b_values {
            *v *= scale;
        }
        linears.insert(
            (layer as usize, module),
            LoraLinear {
                inputs,
                outputs,
                a: floats(a, data),
                b: b_values,
            },
        );
    }
    Ok(LoraWeights { rank, linears })
}

fn matrix(name: &str, entry: &TensorEntry) -> Result<[usize; 2], String> {
    match entry.shape[..] {
        [rows, cols] => Ok([rows as usize, cols as usize]),
        _ => Err(format!(
            "tensor {name:?} has shape {:?}; LoRA weights are matrices",
            entry.shape
        )),
    }
}

/// A float tensor's values (its offsets were checked against the data by the header reader).
fn floats(entry: &TensorEntry, data: &[u8]) -> Vec<f32> {
    let raw = &data[entry.data_offsets.0 as usize..entry.data_offsets.1 as usize];
    match entry.dtype.as_str() {
        "F32" => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        "F16" => raw
            .chunks_exact(2)
            .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        "BF16" => raw
            .chunks_exact(2)
            .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
            .collect(),
        other => unreachable!("lora_pairs admits float dtypes only, not {other}"),
    }
}

/// Writes an adapter in the PEFT format (what a trainer produces): `adapter_config.json`
/// (LORA, `r`, `lora_alpha`, the target modules its linears cover, no bias, not fan-in-fan-out,
/// `base_model_name_or_path`) and `adapter_model.safetensors` (`lora_A [r, in]` and `lora_B
/// [out, r]` in F32 under PEFT's names). `linears` hold B as trained, without the scale (PEFT
/// applies `lora_alpha / r` when it loads). Returns the two files' bytes.
pub fn write_peft_adapter(
    r: usize,
    lora_alpha: f64,
    base_model: &str,
    linears: &BTreeMap<(usize, &'static str), LoraLinear>,
) -> (Vec<u8>, Vec<u8>) {
    let mut modules: Vec<&str> = Vec::new();
    for (hf, _, _) in super::MODULES {
        if linears.keys().any(|(_, m)| *m == hf) {
            modules.push(hf);
        }
    }
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "base_model_name_or_path": base_model,
    });
    let mut names = Vec::with_capacity(2 * linears.len());
    for &(layer, module) in linears.keys() {
        let parent = super::MODULES
            .iter()
            .find_map(|(hf, parent, _)| (*hf == module).then_some(*parent))
            .unwrap_or("self_attn");
        let name = |half: &str| {
            format!("base_model.model.model.layers.{layer}.{parent}.{module}.lora_{half}.weight")
        };
        names.push((name("A"), name("B")));
    }
    let mut tensors: Vec<(&str, [usize; 2], &[f32])> = Vec::with_capacity(2 * linears.len());
    for ((a, b), linear) in names.iter().zip(linears.values()) {
        tensors.push((a, [r, linear.inputs], &linear.a));
        tensors.push((b, [linear.outputs, r], &linear.b));
    }
    let tensors: Vec<(&str, &[usize], &[f32])> = tensors
        .iter()
        .map(|(name, shape, values)| (*name, &shape[..], *values))
        .collect();
    (
        serde_json::to_vec_pretty(&config).expect("a JSON value"),
        crate::safetensors::write_safetensors_f32(&tensors),
    )
}
