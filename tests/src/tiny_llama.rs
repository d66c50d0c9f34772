//! A tiny llama-family GGUF checkpoint built for the suites, so that a fine-tuning job trains
//! through the whole platform in seconds: 2 layers, hidden 32, 4 query heads over 2
//! key/value heads, FFN 64, float32 weights drawn from a seed, a byte-level tokenizer (the
//! 256 bytes in GPT-2's alphabet and no merges, plus ChatML's markers) and a ChatML template.
//! Its answers are noise until it is taught.

const MAGIC: &[u8; 4] = b"GGUF";
const ALIGNMENT: usize = 32;
const T_UINT32: u32 = 4;
const T_INT32: u32 = 5;
const T_FLOAT32: u32 = 6;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const F32: u32 = 0;

pub const HIDDEN: usize = 32;
pub const LAYERS: usize = 2;
const FFN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
/// `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` after the 256 bytes.
pub const SPECIAL: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
pub const VOCAB: usize = 256 + SPECIAL.len();

const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A metadata value.
enum V {
    U32(u32),
    I32(i32),
    F32(f32),
    Str(String),
    Strings(Vec<String>),
    I32s(Vec<i32>),
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl V {
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            V::U32(v) => {
                out.extend_from_slice(&T_UINT32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            V::I32(v) => {
                out.extend_from_slice(&T_INT32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            V::F32(v) => {
                out.extend_from_slice(&T_FLOAT32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            V::Str(s) => {
                out.extend_from_slice(&T_STRING.to_le_bytes());
                string(out, s);
            }
            V::Strings(items) => {
                out.extend_from_slice(&T_ARRAY.to_le_bytes());
                out.extend_from_slice(&T_STRING.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for s in items {
                    string(out, s);
                }
            }
            V::I32s(items) => {
                out.extend_from_slice(&T_ARRAY.to_le_bytes());
                out.extend_from_slice(&T_INT32.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for v in items {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
}

/// GPT-2's printable stand-in for each byte (its byte-level BPE alphabet).
fn byte_tokens() -> Vec<String> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(c).expect("a char").to_string()
        })
        .collect()
}

/// The checkpoint's bytes, its weights drawn from `seed`.
pub fn tiny_llama_gguf(seed: u64) -> Vec<u8> {
    let mut tokens = byte_tokens();
    tokens.extend(SPECIAL.iter().map(|s| (*s).to_owned()));
    let mut types = vec![1; 256];
    types.extend([3; SPECIAL.len()]);
    let kvs: Vec<(&str, V)> = vec![
        ("general.architecture", V::Str("llama".into())),
        ("general.name", V::Str("tiny-llama".into())),
        ("llama.block_count", V::U32(LAYERS as u32)),
        ("llama.context_length", V::U32(512)),
        ("llama.embedding_length", V::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", V::U32(FFN as u32)),
        ("llama.attention.head_count", V::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", V::U32(KV_HEADS as u32)),
        ("llama.rope.freq_base", V::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("tokenizer.ggml.model", V::Str("gpt2".into())),
        ("tokenizer.ggml.pre", V::Str("gpt2".into())),
        ("tokenizer.ggml.tokens", V::Strings(tokens)),
        ("tokenizer.ggml.token_type", V::I32s(types)),
        ("tokenizer.ggml.merges", V::Strings(Vec::new())),
        ("tokenizer.ggml.bos_token_id", V::U32(256)),
        ("tokenizer.ggml.eos_token_id", V::U32(258)),
        ("tokenizer.ggml.padding_token_id", V::I32(256)),
        ("tokenizer.chat_template", V::Str(CHAT_TEMPLATE.into())),
    ];
    let kv = KV_HEADS * HIDDEN / HEADS;
    let mut tensors: Vec<(String, Vec<usize>)> = vec![
        ("token_embd.weight".into(), vec![HIDDEN, VOCAB]),
        ("output_norm.weight".into(), vec![HIDDEN]),
    ];
    for l in 0..LAYERS {
        for (name, dims) in [
            ("attn_norm", vec![HIDDEN]),
            ("attn_q", vec![HIDDEN, HIDDEN]),
            ("attn_k", vec![HIDDEN, kv]),
            ("attn_v", vec![HIDDEN, kv]),
            ("attn_output", vec![HIDDEN, HIDDEN]),
            ("ffn_norm", vec![HIDDEN]),
            ("ffn_gate", vec![HIDDEN, FFN]),
            ("ffn_up", vec![HIDDEN, FFN]),
            ("ffn_down", vec![FFN, HIDDEN]),
        ] {
            tensors.push((format!("blk.{l}.{name}.weight"), dims));
        }
    }

    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (key, value) in &kvs {
        string(&mut out, key);
        value.write(&mut out);
    }
    let mut offset = 0usize;
    for (name, dims) in &tensors {
        string(&mut out, name);
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        out.extend_from_slice(&F32.to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += (dims.iter().product::<usize>() * 4).next_multiple_of(ALIGNMENT);
    }
    out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
    let mut numbers = crate::lora::Numbers::new(seed);
    for (name, dims) in &tensors {
        let count: usize = dims.iter().product();
        let start = out.len();
        for _ in 0..count {
            // Norms near 1; weights uniform in ±1/sqrt(in).
            let v = if dims.len() == 1 {
                1.0 + 0.1 * numbers.uniform()
            } else if name.starts_with("token_embd") {
                numbers.uniform()
            } else {
                numbers.uniform() / (dims[0] as f32).sqrt()
            };
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.resize(start + (count * 4).next_multiple_of(ALIGNMENT), 0);
    }
    out
}
