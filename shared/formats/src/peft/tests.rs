//! The PEFT reader's tests: adapter configs and adapters checked against a small llama base.

use super::*;
use crate::gguf::testdata::tiny_llama;
use crate::safetensors;

fn config(json: &str) -> Result<AdapterConfig, FormatError> {
    read_adapter_config("adapter_config.json", json.as_bytes())
}

fn problem(json: &str) -> String {
    config(json).expect_err("should be rejected").problem
}

/// The GGUF tests' tiny llama: two layers, hidden 8, 2 heads / 1 kv head of 4 (k/v project
/// to 4), ffn 16.
fn base() -> GgufInfo {
    crate::read_gguf("base.gguf", &tiny_llama()[..]).unwrap()
}

fn lora_config(r: u32, modules: &[&str]) -> AdapterConfig {
    AdapterConfig {
        r,
        lora_alpha: 16.0,
        target_modules: modules.iter().map(|m| m.to_string()).collect(),
        base_model_name_or_path: None,
        use_rslora: false,
        scale: 16.0 / f64::from(r),
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
    safetensors::read_safetensors_header(
        "adapter_model.safetensors",
        &safetensors::tests::build(&spec),
    )
    .unwrap()
}

fn fits(config: &AdapterConfig, tensors: &[(String, &str, Vec<u64>)]) -> Result<(), FormatError> {
    check_adapter_fits(
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
    assert_eq!(c.r, 16);
    assert_eq!(c.lora_alpha, 32.0);
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
    let c = config(r#"{"peft_type": "LORA", "r": 8, "target_modules": ".*\\.(v_proj|q_proj)$"}"#)
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
        problem(r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 0, "target_modules": ["q_proj"]}"#)
            .contains("lora_alpha must be positive")
    );
    let err = config(r#"{"peft_type": "LORA", "r": 1, "target_modules": ["q_proj"]}"#).unwrap_err();
    assert!(err.to_string().starts_with("adapter_config.json: r = 1"));
}

/// What would be applied wrongly is refused with the field's name, never served mis-scaled.
#[test]
fn refuses_what_cannot_be_applied_as_trained() {
    let with = |extra: &str| {
        problem(&format!(
            r#"{{"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"], {extra}}}"#
        ))
    };
    assert!(with(r#""fan_in_fan_out": true"#).starts_with("fan_in_fan_out is true: "));
    assert!(with(r#""bias": "all""#).starts_with("bias is \"all\": "));
    assert!(with(r#""bias": "lora_only""#).starts_with("bias is \"lora_only\""));
    assert!(with(r#""use_dora": true"#).starts_with("use_dora is true"));
    assert!(with(r#""rank_pattern": {"q_proj": 16}"#).starts_with("rank_pattern is "));
    assert!(with(r#""alpha_pattern": {"q_proj": 16}"#).starts_with("alpha_pattern is "));
    assert!(with(r#""modules_to_save": ["lm_head"]"#).starts_with("modules_to_save is "));
    assert!(with(r#""use_rslora": "yes""#).starts_with("use_rslora must be true or false"));
    // Their harmless values pass.
    config(
        r#"{"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"], "fan_in_fan_out": false,
            "bias": "none", "use_dora": false, "rank_pattern": {}, "alpha_pattern": {},
            "modules_to_save": null}"#,
    )
    .unwrap();
}

#[test]
fn rslora_scales_by_the_square_root_of_r() {
    let plain =
        config(r#"{"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj"]}"#)
            .unwrap();
    assert!(!plain.use_rslora);
    assert_eq!(plain.scale, 2.0);
    let rs = config(
        r#"{"peft_type": "LORA", "r": 16, "lora_alpha": 32, "use_rslora": true, "target_modules": ["q_proj"]}"#,
    )
    .unwrap();
    assert!(rs.use_rslora);
    assert_eq!(rs.scale, 8.0);
}

#[test]
fn a_matching_adapter_fits() {
    let config = lora_config(4, &["q_proj", "v_proj", "down_proj"]);
    fits(&config, &adapter()).unwrap();
    // `.default` before `.weight`, and only some layers.
    let tensors = vec![
        (
            "base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight".to_string(),
            "F32",
            vec![4, 8],
        ),
        (
            "base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight".to_string(),
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
    let err = check_adapter_fits(
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
    tensors.push((name(2, "self_attn", "q_proj", "B"), "F32", vec![8, 4]));
    assert!(misfit(&config, &tensors).contains("is for layer 2 but the base model has 2 layers"));
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
        check_adapter_fits(&lora_config(4, &["q_proj"]), &header(&adapter()), &b, "a").unwrap_err();
    assert!(err.problem.contains("no block_count"));
}

#[test]
fn weights_are_read_with_the_scale_folded_into_b() {
    let a: Vec<f32> = (0..4 * 8).map(|i| i as f32 * 0.5).collect();
    let b: Vec<f32> = (0..8 * 4).map(|i| 1.0 - i as f32).collect();
    let bytes = safetensors::write_safetensors_f32(&[
        (&name(1, "self_attn", "q_proj", "A"), &[4, 8], &a),
        (&name(1, "self_attn", "q_proj", "B"), &[8, 4], &b),
    ]);
    let mut config = lora_config(4, &["q_proj", "v_proj"]);
    let weights = read_lora_weights(&config, &bytes, "adapter_model.safetensors").unwrap();
    assert_eq!(weights.rank, 4);
    let q = &weights.linears[&(1, "q_proj")];
    assert_eq!((q.inputs, q.outputs), (8, 8));
    assert_eq!(q.a, a);
    // lora_alpha 16 / r 4.
    assert_eq!(q.b, b.iter().map(|v| v * 4.0).collect::<Vec<_>>());
    config.scale = 8.0;
    let weights = read_lora_weights(&config, &bytes, "adapter_model.safetensors").unwrap();
    assert_eq!(
        weights.linears[&(1, "q_proj")].b,
        b.iter().map(|v| v * 8.0).collect::<Vec<_>>()
    );
    assert_eq!(weights.bytes(), 4 * (32 + 32));

    // A rank other than the config's.
    let err = read_lora_weights(&lora_config(8, &["q_proj"]), &bytes, "a.safetensors").unwrap_err();
    assert!(
        err.problem.contains("are not of rank r = 8"),
        "{}",
        err.problem
    );
}

#[test]
fn half_precision_weights_are_widened() {
    // 1.5 in F16 (0x3e00) and BF16 (0x3fc0).
    let spec = [
        (name(0, "self_attn", "v_proj", "A"), "F16", vec![4u64, 8]),
        (name(0, "self_attn", "v_proj", "B"), "BF16", vec![4u64, 4]),
    ];
    let spec: Vec<(&str, &str, &[u64])> = spec
        .iter()
        .map(|(n, d, s)| (n.as_str(), *d, s.as_slice()))
        .collect();
    let mut file = safetensors::tests::build(&spec);
    let data_start = file.len() - (32 + 16) * 2;
    for (i, chunk) in file[data_start..].chunks_exact_mut(2).enumerate() {
        let bits: u16 = if i < 32 { 0x3e00 } else { 0x3fc0 };
        chunk.copy_from_slice(&bits.to_le_bytes());
    }
    let weights = read_lora_weights(
        &lora_config(4, &["v_proj"]),
        &file,
        "adapter_model.safetensors",
    )
    .unwrap();
    let v = &weights.linears[&(0, "v_proj")];
    assert!(v.a.iter().all(|&x| x == 1.5));
    assert!(v.b.iter().all(|&x| x == 1.5 * 4.0));
}

/// What a trainer writes reads back as the same adapter, and fits the base it was made for.
#[test]
fn a_written_adapter_reads_back_and_fits_its_base() {
    let mut linears = BTreeMap::new();
    for layer in 0..2 {
        linears.insert(
            (layer, "q_proj"),
            LoraLinear {
                inputs: 8,
                outputs: 8,
                a: (0..32).map(|i| i as f32 / 8.0).collect(),
                b: (0..32).map(|i| 1.0 - i as f32 / 16.0).collect(),
            },
        );
        linears.insert(
            (layer, "down_proj"),
            LoraLinear {
                inputs: 16,
                outputs: 8,
                a: vec![0.25; 64],
                b: vec![-0.5; 32],
            },
        );
    }
    let (config_bytes, weights_bytes) = write_peft_adapter(4, 8.0, "tiny", &linears);
    let config = read_adapter_config("adapter_config.json", &config_bytes).unwrap();
    assert_eq!((config.r, config.lora_alpha, config.scale), (4, 8.0, 2.0));
    assert_eq!(config.target_modules, ["q_proj", "down_proj"]);
    assert_eq!(config.base_model_name_or_path.as_deref(), Some("tiny"));
    let header = safetensors::read_safetensors_header("a", &weights_bytes).unwrap();
    check_adapter_fits(&config, &header, &base(), "a").unwrap();
    let read = read_lora_weights(&config, &weights_bytes, "a").unwrap();
    assert_eq!(read.rank, 4);
    for (key, written) in &linears {
        let got = &read.linears[key];
        assert_eq!(got.a, written.a, "{key:?}");
        let scaled: Vec<f32> = written.b.iter().map(|v| v * 2.0).collect();
        assert_eq!(got.b, scaled, "{key:?}");
    }
}
