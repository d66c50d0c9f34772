//! The interface of an ONNX model: opset, producer, graph inputs and outputs, and the task it
//! serves.
//!
//! The messages below are a subset of `onnx/onnx.proto3` with the official field numbers.
//! Fields not declared here are skipped by the decoder without being kept; in particular
//! `GraphProto.initializer` (field 5, the weights) and `NodeProto.attribute` (field 5, which holds
//! `Constant` tensors) are left out, so reading a model allocates little beyond its interface.
//! Models whose weights live in external data files read the same way (only the graph file is
//! needed).

use super::FormatError;

/// `ModelProto` (subset).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelProto {
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    #[prost(string, tag = "2")]
    pub producer_name: String,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
}

/// `OperatorSetIdProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(int64, tag = "2")]
    pub version: i64,
}

/// `GraphProto` (subset; no `initializer`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
}

/// `NodeProto` (subset; no inputs, outputs or attributes).
#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeProto {
    #[prost(string, tag = "4")]
    pub op_type: String,
    #[prost(string, tag = "7")]
    pub domain: String,
}

/// `ValueInfoProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

/// `TypeProto` (tensor types only; sequence and map types decode as `value: None`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TypeProto {
    #[prost(oneof = "type_proto::Value", tags = "1")]
    pub value: Option<type_proto::Value>,
}

pub mod type_proto {
    /// `TypeProto.Tensor`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Tensor {
        #[prost(int32, tag = "1")]
        pub elem_type: i32,
        #[prost(message, optional, tag = "2")]
        pub shape: Option<super::TensorShapeProto>,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        #[prost(message, tag = "1")]
        TensorType(Tensor),
    }
}

/// `TensorShapeProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<tensor_shape_proto::Dimension>,
}

pub mod tensor_shape_proto {
    /// `TensorShapeProto.Dimension`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dimension {
        #[prost(oneof = "dimension::Value", tags = "1, 2")]
        pub value: Option<dimension::Value>,
    }

    pub mod dimension {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Value {
            #[prost(int64, tag = "1")]
            DimValue(i64),
            #[prost(string, tag = "2")]
            DimParam(String),
        }
    }
}

/// `TensorProto.DataType` values Kiln looks at.
pub mod elem_type {
    pub const UNDEFINED: i32 = 0;
    pub const FLOAT: i32 = 1;
    pub const UINT8: i32 = 2;
    pub const INT8: i32 = 3;
    pub const INT32: i32 = 6;
    pub const INT64: i32 = 7;
    pub const BOOL: i32 = 9;
    pub const FLOAT16: i32 = 10;
    pub const DOUBLE: i32 = 11;
    pub const BFLOAT16: i32 = 16;
}

/// The ONNX name of an element type (`"float"`, `"int64"`, …), or `None` when unknown.
pub fn elem_type_name(elem_type: i32) -> Option<&'static str> {
    Some(match elem_type {
        1 => "float",
        2 => "uint8",
        3 => "int8",
        4 => "uint16",
        5 => "int16",
        6 => "int32",
        7 => "int64",
        8 => "string",
        9 => "bool",
        10 => "float16",
        11 => "double",
        12 => "uint32",
        13 => "uint64",
        14 => "complex64",
        15 => "complex128",
        16 => "bfloat16",
        17 => "float8e4m3fn",
        18 => "float8e4m3fnuz",
        19 => "float8e5m2",
        20 => "float8e5m2fnuz",
        21 => "uint4",
        22 => "int4",
        23 => "float4e2m1",
        _ => return None,
    })
}

fn is_float(elem_type: i32) -> bool {
    use elem_type::*;
    matches!(elem_type, FLOAT | FLOAT16 | DOUBLE | BFLOAT16)
}

/// One dimension of a graph input or output.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    Fixed(i64),
    /// A named dynamic dimension (`batch_size`, `sequence_length`, …).
    Symbolic(String),
    /// Dynamic and unnamed.
    Unknown,
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(v) => write!(f, "{v}"),
            Dim::Symbolic(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// A graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    /// A `TensorProto.DataType` (0 when not a tensor or not given).
    pub elem_type: i32,
    /// Empty when the rank is not given (or the value is a scalar).
    pub dims: Vec<Dim>,
}

impl std::fmt::Display for TensorSpec {
    /// `input_ids: int64[batch_size, sequence_length]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ty = elem_type_name(self.elem_type).unwrap_or("unknown");
        let dims: Vec<String> = self.dims.iter().map(Dim::to_string).collect();
        write!(f, "{}: {ty}[{}]", self.name, dims.join(", "))
    }
}

