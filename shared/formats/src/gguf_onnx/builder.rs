//! A small builder for the nodes and initializers of a graph (the messages are
//! [`crate::onnx_proto`]'s).

use crate::onnx_proto::{AttributeProto, NodeProto, TensorProto, attribute_type, elem_type};

pub(crate) fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i,
        r#type: attribute_type::INT,
        ..Default::default()
    }
}

pub(crate) fn attr_float(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        f,
        r#type: attribute_type::FLOAT,
        ..Default::default()
    }
}

pub(crate) fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: ints.to_vec(),
        r#type: attribute_type::INTS,
        ..Default::default()
    }
}

/// Collects nodes and initializers, naming intermediate values.
#[derive(Default)]
pub(crate) struct Builder {
    pub(crate) nodes: Vec<NodeProto>,
    pub(crate) initializers: Vec<TensorProto>,
    next: usize,
}

impl Builder {
    /// Adds a node with one output, named after `hint`; returns the output's name.
    pub(crate) fn op(
        &mut self,
        op: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
        hint: &str,
    ) -> String {
        self.op_in("", op, inputs, attributes, hint)
    }

    /// Adds a node with the given outputs.
    pub(crate) fn op_to(
        &mut self,
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) {
        self.node(String::new(), op, inputs, outputs, attributes);
    }

    /// Adds a node of another operator domain (e.g. `com.microsoft`) with one output.
    pub(crate) fn op_in(
        &mut self,
        domain: &str,
        op: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
        hint: &str,
    ) -> String {
        self.next += 1;
        let out = format!("{hint}_{}", self.next);
        self.node(domain.to_owned(), op, inputs, &[&out], attributes);
        out
    }

    /// Adds a node of another operator domain with the given outputs ("" for an optional
    /// output left out).
    pub(crate) fn op_in_to(
        &mut self,
        domain: &str,
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) {
        self.node(domain.to_owned(), op, inputs, outputs, attributes);
    }

    fn node(
        &mut self,
        domain: String,
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| (*s).to_owned()).collect(),
            output: outputs.iter().map(|s| (*s).to_owned()).collect(),
            name: format!("{op}_{}", self.nodes.len()),
            op_type: op.to_owned(),
            attribute: attributes,
            domain,
        });
    }

    /// Adds an initializer of `data_type` with its raw little-endian data; returns its name.
    fn tensor(&mut self, name: &str, dims: &[i64], data_type: i32, raw_data: Vec<u8>) -> String {
        self.initializers.push(TensorProto {
            dims: dims.to_vec(),
            data_type,
            name: name.to_owned(),
            raw_data,
        });
        name.to_owned()
    }

    pub(crate) fn u8_tensor(&mut self, name: &str, dims: &[i64], values: Vec<u8>) -> String {
        self.tensor(name, dims, elem_type::UINT8, values)
    }

    pub(crate) fn f32_tensor(&mut self, name: &str, dims: &[i64], values: &[f32]) -> String {
        debug_assert_eq!(dims.iter().product::<i64>() as usize, values.len());
        let mut raw = Vec::with_capacity(values.len() * 4);
        raw.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        self.tensor(name, dims, elem_type::FLOAT, raw)
    }

    pub(crate) fn i64_tensor(&mut self, name: &str, dims: &[i64], values: &[i64]) -> String {
        let mut raw = Vec::with_capacity(values.len() * 8);
        raw.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        self.tensor(name, dims, elem_type::INT64, raw)
    }
}
