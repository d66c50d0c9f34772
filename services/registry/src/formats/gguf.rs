//! The header of a GGUF checkpoint: version, metadata key/values and tensor infos.
//!
//! Only the header is read (the tensor data after it is never touched), from any
//! [`std::io::Read`], so a multi-gigabyte checkpoint costs a few kilobytes of memory. Metadata
//! Kiln does not use is read past without being kept; the big tokenizer arrays are counted, not
//! stored. Every length and count is bounded before use ([`MAX_STRING_LEN`], [`MAX_COUNT`],
//! [`MAX_DIMS`]), and a file that ends early says what was being read and where.
//!
//! Layout (little-endian, versions 2 and 3): `"GGUF"`, `u32` version, `u64` tensor count, `u64`
//! metadata count, the metadata (`string` key, `u32` value type, value), then per tensor:
//! `string` name, `u32` n_dims, `u64` × n_dims, `u32` ggml type, `u64` offset. A string is a
//! `u64` byte length and UTF-8 bytes; an array is a `u32` element type, a `u64` length and the
//! elements (arrays may nest).

use std::collections::HashMap;
use std::io::{self, Read};

use super::FormatError;

/// The longest string (key, value or tensor name) accepted: 64 MiB.
pub const MAX_STRING_LEN: u64 = 64 << 20;
/// The largest tensor count, metadata count or array length accepted.
pub const MAX_COUNT: u64 = 10_000_000;
/// The highest tensor rank accepted (ggml itself uses at most 4).
pub const MAX_DIMS: u32 = 8;
/// How deeply arrays may nest inside arrays.
const MAX_ARRAY_DEPTH: u32 = 8;

/// Architectures Kiln prepares into ONNX bundles.
const PREPARABLE_ARCHITECTURES: [&str; 2] = ["llama", "mistral"];

/// One tensor of the checkpoint, as its header describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GgufTensor {
    pub name: String,
    /// ggml order: `dims[0]` (ne0) varies fastest; a linear layer's weight is
    /// `[in_features, out_features]`.
    pub dims: Vec<u64>,
    /// The ggml type id (0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 8 Q8_0, …).
    pub ggml_type: u32,
}

