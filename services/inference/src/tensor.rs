//! Tensors as the engine passes them between the API, the batcher and the backends: a shape
//! and a flat, row-major buffer of one element type.

use std::fmt;

/// Element types the engine serves (the Open Inference Protocol names them `FP32`, `INT64`…).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    F32,
    F64,
    I64,
    I32,
    I8,
    U8,
    Bool,
}

impl DataType {
    /// The Open Inference Protocol's name.
    pub(crate) fn oip_name(self) -> &'static str {
        match self {
            DataType::F32 => "FP32",
            DataType::F64 => "FP64",
            DataType::I64 => "INT64",
            DataType::I32 => "INT32",
            DataType::I8 => "INT8",
            DataType::U8 => "UINT8",
            DataType::Bool => "BOOL",
        }
    }

    pub(crate) fn from_oip_name(name: &str) -> Option<Self> {
        Some(match name {
            "FP32" => DataType::F32,
            "FP64" => DataType::F64,
            "INT64" => DataType::I64,
            "INT32" => DataType::I32,
            "INT8" => DataType::I8,
            "UINT8" => DataType::U8,
            "BOOL" => DataType::Bool,
            _ => return None,
        })
    }

    /// Bytes per element in the protocol's raw (little-endian) encoding.
    pub fn size(self) -> usize {
        match self {
            DataType::F64 | DataType::I64 => 8,
            DataType::F32 | DataType::I32 => 4,
            DataType::I8 | DataType::U8 | DataType::Bool => 1,
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.oip_name())
    }
}

/// The elements of a tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    I8(Vec<i8>),
    U8(Vec<u8>),
    Bool(Vec<bool>),
}

/// Applies `$body` to the inner vector of every variant, rebuilding the same variant.
macro_rules! map_data {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            TensorData::F32($v) => TensorData::F32($body),
            TensorData::F64($v) => TensorData::F64($body),
            TensorData::I64($v) => TensorData::I64($body),
            TensorData::I32($v) => TensorData::I32($body),
            TensorData::I8($v) => TensorData::I8($body),
            TensorData::U8($v) => TensorData::U8($body),
            TensorData::Bool($v) => TensorData::Bool($body),
        }
    };
}

impl TensorData {
    pub fn dtype(&self) -> DataType {
        match self {
            TensorData::F32(_) => DataType::F32,
            TensorData::F64(_) => DataType::F64,
            TensorData::I64(_) => DataType::I64,
            TensorData::I32(_) => DataType::I32,
            TensorData::I8(_) => DataType::I8,
            TensorData::U8(_) => DataType::U8,
            TensorData::Bool(_) => DataType::Bool,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F64(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::I8(v) => v.len(),
            TensorData::U8(v) => v.len(),
            TensorData::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn empty_like(&self, capacity: usize) -> TensorData {
        map_data!(self, _v => Vec::with_capacity(capacity))
    }

    /// Appends `other[range]`; both must have the same type.
    fn extend_from(&mut self, other: &TensorData, range: std::ops::Range<usize>) {
        match (self, other) {
            (TensorData::F32(a), TensorData::F32(b)) => a.extend_from_slice(&b[range]),
            (TensorData::F64(a), TensorData::F64(b)) => a.extend_from_slice(&b[range]),
            (TensorData::I64(a), TensorData::I64(b)) => a.extend_from_slice(&b[range]),
            (TensorData::I32(a), TensorData::I32(b)) => a.extend_from_slice(&b[range]),
            (TensorData::I8(a), TensorData::I8(b)) => a.extend_from_slice(&b[range]),
            (TensorData::U8(a), TensorData::U8(b)) => a.extend_from_slice(&b[range]),
            (TensorData::Bool(a), TensorData::Bool(b)) => a.extend_from_slice(&b[range]),
            _ => unreachable!("extend_from on tensors of different types"),
        }
    }

    /// Appends `count` zeros (false for booleans).
    fn extend_zeros(&mut self, count: usize) {
        match self {
            TensorData::F32(v) => v.resize(v.len() + count, 0.0),
            TensorData::F64(v) => v.resize(v.len() + count, 0.0),
            TensorData::I64(v) => v.resize(v.len() + count, 0),
            TensorData::I32(v) => v.resize(v.len() + count, 0),
            TensorData::I8(v) => v.resize(v.len() + count, 0),
            TensorData::U8(v) => v.resize(v.len() + count, 0),
            TensorData::Bool(v) => v.resize(v.len() + count, false),
        }
    }
}

/// A dense tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl Tensor {
    /// A tensor of `shape` over `data`; the element count must match.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Self, String> {
        // Checked: a caller's shape of huge dimensions must not wrap around to the length of
        // the data it sent (found by the fuzz target oip_tensors).
        let want = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| format!("shape {shape:?} holds more elements than can be counted"))?;
        if want != data.len() {
            return Err(format!(
                "shape {shape:?} holds {want} elements but {} were given",
                data.len()
            ));
        }
        Ok(Self { shape, data })
    }

    pub fn dtype(&self) -> DataType {
        self.data.dtype()
    }

