//! What Kiln needs to know about a GGUF checkpoint, typed from its header's metadata.

use std::collections::HashMap;

use super::header::{GgufTensor, Header, Value};
use crate::error::FormatError;

/// Architectures Kiln prepares into ONNX bundles.
const PREPARABLE_ARCHITECTURES: [&str; 2] = ["llama", "mistral"];

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
    /// `{arch}.attention.layer_norm_rms_epsilon`.
    pub rms_norm_epsilon: Option<f64>,
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

/// What `header` says, typed.
pub(super) fn summarize(file: &str, header: &Header) -> Result<GgufInfo, FormatError> {
    let m = Meta {
        meta: &header.metadata,
        file,
    };
    let architecture = m
        .string("general.architecture")?
        .ok_or_else(|| FormatError::new(file, "missing metadata key general.architecture"))?;
    let arch = architecture.clone();
    let key = |suffix: &str| format!("{arch}.{suffix}");
    Ok(GgufInfo {
        version: header.version,
        name: m.string("general.name")?,
        context_length: m.unsigned(&key("context_length"))?,
        block_count: m.unsigned(&key("block_count"))?,
        embedding_length: m.unsigned(&key("embedding_length"))?,
        feed_forward_length: m.unsigned(&key("feed_forward_length"))?,
        head_count: m.unsigned(&key("attention.head_count"))?,
        head_count_kv: m.unsigned(&key("attention.head_count_kv"))?,
        rope_freq_base: m.float(&key("rope.freq_base"))?,
        rms_norm_epsilon: m.float(&key("attention.layer_norm_rms_epsilon"))?,
        vocab_size: header.vocab_size,
        tokenizer_model: m.string("tokenizer.ggml.model")?,
        chat_template: m.string("tokenizer.chat_template")?,
        bos_token_id: m.token_id("tokenizer.ggml.bos_token_id")?,
        eos_token_id: m.token_id("tokenizer.ggml.eos_token_id")?,
        architecture,
        tensors: header.tensors.clone(),
        parameter_count: header.parameter_count,
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
