//! The rewrite on Kiln's own GGUF graphs (float and blocks) and on a real optimum export.

use super::*;
use crate::gguf::testdata::{tiny_llama, with_data};
use crate::onnx_proto::ModelProto;
use crate::{convert_gguf, read_onnx};

/// The tiny llama's graph: standard operators, or (`fused`) ONNX Runtime's fused operators
/// with q|k|v and gate|up side by side (its linears are too narrow for blocks: MatMulNBits
/// graphs are rewritten in the e2e suite, on SmolLM2 in INT4).
fn tiny_graph(fused: bool) -> Vec<u8> {
    let converted = convert_gguf(&with_data(tiny_llama(), 2 + 2 * 9), fused).unwrap();
    converted
        .files
        .into_iter()
        .find(|(n, _)| *n == "model.onnx")
        .unwrap()
        .1
}

fn optimum_export() -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data/llm/hf-optimum/tiny-llama/model.onnx");
    std::fs::read(path).unwrap()
}

/// Every linear of every layer gets its slots; everything else is kept. `products`: the
/// products a layer computes its seven linears in (and of them, `joined` side by side).
fn check_rewrite(
    original: &[u8],
    layers: usize,
    [products, joined]: [usize; 2],
    features: &[(&str, usize, usize)],
) {
    let (rewritten, linears) = add_lora_slots(original).unwrap();
    assert_eq!(linears.len(), layers * 7);
    for (module, inputs, outputs) in features {
        let l = linears
            .iter()
            .find(|l| l.layer == layers - 1 && l.module == *module)
            .unwrap_or_else(|| panic!("{module} of the last layer"));
        assert_eq!((l.inputs, l.outputs), (*inputs, *outputs), "{module}");
    }
    let before = read_onnx("model.onnx", original).unwrap();
    let after = read_onnx("model.onnx", &rewritten).unwrap();
    assert_eq!(after.outputs, before.outputs);
    assert_eq!(after.inputs[..before.inputs.len()], before.inputs[..]);
    assert_eq!(
        after.inputs.len(),
        before.inputs.len() + 1 + 2 * linears.len()
    );
    // Per linear A, the mask and B; per product the add, and the join of parts side by side.
    assert_eq!(
        after.node_count,
        before.node_count + 3 * linears.len() + layers * (products + joined)
    );
    let mask = after.input(LORA_MASK).unwrap();
    assert_eq!(mask.dims.len(), 3);
    assert!(after.input("lora.0.q_proj.a").is_some());
    assert!(
        after
            .input(&format!("lora.{}.down_proj.b", layers - 1))
            .is_some()
    );
    assert_eq!(
        (after.ir_version, after.opset),
        (before.ir_version, before.opset)
    );

    // The branch follows the linear it adapts and ends in the linear's old output.
    let model: ModelProto = ModelProto::decode(&rewritten[..]).unwrap();
    let nodes = model.graph.unwrap().node;
    let at = nodes
        .iter()
        .position(|n| n.output[0].ends_with(".lora_base"))
        .unwrap();
    let base = &nodes[at].output[0];
    // A, mask and B of each part (three for q|k|v), their join, the add.
    let parts = if joined > 0 { 3 } else { 1 };
    let add = &nodes[at + 3 * parts + usize::from(parts > 1) + 1];
    assert_eq!(add.op_type, "Add");
    assert_eq!(add.input[0], *base);
    assert_eq!(format!("{}.lora_base", add.output[0]), *base);
    assert_eq!(
        nodes[at + 1].input[0],
        nodes[at].input[0],
        "x feeds the branch"
    );

    // Once only.
    assert_eq!(
        add_lora_slots(&rewritten).unwrap_err(),
        "the graph already has a lora_mask input"
    );
}

#[test]
fn slots_go_into_graphs_prepared_from_gguf() {
    // The tiny llama: hidden 8, k/v 4, ffn 16.
    let features = [
        ("q_proj", 8, 8),
        ("k_proj", 8, 4),
        ("v_proj", 8, 4),
        ("down_proj", 16, 8),
    ];
    check_rewrite(&tiny_graph(false), 2, [7, 0], &features);
    // q|k|v and gate|up side by side: each part keeps its own slots and features.
    check_rewrite(&tiny_graph(true), 2, [4, 2], &features);
}

