//! The one GGUF header parser: version, metadata key/values and tensor infos, from any
//! [`std::io::Read`]. Validation keeps only the scalars [`super::GgufInfo`] reads
//! ([`Keep::Summary`]: the big tokenizer arrays are counted, not stored, so a multi-gigabyte
//! checkpoint costs a few kilobytes); preparation keeps every value ([`Keep::Everything`]: it
//! builds the tokenizer from those arrays). Both read with the same limits.
//!
//! Layout (little-endian, versions 2 and 3): `"GGUF"`, `u32` version, `u64` tensor count, `u64`
//! metadata count, the metadata (`string` key, `u32` value type, value), then per tensor:
//! `string` name, `u32` n_dims, `u64` × n_dims, `u32` ggml type, `u64` offset (from the start of
//! the data section, which begins at the next multiple of `general.alignment`, default 32,
//! after the header). A string is a `u64` byte length and UTF-8 bytes; an array is a `u32`
//! element type, a `u64` length and the elements.
//!
//! Limits: every length and count is bounded before anything is allocated for it, and a file
//! that ends early says what was being read and at which byte.
//! - [`MAX_STRING_LEN`] (64 MiB) for any string: a chat template or a key is kilobytes.
//! - [`MAX_COUNT`] (10 million) for the tensor count, the metadata count and an array's
//!   length: vocabularies and merge lists hold a few hundred thousand entries.
//! - [`MAX_DIMS`] (8) for a tensor's rank: ggml itself uses at most 4.
//! - [`MAX_ARRAY_DEPTH`] (4) for arrays inside arrays: llama.cpp writes none.
//! - A bool is 0 or 1; the tensors' element counts may not overflow a `u64`; `general.alignment`
//!   is a power of two.

use std::collections::HashMap;
use std::io::{self, Read};

use crate::error::FormatError;

/// The longest string (key, value or tensor name) accepted: 64 MiB.
pub(crate) const MAX_STRING_LEN: u64 = 64 << 20;
/// The largest tensor count, metadata count or array length accepted.
pub(crate) const MAX_COUNT: u64 = 10_000_000;
/// The highest tensor rank accepted.
pub(crate) const MAX_DIMS: u32 = 8;
/// How many arrays deep a metadata value may be (an array of scalars is 1 deep).
pub(crate) const MAX_ARRAY_DEPTH: u32 = 4;
/// The data section's alignment when `general.alignment` does not say.
const DEFAULT_ALIGNMENT: u64 = 32;
/// Elements reserved ahead for a list whose length the file states (the rest grow as read).
const PREALLOCATE: u64 = 4096;

/// Which metadata values [`read_header`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keep {
    /// The scalar values of the keys [`super::GgufInfo`] reads (and `general.alignment`);
    /// arrays are read past, `tokenizer.ggml.tokens` counted.
    Summary,
    /// Every value, arrays included.
    Everything,
}

/// One tensor of the checkpoint, as its header describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GgufTensor {
    pub name: String,
    /// ggml order: `dims[0]` (ne0) varies fastest; a linear layer's weight is
    /// `[in_features, out_features]`.
    pub dims: Vec<u64>,
    /// The ggml type id (0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 8 Q8_0, …).
    pub ggml_type: u32,
    /// Where its data starts, from the start of the data section.
    pub offset: u64,
}

impl GgufTensor {
    /// The number of elements (product of the dims; 1 for a scalar).
    pub fn element_count(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A GGUF header as read.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub version: u32,
    /// The kept values (see [`Keep`]).
    pub metadata: HashMap<String, Value>,
    /// The length of `tokenizer.ggml.tokens`.
    pub vocab_size: Option<u64>,
    /// In file order.
    pub tensors: Vec<GgufTensor>,
    /// The sum over tensors of their element counts.
    pub parameter_count: u64,
    /// Where the data section begins, counted from the first byte read.
    pub data_start: u64,
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    /// A string read past without being kept.
    SkippedStr,
    /// An array read past without being kept: its length.
    SkippedArray(u64),
}

impl Value {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Value::Unsigned(_) | Value::Signed(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a bool",
            Value::Str(_) | Value::SkippedStr => "a string",
            Value::Array(_) | Value::SkippedArray(_) => "an array",
        }
    }

