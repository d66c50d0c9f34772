//! What a fine-tuning job on this node reads and writes through the engine's model source:
//! its base's GGUF checkpoint and prepared bundle (for the tokenizer and chat template),
//! fetched into the cache and pinned while it trains; its datasets; its warm start's files;
//! the addon it produces.

use std::path::PathBuf;

use kiln_proto::registry::v1::{Model, ModelFile, base_model_details, model};

use super::Engine;

/// Where a fine-tuning job keeps its checkpoint while it trains: a file of its output model
/// (UPLOADING until the adapter is written; emptied then), so any node can resume it.
pub(crate) const CHECKPOINT: &str = "training-checkpoint.safetensors";
use crate::bundle::Bundle;
use crate::source::ModelSource;
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
        let checkpoint_dir = self.fetch_file(&model, file).await?;
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

    /// One of `model`'s own files in a folder of the cache, pinned.
    async fn fetch_file(&self, model: &Model, file: &ModelFile) -> Result<PathBuf> {
        let files = std::slice::from_ref(file);
        self.cache
            .fetch_files(self.source.as_ref(), model, None, files)
            .await
    }

    /// Unpins what [`Engine::fetch_training_base`] fetched.
    pub(crate) fn release_training(&self, base: &TrainingBase) {
        for dir in &base.dirs {
            self.cache.unpin(dir);
        }
    }

    /// Where datasets are read and trained models uploaded.
    pub(crate) fn source(&self) -> &dyn ModelSource {
        self.source.as_ref()
    }

    /// The checkpoint an earlier run of `job` (on any node) left as file [`CHECKPOINT`] of its
    /// output model, fetched into the cache; its bytes, or None when there is none.
    pub(crate) async fn fetch_job_checkpoint(
        &self,
        job: &str,
        output: &str,
    ) -> Result<Option<Vec<u8>>> {
        let model = match self.source.get_model(output).await {
            Ok(model) if model.fine_tuning_job == job => model,
            Ok(_) => return Ok(None),
            Err(err) if err.is_not_found() => return Ok(None),
            Err(err) => return Err(err),
        };
        let Some(file) = model
            .files
            .iter()
            .find(|f| f.path == CHECKPOINT && f.complete && f.size_bytes > 0)
        else {
            return Ok(None);
        };
        let dir = self.fetch_file(&model, file).await?;
        let bytes = std::fs::read(dir.join(CHECKPOINT));
        self.cache.unpin(&dir);
        Ok(Some(bytes?))
    }

    /// Deletes what a job that ended without an addon left of its output model (the
    /// checkpoints of an unfinished upload), never a READY model nor another job's.
    pub(crate) async fn drop_unfinished_output(&self, job: &str, output: &str) -> Result<()> {
        match self.source.get_model(output).await {
            Ok(model)
                if model.fine_tuning_job == job && model.state != model::State::Ready as i32 =>
            {
                self.source.delete_model(output).await
            }
            Ok(_) => Ok(()),
            Err(err) if err.is_not_found() => Ok(()),
            Err(err) => Err(err),
        }
    }
}
