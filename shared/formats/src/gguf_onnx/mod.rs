//! The GGUF preparer: a llama-family GGUF checkpoint into an ONNX bundle — `model.onnx` (the
//! decoder-with-past graph of [`graph`], weights dequantized to float32), `tokenizer.json`
//! (built from the GGUF's tokenizer) and `manifest.json` (task, context length, BOS/EOS, chat
//! template).

mod builder;
mod contrib;
mod graph;
mod offsets;
mod tokenizer;

use std::io::Cursor;

use prost::Message;

use crate::gguf::{GgufFile, GgufInfo, Value, to_nbits};
use crate::manifest::Manifest;
pub(crate) use builder::attr_int;
pub(crate) use contrib::MERGED;
use graph::{Linear, Weights};
pub use graph::{LlamaConfig, Weight};
pub(crate) use offsets::unfolded_inputs;

/// Changes whenever the graph, tokenizer or manifest this module writes changes (caches of
/// prepared bundles key on it).
pub const GGUF_ONNX_VERSION: u32 = 6;

/// What a GGUF turns into: the bundle's files, in memory.
pub struct Converted {
    pub files: Vec<(&'static str, Vec<u8>)>,
}

/// The hyper-parameters of a llama-family checkpoint.
fn llama_config(info: &GgufInfo) -> Result<LlamaConfig, String> {
    let arch = &info.architecture;
    let int = |value: Option<u64>, key: &str| -> Result<usize, String> {
        value
            .map(|v| v as usize)
            .ok_or_else(|| format!("{arch}.{key} is missing"))
    };
    let heads = int(info.head_count, "attention.head_count")?;
    Ok(LlamaConfig {
        layers: int(info.block_count, "block_count")?,
        hidden: int(info.embedding_length, "embedding_length")?,
        heads,
        kv_heads: info.head_count_kv.map_or(heads, |v| v as usize),
        ffn: int(info.feed_forward_length, "feed_forward_length")?,
        vocab: info.vocab_size.ok_or("tokenizer.ggml.tokens is missing")? as usize,
        eps: info.rms_norm_epsilon.unwrap_or(1e-5) as f32,
        rope_theta: info.rope_freq_base.unwrap_or(10_000.0) as f32,
        max_positions: info.context_length.map_or(4096, |v| v as usize),
    })
}

/// GGUF tensors as the graph wants them.
struct GgufWeights<'a, R> {
    gguf: &'a mut GgufFile<R>,
    config: LlamaConfig,
    /// Keep Q4_1 / Q8_0 linear layers in blocks (MatMulNBits) instead of float32.
    blocks: bool,
}

impl<R: std::io::Read + std::io::Seek> Weights for GgufWeights<'_, R> {
    fn weight(&mut self, layer: Option<usize>, name: &str) -> Result<Weight, String> {
        let key = match layer {
            Some(l) => format!("blk.{l}.{name}.weight"),
            None => format!("{name}.weight"),
        };
        let (dims, values) = self.gguf.tensor_f32(&key).map_err(|e| e.problem)?;
        match name {
            // 1-D norms, and the embedding as [vocab, hidden] (ggml's [hidden, vocab]).
            "attn_norm" | "ffn_norm" | "output_norm" => {
                let [len] = shape(&key, &dims)?;
                Ok(Weight {
                    dims: vec![len as i64],
                    values,
                })
            }
            "token_embd" => {
                let [hidden, vocab] = shape(&key, &dims)?;
                Ok(Weight {
                    dims: vec![vocab as i64, hidden as i64],
                    values,
                })
            }
            _ => {
                // ggml [in, out] is row-major [out][in]; MatMul wants [in][out].
                let [inputs, outputs] = shape(&key, &dims)?;
                let rows = match name {
                    // llama.cpp's converter interleaves the rotary halves of each query and
                    // key head; undo it so HF's half rotation applies.
                    "attn_q" => unpermute(&values, self.config.heads, inputs),
                    "attn_k" => unpermute(&values, self.config.kv_heads, inputs),
                    _ => values,
                };
                let mut t = vec![0f32; rows.len()];
                for o in 0..outputs {
                    for i in 0..inputs {
                        t[i * outputs + o] = rows[o * inputs + i];
                    }
                }
                Ok(Weight {
                    dims: vec![inputs as i64, outputs as i64],
                    values: t,
                })
            }
        }
    }

    fn linear(&mut self, layer: usize, name: &str) -> Result<Linear, String> {
        // llama.cpp's converter interleaves the rotary halves of each query and key head.
        let heads = match name {
            "attn_q" => Some(self.config.heads),
            "attn_k" => Some(self.config.kv_heads),
            _ => None,
        };
        match self.blocks_of(&format!("blk.{layer}.{name}.weight"), heads)? {
            Some(blocks) => Ok(blocks),
            None => self.weight(Some(layer), name).map(Linear::Float),
        }
    }

    fn output_blocks(&mut self) -> Result<Option<Linear>, String> {
        self.blocks_of("token_embd.weight", None)
    }
}