    /// Rows along the first axis (1 for a scalar).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// Stacks tensors of one type along the first axis. Tensors whose other dimensions are
    /// smaller than the largest are padded with zeros at the end of each of those axes
    /// (token sequences of different lengths), so rows keep their own values in front.
    pub(crate) fn concat_padded(parts: &[&Tensor]) -> Tensor {
        let first = parts[0];
        let rank = first.shape.len();
        let mut shape = vec![0usize; rank.max(1)];
        for part in parts {
            shape[0] += part.rows();
            for (dim, &own) in shape.iter_mut().zip(&part.shape).skip(1) {
                *dim = (*dim).max(own);
            }
        }
        let total: usize = shape.iter().product();
        let mut data = first.data.empty_like(total);
        for part in parts {
            if part.shape[1..] == shape[1..] {
                data.extend_from(&part.data, 0..part.data.len());
            } else {
                pad_into(&mut data, part, &shape[1..]);
            }
        }
        Tensor { shape, data }
    }

    /// Rows `range` of the first axis, and along every other axis only the first `keep[axis]`
    /// entries (undoing [`Tensor::concat_padded`]). `keep` shorter than the rank keeps the rest.
    pub(crate) fn slice_rows(&self, range: std::ops::Range<usize>, keep: &[usize]) -> Tensor {
        let inner: Vec<usize> = (1..self.shape.len())
            .map(|axis| keep.get(axis - 1).copied().unwrap_or(self.shape[axis]))
            .collect();
        let row_len = self.row_len();
        let mut shape = vec![range.len()];
        shape.extend_from_slice(&inner);
        if inner == self.shape[1..] {
            let mut data = self.data.empty_like(range.len() * row_len);
            data.extend_from(&self.data, range.start * row_len..range.end * row_len);
            return Tensor { shape, data };
        }
        let out_len: usize = shape.iter().product();
        let mut data = self.data.empty_like(out_len);
        for row in range {
            copy_block(
                &mut data,
                &self.data,
                row * row_len,
                &self.shape[1..],
                &inner,
            );
        }
        Tensor { shape, data }
    }
}

/// Appends `part` to `out`, each row padded with zeros to the inner `shape`.
fn pad_into(out: &mut TensorData, part: &Tensor, shape: &[usize]) {
    let src_inner = &part.shape[1..];
    let row_len: usize = src_inner.iter().product();
    for row in 0..part.rows() {
        pad_block(out, &part.data, row * row_len, src_inner, shape);
    }
}

/// Appends one block of `src` (inner dims `src_dims`, starting at `at`) zero-padded to `dims`.
fn pad_block(
    out: &mut TensorData,
    src: &TensorData,
    at: usize,
    src_dims: &[usize],
    dims: &[usize],
) {
    if src_dims.is_empty() {
        out.extend_from(src, at..at + 1);
        return;
    }
    let src_stride: usize = src_dims[1..].iter().product();
    let stride: usize = dims[1..].iter().product();
    for i in 0..src_dims[0] {
        pad_block(out, src, at + i * src_stride, &src_dims[1..], &dims[1..]);
    }
    out.extend_zeros((dims[0] - src_dims[0]) * stride);
}

/// Appends the leading `keep` part of one block of `src` (inner dims `dims`, starting at `at`).
fn copy_block(out: &mut TensorData, src: &TensorData, at: usize, dims: &[usize], keep: &[usize]) {
    if dims.is_empty() {
        out.extend_from(src, at..at + 1);
        return;
    }
    let stride: usize = dims[1..].iter().product();
    if dims[1..] == keep[1..] {
        out.extend_from(src, at..at + keep[0] * stride);
        return;
    }
    for i in 0..keep[0] {
        copy_block(out, src, at + i * stride, &dims[1..], &keep[1..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(shape: Vec<usize>, v: Vec<i64>) -> Tensor {
        Tensor::new(shape, TensorData::I64(v)).unwrap()
    }

    #[test]
    fn concat_pads_shorter_sequences_and_slicing_undoes_it() {
        let a = ids(vec![1, 3], vec![1, 2, 3]);
        let b = ids(vec![2, 1], vec![4, 5]);
        let both = Tensor::concat_padded(&[&a, &b]);
        assert_eq!(both.shape, vec![3, 3]);
        assert_eq!(both.data, TensorData::I64(vec![1, 2, 3, 4, 0, 0, 5, 0, 0]));
        assert_eq!(both.slice_rows(0..1, &[3]), a);
        assert_eq!(both.slice_rows(1..3, &[1]), b);
    }

    #[test]
    fn rank_three_pads_the_middle_axis() {
        let a = Tensor::new(vec![1, 1, 2], TensorData::F32(vec![1.0, 2.0])).unwrap();
        let b = Tensor::new(vec![1, 2, 2], TensorData::F32(vec![3.0, 4.0, 5.0, 6.0])).unwrap();
        let both = Tensor::concat_padded(&[&a, &b]);
        assert_eq!(both.shape, vec![2, 2, 2]);
        assert_eq!(
            both.data,
            TensorData::F32(vec![1.0, 2.0, 0.0, 0.0, 3.0, 4.0, 5.0, 6.0])
        );
        assert_eq!(both.slice_rows(0..1, &[1, 2]), a);
        assert_eq!(both.slice_rows(1..2, &[2, 2]), b);
    }

    #[test]
    fn new_refuses_a_shape_that_does_not_fit() {
        let err = Tensor::new(vec![2, 2], TensorData::I64(vec![1, 2, 3])).unwrap_err();
        assert!(err.contains("4 elements"), "{err}");
        // 2^33 × 2^33 wraps to 0 elements in 64 bits: refused, not taken for an empty tensor.
        let huge = vec![1 << 33, 1 << 33];
        let err = Tensor::new(huge, TensorData::I64(vec![])).unwrap_err();
        assert!(err.contains("more elements than can be counted"), "{err}");
    }
}
