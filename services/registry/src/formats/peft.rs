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

use super::FormatError;
use super::gguf::GgufInfo;
use super::safetensors::TensorEntry;

/// The LoRA ranks Kiln serves.
pub const RANK_RANGE: std::ops::RangeInclusive<u32> = 4..=64;

/// PEFT's default `lora_alpha` when a config leaves it out.
const DEFAULT_LORA_ALPHA: f64 = 8.0;

/// `(HF module, its parent in a llama decoder layer, the GGUF tensor infix)`.
const MODULES: [(&str, &str, &str); 7] = [
    ("q_proj", "self_attn", "attn_q"),
    ("k_proj", "self_attn", "attn_k"),
    ("v_proj", "self_attn", "attn_v"),
    ("o_proj", "self_attn", "attn_output"),
    ("gate_proj", "mlp", "ffn_gate"),
    ("up_proj", "mlp", "ffn_up"),
    ("down_proj", "mlp", "ffn_down"),
];

/// The prefixes PEFT puts before `{i}.{parent}.{module}` (for a `LlamaForCausalLM` base, and for
/// a bare `LlamaModel` base).
const LAYER_PREFIXES: [&str; 2] = ["base_model.model.model.layers.", "base_model.model.layers."];

/// What Kiln uses of an `adapter_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// Always `LORA`.
    pub peft_type: String,
    pub r: u32,
    pub lora_alpha: f64,
    /// HF module names (`q_proj`, `v_proj`, …), deduplicated, in the order given.
    pub target_modules: Vec<String>,
    pub base_model_name_or_path: Option<String>,
}

impl AdapterConfig {
    /// The factor LoRA's update is scaled by: `lora_alpha / r`.
    pub fn scaling(&self) -> f64 {
        self.lora_alpha / f64::from(self.r)
    }
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