    pub(crate) fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Unsigned(v) => Some(*v),
            Value::Signed(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }

    pub(crate) fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Unsigned(v) => i64::try_from(*v).ok(),
            Value::Signed(v) => Some(*v),
            _ => None,
        }
    }

    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Reads a GGUF header. `file` names it in errors. The reader is read up to the end of the
/// tensor infos and no further; wrap files in a [`std::io::BufReader`].
pub(crate) fn read_header(
    file: &str,
    reader: impl Read,
    keep: Keep,
) -> Result<Header, FormatError> {
    let mut r = Reader {
        inner: reader,
        pos: 0,
        file,
    };

    let mut magic = [0u8; 4];
    r.bytes(&mut magic, "the magic number")?;
    if &magic != b"GGUF" {
        return Err(r.err(format!(
            "not a GGUF file: it starts with {:?}, not \"GGUF\"",
            String::from_utf8_lossy(&magic)
        )));
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(r.err(format!(
            "GGUF version {version} is not supported (Kiln reads versions 2 and 3)"
        )));
    }
    let tensor_count = r.count("the tensor count")?;
    let kv_count = r.count("the metadata count")?;

    let mut metadata: HashMap<String, Value> = HashMap::new();
    let mut vocab_size = None;
    for index in 0..kv_count {
        let key = r.string(&format!("the key of metadata entry {index}"))?;
        let what = format!("metadata {key:?}");
        let ty = r.u32(&format!("the value type of {what}"))?;
        let kept = keep == Keep::Everything || is_summarized(&key);
        let value = read_value(&mut r, ty, &what, kept, 0)?;
        if key == "tokenizer.ggml.tokens" {
            vocab_size = Some(match &value {
                Value::Array(items) => items.len() as u64,
                Value::SkippedArray(len) => *len,
                other => {
                    return Err(r.err(format!(
                        "metadata \"tokenizer.ggml.tokens\" is {}, not an array",
                        other.kind()
                    )));
                }
            });
        }
        if kept {
            metadata.insert(key, value);
        }
    }

    let mut tensors = Vec::with_capacity(tensor_count.min(PREALLOCATE) as usize);
    let mut parameter_count: u64 = 0;
    for index in 0..tensor_count {
        let name = r.string(&format!("the name of tensor {index}"))?;
        let what = format!("tensor {name:?}");
        let n_dims = r.u32(&format!("the rank of {what}"))?;
        if n_dims > MAX_DIMS {
            return Err(r.err(format!(
                "{what} has {n_dims} dimensions; at most {MAX_DIMS} are allowed"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64(&format!("the dimensions of {what}"))?);
        }
        let ggml_type = r.u32(&format!("the type of {what}"))?;
        let offset = r.u64(&format!("the data offset of {what}"))?;
        let elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| r.err(format!("{what} has absurd dimensions {dims:?}")))?;
        parameter_count = parameter_count
            .checked_add(elements)
            .ok_or_else(|| r.err("the tensors' total element count overflows"))?;
        tensors.push(GgufTensor {
            name,
            dims,
            ggml_type,
            offset,
        });
    }

    let alignment = match metadata.get(ALIGNMENT) {
        None => DEFAULT_ALIGNMENT,
        Some(value) => match value.as_u64() {
            Some(a) if a.is_power_of_two() => a,
            Some(a) => {
                return Err(r.err(format!(
                    "metadata \"{ALIGNMENT}\" is {a}, not a power of two"
                )));
            }
            None => {
                return Err(r.err(format!(
                    "metadata \"{ALIGNMENT}\" is {}, expected a positive integer",
                    value.kind()
                )));
            }
        },
    };
    let data_start = r
        .pos
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| r.err(format!("metadata \"{ALIGNMENT}\" {alignment} is too large")))?;
    Ok(Header {
        version,
        metadata,
        vocab_size,
        tensors,
        parameter_count,
        data_start,
    })
}

