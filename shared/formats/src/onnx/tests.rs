//! The ONNX reader's tests, on graphs built here and on the real MiniLM model.

use super::interface::*;
use super::task::{Task, check_task};
use crate::error::FormatError;
use crate::onnx_proto::{
    GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, ValueInfoProto, elem_type,
    value_info,
};
use prost::Message as _;

/// Element types the reader has no name constant for.
const INT8: i32 = 3;
const INT32: i32 = 6;

/// A tensor value; each dimension a size, a name, or (`""`) unknown.
fn value(name: &str, elem_type: i32, dims: &[&str]) -> ValueInfoProto {
    let dims: Vec<Dim> = dims
        .iter()
        .map(|d| match d.parse::<i64>() {
            Ok(v) => Dim::Fixed(v),
            Err(_) if d.is_empty() => Dim::Unknown,
            Err(_) => Dim::Symbolic(d.to_string()),
        })
        .collect();
    value_info(name, elem_type, &dims)
}

fn model(inputs: Vec<ValueInfoProto>, outputs: Vec<ValueInfoProto>) -> Vec<u8> {
    let model: ModelProto = ModelProto {
        ir_version: 8,
        producer_name: "test".into(),
        graph: Some(GraphProto {
            node: ["MatMul", "Relu"]
                .map(|op_type| NodeProto {
                    op_type: op_type.into(),
                    ..Default::default()
                })
                .into(),
            name: "g".into(),
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        opset_import: vec![
            OperatorSetIdProto {
                domain: "com.microsoft".into(),
                version: 1,
            },
            OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            },
        ],
        ..Default::default()
    };
    model.encode_to_vec()
}

fn embedding_model() -> Vec<u8> {
    use elem_type::*;
    model(
        vec![
            value("input_ids", INT64, &["batch_size", "sequence_length"]),
            value("attention_mask", INT64, &["batch_size", "sequence_length"]),
            value("token_type_ids", INT64, &["batch_size", "sequence_length"]),
        ],
        vec![value(
            "last_hidden_state",
            FLOAT,
            &["batch_size", "sequence_length", "384"],
        )],
    )
}

fn decoder(layers: u32, with_present: bool) -> OnnxInfo {
    use elem_type::*;
    let mut inputs = vec![
        value("input_ids", INT64, &["batch", "seq"]),
        value("attention_mask", INT64, &["batch", "total"]),
        value("position_ids", INT64, &["batch", "seq"]),
    ];
    let mut outputs = vec![value("logits", FLOAT, &["batch", "seq", "49152"])];
    for i in 0..layers {
        for kind in ["key", "value"] {
            inputs.push(value(
                &format!("past_key_values.{i}.{kind}"),
                FLOAT,
                &["batch", "3", "past", "64"],
            ));
            if with_present {
                outputs.push(value(
                    &format!("present.{i}.{kind}"),
                    FLOAT,
                    &["batch", "3", "total", "64"],
                ));
            }
        }
    }
    read_onnx("decoder.onnx", &model(inputs, outputs)).unwrap()
}

/// A plain tensor model (an image classifier).
fn tensor_model() -> OnnxInfo {
    use elem_type::*;
    read_onnx(
        "classifier.onnx",
        &model(
            vec![value("pixels", FLOAT, &["N", "3", "224", "224"])],
            vec![value("probs", FLOAT, &["N", "1000"])],
        ),
    )
    .unwrap()
}

fn problem(r: Result<(), FormatError>) -> String {
    r.expect_err("should be rejected").problem
}

#[test]
fn reads_the_interface() {
    let info = read_onnx("m.onnx", &embedding_model()).unwrap();
    assert_eq!(info.ir_version, 8);
    assert_eq!(info.opset, 17);
    assert_eq!(info.producer, "test");
    assert_eq!(info.node_count, 2);
    assert_eq!(info.inputs.len(), 3);
    assert_eq!(
        info.inputs[0],
        TensorSpec {
            name: "input_ids".into(),
            elem_type: elem_type::INT64,
            dims: vec![
                Dim::Symbolic("batch_size".into()),
                Dim::Symbolic("sequence_length".into())
            ],
        }
    );
    assert_eq!(
        info.outputs[0].dims,
        vec![
            Dim::Symbolic("batch_size".into()),
            Dim::Symbolic("sequence_length".into()),
            Dim::Fixed(384)
        ]
    );
    assert_eq!(
        info.outputs[0].to_string(),
        "last_hidden_state: float[batch_size, sequence_length, 384]"
    );
}

#[test]
fn skips_initializers_and_reads_ai_onnx_opset() {
    // A GraphProto.initializer with 1 MiB of raw data: the reader steps over it.
    let model: ModelProto = ModelProto {
        ir_version: 9,
        graph: Some(GraphProto {
            name: "g".into(),
            initializer: vec![TensorProto {
                raw_data: vec![7u8; 1 << 20],
                ..Default::default()
            }],
            input: vec![value("x", elem_type::FLOAT, &["", "4"])],
            output: vec![value("y", elem_type::FLOAT, &["4"])],
            ..Default::default()
        }),
        opset_import: vec![OperatorSetIdProto {
            domain: "ai.onnx".into(),
            version: 19,
        }],
        ..Default::default()
    };
    let bytes = model.encode_to_vec();
    let info = read_onnx("w.onnx", &bytes).unwrap();
    assert_eq!(info.opset, 19);
    assert_eq!(info.inputs[0].dims, vec![Dim::Unknown, Dim::Fixed(4)]);
    check_task("w.onnx", &info, Task::Tensor).unwrap();
}

#[test]
fn rejects_what_is_not_an_onnx_model() {
    let err = read_onnx("x.onnx", b"\xff\xff\xff\xff garbage").unwrap_err();
    assert!(err.problem.starts_with("not an ONNX model: "), "{err}");
    let err = read_onnx("x.onnx", b"").unwrap_err();
    assert_eq!(
        err.to_string(),
        "x.onnx: not an ONNX model: it has no graph"
    );
    let no_ir: ModelProto = ModelProto {
        ir_version: 0,
        graph: Some(GraphProto::default()),
        ..Default::default()
    };
    let no_ir = no_ir.encode_to_vec();
    assert_eq!(
        read_onnx("x.onnx", &no_ir).unwrap_err().problem,
        "not an ONNX model: it has no IR version"
    );
}

#[test]
fn task_names_round_trip() {
    for task in Task::ALL {
        assert_eq!(Task::parse(task.as_str()), Some(task));
    }
    assert_eq!(Task::parse("text-generation"), Some(Task::TextGeneration));
    assert_eq!(Task::parse("chat"), None);
    assert_eq!(Task::Embedding.to_string(), "embedding");
}

#[test]
fn checks_embedding_models() {
    let info = read_onnx("m.onnx", &embedding_model()).unwrap();
    check_task("m.onnx", &info, Task::Embedding).unwrap();

    let mut no_tt = info.clone();
    no_tt.inputs.retain(|t| t.name != "token_type_ids");
    check_task("m.onnx", &no_tt, Task::Embedding).unwrap();

    let mut no_mask = info.clone();
    no_mask.inputs.retain(|t| t.name != "attention_mask");
    let err = check_task("m.onnx", &no_mask, Task::Embedding).unwrap_err();
    assert_eq!(
        err.to_string(),
        "m.onnx: cannot serve the embedding task: it has no input \"attention_mask\""
    );

    let mut int32_ids = info.clone();
    int32_ids.inputs[0].elem_type = INT32;
    assert_eq!(
        problem(check_task("m.onnx", &int32_ids, Task::Embedding)),
        "cannot serve the embedding task: input \"input_ids\" is int32, expected int64"
    );

    let mut rank2 = info.clone();
    rank2.outputs[0].dims.pop();
    assert!(
        problem(check_task("m.onnx", &rank2, Task::Embedding))
            .contains("output \"last_hidden_state\" has rank 2, expected 3")
    );

    let mut sentence = info.clone();
    sentence.outputs = vec![TensorSpec {
        name: "sentence_embedding".into(),
        elem_type: elem_type::FLOAT,
        dims: vec![Dim::Symbolic("batch".into()), Dim::Fixed(384)],
    }];
    check_task("m.onnx", &sentence, Task::Embedding).unwrap();

    let mut int_out = info.clone();
    int_out.outputs[0].elem_type = INT8;
    assert!(
        problem(check_task("m.onnx", &int_out, Task::Embedding))
            .contains("output \"last_hidden_state\" is int8, expected a float type")
    );

    let mut wrong_out = info.clone();
    wrong_out.outputs[0].name = "pooler_output".into();
    assert!(
        problem(check_task("m.onnx", &wrong_out, Task::Embedding))
            .contains("(its outputs: pooler_output)")
    );

    let mut extra = info.clone();
    extra.inputs.push(TensorSpec {
        name: "pixel_values".into(),
        elem_type: elem_type::FLOAT,
        dims: vec![],
    });
    assert!(
        problem(check_task("m.onnx", &extra, Task::Embedding))
            .contains("input \"pixel_values\" is not one Kiln feeds")
    );
}

#[test]
fn checks_text_generation_models() {
    check_task("d.onnx", &decoder(0, false), Task::TextGeneration).unwrap();
    check_task("d.onnx", &decoder(3, true), Task::TextGeneration).unwrap();

    assert_eq!(
        problem(check_task(
            "d.onnx",
            &decoder(2, false),
            Task::TextGeneration
        )),
        "cannot serve the text-generation task: input \"past_key_values.0.key\" has no \
         matching output \"present.0.key\""
    );

    let mut one_missing = decoder(2, true);
    one_missing.outputs.retain(|t| t.name != "present.1.value");
    assert!(
        problem(check_task("d.onnx", &one_missing, Task::TextGeneration))
            .contains("\"past_key_values.1.value\" has no matching output \"present.1.value\"")
    );

    let mut no_logits = decoder(1, true);
    no_logits.outputs.retain(|t| t.name != "logits");
    assert!(
        problem(check_task("d.onnx", &no_logits, Task::TextGeneration))
            .contains("it has no output \"logits\"")
    );

    let mut no_mask = decoder(1, true);
    no_mask.inputs.retain(|t| t.name != "attention_mask");
    assert!(
        problem(check_task("d.onnx", &no_mask, Task::TextGeneration))
            .contains("it has no input \"attention_mask\"")
    );

    let emb = read_onnx("m.onnx", &embedding_model()).unwrap();
    assert!(
        problem(check_task("m.onnx", &emb, Task::TextGeneration))
            .contains("it has no output \"logits\"")
    );
}

#[test]
fn checks_tensor_models() {
    check_task("c.onnx", &tensor_model(), Task::Tensor).unwrap();
    let mut no_outputs = tensor_model();
    no_outputs.outputs.clear();
    assert_eq!(
        problem(check_task("c.onnx", &no_outputs, Task::Tensor)),
        "cannot serve the tensor task: it has no outputs"
    );
    let mut untyped = tensor_model();
    untyped.inputs[0].elem_type = 0;
    assert_eq!(
        problem(check_task("c.onnx", &untyped, Task::Tensor)),
        "cannot serve the tensor task: input \"pixels\" has an unknown element type (0)"
    );
    assert!(
        problem(check_task("c.onnx", &tensor_model(), Task::Embedding))
            .contains("no input \"input_ids\"")
    );
}

#[test]
fn reads_the_real_minilm_model() {
    let path = crate::test_asset("all-minilm-l6-v2/model.onnx");
    let bytes = std::fs::read(&path).unwrap();
    let info = read_onnx("model.onnx", &bytes).unwrap();
    println!(
        "{}: ir {} opset {} producer {:?}, {} nodes",
        path.display(),
        info.ir_version,
        info.opset,
        info.producer,
        info.node_count
    );
    for t in &info.inputs {
        println!("  input  {t}");
    }
    for t in &info.outputs {
        println!("  output {t}");
    }
    assert!(info.node_count > 0);
    assert!(info.opset > 0);
    check_task("model.onnx", &info, Task::Embedding).unwrap();
    let out = info.output("last_hidden_state").expect("last_hidden_state");
    assert_eq!(out.elem_type, elem_type::FLOAT);
    assert_eq!(out.dims.last(), Some(&Dim::Fixed(384)));
}
