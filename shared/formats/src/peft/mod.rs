//! PEFT LoRA adapters: `adapter_config.json`, and whether the tensors of
//! `adapter_model.safetensors` fit a llama-family GGUF base model.
//!
//! Hugging Face module names map to the base's GGUF tensors as
//! `model.layers.{i}.self_attn.q_proj` → `blk.{i}.attn_q.weight` (likewise `k_proj` → `attn_k`,
//! `v_proj` → `attn_v`, `o_proj` → `attn_output`, and under `mlp`: `gate_proj` → `ffn_gate`,
//! `up_proj` → `ffn_up`, `down_proj` → `ffn_down`). A GGUF linear weight has dims
//! `[in_features, out_features]` (ne0 first), so the adapter's `lora_A` must be
//! `[r, in_features]` and `lora_B` `[out_features, r]` (PyTorch's row-major `[out, in]`).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::error::FormatError;
use crate::gguf::GgufInfo;
use crate::safetensors::TensorEntry;

#[cfg(test)]
mod tests;
mod weights;

pub use weights::{LoraLinear, LoraWeights, read_lora_weights, write_peft_adapter};

/// The LoRA ranks Kiln serves.
pub const RANK_RANGE: std::ops::RangeInclusive<u32> = 4..=64;

/// PEFT's default `lora_alpha` when a config leaves it out.
const DEFAULT_LORA_ALPHA: f64 = 8.0;

/// `(HF module, its parent in a llama decoder layer, the GGUF tensor infix)`.
pub const MODULES: [(&str, &str, &str); 7] = [
    ("q_proj", "self_attn", "attn_q"),
    ("k_proj", "self_attn", "attn_k"),
    ("v_proj", "self_attn", "attn_v"),
    ("o_proj", "self_attn", "attn_output"),
    ("gate_proj", "mlp", "ffn_gate"),
    ("up_proj", "mlp", "ffn_up"),
    ("down_proj", "mlp", "ffn_down"),
];

/// The HF names of [`MODULES`]: what `target_modules` may name.
pub const MODULE_NAMES: [&str; 7] = [
    MODULES[0].0,
    MODULES[1].0,
    MODULES[2].0,
    MODULES[3].0,
    MODULES[4].0,
    MODULES[5].0,
    MODULES[6].0,
];

/// The prefixes PEFT puts before `{i}.{parent}.{module}` (for a `LlamaForCausalLM` base, and for
/// a bare `LlamaModel` base).
const LAYER_PREFIXES: [&str; 2] = ["base_model.model.model.layers.", "base_model.model.layers."];

/// What Kiln uses of an `adapter_config.json` (of `peft_type` LORA, the only one it reads).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    pub r: u32,
    pub lora_alpha: f64,
    /// HF module names (`q_proj`, `v_proj`, …), deduplicated, in the order given.
    pub target_modules: Vec<String>,
    pub base_model_name_or_path: Option<String>,
    pub use_rslora: bool,
    /// What `B·A` is multiplied by: `lora_alpha / r`, or `lora_alpha / sqrt(r)` under rsLoRA.
    pub scale: f64,
}

/// Reads an `adapter_config.json`. `target_modules` may be a list of module names or a single
/// string: a module name, `"all-linear"` (all seven llama projections), or a PEFT regular
/// expression, of which the llama projections it names are taken (e.g.
/// `".*\.(q_proj|v_proj)$"` → `q_proj`, `v_proj`).
pub fn read_adapter_config(file: &str, bytes: &[u8]) -> Result<AdapterConfig, FormatError> {
    let err = |problem: String| FormatError::new(file, problem);
    let json: Value =
        serde_json::from_slice(bytes).map_err(|e| err(format!("invalid JSON: {e}")))?;
    let Value::Object(obj) = json else {
        return Err(err("the adapter config is not a JSON object".into()));
    };

    let peft_type = match obj.get("peft_type") {
        None | Some(Value::Null) => return Err(err("missing peft_type".into())),
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(err(format!("peft_type must be a string, not {other}"))),
    };
    if peft_type != "LORA" {
        return Err(err(format!(
            "peft_type {peft_type:?} is not supported; Kiln serves LORA adapters"
        )));
    }

    let r = match obj.get("r") {
        None | Some(Value::Null) => return Err(err("missing r (the LoRA rank)".into())),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| err(format!("r must be a positive integer, not {v}")))?,
    };
    if !(u64::from(*RANK_RANGE.start())..=u64::from(*RANK_RANGE.end())).contains(&r) {
        return Err(err(format!(
            "r = {r} is outside the supported range {}..={}",
            RANK_RANGE.start(),
            RANK_RANGE.end()
        )));
    }
    let r = r as u32;

    let lora_alpha = match obj.get("lora_alpha") {
        None | Some(Value::Null) => DEFAULT_LORA_ALPHA,
        Some(v) => v
            .as_f64()
            .ok_or_else(|| err(format!("lora_alpha must be a number, not {v}")))?,
    };
    if !(lora_alpha.is_finite() && lora_alpha > 0.0) {
        return Err(err(format!(
            "lora_alpha must be positive, not {lora_alpha}"
        )));
    }

    let mut target_modules: Vec<String> = match obj.get("target_modules") {
        None | Some(Value::Null) => return Err(err("missing target_modules".into())),
        Some(Value::String(s)) => modules_from_string(s).ok_or_else(|| {
            err(format!(
                "target_modules {s:?} names none of the modules Kiln adapts ({})",
                module_list()
            ))
        })?,
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(err(format!(
                    "target_modules must list module names (strings), not {other}"
                ))),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(err(format!(
                "target_modules must be a list of module names or a string, not {other}"
            )));
        }
    };
    let mut seen = std::collections::HashSet::new();
    target_modules.retain(|m| seen.insert(m.clone()));
    if target_modules.is_empty() {
        return Err(err("target_modules is empty".into()));
    }

    let base_model_name_or_path = match obj.get("base_model_name_or_path") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(err(format!(
                "base_model_name_or_path must be a string, not {other}"
            )));
        }
    };

    let use_rslora = match obj.get("use_rslora") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(err(format!(
                "use_rslora must be true or false, not {other}"
            )));
        }
    };
    refuse_unappliable(&obj).map_err(err)?;
    let rank = f64::from(r);
    let scale = lora_alpha / if use_rslora { rank.sqrt() } else { rank };

    Ok(AdapterConfig {
        r,
        lora_alpha,
        target_modules,
        base_model_name_or_path,
        use_rslora,
        scale,
    })
}