const ALIGNMENT: &str = "general.alignment";

/// Metadata keys whose scalar values [`Keep::Summary`] keeps (the architecture-specific ones
/// by suffix, since `general.architecture` need not come first).
fn is_summarized(key: &str) -> bool {
    const KEYS: [&str; 7] = [
        "general.architecture",
        "general.name",
        ALIGNMENT,
        "tokenizer.ggml.model",
        "tokenizer.chat_template",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
    ];
    const SUFFIXES: [&str; 8] = [
        ".context_length",
        ".block_count",
        ".embedding_length",
        ".feed_forward_length",
        ".attention.head_count",
        ".attention.head_count_kv",
        ".rope.freq_base",
        ".attention.layer_norm_rms_epsilon",
    ];
    KEYS.contains(&key) || SUFFIXES.iter().any(|s| key.ends_with(s))
}

// GGUF value types.
pub(crate) const T_UINT8: u32 = 0;
pub(crate) const T_INT8: u32 = 1;
pub(crate) const T_UINT16: u32 = 2;
pub(crate) const T_INT16: u32 = 3;
pub(crate) const T_UINT32: u32 = 4;
pub(crate) const T_INT32: u32 = 5;
pub(crate) const T_FLOAT32: u32 = 6;
pub(crate) const T_BOOL: u32 = 7;
pub(crate) const T_STRING: u32 = 8;
pub(crate) const T_ARRAY: u32 = 9;
pub(crate) const T_UINT64: u32 = 10;
pub(crate) const T_INT64: u32 = 11;
pub(crate) const T_FLOAT64: u32 = 12;

/// The byte size of a fixed-size value type.
fn fixed_size(ty: u32) -> Option<u64> {
    match ty {
        T_UINT8 | T_INT8 | T_BOOL => Some(1),
        T_UINT16 | T_INT16 => Some(2),
        T_UINT32 | T_INT32 | T_FLOAT32 => Some(4),
        T_UINT64 | T_INT64 | T_FLOAT64 => Some(8),
        _ => None,
    }
}

/// A value of type `ty`: kept (`keep`), or read past (strings and arrays; scalars are always
/// kept, they cost nothing). `depth` counts the arrays around it.
fn read_value<R: Read>(
    r: &mut Reader<'_, R>,
    ty: u32,
    what: &str,
    keep: bool,
    depth: u32,
) -> Result<Value, FormatError> {
    Ok(match ty {
        T_UINT8 => Value::Unsigned(r.u8(what)?.into()),
        T_INT8 => Value::Signed(i8::from_le_bytes([r.u8(what)?]).into()),
        T_UINT16 => Value::Unsigned(u16::from_le_bytes(r.array(what)?).into()),
        T_INT16 => Value::Signed(i16::from_le_bytes(r.array(what)?).into()),
        T_UINT32 => Value::Unsigned(r.u32(what)?.into()),
        T_INT32 => Value::Signed(i32::from_le_bytes(r.array(what)?).into()),
        T_UINT64 => Value::Unsigned(r.u64(what)?),
        T_INT64 => Value::Signed(i64::from_le_bytes(r.array(what)?)),
        T_FLOAT32 => Value::Float(f32::from_le_bytes(r.array(what)?).into()),
        T_FLOAT64 => Value::Float(f64::from_le_bytes(r.array(what)?)),
        T_BOOL => match r.u8(what)? {
            0 => Value::Bool(false),
            1 => Value::Bool(true),
            other => return Err(r.err(format!("{what} is a bool with invalid value {other}"))),
        },
        T_STRING if keep => Value::Str(r.string(what)?),
        T_STRING => {
            r.skip_string(what)?;
            Value::SkippedStr
        }
        T_ARRAY => {
            if depth >= MAX_ARRAY_DEPTH {
                return Err(r.err(format!(
                    "{what} nests arrays more than {MAX_ARRAY_DEPTH} deep"
                )));
            }
            let elem_ty = r.u32(&format!("the element type of {what}"))?;
            let len = r.count(&format!("the length of {what}"))?;
            if fixed_size(elem_ty).is_none() && !matches!(elem_ty, T_STRING | T_ARRAY) {
                return Err(r.err(format!(
                    "{what} is an array of unknown value type {elem_ty}"
                )));
            }
            if keep {
                let mut items = Vec::with_capacity(len.min(PREALLOCATE) as usize);
                for _ in 0..len {
                    items.push(read_value(r, elem_ty, what, true, depth + 1)?);
                }
                Value::Array(items)
            } else {
                match fixed_size(elem_ty) {
                    Some(size) => r.skip(len * size, what)?,
                    None => {
                        for _ in 0..len {
                            read_value(r, elem_ty, what, false, depth + 1)?;
                        }
                    }
                }
                Value::SkippedArray(len)
            }
        }
        other => return Err(r.err(format!("{what} has unknown value type {other}"))),
    })
}

