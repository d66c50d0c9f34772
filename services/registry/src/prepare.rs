//! PrepareModel: turns a READY model's files into a servable bundle (ONNX graph(s),
//! tokenizer.json and manifest.json) by the preparer registered for its checkpoint format:
//! an ONNX checkpoint's files as they are, a GGUF checkpoint converted by kiln-formats.

use kiln_core::Error;
use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use kiln_core::auth::Principal;
use kiln_core::time::{micros_to_timestamp, now_micros};
use kiln_events::Body;
use kiln_formats::{Manifest, convert_gguf};
use kiln_proto::common::v1::Precision;
use kiln_proto::events::v1 as ev;
use kiln_proto::registry::v1::{
    Model, PreparedBundle, base_model_details::CheckpointFormat, model, prepared_bundle,
};
use sea_orm::EntityTrait;
use sha2::{Digest, Sha256};

use crate::db::model_file as files;
use crate::models::{StoredModel, file_key, precision_name};
use crate::service::Registry;
use kiln_core::Result;
use kiln_core::auth::hex;

/// A file a preparer produced: its path in the bundle and where its bytes already are.
pub struct BundleFile {
    pub path: String,
    pub size_bytes: u64,
    pub sha256: String,
}

/// Converts a checkpoint format into a bundle.
#[async_trait]
pub trait Preparer: Send + Sync + 'static {
    /// Writes the bundle's files under `bundle` (see [`file_key`]) and lists them.
    async fn prepare(
        &self,
        registry: &Registry,
        model: &StoredModel,
        bundle: &str,
        precision: Precision,
    ) -> Result<Vec<BundleFile>>;
}

/// Preparers by checkpoint format.
#[derive(Clone, Default)]
pub struct Preparers(HashMap<i32, Arc<dyn Preparer>>);

impl Preparers {
    /// The preparers this service has: an ONNX bundle is served as uploaded, with a manifest;
    /// a GGUF checkpoint becomes an ONNX decoder-with-past bundle.
    pub fn standard() -> Self {
        let mut p = Self::default();
        p.register(CheckpointFormat::Onnx, Arc::new(OnnxBundle));
        p.register(CheckpointFormat::Gguf, Arc::new(GgufPreparer));
        p
    }

    pub fn register(&mut self, format: CheckpointFormat, preparer: Arc<dyn Preparer>) {
        self.0.insert(format as i32, preparer);
    }

    fn get(&self, format: i32) -> Option<&Arc<dyn Preparer>> {
        self.0.get(&format)
    }
}

/// An uploaded ONNX bundle: the files as they are, plus `manifest.json`.
struct OnnxBundle;

#[async_trait]
impl Preparer for OnnxBundle {
    async fn prepare(
        &self,
        registry: &Registry,
        stored: &StoredModel,
        bundle: &str,
        _precision: Precision,
    ) -> Result<Vec<BundleFile>> {
        let mut out = Vec::new();
        for file in stored
            .model
            .files
            .iter()
            .filter(|f| f.path != Manifest::FILE)
        {
            registry
                .artifacts()
                .copy(
                    &file_key(stored.account(), stored.id(), "", &file.path),
                    &file_key(stored.account(), stored.id(), bundle, &file.path),
                )
                .await?;
            out.push(BundleFile {
                path: file.path.clone(),
                size_bytes: file.size_bytes as u64,
                sha256: file.sha256.clone(),
            });
        }
        let manifest = Manifest::of_model(&stored.model).to_json();
        out.push(put_file(registry, stored, bundle, Manifest::FILE, manifest).await?);
        Ok(out)
    }
}

/// Stores `data` as `path` of the bundle and describes it.
async fn put_file(
    registry: &Registry,
    stored: &StoredModel,
    bundle: &str,
    path: &str,
    data: Vec<u8>,
) -> Result<BundleFile> {
    let sha256 = hex(Sha256::digest(&data));
    let size_bytes = data.len() as u64;
    registry
        .artifacts()
        .put(
            &file_key(stored.account(), stored.id(), bundle, path),
            data.into(),
        )
        .await?;
    Ok(BundleFile {
        path: path.to_owned(),
        size_bytes,
        sha256,
    })
}

