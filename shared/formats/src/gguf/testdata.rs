//! GGUF files for tests: headers with any metadata and tensors, and a tiny llama.

use super::header::*;

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
pub(crate) fn build(version: u32, kvs: &[(&str, V)], tensors: &[(&str, &[u64], u32)]) -> Vec<u8> {
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

/// The chat template of [`tiny_llama`].
pub(crate) const TINY_CHAT_TEMPLATE: &str =
    "{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}";

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
        ("tokenizer.chat_template", s(TINY_CHAT_TEMPLATE)),
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

/// `header` (from [`build`]) followed by a data section that covers its `tensors` tensors
/// (each up to 128 bytes), filled with small values.
pub(crate) fn with_data(mut header: Vec<u8>, tensors: usize) -> Vec<u8> {
    let data_start = header.len().next_multiple_of(32);
    header.resize(data_start + 64 * tensors + 128, 0x11);
    header
}
