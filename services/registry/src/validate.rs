//! ValidateModelUpload: the files are complete and form a valid model of its kind. A bad
//! upload turns only that model FAILED, with a status naming the file and the problem.

use kiln_core::Error;
use std::io::Cursor;

use kiln_core::auth::Principal;
use kiln_formats::{
    FormatError, GgufInfo, HF_FILES, HfFiles, Manifest, Task, check_adapter_fits, check_task,
    read_adapter_config, read_gguf, read_hf, read_onnx, read_safetensors_header,
};
use kiln_proto::registry::v1::{
    BaseModelDetails, ConversationConfig, Model, PeftDetails, ValidateModelUploadResponse,
    base_model_details::CheckpointFormat, model,
};

use crate::models::ModelChange;
use crate::service::Registry;
use crate::stored::{StoredModel, file_key};
use kiln_core::Result;

/// What a model's kind needs uploaded.
fn required_files(model: &Model) -> Vec<&'static str> {
    match model::Kind::try_from(model.kind) {
        Ok(model::Kind::LoraAddon) => vec!["adapter_config.json", "adapter_model.safetensors"],
        Ok(model::Kind::EmbeddingModel) => vec!["model.onnx", "tokenizer.json"],
        Ok(model::Kind::TensorModel) => vec!["model.onnx"],
        // A base model is one GGUF file, or an ONNX bundle.
        _ if model.files.iter().any(|f| f.path.ends_with(".gguf")) => vec![],
        _ => vec!["model.onnx", "tokenizer.json"],
    }
}

impl Registry {
    /// Reads the header of a GGUF object, fetching more of the file until the header fits.
    pub(crate) async fn gguf_info(
        &self,
        key: &str,
        path: &str,
        size: u64,
    ) -> Result<GgufInfo, FormatError> {
        let mut want = (32u64 << 20).min(size);
        loop {
            let bytes = self
                .artifacts()
                .read_range(key, 0..want)
                .await
                .map_err(|e| FormatError::new(path, format!("cannot read: {e}")))?;
            match read_gguf(path, Cursor::new(bytes)) {
                Err(e) if e.problem.contains("unexpected end") && want < size => {
                    want = (want * 4).min(size)
                }
                other => return other,
            }
        }
    }

    /// Checks the files' content; returns the model with what the files tell filled in, or
    /// the problem the files have.
    async fn check_content(&self, stored: &StoredModel) -> Result<Result<Model, FormatError>> {
        match self.check_files(stored).await {
            Ok(model) => Ok(Ok(model)),
            Err(Stop::Problem(problem)) => Ok(Err(problem)),
            Err(Stop::Failed(err)) => Err(err),
        }
    }