impl GgufTensor {
    /// The number of elements (product of the dims; 1 for a scalar).
    pub fn element_count(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// What Kiln needs to know about a GGUF checkpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GgufInfo {
    pub version: u32,
    /// `general.architecture`.
    pub architecture: String,
    /// `general.name`.
    pub name: Option<String>,
    /// `{arch}.context_length`.
    pub context_length: Option<u64>,
    /// `{arch}.block_count`: the number of transformer layers.
    pub block_count: Option<u64>,
    /// `{arch}.embedding_length`: the hidden size.
    pub embedding_length: Option<u64>,
    /// `{arch}.feed_forward_length`.
    pub feed_forward_length: Option<u64>,
    /// `{arch}.attention.head_count`.
    pub head_count: Option<u64>,
    /// `{arch}.attention.head_count_kv` (grouped-query attention when below `head_count`).
    pub head_count_kv: Option<u64>,
    /// `{arch}.rope.freq_base`.
    pub rope_freq_base: Option<f64>,
    /// The length of `tokenizer.ggml.tokens`.
    pub vocab_size: Option<u64>,
    /// `tokenizer.ggml.model` (`"gpt2"` for byte-level BPE, `"llama"` for SentencePiece).
    pub tokenizer_model: Option<String>,
    /// `tokenizer.chat_template` (a Jinja template).
    pub chat_template: Option<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_token_id: Option<u32>,
    /// In file order.
    pub tensors: Vec<GgufTensor>,
    /// The sum over tensors of their element counts.
    pub parameter_count: u64,
}

impl GgufInfo {
    /// The tensor with this name (e.g. `blk.0.attn_q.weight`).
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Whether Kiln can prepare this checkpoint into an ONNX bundle: a llama-family
    /// architecture with the hyper-parameters the graph builder needs.
    pub fn check_preparable(&self, file: &str) -> Result<(), FormatError> {
        let arch = self.architecture.as_str();
        if !PREPARABLE_ARCHITECTURES.contains(&arch) {
            return Err(FormatError::new(
                file,
                format!(
                    "architecture {arch:?} cannot be prepared; Kiln prepares llama-family \
                     checkpoints"
                ),
            ));
        }
        let missing =
            |what: &str| FormatError::new(file, format!("missing metadata key {arch}.{what}"));
        let block_count = self.block_count.ok_or_else(|| missing("block_count"))?;
        let embedding_length = self
            .embedding_length
            .ok_or_else(|| missing("embedding_length"))?;
        let head_count = self
            .head_count
            .ok_or_else(|| missing("attention.head_count"))?;
        if block_count == 0 {
            return Err(FormatError::new(file, format!("{arch}.block_count is 0")));
        }
        if head_count == 0 || embedding_length % head_count != 0 {
            return Err(FormatError::new(
                file,
                format!(
                    "{arch}.embedding_length {embedding_length} is not a multiple of \
                     {arch}.attention.head_count {head_count}"
                ),
            ));
        }
        if let Some(kv) = self.head_count_kv
            && (kv == 0 || head_count % kv != 0)
        {
            return Err(FormatError::new(
                file,
                format!(
                    "{arch}.attention.head_count {head_count} is not a multiple of \
                     {arch}.attention.head_count_kv {kv}"
                ),
            ));
        }
        Ok(())
    }
}

/// Reads the header of a GGUF file. `file` names it in errors. The reader is read up to the end
/// of the tensor infos and no further; wrap files in a [`std::io::BufReader`].
pub fn read_gguf(file: &str, reader: impl Read) -> Result<GgufInfo, FormatError> {
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

    let mut meta: HashMap<String, Value> = HashMap::new();
    let mut vocab_size = None;
    for index in 0..kv_count {
        let key = r.string(&format!("the key of metadata entry {index}"))?;
        let what = format!("metadata {key:?}");
        let ty = r.u32(&format!("the value type of {what}"))?;
        let keep = is_wanted(&key);
        let value = read_value(&mut r, ty, &what, keep, 0)?;
        if key == "tokenizer.ggml.tokens" {
            match value {
                Value::Array { len } => vocab_size = Some(len),
                other => {
                    return Err(r.err(format!(
                        "metadata \"tokenizer.ggml.tokens\" is {}, not an array",
                        other.kind()
                    )));
                }
            }
        }
        if keep {
            meta.insert(key, value);
        }
    }

    let mut tensors = Vec::with_capacity(tensor_count.min(4096) as usize);
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
        let _offset = r.u64(&format!("the data offset of {what}"))?;
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
        });
    }

    let m = Meta { meta: &meta, file };
    let architecture = m
        .string("general.architecture")?
        .ok_or_else(|| FormatError::new(file, "missing metadata key general.architecture"))?;
    let arch = architecture.clone();
    let key = |suffix: &str| format!("{arch}.{suffix}");
    Ok(GgufInfo {
        version,
        name: m.string("general.name")?,
        context_length: m.unsigned(&key("context_length"))?,
        block_count: m.unsigned(&key("block_count"))?,
        embedding_length: m.unsigned(&key("embedding_length"))?,
        feed_forward_length: m.unsigned(&key("feed_forward_length"))?,
        head_count: m.unsigned(&key("attention.head_count"))?,
        head_count_kv: m.unsigned(&key("attention.head_count_kv"))?,
        rope_freq_base: m.float(&key("rope.freq_base"))?,
        vocab_size,
        tokenizer_model: m.string("tokenizer.ggml.model")?,
        chat_template: m.string("tokenizer.chat_template")?,
        bos_token_id: m.token_id("tokenizer.ggml.bos_token_id")?,
        eos_token_id: m.token_id("tokenizer.ggml.eos_token_id")?,
        architecture,
        tensors,
        parameter_count,
    })
}

/// Metadata keys whose scalar values are kept (the architecture-specific ones by suffix, since
/// `general.architecture` need not come first).
fn is_wanted(key: &str) -> bool {
    const KEYS: [&str; 6] = [
        "general.architecture",
        "general.name",
        "tokenizer.ggml.model",
        "tokenizer.chat_template",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
    ];
    const SUFFIXES: [&str; 7] = [
        ".context_length",
        ".block_count",
        ".embedding_length",
        ".feed_forward_length",
        ".attention.head_count",
        ".attention.head_count_kv",
        ".rope.freq_base",
    ];
    KEYS.contains(&key) || SUFFIXES.iter().any(|s| key.ends_with(s))
}