/// The PEFT settings under which `B·A·scale` added to a linear layer's output would not be
/// what the adapter was trained as: refused, naming the field, rather than served mis-scaled.
fn refuse_unappliable(obj: &serde_json::Map<String, Value>) -> Result<(), String> {
    let set = |key: &str| obj.get(key).filter(|v| !v.is_null());
    if let Some(v) = set("fan_in_fan_out")
        && v != &Value::Bool(false)
    {
        return Err(format!(
            "fan_in_fan_out is {v}: Kiln applies adapters of nn.Linear layers (lora_A [r, in]); \
             fan_in_fan_out adapters are for Conv1D layers (GPT-2) and would be applied transposed"
        ));
    }
    if let Some(v) = set("bias")
        && v.as_str() != Some("none")
    {
        return Err(format!(
            "bias is {v}: Kiln serves adapters without trained biases (bias \"none\")"
        ));
    }
    if let Some(v) = set("use_dora")
        && v != &Value::Bool(false)
    {
        return Err(format!(
            "use_dora is {v}: DoRA's magnitude vectors are not applied by Kiln; use plain LoRA"
        ));
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if let Some(v) = set(key)
            && v.as_object().is_none_or(|m| !m.is_empty())
        {
            return Err(format!(
                "{key} is {v}: Kiln scales every module by one r and lora_alpha; per-module \
                 ranks or alphas would be mis-scaled"
            ));
        }
    }
    if let Some(v) = set("modules_to_save")
        && v.as_array().is_none_or(|a| !a.is_empty())
    {
        return Err(format!(
            "modules_to_save is {v}: Kiln applies LoRA weights only, not fully trained modules"
        ));
    }
    Ok(())
}

fn module_list() -> String {
    MODULES.map(|(m, _, _)| m).join(", ")
}

/// The modules a single-string `target_modules` names, or `None` when it names none.
fn modules_from_string(s: &str) -> Option<Vec<String>> {
    if s == "all-linear" {
        return Some(MODULES.iter().map(|(m, _, _)| m.to_string()).collect());
    }
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Some(vec![s.to_string()]);
    }
    let found: Vec<String> = MODULES
        .iter()
        .filter(|(m, _, _)| s.contains(m))
        .map(|(m, _, _)| m.to_string())
        .collect();
    (!found.is_empty()).then_some(found)
}

/// A LoRA tensor name, taken apart.
struct LoraName<'a> {
    layer: u64,
    parent: &'a str,
    module: &'a str,
    /// `'A'` or `'B'`.
    half: char,
}

/// Parses `{prefix}{i}.{parent}.{module}.lora_{A|B}[.default].weight`.
fn parse_lora_name(name: &str) -> Option<LoraName<'_>> {
    let rest = LAYER_PREFIXES.iter().find_map(|p| name.strip_prefix(p))?;
    let parts: Vec<&str> = rest.split('.').collect();
    let (layer, parent, module, lora) = match parts.as_slice() {
        [layer, parent, module, lora, "weight"] => (layer, parent, module, lora),
        [layer, parent, module, lora, "default", "weight"] => (layer, parent, module, lora),
        _ => return None,
    };
    let half = match *lora {
        "lora_A" => 'A',
        "lora_B" => 'B',
        _ => return None,
    };
    Some(LoraName {
        layer: layer.parse().ok()?,
        parent,
        module,
        half,
    })
}

fn shape(dims: &[u64]) -> String {
    format!("{dims:?}")
}

/// An adapter's `lora_A` and `lora_B` tensors of one linear layer.
struct Pair<'a> {
    a: (&'a str, &'a TensorEntry),
    b: (&'a str, &'a TensorEntry),
}