    Ok(AdapterConfig {
        peft_type,
        r,
        lora_alpha,
        target_modules,
        base_model_name_or_path,
    })
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

/// Whether an adapter's tensors fit the base model: every target module maps to a tensor of
/// the base, every tensor is a `lora_A`/`lora_B` weight of a target module in a layer the base
/// has, with the shape the base's tensor and `r` require, and every `lora_A` has its `lora_B`.
/// `file` names the adapter in errors.
pub fn check_fits(
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
    // (layer, module) -> (has lora_A, has lora_B, a tensor name for errors)
    let mut pairs: BTreeMap<(u64, &str), (bool, bool, &str)> = BTreeMap::new();
    for (name, entry) in tensors {
        let Some(lora) = parse_lora_name(name) else {
            return err(format!(
                "tensor {name:?} is not a LoRA weight Kiln can apply (expected names like \
                 base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight)"
            ));
        };
        let Some((module, parent, infix)) = MODULES.iter().find(|(m, _, _)| *m == lora.module)
        else {
            return err(format!(
                "tensor {name:?} adapts module {:?}, which Kiln cannot map to the base model \
                 (Kiln adapts {})",
                lora.module,
                module_list()
            ));
        };
        if lora.parent != *parent {
            return err(format!(
                "tensor {name:?} puts {module} under {:?}; expected {parent:?}",
                lora.parent
            ));
        }
        if !config.target_modules.iter().any(|m| m == module) {
            return err(format!(
                "tensor {name:?} adapts {module}, which is not in target_modules ({})",
                config.target_modules.join(", ")
            ));
        }
        if lora.layer >= block_count {
            return err(format!(
                "tensor {name:?} is for layer {} but the base model has {block_count} layers",
                lora.layer
            ));
        }
        if !matches!(entry.dtype.as_str(), "F32" | "F16" | "BF16") {
            return err(format!(
                "tensor {name:?} has dtype {}; LoRA weights must be F32, F16 or BF16",
                entry.dtype
            ));
        }
        let base_name = format!("blk.{}.{infix}.weight", lora.layer);
        let Some(base_tensor) = base.tensor(&base_name) else {
            return err(format!(
                "tensor {name:?} adapts {base_name}, which the base model does not have"
            ));
        };
        let [in_features, out_features] = base_tensor.dims[..] else {
            return err(format!(
                "tensor {name:?} adapts {base_name}, whose shape {} is not a matrix",
                shape(&base_tensor.dims)
            ));
        };
        let expected = if lora.half == 'A' {
            [r, in_features]
        } else {
            [out_features, r]
        };
        if entry.shape != expected {
            return err(format!(
                "tensor {name:?} has shape {}; expected {} (r = {r}, {base_name} is \
                 {in_features} in × {out_features} out)",
                shape(&entry.shape),
                shape(&expected)
            ));
        }
        let pair = pairs
            .entry((lora.layer, module))
            .or_insert((false, false, name.as_str()));
        if lora.half == 'A' {
            pair.0 = true;
        } else {
            pair.1 = true;
        }
    }

    if pairs.is_empty() {
        return err("the adapter has no LoRA tensors".into());
    }
    for (has_a, has_b, name) in pairs.values() {
        if !has_a {
            return err(format!("tensor {name:?} has no matching lora_A"));
        }
        if !has_b {
            return err(format!("tensor {name:?} has no matching lora_B"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf::GgufTensor;
    use crate::formats::safetensors;

    fn config(json: &str) -> Result<AdapterConfig, FormatError> {
        read_adapter_config("adapter_config.json", json.as_bytes())
    }

    fn problem(json: &str) -> String {
        config(json).expect_err("should be rejected").problem
    }

    /// Two layers, hidden 8, 2 heads / 1 kv head of 4 (k/v project to 4), ffn 16.
    fn base() -> GgufInfo {
        let mut tensors = vec![GgufTensor {
            name: "token_embd.weight".into(),
            dims: vec![8, 10],
            ggml_type: 3,
        }];
        for i in 0..2 {
            for (infix, dims) in [
                ("attn_q", [8, 8]),
                ("attn_k", [8, 4]),
                ("attn_v", [8, 4]),
                ("attn_output", [8, 8]),
                ("ffn_gate", [8, 16]),
                ("ffn_up", [8, 16]),
                ("ffn_down", [16, 8]),
            ] {
                tensors.push(GgufTensor {
                    name: format!("blk.{i}.{infix}.weight"),
                    dims: dims.to_vec(),
                    ggml_type: 3,
                });
            }
        }
        GgufInfo {
            version: 3,
            architecture: "llama".into(),
            block_count: Some(2),
            embedding_length: Some(8),
            head_count: Some(2),
            head_count_kv: Some(1),
            tensors,
            ..GgufInfo::default()
        }
    }

    fn lora_config(r: u32, modules: &[&str]) -> AdapterConfig {
        AdapterConfig {
            peft_type: "LORA".into(),
            r,
            lora_alpha: 16.0,
            target_modules: modules.iter().map(|m| m.to_string()).collect(),
            base_model_name_or_path: None,
        }
    }

    fn name(layer: u32, parent: &str, module: &str, half: &str) -> String {
        format!("base_model.model.model.layers.{layer}.{parent}.{module}.lora_{half}.weight")
    }

    /// The tensors of a well-formed r=4 adapter on q_proj, v_proj and down_proj of both layers.
    fn adapter() -> Vec<(String, &'static str, Vec<u64>)> {
        let mut out = Vec::new();
        for i in 0..2 {
            out.push((name(i, "self_attn", "q_proj", "A"), "F32", vec![4, 8]));
            out.push((name(i, "self_attn", "q_proj", "B"), "F32", vec![8, 4]));
            out.push((name(i, "self_attn", "v_proj", "A"), "F16", vec![4, 8]));
            out.push((name(i, "self_attn", "v_proj", "B"), "F16", vec![4, 4]));
            out.push((name(i, "mlp", "down_proj", "A"), "BF16", vec![4, 16]));
            out.push((name(i, "mlp", "down_proj", "B"), "BF16", vec![8, 4]));
        }
        out
    }

    fn header(tensors: &[(String, &str, Vec<u64>)]) -> BTreeMap<String, TensorEntry> {
        let spec: Vec<(&str, &str, &[u64])> = tensors
            .iter()
            .map(|(n, d, s)| (n.as_str(), *d, s.as_slice()))
            .collect();
        safetensors::read_header(
            "adapter_model.safetensors",
            &safetensors::tests::build(&spec),
        )
        .unwrap()
    }

    fn fits(
        config: &AdapterConfig,
        tensors: &[(String, &str, Vec<u64>)],
    ) -> Result<(), FormatError> {
        check_fits(
            config,
            &header(tensors),
            &base(),
            "adapter_model.safetensors",
        )
    }

    fn misfit(config: &AdapterConfig, tensors: &[(String, &str, Vec<u64>)]) -> String {
        fits(config, tensors).expect_err("should not fit").problem
    }

    #[test]
    fn reads_a_real_style_config() {
        let c = config(
            r#"{"alpha_pattern": {}, "auto_mapping": null,
                "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "bias": "none", "fan_in_fan_out": false, "inference_mode": true,
                "lora_alpha": 32, "lora_dropout": 0.05, "peft_type": "LORA", "r": 16,
                "target_modules": ["v_proj", "q_proj", "q_proj"], "task_type": "CAUSAL_LM"}"#,
        )
        .unwrap();
        assert_eq!(c.peft_type, "LORA");
        assert_eq!(c.r, 16);
        assert_eq!(c.lora_alpha, 32.0);
        assert_eq!(c.scaling(), 2.0);
        assert_eq!(c.target_modules, vec!["v_proj", "q_proj"]);
        assert_eq!(
            c.base_model_name_or_path.as_deref(),
            Some("HuggingFaceTB/SmolLM2-135M-Instruct")
        );
    }

    #[test]
    fn target_modules_may_be_a_string() {
        let c = config(r#"{"peft_type": "LORA", "r": 8, "target_modules": "q_proj"}"#).unwrap();
        assert_eq!(c.target_modules, vec!["q_proj"]);
        assert_eq!(c.lora_alpha, 8.0);
        assert_eq!(c.base_model_name_or_path, None);
        let c =
            config(r#"{"peft_type": "LORA", "r": 8, "target_modules": ".*\\.(v_proj|q_proj)$"}"#)
                .unwrap();
        assert_eq!(c.target_modules, vec!["q_proj", "v_proj"]);
        let c = config(r#"{"peft_type": "LORA", "r": 8, "target_modules": "all-linear"}"#).unwrap();
        assert_eq!(c.target_modules.len(), 7);
        assert!(
            problem(r#"{"peft_type": "LORA", "r": 8, "target_modules": ".*attn.*"}"#)
                .contains("names none of the modules")
        );
    }

    #[test]
    fn rejects_bad_configs() {
        assert!(problem("{").starts_with("invalid JSON: "));
        assert_eq!(problem("[]"), "the adapter config is not a JSON object");
        assert_eq!(
            problem(r#"{"peft_type": "IA3", "r": 8, "target_modules": ["q_proj"]}"#),
            "peft_type \"IA3\" is not supported; Kiln serves LORA adapters"
        );
        assert_eq!(
            problem(r#"{"r": 8, "target_modules": ["q_proj"]}"#),
            "missing peft_type"
        );
        assert_eq!(
            problem(r#"{"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}"#),
            "r = 2 is outside the supported range 4..=64"
        );
        assert_eq!(
            problem(r#"{"peft_type": "LORA", "r": 128, "target_modules": ["q_proj"]}"#),
            "r = 128 is outside the supported range 4..=64"
        );
        assert!(
            problem(r#"{"peft_type": "LORA", "r": 8.5, "target_modules": ["q_proj"]}"#)
                .starts_with("r must be a positive integer")
        );
        assert_eq!(
            problem(r#"{"peft_type": "LORA", "r": 8, "target_modules": []}"#),
            "target_modules is empty"
        );
        assert_eq!(
            problem(r#"{"peft_type": "LORA", "r": 8}"#),
            "missing target_modules"
        );
        assert!(
            problem(r#"{"peft_type": "LORA", "r": 8, "target_modules": [1]}"#)
                .contains("must list module names")
        );
        assert!(
            problem(
                r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 0, "target_modules": ["q_proj"]}"#
            )
            .contains("lora_alpha must be positive")
        );
        let err =
            config(r#"{"peft_type": "LORA", "r": 1, "target_modules": ["q_proj"]}"#).unwrap_err();
        assert!(err.to_string().starts_with("adapter_config.json: r = 1"));
    }

    #[test]
    fn a_matching_adapter_fits() {
        let config = lora_config(4, &["q_proj", "v_proj", "down_proj"]);
        fits(&config, &adapter()).unwrap();
        // `.default` before `.weight`, and only some layers.
        let tensors = vec![
            (
                "base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"
                    .to_string(),
                "F32",
                vec![4, 8],
            ),
            (
                "base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight"
                    .to_string(),
                "F32",
                vec![8, 4],
            ),
        ];
        fits(&config, &tensors).unwrap();
    }

    #[test]
    fn shape_mismatches_name_the_tensor_and_shapes() {
        let config = lora_config(4, &["q_proj", "v_proj", "down_proj"]);
        let mut tensors = adapter();
        // v_proj's lora_B written for a full-width (non-GQA) value projection.
        tensors[3].2 = vec![8, 4];
        assert_eq!(
            misfit(&config, &tensors),
            "tensor \"base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight\" has shape \
             [8, 4]; expected [4, 4] (r = 4, blk.0.attn_v.weight is 8 in × 4 out)"
        );
        // The config says r = 8 but the tensors are rank 4.
        let p = misfit(
            &lora_config(8, &["q_proj", "v_proj", "down_proj"]),
            &adapter(),
        );
        assert!(
            p.contains("has shape [4, 16]; expected [8, 16]") || p.contains("expected [8, 8]"),
            "{p}"
        );
        // lora_A transposed.
        let mut tensors = adapter();
        tensors[4].2 = vec![16, 4];
        let p = misfit(&config, &tensors);
        assert!(
            p.contains("mlp.down_proj.lora_A.weight\" has shape [16, 4]; expected [4, 16]"),
            "{p}"
        );
    }

    #[test]
    fn rejects_modules_the_base_lacks() {
        let config = lora_config(4, &["q_proj", "lm_head"]);
        assert!(
            misfit(&config, &adapter()).starts_with("target module \"lm_head\" has no counterpart")
        );
        let mut no_gate = base();
        no_gate.tensors.retain(|t| !t.name.contains("ffn_gate"));
        let err = check_fits(
            &lora_config(4, &["gate_proj"]),
            &header(&adapter()),
            &no_gate,
            "a.safetensors",
        )
        .unwrap_err();
        assert_eq!(
            err.problem,
            "target module \"gate_proj\" is not in the base model (it has no blk.0.ffn_gate.weight)"
        );
    }

    #[test]
    fn rejects_tensors_that_do_not_belong() {
        let config = lora_config(4, &["q_proj", "v_proj", "down_proj"]);
        // A layer the base does not have.
        let mut tensors = adapter();
        tensors.push((name(2, "self_attn", "q_proj", "A"), "F32", vec![4, 8]));
        assert!(
            misfit(&config, &tensors).contains("is for layer 2 but the base model has 2 layers")
        );
        // A module outside target_modules.
        let tensors = adapter();
        let p = misfit(&lora_config(4, &["q_proj", "v_proj"]), &tensors);
        assert!(
            p.contains("adapts down_proj, which is not in target_modules"),
            "{p}"
        );
        // Not a LoRA tensor at all.
        let mut tensors = adapter();
        tensors.push(("base_model.model.lm_head.weight".into(), "F32", vec![10, 8]));
        assert!(misfit(&config, &tensors).contains("is not a LoRA weight Kiln can apply"));
        // Wrong parent.
        let tensors = vec![
            (name(0, "mlp", "q_proj", "A"), "F32", vec![4, 8]),
            (name(0, "mlp", "q_proj", "B"), "F32", vec![8, 4]),
        ];
        assert!(
            misfit(&config, &tensors).contains("puts q_proj under \"mlp\"; expected \"self_attn\"")
        );
        // Integer weights.
        let mut tensors = adapter();
        tensors[0].1 = "I8";
        assert!(misfit(&config, &tensors).contains("has dtype I8"));
    }

    #[test]
    fn requires_complete_pairs_and_some_tensors() {
        let config = lora_config(4, &["q_proj", "v_proj", "down_proj"]);
        assert_eq!(misfit(&config, &[]), "the adapter has no LoRA tensors");
        let mut tensors = adapter();
        tensors.retain(|(n, _, _)| n != &name(1, "mlp", "down_proj", "B"));
        assert_eq!(
            misfit(&config, &tensors),
            "tensor \"base_model.model.model.layers.1.mlp.down_proj.lora_A.weight\" has no \
             matching lora_B"
        );
        let mut tensors = adapter();
        tensors.retain(|(n, _, _)| n != &name(0, "self_attn", "q_proj", "A"));
        assert!(misfit(&config, &tensors).contains("has no matching lora_A"));
    }

    #[test]
    fn needs_block_count() {
        let mut b = base();
        b.block_count = None;
        let err =
            check_fits(&lora_config(4, &["q_proj"]), &header(&adapter()), &b, "a").unwrap_err();
        assert!(err.problem.contains("no block_count"));
    }
}
