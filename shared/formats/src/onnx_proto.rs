//! The ONNX messages, declared once for both sides: the GGUF preparer writes whole models with
//! them, the ONNX reader reads a model's interface with them. A subset of `onnx/onnx.proto3`
//! with its field numbers; fields not declared here are skipped by the decoder without being
//! kept.
//!
//! [`ModelProto`] and [`GraphProto`] take the message types of the graph's nodes and
//! initializers as parameters. Written models use [`NodeProto`] and [`TensorProto`] (the
//! defaults); the reader decodes a [`ModelInterface`], where both are `()`: each node and each
//! initializer is stepped over and counted, never copied, so reading a model with hundreds of
//! megabytes of weights (in `GraphProto.initializer`, or `Constant` nodes' attributes) allocates
//! little beyond its interface.

use std::fmt::Debug;

use prost::Message;

/// What a graph's nodes and initializers are: messages (with `Debug`, which prost's derived
/// `Debug` of [`GraphProto`] needs and `Message` does not imply).
pub(crate) trait Element: Message + Default + Debug {}

impl<M: Message + Default + Debug> Element for M {}

/// `ModelProto` (subset), over the message types of its graph's nodes (`N`) and initializers
/// (`T`).
#[derive(Clone, PartialEq, Message)]
pub(crate) struct ModelProto<N: Element = NodeProto, T: Element = TensorProto> {
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    #[prost(string, tag = "2")]
    pub producer_name: String,
    #[prost(string, tag = "3")]
    pub producer_version: String,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto<N, T>>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
}

/// A model read for its interface: nodes and initializers are counted, not decoded.
pub(crate) type ModelInterface = ModelProto<(), ()>;

/// `OperatorSetIdProto`.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(int64, tag = "2")]
    pub version: i64,
}

/// `GraphProto` (subset), over the message types of its nodes (`N`) and initializers (`T`).
#[derive(Clone, PartialEq, Message)]
pub(crate) struct GraphProto<N: Element = NodeProto, T: Element = TensorProto> {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<N>,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<T>,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
}

/// `NodeProto`.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(string, tag = "4")]
    pub op_type: String,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
    #[prost(string, tag = "7")]
    pub domain: String,
}

/// `AttributeProto` (the float and integer kinds).
#[derive(Clone, PartialEq, Message)]
pub(crate) struct AttributeProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(float, tag = "2")]
    pub f: f32,
    #[prost(int64, tag = "3")]
    pub i: i64,
    #[prost(int64, repeated, tag = "8")]
    pub ints: Vec<i64>,
    /// An [`attribute_type`].
    #[prost(int32, tag = "20")]
    pub r#type: i32,
}

/// `AttributeProto.AttributeType` values Kiln writes.
pub(crate) mod attribute_type {
    pub(crate) const FLOAT: i32 = 1;
    pub(crate) const INT: i32 = 2;
    pub(crate) const INTS: i32 = 7;
}

/// `TensorProto` (dense, with raw little-endian data).
#[derive(Clone, PartialEq, Message)]
pub(crate) struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    /// An [`elem_type`].
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(string, tag = "8")]
    pub name: String,
    #[prost(bytes = "vec", tag = "9")]
    pub raw_data: Vec<u8>,
}

/// `ValueInfoProto`.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

/// `TypeProto` (tensor types only; sequence and map types decode as `value: None`).
#[derive(Clone, PartialEq, Message)]
pub(crate) struct TypeProto {
    #[prost(oneof = "TypeValue", tags = "1")]
    pub value: Option<TypeValue>,
}

/// `TypeProto.value`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub(crate) enum TypeValue {
    #[prost(message, tag = "1")]
    TensorType(TensorTypeProto),
}

/// `TypeProto.Tensor`.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct TensorTypeProto {
    /// An [`elem_type`].
    #[prost(int32, tag = "1")]
    pub elem_type: i32,
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

/// `TensorShapeProto`.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<Dimension>,
}

/// `TensorShapeProto.Dimension`.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct Dimension {
    #[prost(oneof = "DimValue", tags = "1, 2")]
    pub value: Option<DimValue>,
}

/// `TensorShapeProto.Dimension.value`: a size, or a named dynamic dimension.
#[derive(Clone, PartialEq, prost::Oneof)]
pub(crate) enum DimValue {
    #[prost(int64, tag = "1")]
    Value(i64),
    #[prost(string, tag = "2")]
    Param(String),
}

/// `TensorProto.DataType` values Kiln writes or looks at.
pub(crate) mod elem_type {
    pub(crate) const UNDEFINED: i32 = 0;
    pub(crate) const FLOAT: i32 = 1;
    pub(crate) const UINT8: i32 = 2;
    pub(crate) const INT32: i32 = 6;
    pub(crate) const INT64: i32 = 7;
    pub(crate) const FLOAT16: i32 = 10;
    pub(crate) const DOUBLE: i32 = 11;
    pub(crate) const BFLOAT16: i32 = 16;
}

/// The ONNX name of an element type (`"float"`, `"int64"`, …), or `None` when unknown.
pub(crate) fn elem_type_name(elem_type: i32) -> Option<&'static str> {
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

/// One dimension of a tensor value (a graph input or output).
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

impl From<Dimension> for Dim {
    fn from(d: Dimension) -> Self {
        match d.value {
            Some(DimValue::Value(v)) => Dim::Fixed(v),
            Some(DimValue::Param(p)) if !p.is_empty() => Dim::Symbolic(p),
            _ => Dim::Unknown,
        }
    }
}

impl From<&Dim> for Dimension {
    fn from(d: &Dim) -> Self {
        Dimension {
            value: match d {
                Dim::Fixed(v) => Some(DimValue::Value(*v)),
                Dim::Symbolic(p) => Some(DimValue::Param(p.clone())),
                Dim::Unknown => None,
            },
        }
    }
}

/// The `ValueInfoProto` of a tensor of `elem_type` with these dimensions.
pub(crate) fn value_info(name: &str, elem_type: i32, dims: &[Dim]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_owned(),
        r#type: Some(TypeProto {
            value: Some(TypeValue::TensorType(TensorTypeProto {
                elem_type,
                shape: Some(TensorShapeProto {
                    dim: dims.iter().map(Dimension::from).collect(),
                }),
            })),
        }),
    }
}