    async fn check_files(&self, stored: &StoredModel) -> std::result::Result<Model, Stop> {
        let mut model = stored.model.clone();
        let key = |path: &str| file_key(stored.account(), stored.id(), "", path);
        let kind = model::Kind::try_from(model.kind).unwrap_or(model::Kind::Unspecified);

        if kind == model::Kind::LoraAddon {
            let config_bytes = self
                .artifacts()
                .read_all(&key("adapter_config.json"))
                .await?;
            let config = read_adapter_config("adapter_config.json", &config_bytes)?;
            let weights = self
                .artifacts()
                .read_all(&key("adapter_model.safetensors"))
                .await?;
            let tensors = read_safetensors_header("adapter_model.safetensors", &weights)?;
            let base_name = model
                .peft_details
                .as_ref()
                .map(|p| p.base_model.clone())
                .unwrap_or_default();
            let base = match base_name
                .strip_prefix("accounts/")
                .and_then(|r| r.split_once("/models/"))
            {
                Some((account, id)) => self.stored_model(account, id).await?,
                None => None,
            };
            let Some(base) = base.filter(|b| b.model.state == model::State::Ready as i32) else {
                return Err(FormatError::new(
                    "adapter_config.json",
                    format!("base model {base_name} does not exist or is not READY"),
                )
                .into());
            };
            let Some(gguf_file) = base.model.files.iter().find(|f| f.path.ends_with(".gguf"))
            else {
                return Err(FormatError::new(
                    "adapter_model.safetensors",
                    format!(
                        "base model {base_name} is not a GGUF checkpoint; adapter shapes are checked against GGUF bases"
                    ),
                ).into());
            };
            let base_key = file_key(base.account(), base.id(), "", &gguf_file.path);
            let info = self
                .gguf_info(&base_key, &gguf_file.path, gguf_file.size_bytes as u64)
                .await?;
            check_adapter_fits(&config, &tensors, &info, "adapter_model.safetensors")?;
            model.peft_details = Some(PeftDetails {
                base_model: base_name,
                r: config.r as i32,
                target_modules: config.target_modules.clone(),
                lora_alpha: config.lora_alpha as f32,
            });
            return Ok(model);
        }

        if let Some(gguf_file) = model
            .files
            .iter()
            .find(|f| f.path.ends_with(".gguf"))
            .cloned()
        {
            if kind != model::Kind::BaseModel {
                return Err(FormatError::new(
                    &gguf_file.path,
                    "a GGUF checkpoint can only be a BASE_MODEL",
                )
                .into());
            }
            let info = self
                .gguf_info(
                    &key(&gguf_file.path),
                    &gguf_file.path,
                    gguf_file.size_bytes as u64,
                )
                .await?;
            info.check_preparable(&gguf_file.path)?;
            let to_i32 =
                |v: Option<u64>| v.map(|v| i32::try_from(v).unwrap_or(i32::MAX)).unwrap_or(0);
            let details = model
                .base_model_details
                .get_or_insert_with(BaseModelDetails::default);
            details.checkpoint_format = CheckpointFormat::Gguf as i32;
            details.parameter_count = info.parameter_count as i64;
            details.model_type = info.architecture.clone();
            details.num_layers = to_i32(info.block_count);
            details.num_attention_heads = to_i32(info.head_count);
            details.num_key_value_heads = to_i32(info.head_count_kv.or(info.head_count));
            details.hidden_size = to_i32(info.embedding_length);
            details.vocab_size = to_i32(info.vocab_size);
            details.task = Task::TextGeneration.as_str().to_owned();
            details.tunable = true;
            if model.context_length == 0 {
                model.context_length = to_i32(info.context_length);
            }
            if let Some(template) = info.chat_template.clone()
                && model
                    .conversation_config
                    .as_ref()
                    .is_none_or(|c| c.template.is_empty())
            {
                model.conversation_config = Some(ConversationConfig {
                    template,
                    ..Default::default()
                });
            }
            model.supports_lora = true;
            return Ok(model);
        }

        // An ONNX bundle.
        let graph = self.artifacts().read_all(&key("model.onnx")).await?;
        let info = tokio::task::spawn_blocking(move || read_onnx("model.onnx", &graph))
            .await
            .map_err(|e| Error::Internal(format!("onnx check: {e}")))??;
        // An uploaded manifest is served with the files (see the engine's bundle loading):
        // it must read as one, with a task Kiln knows.
        let manifest_task = match model.files.iter().find(|f| f.path == Manifest::FILE) {
            Some(_) => {
                let bytes = self.artifacts().read_all(&key(Manifest::FILE)).await?;
                let manifest = Manifest::from_json(&bytes)?;
                match Task::parse(&manifest.task) {
                    Some(task) => Some(task),
                    None => {
                        return Err(FormatError::new(
                            Manifest::FILE,
                            format!("unknown task {:?}", manifest.task),
                        )
                        .into());
                    }
                }
            }
            None => None,
        };
        // A Hugging Face folder (an optimum export) says what the model is in its own files.
        let mut hf_files = Vec::new();
        for name in HF_FILES {
            if model.files.iter().any(|f| f.path == name) {
                hf_files.push((
                    name.to_owned(),
                    self.artifacts().read_all(&key(name)).await?,
                ));
            }
        }
        let hf = read_hf(HfFiles::from_pairs(&hf_files))
            .map_err(|e| FormatError::new(e.file, e.problem))?;
        let task = manifest_task.unwrap_or(match kind {
            model::Kind::EmbeddingModel => Task::Embedding,
            model::Kind::TensorModel => Task::Tensor,
            _ => Task::TextGeneration,
        });
        check_task("model.onnx", &info, task)?;
        if task != Task::Tensor {
            let tokenizer = self.artifacts().read_all(&key("tokenizer.json")).await?;
            let loaded = tokio::task::spawn_blocking(move || {
                tokenizers::Tokenizer::from_bytes(&tokenizer)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| Error::Internal(format!("tokenizer check: {e}")))?;
            if let Err(e) = loaded {
                return Err(FormatError::new(
                    "tokenizer.json",
                    format!("does not load as a tokenizer: {e}"),
                )
                .into());
            }
        }
        let details = model
            .base_model_details
            .get_or_insert_with(BaseModelDetails::default);
        details.checkpoint_format = CheckpointFormat::Onnx as i32;
        details.task = task.as_str().to_owned();
        if details.model_type.is_empty() {
            details.model_type = if hf.model_type.is_empty() {
                info.producer.clone()
            } else {
                hf.model_type.clone()
            };
        }
        if model.context_length <= 0 && hf.context_length > 0 {
            model.context_length = i32::try_from(hf.context_length).unwrap_or(i32::MAX);
        }
        if task == Task::TextGeneration && !hf.chat_template.is_empty() {
            let conversation = model
                .conversation_config
                .get_or_insert_with(ConversationConfig::default);
            if conversation.template.is_empty() {
                conversation.template = hf.chat_template;
            }
        }
        Ok(model)
    }

    pub async fn validate_model_upload(
        &self,
        caller: &Principal,
        name: &str,
        validate_only: bool,
    ) -> Result<ValidateModelUploadResponse> {
        let stored = if validate_only {
            self.readable_model(caller, "name", name).await?
        } else {
            self.writable_model(caller, "name", name).await?
        };
        let files = stored.model.files.clone();
        let mut errors = Vec::new();
        for f in files.iter().filter(|f| !f.complete) {
            errors.push(format!(
                "{}: {} of {} bytes stored",
                f.path, f.uploaded_bytes, f.size_bytes
            ));
        }
        let missing: Vec<String> = required_files(&stored.model)
            .into_iter()
            .filter(|r| !files.iter().any(|f| f.path == *r))
            .map(str::to_owned)
            .collect();
        if files.is_empty() {
            errors.push("no files uploaded".to_owned());
        }
        if !errors.is_empty() || !missing.is_empty() {
            // Incomplete is not invalid: the model stays UPLOADING.
            return Ok(ValidateModelUploadResponse {
                valid: false,
                model: Some(stored.model),
                files,
                missing_files: missing,
                errors,
                warnings: vec![],
            });
        }
        if stored.model.state == model::State::Ready as i32 {
            return Ok(ValidateModelUploadResponse {
                valid: true,
                model: Some(stored.model),
                files,
                ..Default::default()
            });
        }
        let checked = self.check_content(&stored).await?;
        let previous = stored.model.state;
        let (valid, mut model, errors) = match checked {
            Ok(model) => (true, model, vec![]),
            Err(problem) => {
                let mut failed = stored.model.clone();
                failed.state = model::State::Failed as i32;
                failed.status = Some(kiln_proto::common::v1::Status {
                    code: tonic::Code::InvalidArgument as i32,
                    message: problem.to_string(),
                });
                (false, failed, vec![problem.to_string()])
            }
        };
        if validate_only {
            model.state = previous;
            model.status = stored.model.status.clone();
            return Ok(ValidateModelUploadResponse {
                valid,
                model: Some(stored.model),
                files,
                errors,
                ..Default::default()
            });
        }
        if valid {
            model.state = model::State::Ready as i32;
            model.status = Some(Default::default());
        }
        self.save_model(&mut model, ModelChange::StateChanged { previous })
            .await?;
        Ok(ValidateModelUploadResponse {
            valid,
            model: Some(model),
            files,
            errors,
            ..Default::default()
        })
    }
}

/// Why a content check stopped: a problem in the files (the model fails validation), or the
/// registry could not read them (the call fails).
enum Stop {
    Problem(FormatError),
    Failed(Error),
}

impl From<FormatError> for Stop {
    fn from(problem: FormatError) -> Self {
        Self::Problem(problem)
    }
}

impl From<Error> for Stop {
    fn from(err: Error) -> Self {
        Self::Failed(err)
    }
}