/// The interface of an ONNX model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnnxInfo {
    pub ir_version: i64,
    /// The version of the default (`""` / `"ai.onnx"`) operator set; 0 when not imported.
    pub opset: i64,
    pub producer: String,
    pub node_count: usize,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

impl OnnxInfo {
    pub fn input(&self, name: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|t| t.name == name)
    }

    pub fn output(&self, name: &str) -> Option<&TensorSpec> {
        self.outputs.iter().find(|t| t.name == name)
    }
}

/// Reads the interface of a serialized `ModelProto`.
pub fn read_onnx(file: &str, bytes: &[u8]) -> Result<OnnxInfo, FormatError> {
    use prost::Message as _;
    let model = ModelProto::decode(bytes)
        .map_err(|e| FormatError::new(file, format!("not an ONNX model: {e}")))?;
    let Some(graph) = model.graph else {
        return Err(FormatError::new(file, "not an ONNX model: it has no graph"));
    };
    if model.ir_version <= 0 {
        return Err(FormatError::new(
            file,
            "not an ONNX model: it has no IR version",
        ));
    }
    let opset = model
        .opset_import
        .iter()
        .filter(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .max()
        .unwrap_or(0);
    Ok(OnnxInfo {
        ir_version: model.ir_version,
        opset,
        producer: model.producer_name,
        node_count: graph.node.len(),
        inputs: graph.input.into_iter().map(spec).collect(),
        outputs: graph.output.into_iter().map(spec).collect(),
    })
}

fn spec(value: ValueInfoProto) -> TensorSpec {
    use tensor_shape_proto::dimension::Value as D;
    let (elem_type, dims) = match value.r#type.and_then(|t| t.value) {
        Some(type_proto::Value::TensorType(t)) => {
            let dims = t
                .shape
                .map(|s| {
                    s.dim
                        .into_iter()
                        .map(|d| match d.value {
                            Some(D::DimValue(v)) => Dim::Fixed(v),
                            Some(D::DimParam(p)) if !p.is_empty() => Dim::Symbolic(p),
                            _ => Dim::Unknown,
                        })
                        .collect()
                })
                .unwrap_or_default();
            (t.elem_type, dims)
        }
        None => (elem_type::UNDEFINED, Vec::new()),
    };
    TensorSpec {
        name: value.name,
        elem_type,
        dims,
    }
}

/// What a model bundle serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Task {
    /// Token ids in, one vector per input out (`CreateEmbeddings`).
    Embedding,
    /// A causal LM with logits (completions and chat completions).
    TextGeneration,
    /// Any tensors in, tensors out (the Open Inference Protocol).
    Tensor,
}

impl Task {
    pub const ALL: [Task; 3] = [Task::Embedding, Task::TextGeneration, Task::Tensor];

