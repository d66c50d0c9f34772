//! Readers and validators for what users upload: GGUF checkpoints, ONNX graphs, safetensors
//! headers, PEFT (LoRA) adapter configs, and JSONL datasets. Pure functions over bytes or
//! readers; every error names the file and the problem.
//!
//! - [`gguf`]: the header of a GGUF checkpoint (metadata and tensor infos, never the weights),
//!   and whether Kiln can prepare it into an ONNX bundle (llama family).
//! - [`onnx`]: the inputs, outputs and opset of an ONNX graph (weights are skipped), the task it
//!   serves, and whether it fits the task a user declared.
//! - [`safetensors`]: the JSON header of a safetensors file, with offsets and sizes checked.
//! - [`peft`]: a PEFT `adapter_config.json` (LoRA only), and whether the adapter's tensors fit a
//!   GGUF base model.
//! - [`dataset`]: a JSONL fine-tuning dataset (chat or completion examples), checked line by line.
//!
//! None of these readers trusts a length or count it reads: each is bounded before anything is
//! allocated for it, and a file that ends early is reported as such, not as a panic.

pub mod dataset;
pub mod gguf;
pub mod onnx;
pub mod peft;
pub mod safetensors;

/// A file that cannot be used as it is: `file` names it (as the user knows it), `problem` says
/// what is wrong in words a user can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {problem}")]
pub struct FormatError {
    pub file: String,
    pub problem: String,
}

impl FormatError {
    pub fn new(file: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            problem: problem.into(),
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::FormatError;

    #[test]
    fn format_error_names_file_and_problem() {
        let err = FormatError::new(
            "model.gguf",
            "unexpected end of file while reading the version",
        );
        assert_eq!(err.file, "model.gguf");
        assert_eq!(
            err.to_string(),
            "model.gguf: unexpected end of file while reading the version"
        );
    }
}
