//! The GGUF preparer: a llama-family GGUF checkpoint into an ONNX bundle — `model.onnx` (the
//! decoder-with-past graph of [`graph`], weights dequantized to float32), `tokenizer.json`
//! (built from the GGUF's tokenizer) and `manifest.json` (task, context length, BOS/EOS, chat
//! template).

pub mod dequant;
pub mod graph;
pub mod onnx;
pub mod reader;
pub mod tokenizer;

use std::io::Cursor;

use async_trait::async_trait;
use kiln_core::Error as ApiError;
use kiln_core::auth::hex;
use kiln_proto::common::v1::Precision;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::models::{StoredModel, file_key};
use crate::prepare::{BundleFile, Preparer};
use crate::service::Registry;
use graph::{Linear, LlamaConfig, Weight, Weights};
use reader::{GgufFile, Value};

/// Changes whenever the graph or tokenizer this module writes changes (caches of prepared
/// bundles key on it).
pub const VERSION: u32 = 2;

/// What a GGUF turns into: the bundle's files, in memory.
pub struct Converted {
    pub files: Vec<(&'static str, Vec<u8>)>,
}

/// The hyper-parameters of a llama-family checkpoint.
pub fn llama_config<R: std::io::Read + std::io::Seek>(
    gguf: &GgufFile<R>,
) -> Result<LlamaConfig, String> {
    let arch = gguf
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or("general.architecture is missing")?
        .to_owned();
    let int = |key: &str| -> Result<usize, String> {
        gguf.get(&format!("{arch}.{key}"))
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| format!("{arch}.{key} is missing"))
    };
    let heads = int("attention.head_count")?;
    let vocab = gguf
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .map(|t| t.len())
        .ok_or("tokenizer.ggml.tokens is missing")?;
    Ok(LlamaConfig {
        layers: int("block_count")?,
        hidden: int("embedding_length")?,
        heads,
        kv_heads: int("attention.head_count_kv").unwrap_or(heads),
        ffn: int("feed_forward_length")?,
        vocab,
        eps: gguf
            .get(&format!("{arch}.attention.layer_norm_rms_epsilon"))
            .and_then(Value::as_f64)
            .unwrap_or(1e-5) as f32,
        rope_theta: gguf
            .get(&format!("{arch}.rope.freq_base"))
            .and_then(Value::as_f64)
            .unwrap_or(10_000.0) as f32,
        max_positions: int("context_length").unwrap_or(4096),
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
        let (dims, values) = self.gguf.tensor_f32(&key).map_err(|e| e.to_string())?;
        match name {
            // 1-D norms, and the embedding as [vocab, hidden] (ggml's [hidden, vocab]).
            "attn_norm" | "ffn_norm" | "output_norm" => Ok(Weight {
                dims: vec![dims[0] as i64],
                values,
            }),
            "token_embd" => Ok(Weight {
                dims: vec![dims[1] as i64, dims[0] as i64],
                values,
            }),
            _ => {
                // ggml [in, out] is row-major [out][in]; MatMul wants [in][out].
                let (inputs, outputs) = (dims[0] as usize, dims[1] as usize);
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
        let key = format!("blk.{layer}.{name}.weight");
        let ggml_type = self
            .gguf
            .tensors
            .get(&key)
            .map(|t| t.ggml_type)
            .ok_or_else(|| format!("the checkpoint has no tensor {key}"))?;
        if !self.blocks || !matches!(ggml_type, 3 | 8) {
            return self.weight(Some(layer), name).map(Linear::Float);
        }
        let (dims, ggml_type, raw) = self.gguf.tensor_raw(&key).map_err(|e| e.to_string())?;
        let (inputs, outputs) = (dims[0] as usize, dims[1] as usize);
        if inputs % 32 != 0 {
            return self.weight(Some(layer), name).map(Linear::Float);
        }
        let mut n =
            dequant::to_nbits(ggml_type, &raw).ok_or_else(|| format!("{key}: bad blocks"))?;
        let heads = match name {
            "attn_q" => Some(self.config.heads),
            "attn_k" => Some(self.config.kv_heads),
            _ => None,
        };
        if let Some(heads) = heads {
            // The same row order fix as for float weights, on whole rows of blocks.
            let blocks = inputs / 32;
            n.packed = unpermute(&n.packed, heads, n.packed.len() / outputs);
            n.scales = unpermute(&n.scales, heads, blocks);
            n.offsets = n.offsets.map(|o| unpermute(&o, heads, blocks));
        }
        Ok(Linear::Blocks {
            inputs,
            outputs,
            bits: n.bits,
            packed: n.packed,
            scales: n.scales,
            offsets: n.offsets,
        })
    }

    fn output_blocks(&mut self) -> Result<Option<Linear>, String> {
        let ggml_type = self
            .gguf
            .tensors
            .get("token_embd.weight")
            .map(|t| t.ggml_type);
        if !self.blocks || !matches!(ggml_type, Some(3 | 8)) {
            return Ok(None);
        }
        let (dims, ggml_type, raw) = self
            .gguf
            .tensor_raw("token_embd.weight")
            .map_err(|e| e.to_string())?;
        let n = dequant::to_nbits(ggml_type, &raw).ok_or("token_embd: bad blocks")?;
        Ok(Some(Linear::Blocks {
            inputs: dims[0] as usize,
            outputs: dims[1] as usize,
            bits: n.bits,
            packed: n.packed,
            scales: n.scales,
            offsets: n.offsets,
        }))
    }
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
pub fn convert(bytes: &[u8], model_name: &str, blocks: bool) -> Result<Converted, String> {
    let mut gguf =
        GgufFile::open(Cursor::new(bytes)).map_err(|e| format!("reading the GGUF: {e}"))?;
    let config = llama_config(&gguf)?;
    if config.hidden % config.heads != 0 || config.heads % config.kv_heads != 0 {
        return Err(format!(
            "{} heads over {} key/value heads and hidden size {} do not divide evenly",
            config.heads, config.kv_heads, config.hidden
        ));
    }
    let model_type = gguf
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .unwrap_or("");
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
    let token_id = |key: &str| gguf.get(key).and_then(Value::as_u64);
    let manifest = serde_json::json!({
        "task": "text-generation",
        "model": model_name,
        "context_length": config.max_positions,
        "chat_template": gguf.get("tokenizer.chat_template").and_then(Value::as_str).unwrap_or(""),
        "bos_token_id": token_id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": token_id("tokenizer.ggml.eos_token_id"),
        "add_bos_token": matches!(gguf.get("tokenizer.ggml.add_bos_token"), Some(Value::Bool(true))),
        "num_layers": config.layers,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim(),
        "vocab_size": config.vocab,
        "precision": if blocks { "INT4" } else { "FP32" },
    });
    let graph = graph::build(
        &config,
        &mut GgufWeights {
            gguf: &mut gguf,
            config: config.clone(),
            blocks,
        },
    )?;
    Ok(Converted {
        files: vec![
            ("model.onnx", graph.encode_to_vec()),
            (
                "tokenizer.json",
                serde_json::to_vec(&tokenizer).map_err(|e| e.to_string())?,
            ),
            (
                "manifest.json",
                serde_json::to_vec_pretty(&manifest).map_err(|e| e.to_string())?,
            ),
        ],
    })
}

/// Registered for GGUF checkpoints.
pub struct GgufPreparer;

#[async_trait]
impl Preparer for GgufPreparer {
    async fn prepare(
        &self,
        registry: &Registry,
        stored: &StoredModel,
        bundle: &str,
        precision: Precision,
    ) -> Result<Vec<BundleFile>> {
        // FP32: standard operators (tract and ONNX Runtime); INT4: the checkpoint's own blocks
        // (ONNX Runtime only).
        let blocks = match precision {
            Precision::Fp32 => false,
            Precision::Int4 => true,
            other => {
                return Err(ApiError::FailedPrecondition(format!(
                    "GGUF checkpoints are prepared in FP32 or INT4, not {}",
                    other.as_str_name()
                ))
                .into());
            }
        };
        let file = stored
            .model
            .files
            .iter()
            .find(|f| f.path.ends_with(".gguf"))
            .ok_or_else(|| {
                ApiError::FailedPrecondition(format!("{} has no .gguf file", stored.model.name))
            })?;
        let bytes = registry
            .artifacts()
            .read_all(&file_key(stored.account(), stored.id(), "", &file.path))
            .await?;
        let name = stored.model.name.clone();
        let path = file.path.clone();
        let converted = tokio::task::spawn_blocking(move || convert(&bytes, &name, blocks))
            .await
            .map_err(|e| ApiError::Internal(format!("converting {path}: {e}")))?
            .map_err(|e| ApiError::FailedPrecondition(format!("{path}: {e}")))?;
        let mut out = Vec::new();
        for (path, data) in converted.files {
            let sha256 = hex(Sha256::digest(&data));
            let size_bytes = data.len() as u64;
            registry
                .artifacts()
                .put(
                    &file_key(stored.account(), stored.id(), bundle, path),
                    data.into(),
                )
                .await?;
            out.push(BundleFile {
                path: path.to_owned(),
                size_bytes,
                sha256,
            });
        }
        Ok(out)
    }
}
