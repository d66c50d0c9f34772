//! What a fine-tuning job on this node reads and writes through the engine's model source:
//! its base's GGUF checkpoint and prepared bundle (for the tokenizer and chat template),
//! fetched into the cache and pinned while it trains; its datasets; its warm start's files;
//! the addon it produces.

use std::path::PathBuf;

use kiln_proto::registry::v1::{Model, base_model_details, model};

use super::Engine;
use crate::bundle::Bundle;
use kiln_core::{Error, Result};

/// A base model's training inputs on local disk, pinned until [`Engine::release_training`].
pub(crate) struct TrainingBase {
    /// The GGUF checkpoint.
    pub gguf: PathBuf,
    /// Its prepared bundle: tokenizer and manifest.
    pub bundle: Bundle,
    dirs: Vec<PathBuf>,
}

impl Engine {
    /// The GGUF checkpoint and prepared bundle of base model `base`.
    pub(crate) async fn fetch_training_base(&self, base: &str) -> Result<TrainingBase> {
        let model = self.source.get_model(base).await?;
        let gguf = base_model_details::CheckpointFormat::Gguf as i32;
        let details = model.base_model_details.clone().unwrap_or_default();
        if model.kind != model::Kind::BaseModel as i32 || details.checkpoint_format != gguf {
            return Err(Error::FailedPrecondition(format!(
                "{base} is not a GGUF base model; Kiln trains on llama-family GGUF checkpoints"
            )));
        }
        let files: Vec<_> = model
            .files
            .iter()
            .filter(|f| f.path.ends_with(".gguf"))
            .cloned()
            .collect();
        let [file] = files.as_slice() else {
            return Err(Error::FailedPrecondition(format!(
                "{base} has {} GGUF files; training needs exactly one",
                files.len()
            )));
        };
        let checkpoint_dir = self
            .cache
            .fetch_files(
                self.source.as_ref(),
                &model,
                None,
                std::slice::from_ref(file),
            )
            .await?;
        let bundle = match self.cache.fetch(self.source.as_ref(), &model, true).await {
            Ok(bundle) => bundle,
            Err(err) => {
                self.cache.unpin(&checkpoint_dir);
                return Err(err);
            }
        };
        Ok(TrainingBase {
            gguf: checkpoint_dir.join(&file.path),
            dirs: vec![checkpoint_dir, bundle.dir.clone()],
            bundle,
        })
    }

    /// Unpins what [`Engine::fetch_training_base`] fetched.
    pub(crate) fn release_training(&self, base: &TrainingBase) {
        for dir in &base.dirs {
            self.cache.unpin(dir);
        }
    }

    /// A dataset's file.
    pub(crate) async fn read_dataset(&self, name: &str) -> Result<Vec<u8>> {
        self.source.read_dataset(name).await
    }

    /// Creates, uploads and validates a model (see `ModelSource::publish`).
    pub(crate) async fn publish(
        &self,
        parent: &str,
        model_id: &str,
        model: Model,
        files: Vec<(String, Vec<u8>)>,
    ) -> Result<Model> {
        self.source.publish(parent, model_id, model, files).await
    }
}
