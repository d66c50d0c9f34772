//! Preparers: each turns one checkpoint format into a servable bundle in the object store.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use kiln_core::auth::hex;
use kiln_core::{Error, Result};
use kiln_formats::{Manifest, convert_gguf};
use kiln_proto::common::v1::Precision;
use kiln_proto::registry::v1::base_model_details::CheckpointFormat;
use sha2::{Digest, Sha256};

use crate::artifacts::Artifacts;
use crate::stored::{StoredModel, file_key};

/// A file a preparer produced: its path in the bundle and where its bytes already are.
pub(crate) struct BundleFile {
    pub(crate) path: String,
    pub(crate) size_bytes: u64,
    pub(crate) sha256: String,
}

/// Converts a checkpoint format into a bundle.
#[async_trait]
pub(crate) trait Preparer: Send + Sync + 'static {
    /// Writes the bundle's files under `bundle` (see [`file_key`]) and lists them.
    async fn prepare(
        &self,
        artifacts: &Artifacts,
        model: &StoredModel,
        bundle: &str,
        precision: Precision,
    ) -> Result<Vec<BundleFile>>;
}

/// Preparers by checkpoint format.
#[derive(Clone, Default)]
pub(crate) struct Preparers(HashMap<i32, Arc<dyn Preparer>>);

impl Preparers {
    /// The preparers this service has: an ONNX bundle is served as uploaded, with a manifest;
    /// a GGUF checkpoint becomes an ONNX decoder-with-past bundle.
    pub(crate) fn standard() -> Self {
        let mut p = Self::default();
        p.register(CheckpointFormat::Onnx, Arc::new(OnnxBundle));
        p.register(CheckpointFormat::Gguf, Arc::new(GgufPreparer));
        p
    }

    pub(crate) fn register(&mut self, format: CheckpointFormat, preparer: Arc<dyn Preparer>) {
        self.0.insert(format as i32, preparer);
    }

    pub(crate) fn get(&self, format: i32) -> Option<&Arc<dyn Preparer>> {
        self.0.get(&format)
    }
}

/// An uploaded ONNX bundle: the files as they are, plus `manifest.json`.
struct OnnxBundle;

#[async_trait]
impl Preparer for OnnxBundle {
    async fn prepare(
        &self,
        artifacts: &Artifacts,
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
            artifacts
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
        out.push(put_file(artifacts, stored, bundle, Manifest::FILE, manifest).await?);
        Ok(out)
    }
}

/// Stores `data` as `path` of the bundle and describes it.
async fn put_file(
    artifacts: &Artifacts,
    stored: &StoredModel,
    bundle: &str,
    path: &str,
    data: Vec<u8>,
) -> Result<BundleFile> {
    let sha256 = hex(Sha256::digest(&data));
    let size_bytes = data.len() as u64;
    artifacts
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
        artifacts: &Artifacts,
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
        let bytes = artifacts
            .read_all(&file_key(stored.account(), stored.id(), "", &file.path))
            .await?;
        let path = file.path.clone();
        let converted = tokio::task::spawn_blocking(move || convert_gguf(&bytes, blocks))
            .await
            .map_err(|e| Error::Internal(format!("converting {path}: {e}")))?
            .map_err(|e| Error::FailedPrecondition(format!("{path}: {e}")))?;
        let mut out = Vec::new();
        for (path, data) in converted.files {
            out.push(put_file(artifacts, stored, bundle, path, data).await?);
        }
        Ok(out)
    }
}
