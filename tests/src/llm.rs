//! The chat model's reference data and a prepared bundle of it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::asset;

pub const SMOLLM2: &str = "accounts/kiln/models/smollm2-135m-instruct";
pub const GGUF: &str = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";

/// `tests/data/llm/reference.json`: llama.cpp (llama-cpp-python) on the same GGUF, made by
/// `make_reference.py` beside it.
#[derive(Debug, serde::Deserialize)]
pub struct Reference {
    pub prompts: Vec<Prompt>,
    pub tokenization: Vec<Tokenized>,
    pub chat: Vec<Chat>,
}

#[derive(Debug, serde::Deserialize)]
pub struct Prompt {
    pub text: String,
    pub tokens: Vec<u32>,
    pub argmax_next: Vec<u32>,
    pub argmax_margin: Vec<f32>,
}

#[derive(Debug, serde::Deserialize)]
pub struct Tokenized {
    pub text: String,
    pub tokens: Vec<u32>,
}

#[derive(Debug, serde::Deserialize)]
pub struct Chat {
    pub question: String,
    pub prompt_tokens: Vec<u32>,
    pub answer_tokens: Vec<u32>,
    pub answer: String,
}

pub fn reference() -> Reference {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/llm/reference.json");
    serde_json::from_slice(&std::fs::read(path).expect("reference.json")).expect("reference")
}

/// The GGUF prepared into an ONNX bundle: float32 weights, or (`blocks`) the checkpoint's
/// 4- and 8-bit blocks for MatMulNBits. Kept beside the asset cache, keyed by the
/// preparer's version, so test processes and runs share one conversion (written to a
/// private folder, then renamed into place).
pub fn bundle(blocks: bool) -> &'static Path {
    static DIRS: [OnceLock<PathBuf>; 2] = [OnceLock::new(), OnceLock::new()];
    DIRS[usize::from(blocks)].get_or_init(|| {
        let gguf = asset(GGUF);
        let variant = if blocks { "int4" } else { "fp32" };
        let dir = gguf.parent().unwrap().join(format!(
            "prepared-{variant}-{}",
            kiln_formats::GGUF_ONNX_VERSION
        ));
        if dir.join("manifest.json").is_file() {
            return dir;
        }
        // Bundles of earlier preparer versions go.
        for entry in std::fs::read_dir(gguf.parent().unwrap()).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("prepared-{variant}-")) && entry.path() != dir {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let bytes = std::fs::read(&gguf).expect("the GGUF");
        let converted = kiln_formats::convert_gguf(&bytes, blocks).expect("converts");
        let staging = dir.with_extension(format!("partial-{}", std::process::id()));
        std::fs::create_dir_all(&staging).unwrap();
        // manifest.json last: its presence marks a complete bundle.
        let mut files = converted.files;
        files.sort_by_key(|(path, _)| *path == "manifest.json");
        for (path, data) in files {
            std::fs::write(staging.join(path), data).unwrap();
        }
        if std::fs::rename(&staging, &dir).is_err() {
            // Another process finished first.
            let _ = std::fs::remove_dir_all(&staging);
        }
        dir
    })
}

/// A folder that holds only the chat model and ONNX Runtime of the asset cache.
pub fn smollm2_asset_dir() -> tempfile::TempDir {
    super::asset_dir_with(&["smollm2-135m-instruct"])
}