/// A little-endian reader that knows its position and names what it was reading when it fails.
struct Reader<'a, R> {
    inner: R,
    pos: u64,
    file: &'a str,
}

impl<R: Read> Reader<'_, R> {
    fn err(&self, problem: impl Into<String>) -> FormatError {
        FormatError::new(self.file, problem)
    }

    fn eof(&self, what: &str) -> FormatError {
        self.err(format!(
            "unexpected end of file while reading {what} (at byte {})",
            self.pos
        ))
    }

    fn io(&self, what: &str, e: &io::Error) -> FormatError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            self.eof(what)
        } else {
            self.err(format!("read error while reading {what}: {e}"))
        }
    }

    fn bytes(&mut self, buf: &mut [u8], what: &str) -> Result<(), FormatError> {
        self.inner.read_exact(buf).map_err(|e| self.io(what, &e))?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], FormatError> {
        let mut buf = [0u8; N];
        self.bytes(&mut buf, what)?;
        Ok(buf)
    }

    fn u8(&mut self, what: &str) -> Result<u8, FormatError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A `u64` count, bounded by [`MAX_COUNT`].
    fn count(&mut self, what: &str) -> Result<u64, FormatError> {
        let n = self.u64(what)?;
        if n > MAX_COUNT {
            return Err(self.err(format!(
                "{what} is {n}, more than the {MAX_COUNT} allowed; the file is corrupt"
            )));
        }
        Ok(n)
    }

    /// A string's byte length, bounded by [`MAX_STRING_LEN`].
    fn string_len(&mut self, what: &str) -> Result<u64, FormatError> {
        let n = self.u64(&format!("the length of {what}"))?;
        if n > MAX_STRING_LEN {
            return Err(self.err(format!(
                "{what} is a string of {n} bytes, longer than the {} MiB allowed; the file is \
                 corrupt",
                MAX_STRING_LEN >> 20
            )));
        }
        Ok(n)
    }

    fn string(&mut self, what: &str) -> Result<String, FormatError> {
        let len = self.string_len(what)?;
        // Grown as read: a stated length is not trusted with an allocation.
        let mut buf = Vec::new();
        let read = (&mut self.inner)
            .take(len)
            .read_to_end(&mut buf)
            .map_err(|e| self.io(what, &e))?;
        if (read as u64) < len {
            self.pos += read as u64;
            return Err(self.eof(what));
        }
        self.pos += len;
        String::from_utf8(buf).map_err(|_| self.err(format!("{what} is not valid UTF-8")))
    }

    fn skip_string(&mut self, what: &str) -> Result<(), FormatError> {
        let len = self.string_len(what)?;
        self.skip(len, what)
    }

    fn skip(&mut self, len: u64, what: &str) -> Result<(), FormatError> {
        let copied = io::copy(&mut (&mut self.inner).take(len), &mut io::sink())
            .map_err(|e| self.io(what, &e))?;
        self.pos += copied;
        if copied < len {
            return Err(self.eof(what));
        }
        Ok(())
    }
}
