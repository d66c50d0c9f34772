//! Kiln's model and data formats, one place for each: what users upload (GGUF checkpoints,
//! ONNX graphs, safetensors headers, PEFT adapter configs, Hugging Face configs, JSONL datasets),
//! the preparation of a GGUF checkpoint into an ONNX bundle, and the bundle's manifest.
//! Pure functions over bytes or readers; every error names the file and the problem.
//!
//! - GGUF ([`read_gguf`]): the header of a checkpoint (metadata and tensor infos, never the
//!   weights), and whether Kiln can prepare it into an ONNX bundle (llama family). One parser,
//!   with one set of limits, serves validation and preparation.
//! - ONNX ([`read_onnx`]): the inputs, outputs and opset of a graph (weights are skipped), and
//!   whether it fits the [`Task`] a user declared ([`check_task`]).
//! - safetensors ([`read_safetensors_header`]): the JSON header, with offsets and sizes checked.
//! - PEFT ([`read_adapter_config`]): an `adapter_config.json` (LoRA only), and whether the
//!   adapter's tensors fit a GGUF base model ([`check_adapter_fits`]).
//! - Hugging Face ([`read_hf`]): `config.json`, `generation_config.json`,
//!   `tokenizer_config.json` and `chat_template.jinja` of a model folder.
//! - datasets ([`validate_jsonl`]): a JSONL fine-tuning dataset, checked line by line.
//! - preparation ([`convert_gguf`]): a llama-family GGUF into `model.onnx` (decoder with past),
//!   `tokenizer.json` and `manifest.json`.
//! - checkpoint ([`read_llama_checkpoint`]): a llama-family GGUF's weights in float32 as the
//!   graph takes them, for the trainer.
//! - LoRA slots ([`add_lora_slots`]): a decoder graph rewritten so that one pass applies a
//!   different adapter (or none) to each batch row.
//! - [`Manifest`]: `manifest.json`, written by the registry and read by the engine.
//!
//! None of these readers trusts a length or count it reads: each is bounded before anything is
//! allocated for it, and a file that ends early is reported as such, not as a panic.

mod dataset;
mod error;
mod gguf;
mod gguf_onnx;
mod hf;
mod lora_slots;
mod manifest;
mod onnx;
mod onnx_proto;
mod peft;
mod safetensors;

pub use dataset::{DatasetError, DatasetFormat, DatasetSummary, validate_jsonl};
pub use error::FormatError;
pub use gguf::{GgufInfo, GgufTensor, read_gguf};
pub use gguf_onnx::{
    Converted, GGUF_ONNX_VERSION, LAYER_WEIGHTS, LlamaCheckpoint, LlamaConfig, Weight,
    convert_gguf, read_llama_checkpoint,
};
pub use hf::{HF_FILES, HfError, HfFiles, HfModelInfo, read_hf};
pub use lora_slots::{LORA_MASK, LORA_SLOTS_VERSION, SlotLinear, add_lora_slots, merge_lora};
pub use manifest::Manifest;
pub use onnx::{OnnxInfo, Task, check_task, read_onnx};
pub use peft::{
    AdapterConfig, LoraLinear, LoraWeights, MODULE_NAMES as LORA_MODULE_NAMES,
    MODULES as LORA_MODULES, RANK_RANGE as LORA_RANKS, check_adapter_fits, read_adapter_config,
    read_lora_weights, write_peft_adapter,
};
pub use safetensors::{TensorEntry, read_safetensors_header, write_safetensors_f32};

/// The path of a real asset fetched by `deploy/fetch-assets.sh` (under `$KILN_ASSET_DIR`, or
/// `~/.cache/kiln/assets`). Panics with instructions when it is missing: tests on real assets
/// fail loudly rather than skip silently.
#[cfg(test)]
pub(crate) fn test_asset(relative: &str) -> std::path::PathBuf {
    let dir = match std::env::var_os("KILN_ASSET_DIR") {
        Some(dir) if !dir.is_empty() => std::path::PathBuf::from(dir),
        _ => {
            let home = std::env::var_os("HOME").unwrap_or_default();
            std::path::PathBuf::from(home).join(".cache/kiln/assets")
        }
    };
    let path = dir.join(relative);
    assert!(
        path.is_file(),
        "real test asset {} is missing; run `bash deploy/fetch-assets.sh` (it fills \
         $KILN_ASSET_DIR, default ~/.cache/kiln/assets) and run the tests again",
        path.display()
    );
    path
}