impl<R: std::io::Read + std::io::Seek> GgufWeights<'_, R> {
    /// The tensor `key` kept in its Q4_1 / Q8_0 blocks, with the rows of `heads` heads put
    /// in HF's order; `None` when blocks are not wanted or it is not in whole blocks of those
    /// types (it is then served as float32).
    fn blocks_of(&mut self, key: &str, heads: Option<usize>) -> Result<Option<Linear>, String> {
        let ggml_type = self.gguf.tensor(key).map(|t| t.ggml_type);
        if !self.blocks || !matches!(ggml_type, Some(3 | 8)) {
            return Ok(None);
        }
        let (dims, ggml_type, raw) = self.gguf.tensor_raw(key).map_err(|e| e.problem)?;
        let [inputs, outputs] = shape(key, &dims)?;
        if inputs % 32 != 0 {
            return Ok(None);
        }
        let mut n = to_nbits(ggml_type, &raw).ok_or_else(|| format!("{key}: bad blocks"))?;
        if let Some(heads) = heads {
            // The same row order fix as for float weights, on whole rows of blocks.
            let blocks = inputs / 32;
            n.packed = unpermute(&n.packed, heads, n.packed.len() / outputs);
            n.scales = unpermute(&n.scales, heads, blocks);
            n.offsets = n.offsets.map(|o| unpermute(&o, heads, blocks));
        }
        Ok(Some(Linear::Blocks {
            inputs,
            outputs,
            bits: n.bits,
            packed: n.packed,
            scales: n.scales,
            offsets: n.offsets,
        }))
    }
}

/// A tensor's dims when it has rank `N`.
fn shape<const N: usize>(key: &str, dims: &[u64]) -> Result<[usize; N], String> {
    <[u64; N]>::try_from(dims)
        .map(|d| d.map(|v| v as usize))
        .map_err(|_| format!("tensor {key} has dims {dims:?}; expected {N} of them"))
}

/// Rows `h·d + 2j + t` of llama.cpp's layout back to HF's `h·d + t·d/2 + j`.
fn unpermute<T: Copy + Default>(rows: &[T], heads: usize, width: usize) -> Vec<T> {
    let out_rows = rows.len() / width;
    let head_dim = out_rows / heads;
    let half = head_dim / 2;
    let mut hf = vec![T::default(); rows.len()];
    for h in 0..heads {
        for j in 0..half {
            for t in 0..2 {
                let from = h * head_dim + 2 * j + t;
                let to = h * head_dim + t * half + j;
                hf[to * width..(to + 1) * width]
                    .copy_from_slice(&rows[from * width..(from + 1) * width]);
            }
        }
    }
    hf
}