/// The adapter's tensors by `(layer, HF module)`: every tensor a float `lora_A`/`lora_B`
/// weight of a target module under its llama parent, every `lora_A` with its `lora_B`.
fn lora_pairs<'a>(
    config: &AdapterConfig,
    tensors: &'a BTreeMap<String, TensorEntry>,
) -> Result<BTreeMap<(u64, &'static str), Pair<'a>>, String> {
    type Halves<'a> = (
        Option<(&'a str, &'a TensorEntry)>,
        Option<(&'a str, &'a TensorEntry)>,
    );
    let mut halves: BTreeMap<(u64, &'static str), Halves<'a>> = BTreeMap::new();
    for (name, entry) in tensors {
        let Some(lora) = parse_lora_name(name) else {
            return Err(format!(
                "tensor {name:?} is not a LoRA weight Kiln can apply (expected names like \
                 base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight)"
            ));
        };
        let Some((module, parent, _)) = MODULES.iter().find(|(m, _, _)| *m == lora.module) else {
            return Err(format!(
                "tensor {name:?} adapts module {:?}, which Kiln cannot map to the base model \
                 (Kiln adapts {})",
                lora.module,
                module_list()
            ));
        };
        if lora.parent != *parent {
            return Err(format!(
                "tensor {name:?} puts {module} under {:?}; expected {parent:?}",
                lora.parent
            ));
        }
        if !config.target_modules.iter().any(|m| m == module) {
            return Err(format!(
                "tensor {name:?} adapts {module}, which is not in target_modules ({})",
                config.target_modules.join(", ")
            ));
        }
        if !matches!(entry.dtype.as_str(), "F32" | "F16" | "BF16") {
            return Err(format!(
                "tensor {name:?} has dtype {}; LoRA weights must be F32, F16 or BF16",
                entry.dtype
            ));
        }
        let pair = halves.entry((lora.layer, module)).or_default();
        let half = if lora.half == 'A' {
            &mut pair.0
        } else {
            &mut pair.1
        };
        *half = Some((name.as_str(), entry));
    }
    if halves.is_empty() {
        return Err("the adapter has no LoRA tensors".into());
    }
    halves
        .into_iter()
        .map(|(key, pair)| match pair {
            (Some(a), Some(b)) => Ok((key, Pair { a, b })),
            (None, Some((name, _))) => Err(format!("tensor {name:?} has no matching lora_A")),
            (Some((name, _)), None) => Err(format!("tensor {name:?} has no matching lora_B")),
            (None, None) => unreachable!("a pair is made by one of its halves"),
        })
        .collect()
}

/// Whether an adapter's tensors fit the base model: every target module maps to a tensor of
/// the base, every tensor is a `lora_A`/`lora_B` weight of a target module in a layer the base
/// has, with the shape the base's tensor and `r` require, and every `lora_A` has its `lora_B`.
/// `file` names the adapter in errors.
pub fn check_adapter_fits(
    config: &AdapterConfig,
    tensors: &BTreeMap<String, TensorEntry>,
    base: &GgufInfo,
    file: &str,
) -> Result<(), FormatError> {
    let err = |problem: String| Err(FormatError::new(file, problem));
    let Some(block_count) = base.block_count else {
        return err("the base model does not say how many layers it has (no block_count)".into());
    };

    for module in &config.target_modules {
        let Some((_, _, infix)) = MODULES.iter().find(|(m, _, _)| m == module) else {
            return err(format!(
                "target module {module:?} has no counterpart in a llama-family base model \
                 (Kiln adapts {})",
                module_list()
            ));
        };
        let base_name = format!("blk.0.{infix}.weight");
        if base.tensor(&base_name).is_none() {
            return err(format!(
                "target module {module:?} is not in the base model (it has no {base_name})"
            ));
        }
    }

    let r = u64::from(config.r);
    let pairs = lora_pairs(config, tensors).map_err(|p| FormatError::new(file, p))?;
    for ((layer, module), pair) in pairs {
        let infix = MODULES
            .iter()
            .find_map(|(m, _, infix)| (*m == module).then_some(infix))
            .expect("a pair's module is one of MODULES");
        if layer >= block_count {
            return err(format!(
                "tensor {:?} is for layer {layer} but the base model has {block_count} layers",
                pair.a.0
            ));
        }
        let base_name = format!("blk.{layer}.{infix}.weight");
        let Some(base_tensor) = base.tensor(&base_name) else {
            return err(format!(
                "tensor {:?} adapts {base_name}, which the base model does not have",
                pair.a.0
            ));
        };
        let [in_features, out_features] = base_tensor.dims[..] else {
            return err(format!(
                "tensor {:?} adapts {base_name}, whose shape {} is not a matrix",
                pair.a.0,
                shape(&base_tensor.dims)
            ));
        };
        for ((name, entry), expected) in [(pair.a, [r, in_features]), (pair.b, [out_features, r])] {
            if entry.shape != expected {
                return err(format!(
                    "tensor {name:?} has shape {}; expected {} (r = {r}, {base_name} is \
                     {in_features} in × {out_features} out)",
                    shape(&entry.shape),
                    shape(&expected)
                ));
            }
        }
    }
    Ok(())
}
