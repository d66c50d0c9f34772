//! The interface of an ONNX model: opset, producer, graph inputs and outputs.
//!
//! The messages below are a subset of `onnx/onnx.proto3` with the official field numbers.
//! Fields not declared here are skipped by the decoder without being kept; in particular
//! `GraphProto.initializer` (field 5, the weights) and `NodeProto.attribute` (field 5, which holds
//! `Constant` tensors) are left out, so reading a model allocates little beyond its interface.
//! Models whose weights live in external data files read the same way (only the graph file is
//! needed).

use crate::error::FormatError;

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
    pub const INT64: i32 = 7;
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
