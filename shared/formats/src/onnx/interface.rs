//! The interface of an ONNX model: opset, producer, graph inputs and outputs, read as a
//! [`ModelInterface`] (its nodes and initializers are counted, not decoded, so reading a model
//! allocates little beyond its interface). Models whose weights live in external data files read
//! the same way (only the graph file is needed).

use crate::error::FormatError;
pub(crate) use crate::onnx_proto::Dim;
use crate::onnx_proto::{ModelInterface, TypeValue, ValueInfoProto, elem_type, elem_type_name};

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
    let model = ModelInterface::decode(bytes)
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
    let (elem_type, dims) = match value.r#type.and_then(|t| t.value) {
        Some(TypeValue::TensorType(t)) => {
            let dims = t
                .shape
                .map(|s| s.dim.into_iter().map(Dim::from).collect())
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