/// Converts a GGUF checkpoint (its bytes) into a bundle: float32 weights, or (`blocks`) its
/// 4- and 8-bit blocks kept for ONNX Runtime's MatMulNBits.
pub fn convert_gguf(bytes: &[u8], blocks: bool) -> Result<Converted, String> {
    let mut gguf = GgufFile::open("the GGUF", Cursor::new(bytes))
        .map_err(|e| format!("reading the GGUF: {}", e.problem))?;
    gguf.info
        .check_preparable("the GGUF")
        .map_err(|e| e.problem)?;
    let config = llama_config(&gguf.info)?;
    let info = &gguf.info;
    let model_type = info.tokenizer_model.as_deref().unwrap_or("");
    if model_type != "gpt2" {
        return Err(format!(
            "the tokenizer is {model_type:?}; Kiln builds tokenizer.json from byte-level BPE (gpt2) tokenizers"
        ));
    }
    let tokenizer = tokenizer::tokenizer_json(
        gguf.get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .unwrap_or_default(),
        gguf.get("tokenizer.ggml.token_type")
            .and_then(Value::as_array),
        gguf.get("tokenizer.ggml.merges")
            .and_then(Value::as_array)
            .unwrap_or_default(),
        gguf.get("tokenizer.ggml.pre").and_then(Value::as_str),
    )?;
    let manifest = Manifest {
        task: "text-generation".into(),
        context_length: i32::try_from(config.max_positions).unwrap_or(i32::MAX),
        chat_template: info.chat_template.clone().unwrap_or_default(),
        bos_token_id: info.bos_token_id,
        eos_token_id: info.eos_token_id,
        eos_token_ids: Vec::new(),
        add_bos_token: matches!(
            gguf.get("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        ),
        kv_in_place: blocks,
    };
    let mut weights = GgufWeights {
        gguf: &mut gguf,
        config: config.clone(),
        blocks,
    };
    // Blocks are served by ONNX Runtime only, so their graph may use its fused operators.
    let graph = if blocks {
        contrib::build(&config, &mut weights)?
    } else {
        graph::build(&config, &mut weights)?
    };
    Ok(Converted {
        files: vec![
            ("model.onnx", graph.encode_to_vec()),
            (
                "tokenizer.json",
                serde_json::to_vec(&tokenizer).map_err(|e| e.to_string())?,
            ),
            (Manifest::FILE, manifest.to_json()),
        ],
    })
}

/// A llama-family checkpoint's weights in float32, exactly as the serving graph takes them:
/// dequantized, the query and key rows in HF's order, linear layers as `[in, out]`. What the
/// trainer learns an adapter against.
pub struct LlamaCheckpoint {
    pub config: LlamaConfig,
    /// `token_embd` `[vocab, hidden]` (also the tied output projection), `output_norm`, and by
    /// layer `blk.{l}.attn_norm`, `blk.{l}.attn_q`, …, `blk.{l}.ffn_down`.
    pub tensors: std::collections::BTreeMap<String, Weight>,
}

/// The weights of the layers a llama block holds, by GGUF name.
pub const LAYER_WEIGHTS: [&str; 9] = [
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// Reads every weight of a llama-family GGUF checkpoint (see [`LlamaCheckpoint`]).
pub fn read_llama_checkpoint(
    reader: impl std::io::Read + std::io::Seek,
) -> Result<LlamaCheckpoint, String> {
    let mut gguf = GgufFile::open("the GGUF", reader)
        .map_err(|e| format!("reading the GGUF: {}", e.problem))?;
    gguf.info
        .check_preparable("the GGUF")
        .map_err(|e| e.problem)?;
    let config = llama_config(&gguf.info)?;
    let mut weights = GgufWeights {
        gguf: &mut gguf,
        config: config.clone(),
        blocks: false,
    };
    let mut tensors = std::collections::BTreeMap::new();
    for name in ["token_embd", "output_norm"] {
        tensors.insert(name.to_owned(), weights.weight(None, name)?);
    }
    for layer in 0..config.layers {
        for name in LAYER_WEIGHTS {
            let weight = weights.weight(Some(layer), name)?;
            tensors.insert(format!("blk.{layer}.{name}"), weight);
        }
    }
    Ok(LlamaCheckpoint { config, tensors })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::testdata::{tiny_llama, with_data};
    use crate::onnx::{Task, check_task, read_onnx};

    #[test]
    fn a_tiny_llama_converts_into_a_bundle_the_validator_accepts() {
        let bytes = with_data(tiny_llama(), 2 + 2 * 9);
        for blocks in [false, true] {
            let converted = convert_gguf(&bytes, blocks).unwrap();
            let names: Vec<&str> = converted.files.iter().map(|(n, _)| *n).collect();
            assert_eq!(names, ["model.onnx", "tokenizer.json", "manifest.json"]);
            let file = |name: &str| &converted.files.iter().find(|(n, _)| *n == name).unwrap().1;

            let graph = read_onnx("model.onnx", file("model.onnx")).unwrap();
            check_task("model.onnx", &graph, Task::TextGeneration).unwrap();
            let pasts = graph
                .inputs
                .iter()
                .filter(|t| t.name.starts_with("past_key_values."))
                .count();
            assert_eq!(pasts, 2 * 2, "two layers, a key and a value each");

            let tokenizer: serde_json::Value =
                serde_json::from_slice(file("tokenizer.json")).unwrap();
            assert_eq!(tokenizer["model"]["vocab"]["ab"], 4);
            assert_eq!(tokenizer["model"]["merges"][0], "a b");

            let manifest = Manifest::from_json(file("manifest.json")).unwrap();
            assert_eq!(manifest.task, "text-generation");
            assert_eq!(manifest.context_length, 2048);
            assert_eq!(manifest.bos_token_id, Some(0));
            assert_eq!(manifest.eos_token_id, Some(1));
            assert!(manifest.chat_template.contains("<|im_start|>"));
            assert!(!manifest.add_bos_token);
        }
    }

    #[test]
    fn what_cannot_be_converted_says_why() {
        let problem = |bytes: &[u8]| convert_gguf(bytes, false).err().expect("should fail");
        assert!(
            problem(b"GGUF").starts_with("reading the GGUF: unexpected end of file"),
            "{}",
            problem(b"GGUF")
        );
        // The header without its tensors' data.
        let p = problem(&tiny_llama());
        assert!(p.contains("reaches past the end of the file"), "{p}");
    }

    #[test]
    fn a_checkpoint_reads_as_the_graph_takes_it() {
        let bytes = with_data(tiny_llama(), 2 + 2 * 9);
        let checkpoint = read_llama_checkpoint(Cursor::new(&bytes)).unwrap();
        let c = &checkpoint.config;
        assert_eq!(
            (c.layers, c.hidden, c.heads, c.kv_heads, c.ffn),
            (2, 8, 2, 1, 16)
        );
        assert_eq!(checkpoint.tensors.len(), 2 + 2 * 9);
        let dims = |name: &str| checkpoint.tensors[name].dims.clone();
        assert_eq!(dims("token_embd"), [c.vocab as i64, 8]);
        assert_eq!(dims("output_norm"), [8]);
        assert_eq!(
            dims("blk.1.attn_k"),
            [8, 4],
            "[in, out] with one kv head of 4"
        );
        assert_eq!(dims("blk.0.ffn_down"), [16, 8]);
    }
}