    pub fn as_str(self) -> &'static str {
        match self {
            Task::Embedding => "embedding",
            Task::TextGeneration => "text-generation",
            Task::Tensor => "tensor",
        }
    }

    /// The inverse of [`Task::as_str`].
    pub fn parse(s: &str) -> Option<Task> {
        Task::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

const EMBEDDING_OUTPUTS: [&str; 3] = [
    "last_hidden_state",
    "sentence_embedding",
    "token_embeddings",
];
const EMBEDDING_INPUTS: [&str; 3] = ["input_ids", "attention_mask", "token_type_ids"];
const GENERATION_INPUTS: [&str; 3] = ["input_ids", "attention_mask", "position_ids"];

/// The task a model's interface suggests: `input_ids` in and `logits` out is text generation;
/// `input_ids` and `attention_mask` in and hidden states or sentence embeddings out is
/// embedding; anything else is a plain tensor model.
pub fn infer_task(info: &OnnxInfo) -> Task {
    let has_in = |n: &str| info.input(n).is_some();
    let has_out = |n: &str| info.output(n).is_some();
    if has_in("input_ids") && has_out("logits") {
        Task::TextGeneration
    } else if has_in("input_ids")
        && has_in("attention_mask")
        && EMBEDDING_OUTPUTS.iter().any(|n| has_out(n))
    {
        Task::Embedding
    } else {
        Task::Tensor
    }
}

/// Whether the model can serve `task` the way Kiln's engine feeds it:
///
/// - embedding: int64 `input_ids` and `attention_mask` (and optionally `token_type_ids`), no
///   other input, and a float output `last_hidden_state` or `token_embeddings` of rank 3, or
///   `sentence_embedding` of rank 2;
/// - text generation: int64 `input_ids` and `attention_mask` (optionally `position_ids`), a
///   float `logits` output, and for every `past_key_values.N.key|value` input the matching
///   `present.N.key|value` output (the HF-optimum decoder-with-past convention);
/// - tensor: at least one input and one output, all of known element types.
pub fn check_task(file: &str, info: &OnnxInfo, task: Task) -> Result<(), FormatError> {
    let fail = |problem: String| {
        Err(FormatError::new(
            file,
            format!("cannot serve the {task} task: {problem}"),
        ))
    };
    let int64_input = |name: &str| -> Result<(), FormatError> {
        match info.input(name) {
            None => fail(format!("it has no input {name:?}")),
            Some(t) if t.elem_type != elem_type::INT64 => fail(format!(
                "input {name:?} is {}, expected int64",
                type_name(t.elem_type)
            )),
            Some(_) => Ok(()),
        }
    };
    match task {
        Task::Embedding => {
            int64_input("input_ids")?;
            int64_input("attention_mask")?;
            if info.input("token_type_ids").is_some() {
                int64_input("token_type_ids")?;
            }
            if let Some(extra) = info
                .inputs
                .iter()
                .find(|t| !EMBEDDING_INPUTS.contains(&t.name.as_str()))
            {
                return fail(format!(
                    "input {:?} is not one Kiln feeds to an embedding model (it feeds \
                     input_ids, attention_mask and token_type_ids)",
                    extra.name
                ));
            }
            let Some(out) = info
                .outputs
                .iter()
                .find(|t| EMBEDDING_OUTPUTS.contains(&t.name.as_str()))
            else {
                return fail(format!(
                    "it has no output last_hidden_state, token_embeddings or \
                     sentence_embedding (its outputs: {})",
                    names(&info.outputs)
                ));
            };
            let want_rank = if out.name == "sentence_embedding" {
                2
            } else {
                3
            };
            if !is_float(out.elem_type) {
                return fail(format!(
                    "output {:?} is {}, expected a float type",
                    out.name,
                    type_name(out.elem_type)
                ));
            }
            if out.dims.len() != want_rank {
                return fail(format!(
                    "output {:?} has rank {}, expected {want_rank}",
                    out.name,
                    out.dims.len()
                ));
            }
            Ok(())
        }
        Task::TextGeneration => {
            int64_input("input_ids")?;
            int64_input("attention_mask")?;
            if info.input("position_ids").is_some() {
                int64_input("position_ids")?;
            }
            match info.output("logits") {
                None => {
                    return fail(format!(
                        "it has no output \"logits\" (its outputs: {})",
                        names(&info.outputs)
                    ));
                }
                Some(t) if !is_float(t.elem_type) => {
                    return fail(format!(
                        "output \"logits\" is {}, expected a float type",
                        type_name(t.elem_type)
                    ));
                }
                Some(_) => {}
            }
            for input in &info.inputs {
                let name = input.name.as_str();
                if let Some(rest) = name.strip_prefix("past_key_values.") {
                    let present = format!("present.{rest}");
                    let well_formed = rest.split_once('.').is_some_and(|(layer, kind)| {
                        layer.parse::<u32>().is_ok() && (kind == "key" || kind == "value")
                    });
                    if !well_formed {
                        return fail(format!(
                            "input {name:?} is not named past_key_values.N.key or \
                             past_key_values.N.value"
                        ));
                    }
                    if info.output(&present).is_none() {
                        return fail(format!("input {name:?} has no matching output {present:?}"));
                    }
                } else if !GENERATION_INPUTS.contains(&name) {
                    return fail(format!(
                        "input {name:?} is not one Kiln feeds to a text-generation model (it \
                         feeds input_ids, attention_mask, position_ids and \
                         past_key_values.N.key/value)"
                    ));
                }
            }
            Ok(())
        }
        Task::Tensor => {
            if info.inputs.is_empty() {
                return fail("it has no inputs".into());
            }
            if info.outputs.is_empty() {
                return fail("it has no outputs".into());
            }
            for (kind, t) in info
                .inputs
                .iter()
                .map(|t| ("input", t))
                .chain(info.outputs.iter().map(|t| ("output", t)))
            {
                if elem_type_name(t.elem_type).is_none() {
                    return fail(format!(
                        "{kind} {:?} has an unknown element type ({})",
                        t.name, t.elem_type
                    ));
                }
            }
            Ok(())
        }
    }
}

fn type_name(elem_type: i32) -> String {
    match elem_type_name(elem_type) {
        Some(n) => n.to_string(),
        None => format!("of unknown type {elem_type}"),
    }
}

fn names(specs: &[TensorSpec]) -> String {
    if specs.is_empty() {
        return "none".into();
    }
    specs
        .iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use prost::Message as _;
    use tensor_shape_proto::{Dimension, dimension};

    pub(crate) fn value(name: &str, elem_type: i32, dims: &[&str]) -> ValueInfoProto {
        let dim = dims
            .iter()
            .map(|d| Dimension {
                value: match d.parse::<i64>() {
                    Ok(v) => Some(dimension::Value::DimValue(v)),
                    Err(_) if d.is_empty() => None,
                    Err(_) => Some(dimension::Value::DimParam(d.to_string())),
                },
            })
            .collect();
        ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type,
                    shape: Some(TensorShapeProto { dim }),
                })),
            }),
        }
    }

    pub(crate) fn model(inputs: Vec<ValueInfoProto>, outputs: Vec<ValueInfoProto>) -> Vec<u8> {
        ModelProto {
            ir_version: 8,
            producer_name: "test".into(),
            graph: Some(GraphProto {
                node: vec![
                    NodeProto {
                        op_type: "MatMul".into(),
                        domain: String::new(),
                    },
                    NodeProto {
                        op_type: "Relu".into(),
                        domain: String::new(),
                    },
                ],
                name: "g".into(),
                input: inputs,
                output: outputs,
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
        }
        .encode_to_vec()
    }

    pub(crate) fn embedding_model() -> Vec<u8> {
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
        // Append a GraphProto.initializer (field 5) with 1 MiB of raw data: decoding skips it.
        let mut graph = GraphProto {
            node: vec![],
            name: "g".into(),
            input: vec![value("x", elem_type::FLOAT, &["", "4"])],
            output: vec![value("y", elem_type::FLOAT, &["4"])],
        }
        .encode_to_vec();
        let mut tensor = Vec::new();
        prost::encoding::bytes::encode(9, &vec![7u8; 1 << 20], &mut tensor);
        prost::encoding::bytes::encode(5, &tensor, &mut graph);
        let mut bytes = Vec::new();
        prost::encoding::int64::encode(1, &9, &mut bytes);
        prost::encoding::bytes::encode(7, &graph, &mut bytes);
        let opset = OperatorSetIdProto {
            domain: "ai.onnx".into(),
            version: 19,
        }
        .encode_to_vec();
        prost::encoding::bytes::encode(8, &opset, &mut bytes);
        let info = read_onnx("w.onnx", &bytes).unwrap();
        assert_eq!(info.opset, 19);
        assert_eq!(info.inputs[0].dims, vec![Dim::Unknown, Dim::Fixed(4)]);
        assert_eq!(infer_task(&info), Task::Tensor);
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
        let no_ir = ModelProto {
            ir_version: 0,
            producer_name: String::new(),
            graph: Some(GraphProto::default()),
            opset_import: vec![],
        }
        .encode_to_vec();
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
    fn infers_tasks() {
        let emb = read_onnx("m.onnx", &embedding_model()).unwrap();
        assert_eq!(infer_task(&emb), Task::Embedding);
        assert_eq!(infer_task(&decoder(2, true)), Task::TextGeneration);
        assert_eq!(infer_task(&tensor_model()), Task::Tensor);
        // input_ids without attention_mask and no logits: not an embedding model.
        let mut partial = emb.clone();
        partial.inputs.retain(|t| t.name != "attention_mask");
        assert_eq!(infer_task(&partial), Task::Tensor);
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
        int32_ids.inputs[0].elem_type = elem_type::INT32;
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
        int_out.outputs[0].elem_type = elem_type::INT8;
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
        let path = crate::formats::test_asset("all-minilm-l6-v2/model.onnx");
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
        assert_eq!(infer_task(&info), Task::Embedding);
        check_task("model.onnx", &info, Task::Embedding).unwrap();
        let out = info.output("last_hidden_state").expect("last_hidden_state");
        assert_eq!(out.elem_type, elem_type::FLOAT);
        assert_eq!(out.dims.last(), Some(&Dim::Fixed(384)));
    }
}