/// A GGUF checkpoint, converted into an ONNX decoder-with-past bundle.
struct GgufPreparer;

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
                return Err(Error::FailedPrecondition(format!(
                    "GGUF checkpoints are prepared in FP32 or INT4, not {}",
                    other.as_str_name()
                )));
            }
        };
        let file = stored
            .model
            .files
            .iter()
            .find(|f| f.path.ends_with(".gguf"))
            .ok_or_else(|| {
                Error::FailedPrecondition(format!("{} has no .gguf file", stored.model.name))
            })?;
        let bytes = registry
            .artifacts()
            .read_all(&file_key(stored.account(), stored.id(), "", &file.path))
            .await?;
        let path = file.path.clone();
        let converted = tokio::task::spawn_blocking(move || convert_gguf(&bytes, blocks))
            .await
            .map_err(|e| Error::Internal(format!("converting {path}: {e}")))?
            .map_err(|e| Error::FailedPrecondition(format!("{path}: {e}")))?;
        let mut out = Vec::new();
        for (path, data) in converted.files {
            out.push(put_file(registry, stored, bundle, path, data).await?);
        }
        Ok(out)
    }
}

impl Registry {
    pub async fn prepare_model(
        &self,
        caller: &Principal,
        name: &str,
        precision: i32,
        force: bool,
    ) -> Result<Model> {
        let stored = self.writable_model(caller, "name", name).await?;
        if stored.model.state != model::State::Ready as i32 {
            return Err(Error::FailedPrecondition(format!(
                "{} is not READY: upload and validate it first",
                stored.model.name
            )));
        }
        if stored.model.kind == model::Kind::LoraAddon as i32 {
            return Err(Error::FailedPrecondition(
                "a LoRA addon is served on its base model; there is nothing to prepare".into(),
            ));
        }
        let details = stored.model.base_model_details.clone().unwrap_or_default();
        let precision = match Precision::try_from(precision) {
            Ok(Precision::Unspecified) => Precision::try_from(details.default_precision)
                .ok()
                .filter(|p| *p != Precision::Unspecified)
                .unwrap_or(Precision::Fp32),
            Ok(p) => p,
            Err(_) => {
                return Err(Error::invalid(
                    "precision",
                    format!("{precision} is not a precision"),
                ));
            }
        };
        if !force
            && stored.model.prepared_bundles.iter().any(|b| {
                b.precision == precision as i32 && b.state == prepared_bundle::State::Ready as i32
            })
        {
            return Ok(stored.model);
        }
        let format = CheckpointFormat::try_from(details.checkpoint_format)
            .unwrap_or(CheckpointFormat::Unspecified);
        let preparer = self
            .preparers()
            .get(format as i32)
            .cloned()
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "no preparer is registered for {} checkpoints",
                    format.as_str_name()
                ))
            })?;
        let bundle_name = precision_name(precision as i32);
        let now = micros_to_timestamp(now_micros());
        let mut bundle = PreparedBundle {
            state: prepared_bundle::State::Ready as i32,
            status: Some(Default::default()),
            precision: precision as i32,
            files: vec![],
            create_time: Some(now),
            update_time: Some(now),
        };
        match preparer
            .prepare(self, &stored, &bundle_name, precision)
            .await
        {
            Ok(produced) => {
                for f in &produced {
                    let row = files::Model {
                        account_id: stored.account().to_owned(),
                        model_id: stored.id().to_owned(),
                        bundle: bundle_name.clone(),
                        path: f.path.clone(),
                        size_bytes: f.size_bytes as i64,
                        sha256: f.sha256.clone(),
                        uploaded_bytes: f.size_bytes as i64,
                        complete: true,
                    };
                    files::Entity::delete_by_id((
                        row.account_id.clone(),
                        row.model_id.clone(),
                        row.bundle.clone(),
                        row.path.clone(),
                    ))
                    .exec(self.db())
                    .await?;
                    files::Entity::insert(files::ActiveModel::from(row))
                        .exec_without_returning(self.db())
                        .await?;
                }
            }
            Err(err) => {
                bundle.state = prepared_bundle::State::Failed as i32;
                bundle.status = Some(kiln_proto::common::v1::Status {
                    code: tonic::Code::Internal as i32,
                    message: err.to_string(),
                });
            }
        }
        let mut model = stored.model.clone();
        model
            .prepared_bundles
            .retain(|b| b.precision != precision as i32);
        model.prepared_bundles.push(bundle.clone());
        model.update_time = Some(now);
        self.save_model(
            &model,
            false,
            "registry.model.prepared",
            Body::ModelPrepared(ev::ModelPrepared {
                name: model.name.clone(),
                bundle: Some(bundle),
            }),
        )
        .await?;
        let fresh = self
            .stored_model(stored.account(), stored.id())
            .await?
            .ok_or_else(|| Error::not_found(&model.name))?;
        Ok(fresh.model)
    }
}