// GGUF value types.
const T_UINT8: u32 = 0;
const T_INT8: u32 = 1;
const T_UINT16: u32 = 2;
const T_INT16: u32 = 3;
const T_UINT32: u32 = 4;
const T_INT32: u32 = 5;
const T_FLOAT32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_UINT64: u32 = 10;
const T_INT64: u32 = 11;
const T_FLOAT64: u32 = 12;

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

/// A metadata value as far as Kiln keeps it.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    /// A string read past without being kept.
    SkippedStr,
    /// An array's length; its elements are read past.
    Array {
        len: u64,
    },
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Unsigned(_) | Value::Signed(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a bool",
            Value::Str(_) | Value::SkippedStr => "a string",
            Value::Array { .. } => "an array",
        }
    }
}

fn read_value<R: Read>(
    r: &mut Reader<'_, R>,
    ty: u32,
    what: &str,
    keep_string: bool,
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
        T_STRING if keep_string => Value::Str(r.string(what)?),
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
            if let Some(size) = fixed_size(elem_ty) {
                r.skip(len * size, what)?;
            } else if elem_ty == T_STRING {
                for _ in 0..len {
                    r.skip_string(what)?;
                }
            } else if elem_ty == T_ARRAY {
                for _ in 0..len {
                    read_value(r, T_ARRAY, what, false, depth + 1)?;
                }
            } else {
                return Err(r.err(format!(
                    "{what} is an array of unknown value type {elem_ty}"
                )));
            }
            Value::Array { len }
        }
        other => return Err(r.err(format!("{what} has unknown value type {other}"))),
    })
}

/// Typed access to the kept metadata.
struct Meta<'a> {
    meta: &'a HashMap<String, Value>,
    file: &'a str,
}

