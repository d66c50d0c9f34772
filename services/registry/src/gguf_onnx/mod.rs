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
use graph::{LlamaConfig, Weight, Weights};
use reader::{GgufFile, Value};

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
}

/// Rows `h·d + 2j + t` of llama.cpp's layout back to HF's `h·d + t·d/2 + j`.
fn unpermute(rows: &[f32], heads: usize, width: usize) -> Vec<f32> {
    let out_rows = rows.len() / width;
    let head_dim = out_rows / heads;
    let half = head_dim / 2;
    let mut hf = vec![0f32; rows.len()];
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

/// Converts a GGUF checkpoint (its bytes) into the float32 bundle.
pub fn convert(bytes: &[u8], model_name: &str) -> Result<Converted, String> {
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
    });
    let graph = graph::build(
        &config,
        &mut GgufWeights {
            gguf: &mut gguf,
            config: config.clone(),
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
        if precision != Precision::Fp32 {
            return Err(ApiError::FailedPrecondition(format!(
                "GGUF checkpoints are prepared in FP32 so far, not {}",
                precision.as_str_name()
            ))
            .into());
        }
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
        let converted = tokio::task::spawn_blocking(move || convert(&bytes, &name))
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
