//! Reads a whole GGUF checkpoint for conversion: every metadata value (the tokenizer's token
//! and merge arrays included) and each tensor's data, dequantized to f32.
//! (`formats::gguf` validates uploads from the header alone; this reads what preparing needs.)

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A tensor's place in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// ggml order: dims[0] varies fastest.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// From the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// An opened checkpoint.
pub struct GgufFile<R> {
    reader: R,
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
    data_start: u64,
}

fn err(what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

fn u32_of(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn u64_of(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn string_of(r: &mut impl Read) -> std::io::Result<String> {
    let len = u64_of(r)?;
    if len > 64 << 20 {
        return Err(err(format!("a string of {len} bytes")));
    }
    let mut b = vec![0u8; len as usize];
    r.read_exact(&mut b)?;
    String::from_utf8(b).map_err(|_| err("a string that is not UTF-8"))
}

fn value_of(r: &mut impl Read, ty: u32, depth: u32) -> std::io::Result<Value> {
    let mut buf = [0u8; 8];
    let mut take = |r: &mut dyn Read, n: usize| -> std::io::Result<[u8; 8]> {
        buf = [0u8; 8];
        r.read_exact(&mut buf[..n])?;
        Ok(buf)
    };
    Ok(match ty {
        0 => Value::Int(take(r, 1)?[0] as i64),
        1 => Value::Int(take(r, 1)?[0] as i8 as i64),
        2 => Value::Int(u16::from_le_bytes(take(r, 2)?[..2].try_into().expect("2")) as i64),
        3 => Value::Int(i16::from_le_bytes(take(r, 2)?[..2].try_into().expect("2")) as i64),
        4 => Value::Int(u32::from_le_bytes(take(r, 4)?[..4].try_into().expect("4")) as i64),
        5 => Value::Int(i32::from_le_bytes(take(r, 4)?[..4].try_into().expect("4")) as i64),
        6 => Value::Float(f32::from_le_bytes(take(r, 4)?[..4].try_into().expect("4")) as f64),
        7 => Value::Bool(take(r, 1)?[0] != 0),
        8 => Value::Str(string_of(r)?),
        9 => {
            if depth > 4 {
                return Err(err("arrays nested too deeply"));
            }
            let inner = u32_of(r)?;
            let n = u64_of(r)?;
            if n > 10_000_000 {
                return Err(err(format!("an array of {n} values")));
            }
            let mut out = Vec::with_capacity(n as usize);
            for _ in 0..n {
                out.push(value_of(r, inner, depth + 1)?);
            }
            Value::Array(out)
        }
        10 => Value::Int(u64::from_le_bytes(take(r, 8)?) as i64),
        11 => Value::Int(i64::from_le_bytes(take(r, 8)?)),
        12 => Value::Float(f64::from_le_bytes(take(r, 8)?)),
        other => return Err(err(format!("unknown metadata value type {other}"))),
    })
}

impl<R: Read + Seek> GgufFile<R> {
    pub fn open(mut reader: R) -> std::io::Result<Self> {
        let mut magic = [0u8; 4];
        reader.read_exact(&mut magic)?;
        if &magic != b"GGUF" {
            return Err(err("not a GGUF file"));
        }
        let version = u32_of(&mut reader)?;
        if !(2..=3).contains(&version) {
            return Err(err(format!("GGUF version {version} is not supported")));
        }
        let n_tensors = u64_of(&mut reader)?;
        let n_kv = u64_of(&mut reader)?;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = string_of(&mut reader)?;
            let ty = u32_of(&mut reader)?;
            metadata.insert(key, value_of(&mut reader, ty, 0)?);
        }
        let mut tensors = HashMap::new();
        for _ in 0..n_tensors {
            let name = string_of(&mut reader)?;
            let n_dims = u32_of(&mut reader)?;
            if n_dims > 8 {
                return Err(err(format!("tensor {name} has {n_dims} dimensions")));
            }
            let dims = (0..n_dims)
                .map(|_| u64_of(&mut reader))
                .collect::<Result<_, _>>()?;
            let ggml_type = u32_of(&mut reader)?;
            let offset = u64_of(&mut reader)?;
            tensors.insert(
                name,
                TensorInfo {
                    dims,
                    ggml_type,
                    offset,
                },
            );
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32)
            .max(1);
        let here = reader.stream_position()?;
        let data_start = here.div_ceil(alignment) * alignment;
        Ok(Self {
            reader,
            metadata,
            tensors,
            data_start,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A tensor's stored bytes: (dims, ggml type, data).
    pub fn tensor_raw(&mut self, name: &str) -> std::io::Result<(Vec<u64>, u32, Vec<u8>)> {
        let info = self
            .tensors
            .get(name)
            .cloned()
            .ok_or_else(|| err(format!("the checkpoint has no tensor {name}")))?;
        let bytes = super::dequant::byte_size(info.ggml_type, info.elements() as usize)
            .ok_or_else(|| {
                err(format!(
                    "tensor {name} has ggml type {}, which Kiln cannot read",
                    info.ggml_type
                ))
            })?;
        self.reader
            .seek(SeekFrom::Start(self.data_start + info.offset))?;
        let mut raw = vec![0u8; bytes];
        self.reader.read_exact(&mut raw)?;
        Ok((info.dims, info.ggml_type, raw))
    }

    /// A tensor's values as f32, in ggml order (dims[0] fastest).
    pub fn tensor_f32(&mut self, name: &str) -> std::io::Result<(Vec<u64>, Vec<f32>)> {
        let (dims, ggml_type, raw) = self.tensor_raw(name)?;
        let elements = dims.iter().product::<u64>() as usize;
        let values = super::dequant::dequantize(ggml_type, &raw, elements)
            .ok_or_else(|| err(format!("tensor {name}: bad data")))?;
        Ok((dims, values))
    }
}