impl Meta<'_> {
    fn wrong(&self, key: &str, value: &Value, expected: &str) -> FormatError {
        FormatError::new(
            self.file,
            format!("metadata {key:?} is {}, expected {expected}", value.kind()),
        )
    }

    fn string(&self, key: &str) -> Result<Option<String>, FormatError> {
        match self.meta.get(key) {
            None => Ok(None),
            Some(Value::Str(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.wrong(key, other, "a string")),
        }
    }

    fn unsigned(&self, key: &str) -> Result<Option<u64>, FormatError> {
        match self.meta.get(key) {
            None => Ok(None),
            Some(Value::Unsigned(v)) => Ok(Some(*v)),
            Some(Value::Signed(v)) => u64::try_from(*v).map(Some).map_err(|_| {
                FormatError::new(self.file, format!("metadata {key:?} is negative ({v})"))
            }),
            Some(other) => Err(self.wrong(key, other, "an integer")),
        }
    }

    fn float(&self, key: &str) -> Result<Option<f64>, FormatError> {
        match self.meta.get(key) {
            None => Ok(None),
            Some(Value::Float(v)) => Ok(Some(*v)),
            Some(Value::Unsigned(v)) => Ok(Some(*v as f64)),
            Some(Value::Signed(v)) => Ok(Some(*v as f64)),
            Some(other) => Err(self.wrong(key, other, "a number")),
        }
    }

    fn token_id(&self, key: &str) -> Result<Option<u32>, FormatError> {
        match self.unsigned(key)? {
            None => Ok(None),
            Some(v) => u32::try_from(v).map(Some).map_err(|_| {
                FormatError::new(
                    self.file,
                    format!("metadata {key:?} ({v}) is not a token id"),
                )
            }),
        }
    }
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A test value with its GGUF type.
    #[derive(Clone)]
    pub(crate) enum V {
        U8(u8),
        I8(i8),
        U16(u16),
        I16(i16),
        U32(u32),
        I32(i32),
        F32(f32),
        Bool(bool),
        Str(String),
        /// Element type and elements.
        Arr(u32, Vec<V>),
        U64(u64),
        I64(i64),
        F64(f64),
    }

    impl V {
        fn ty(&self) -> u32 {
            match self {
                V::U8(_) => T_UINT8,
                V::I8(_) => T_INT8,
                V::U16(_) => T_UINT16,
                V::I16(_) => T_INT16,
                V::U32(_) => T_UINT32,
                V::I32(_) => T_INT32,
                V::F32(_) => T_FLOAT32,
                V::Bool(_) => T_BOOL,
                V::Str(_) => T_STRING,
                V::Arr(..) => T_ARRAY,
                V::U64(_) => T_UINT64,
                V::I64(_) => T_INT64,
                V::F64(_) => T_FLOAT64,
            }
        }

        fn write(&self, out: &mut Vec<u8>) {
            match self {
                V::U8(v) => out.push(*v),
                V::I8(v) => out.extend(v.to_le_bytes()),
                V::U16(v) => out.extend(v.to_le_bytes()),
                V::I16(v) => out.extend(v.to_le_bytes()),
                V::U32(v) => out.extend(v.to_le_bytes()),
                V::I32(v) => out.extend(v.to_le_bytes()),
                V::F32(v) => out.extend(v.to_le_bytes()),
                V::Bool(v) => out.push(u8::from(*v)),
                V::Str(s) => write_str(out, s),
                V::Arr(ty, items) => {
                    out.extend(ty.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    for item in items {
                        item.write(out);
                    }
                }
                V::U64(v) => out.extend(v.to_le_bytes()),
                V::I64(v) => out.extend(v.to_le_bytes()),
                V::F64(v) => out.extend(v.to_le_bytes()),
            }
        }
    }

    pub(crate) fn s(v: &str) -> V {
        V::Str(v.to_string())
    }

    fn write_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    /// Writes a GGUF header (no tensor data) with these metadata and tensors.
    pub(crate) fn build(
        version: u32,
        kvs: &[(&str, V)],
        tensors: &[(&str, &[u64], u32)],
    ) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(version.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((kvs.len() as u64).to_le_bytes());
        for (key, value) in kvs {
            write_str(&mut out, key);
            out.extend(value.ty().to_le_bytes());
            value.write(&mut out);
        }
        let mut offset = 0u64;
        for (name, dims, ty) in tensors {
            write_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += 64;
        }
        out
    }

    /// A tiny llama-like checkpoint header: 2 layers, hidden 8, 2 heads / 1 kv head, ffn 16,
    /// vocab 5, with integer metadata stored in assorted integer types.
    pub(crate) fn tiny_llama() -> Vec<u8> {
        let tokens = ["<s>", "</s>", "a", "b", "ab"];
        let kvs = vec![
            ("general.name", s("tiny")),
            // Architecture-specific keys before general.architecture on purpose.
            ("llama.block_count", V::U32(2)),
            ("general.architecture", s("llama")),
            ("general.file_type", V::U32(3)),
            ("llama.context_length", V::U64(2048)),
            ("llama.embedding_length", V::I32(8)),
            ("llama.feed_forward_length", V::I64(16)),
            ("llama.attention.head_count", V::U16(2)),
            ("llama.attention.head_count_kv", V::U8(1)),
            ("llama.rope.freq_base", V::F32(10000.0)),
            ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
            ("general.some_flag", V::Bool(true)),
            ("general.some_i8", V::I8(-3)),
            ("general.some_i16", V::I16(-300)),
            ("general.some_f64", V::F64(0.5)),
            ("tokenizer.ggml.model", s("gpt2")),
            (
                "tokenizer.ggml.tokens",
                V::Arr(T_STRING, tokens.iter().map(|t| s(t)).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                V::Arr(
                    T_INT32,
                    vec![V::I32(3), V::I32(3), V::I32(1), V::I32(1), V::I32(1)],
                ),
            ),
            ("tokenizer.ggml.merges", V::Arr(T_STRING, vec![s("a b")])),
            (
                "general.nested",
                V::Arr(
                    T_ARRAY,
                    vec![
                        V::Arr(T_UINT64, vec![V::U64(1), V::U64(2)]),
                        V::Arr(T_STRING, vec![s("x")]),
                        V::Arr(T_ARRAY, vec![V::Arr(T_BOOL, vec![V::Bool(false)])]),
                    ],
                ),
            ),
            ("tokenizer.ggml.bos_token_id", V::U32(0)),
            ("tokenizer.ggml.eos_token_id", V::I32(1)),
            (
                "tokenizer.chat_template",
                s("{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}"),
            ),
        ];
        let mut tensors: Vec<(String, Vec<u64>, u32)> = vec![
            ("token_embd.weight".into(), vec![8, 5], 3),
            ("output_norm.weight".into(), vec![8], 0),
        ];
        for i in 0..2 {
            for (name, dims) in [
                ("attn_norm", vec![8]),
                ("attn_q", vec![8, 8]),
                ("attn_k", vec![8, 4]),
                ("attn_v", vec![8, 4]),
                ("attn_output", vec![8, 8]),
                ("ffn_norm", vec![8]),
                ("ffn_gate", vec![8, 16]),
                ("ffn_up", vec![8, 16]),
                ("ffn_down", vec![16, 8]),
            ] {
                tensors.push((format!("blk.{i}.{name}.weight"), dims, 3));
            }
        }
        let tensors: Vec<(&str, &[u64], u32)> = tensors
            .iter()
            .map(|(n, d, t)| (n.as_str(), d.as_slice(), *t))
            .collect();
        build(3, &kvs, &tensors)
    }

    fn read(bytes: &[u8]) -> Result<GgufInfo, FormatError> {
        read_gguf("model.gguf", bytes)
    }

    fn problem(bytes: &[u8]) -> String {
        read(bytes).expect_err("should be rejected").problem
    }

    #[test]
    fn reads_a_llama_header_with_any_integer_types() {
        let info = read(&tiny_llama()).unwrap();
        assert_eq!(info.version, 3);
        assert_eq!(info.architecture, "llama");
        assert_eq!(info.name.as_deref(), Some("tiny"));
        assert_eq!(info.context_length, Some(2048));
        assert_eq!(info.block_count, Some(2));
        assert_eq!(info.embedding_length, Some(8));
        assert_eq!(info.feed_forward_length, Some(16));
        assert_eq!(info.head_count, Some(2));
        assert_eq!(info.head_count_kv, Some(1));
        assert_eq!(info.rope_freq_base, Some(10000.0));
        assert_eq!(info.vocab_size, Some(5));
        assert_eq!(info.tokenizer_model.as_deref(), Some("gpt2"));
        assert!(
            info.chat_template
                .as_deref()
                .unwrap()
                .contains("<|im_start|>")
        );
        assert_eq!(info.bos_token_id, Some(0));
        assert_eq!(info.eos_token_id, Some(1));
        assert_eq!(info.tensors.len(), 2 + 2 * 9);
        assert_eq!(info.tensors[0].name, "token_embd.weight");
        assert_eq!(info.tensors[0].dims, vec![8, 5]);
        assert_eq!(info.tensors[0].ggml_type, 3);
        let per_layer = 8 + 64 + 32 + 32 + 64 + 8 + 128 + 128 + 128;
        assert_eq!(info.parameter_count, 40 + 8 + 2 * per_layer);
        assert_eq!(
            info.tensor("blk.1.ffn_down.weight").unwrap().dims,
            vec![16, 8]
        );
        assert!(info.tensor("blk.2.ffn_down.weight").is_none());
        info.check_preparable("model.gguf").unwrap();
    }

    #[test]
    fn reads_version_2_and_rejects_others() {
        let kvs = [("general.architecture", s("llama"))];
        assert_eq!(read(&build(2, &kvs, &[])).unwrap().version, 2);
        assert_eq!(
            problem(&build(1, &kvs, &[])),
            "GGUF version 1 is not supported (Kiln reads versions 2 and 3)"
        );
        assert!(problem(&build(4, &kvs, &[])).contains("version 4"));
    }

    #[test]
    fn missing_optional_metadata_is_none() {
        let info = read(&build(3, &[("general.architecture", s("llama"))], &[])).unwrap();
        assert_eq!(info.block_count, None);
        assert_eq!(info.vocab_size, None);
        assert_eq!(info.chat_template, None);
        assert_eq!(info.parameter_count, 0);
    }

    #[test]
    fn rejects_bad_magic() {
        let mut bytes = tiny_llama();
        bytes[..4].copy_from_slice(b"PK\x03\x04");
        let p = problem(&bytes);
        assert!(p.starts_with("not a GGUF file"), "{p}");
        let err = read(b"{\"a\": 1}").unwrap_err();
        assert!(
            err.to_string().starts_with("model.gguf: not a GGUF file"),
            "{err}"
        );
    }

    #[test]
    fn every_truncation_is_an_unexpected_end_of_file() {
        let bytes = tiny_llama();
        for cut in 0..bytes.len() {
            let p = problem(&bytes[..cut]);
            assert!(
                p.starts_with("unexpected end of file while reading "),
                "cut at {cut}: {p}"
            );
        }
        assert_eq!(
            problem(&bytes[..2]),
            "unexpected end of file while reading the magic number (at byte 0)"
        );
        assert_eq!(
            problem(&bytes[..6]),
            "unexpected end of file while reading the version (at byte 4)"
        );
        // A cut inside the tokens array names the key.
        let at = bytes
            .windows(b"</s>".len())
            .position(|w| w == b"</s>")
            .unwrap();
        assert!(
            problem(&bytes[..at + 2]).contains("metadata \"tokenizer.ggml.tokens\""),
            "{}",
            problem(&bytes[..at + 2])
        );
        // A cut inside the tensor infos names the tensor.
        let at = bytes
            .windows(b"blk.1.ffn_up.weight".len())
            .position(|w| w == b"blk.1.ffn_up.weight")
            .unwrap();
        let p = problem(&bytes[..at + 25]);
        assert!(p.contains("tensor \"blk.1.ffn_up.weight\""), "{p}");
    }

    #[test]
    fn rejects_absurd_lengths_and_counts() {
        // tensor count
        let mut bytes = build(3, &[], &[]);
        bytes[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let p = problem(&bytes);
        assert!(p.contains("the tensor count is 1099511627776"), "{p}");
        // metadata count
        let mut bytes = build(3, &[], &[]);
        bytes[16..24].copy_from_slice(&(MAX_COUNT + 1).to_le_bytes());
        assert!(problem(&bytes).contains("the metadata count"));
        // key length
        let mut bytes = build(3, &[("general.architecture", s("llama"))], &[]);
        bytes[24..32].copy_from_slice(&(MAX_STRING_LEN + 1).to_le_bytes());
        let p = problem(&bytes);
        assert!(p.contains("longer than the 64 MiB allowed"), "{p}");
        // array length
        let mut bytes = build(3, &[("a", V::Arr(T_UINT8, vec![]))], &[]);
        let len_at = bytes.len() - 8;
        bytes[len_at..].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(problem(&bytes).contains("the length of metadata \"a\""));
        // rank
        let bytes = build(
            3,
            &[("general.architecture", s("llama"))],
            &[("t", &[1, 1, 1, 1, 1, 1, 1, 1, 1], 0)],
        );
        assert_eq!(
            problem(&bytes),
            "tensor \"t\" has 9 dimensions; at most 8 are allowed"
        );
        // dims whose product overflows
        let bytes = build(
            3,
            &[("general.architecture", s("llama"))],
            &[("t", &[u64::MAX, 2], 0)],
        );
        assert!(problem(&bytes).contains("absurd dimensions"));
    }

    #[test]
    fn rejects_unknown_types_and_deep_nesting() {
        let mut bytes = build(3, &[("k", V::U32(1))], &[]);
        let ty_at = bytes.len() - 8;
        bytes[ty_at..ty_at + 4].copy_from_slice(&13u32.to_le_bytes());
        assert_eq!(problem(&bytes), "metadata \"k\" has unknown value type 13");

        let mut deep = V::Arr(T_UINT8, vec![]);
        for _ in 0..10 {
            deep = V::Arr(T_ARRAY, vec![deep]);
        }
        let p = problem(&build(3, &[("deep", deep)], &[]));
        assert!(p.contains("nests arrays more than 8 deep"), "{p}");

        let mut bytes = build(3, &[("flag", V::Bool(true))], &[]);
        *bytes.last_mut().unwrap() = 7;
        assert!(problem(&bytes).contains("invalid value 7"));
    }

    #[test]
    fn rejects_wrongly_typed_metadata() {
        let arch = ("general.architecture", s("llama"));
        let p = problem(&build(
            3,
            &[arch.clone(), ("llama.block_count", V::I32(-1))],
            &[],
        ));
        assert_eq!(p, "metadata \"llama.block_count\" is negative (-1)");
        let p = problem(&build(
            3,
            &[arch.clone(), ("llama.block_count", s("30"))],
            &[],
        ));
        assert_eq!(
            p,
            "metadata \"llama.block_count\" is a string, expected an integer"
        );
        let p = problem(&build(3, &[("general.architecture", V::U32(1))], &[]));
        assert_eq!(
            p,
            "metadata \"general.architecture\" is an integer, expected a string"
        );
        let p = problem(&build(3, &[arch, ("tokenizer.ggml.tokens", s("abc"))], &[]));
        assert!(p.contains("not an array"), "{p}");
        assert_eq!(
            problem(&build(3, &[("general.name", s("x"))], &[])),
            "missing metadata key general.architecture"
        );
    }

    #[test]
    fn check_preparable_accepts_the_llama_family_only() {
        let info = |arch: &str| GgufInfo {
            architecture: arch.into(),
            block_count: Some(2),
            embedding_length: Some(8),
            head_count: Some(2),
            head_count_kv: Some(1),
            ..GgufInfo::default()
        };
        info("llama").check_preparable("m.gguf").unwrap();
        info("mistral").check_preparable("m.gguf").unwrap();
        let err = info("gpt2").check_preparable("m.gguf").unwrap_err();
        assert_eq!(
            err.to_string(),
            "m.gguf: architecture \"gpt2\" cannot be prepared; Kiln prepares llama-family \
             checkpoints"
        );
        let err = GgufInfo {
            head_count: None,
            ..info("llama")
        }
        .check_preparable("m.gguf")
        .unwrap_err();
        assert_eq!(
            err.problem,
            "missing metadata key llama.attention.head_count"
        );
        let err = GgufInfo {
            block_count: None,
            ..info("llama")
        }
        .check_preparable("m.gguf")
        .unwrap_err();
        assert_eq!(err.problem, "missing metadata key llama.block_count");
        let err = GgufInfo {
            embedding_length: Some(9),
            ..info("llama")
        }
        .check_preparable("m.gguf")
        .unwrap_err();
        assert!(err.problem.contains("not a multiple"), "{}", err.problem);
    }

    #[test]
    fn reads_the_real_smollm2_checkpoint() {
        let path =
            crate::formats::test_asset("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
        let f = std::fs::File::open(&path).unwrap();
        let info = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", io::BufReader::new(f)).unwrap();
        println!(
            "{}: v{} {} {:?}, {} tensors, {} parameters, ctx {:?}, ffn {:?}, rope {:?}, \
             tokenizer {:?}, bos {:?}, eos {:?}",
            path.display(),
            info.version,
            info.architecture,
            info.name,
            info.tensors.len(),
            info.parameter_count,
            info.context_length,
            info.feed_forward_length,
            info.rope_freq_base,
            info.tokenizer_model,
            info.bos_token_id,
            info.eos_token_id
        );
        assert_eq!(info.architecture, "llama");
        assert_eq!(info.block_count, Some(30));
        assert_eq!(info.head_count, Some(9));
        assert_eq!(info.head_count_kv, Some(3));
        assert_eq!(info.embedding_length, Some(576));
        assert_eq!(info.vocab_size, Some(49152));
        assert_eq!(info.context_length, Some(8192));
        assert_eq!(info.tokenizer_model.as_deref(), Some("gpt2"));
        assert_eq!(info.tensors.len(), 2 + 30 * 9);
        let template = info.chat_template.as_deref().expect("a chat template");
        assert!(template.contains("<|im_start|>"), "not ChatML: {template}");
        info.check_preparable("SmolLM2-135M-Instruct.Q4_1.gguf")
            .unwrap();
        let q = info
            .tensor("blk.0.attn_q.weight")
            .expect("blk.0.attn_q.weight");
        assert_eq!(q.dims, vec![576, 576]);
        let k = info
            .tensor("blk.29.attn_k.weight")
            .expect("blk.29.attn_k.weight");
        assert_eq!(k.dims, vec![576, 192]);
        assert_eq!(
            info.tensor("token_embd.weight").unwrap().dims,
            vec![576, 49152]
        );
        assert!(
            (130_000_000..140_000_000).contains(&info.parameter_count),
            "{}",
            info.parameter_count
        );
    }
}