#[test]
fn slots_go_into_optimum_exports() {
    // hidden 64 (4 heads of 16), k/v 32 (2 kv heads), see tests/data/llm/hf-optimum.
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/data/llm/hf-optimum/tiny-llama/config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let hidden = config["hidden_size"].as_u64().unwrap() as usize;
    let ffn = config["intermediate_size"].as_u64().unwrap() as usize;
    let kv = hidden / config["num_attention_heads"].as_u64().unwrap() as usize
        * config["num_key_value_heads"].as_u64().unwrap() as usize;
    let layers = config["num_hidden_layers"].as_u64().unwrap() as usize;
    check_rewrite(
        &optimum_export(),
        layers,
        [7, 0],
        &[
            ("q_proj", hidden, hidden),
            ("v_proj", hidden, kv),
            ("o_proj", hidden, hidden),
            ("up_proj", hidden, ffn),
            ("down_proj", ffn, hidden),
        ],
    );
}

#[test]
fn a_graph_without_llama_linears_is_refused() {
    let mut model: ModelProto = ModelProto::decode(&tiny_graph(false)[..]).unwrap();
    let graph = model.graph.as_mut().unwrap();
    graph
        .node
        .retain(|n| !n.input.iter().any(|i| i.starts_with("blk.")));
    let problem = add_lora_slots(&model.encode_to_vec()).unwrap_err();
    assert!(
        problem.starts_with("no linear layer LoRA adapts was found"),
        "{problem}"
    );
    assert_eq!(
        add_lora_slots(&[]).unwrap_err(),
        "the model has no graph, or more than one"
    );
}

/// The float32 values of initializer `name`.
fn initializer(model: &[u8], name: &str) -> Vec<f32> {
    let model: ModelProto = ModelProto::decode(model).unwrap();
    let tensor = model
        .graph
        .unwrap()
        .initializer
        .into_iter()
        .find(|t| t.name == name)
        .unwrap();
    tensor
        .raw_data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn live_merge_adds_the_update_into_float_weights() {
    use crate::peft::{LoraLinear, LoraWeights};
    let graph = tiny_graph(false);
    // q_proj of layer 1 (8 in, 8 out), rank 1: A = [1, 2, …, 8], B (scaled) = [0.5; 8].
    let mut linears = std::collections::BTreeMap::new();
    linears.insert(
        (1, "q_proj"),
        LoraLinear {
            inputs: 8,
            outputs: 8,
            a: (1..=8).map(|i| i as f32).collect(),
            b: vec![0.5; 8],
        },
    );
    let adapter = LoraWeights { rank: 1, linears };
    let merged = merge_lora(&graph, &adapter).unwrap().unwrap();
    let (before, after) = (
        initializer(&graph, "blk.1.attn_q"),
        initializer(&merged, "blk.1.attn_q"),
    );
    for i in 0..8 {
        for o in 0..8 {
            let want = before[i * 8 + o] + (i + 1) as f32 * 0.5;
            assert_eq!(after[i * 8 + o], want, "[{i}][{o}]");
        }
    }
    assert_eq!(
        initializer(&merged, "blk.0.attn_q"),
        initializer(&graph, "blk.0.attn_q")
    );
    let (b, a) = (
        read_onnx("m", &graph).unwrap(),
        read_onnx("m", &merged).unwrap(),
    );
    assert_eq!((a.inputs, a.node_count), (b.inputs, b.node_count));

    // A linear the graph does not have.
    let mut far = adapter.clone();
    let q = far.linears.remove(&(1, "q_proj")).unwrap();
    far.linears.insert((5, "q_proj"), q);
    assert_eq!(
        merge_lora(&graph, &far).unwrap_err(),
        "the adapter adapts layer 5's q_proj, which the graph does not have"
    );
}
