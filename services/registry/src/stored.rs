//! A model as the registry stores it: its row, its decoded resource with its files, and where
//! its bytes live in the object store.

use kiln_core::{Error, Result};
use kiln_proto::registry::v1::{Model, ModelFile};
use prost::Message;

use crate::db::{model as models, model_file as files};

/// A model row with its decoded resource.
pub(crate) struct StoredModel {
    pub(crate) row: models::Model,
    pub(crate) model: Model,
}

impl StoredModel {
    pub(crate) fn account(&self) -> &str {
        &self.row.account_id
    }

    pub(crate) fn id(&self) -> &str {
        &self.row.model_id
    }
}

/// The object key of an uploaded file (`bundle` empty) or of a prepared bundle's file.
pub(crate) fn file_key(account: &str, model: &str, bundle: &str, path: &str) -> String {
    if bundle.is_empty() {
        format!("models/{account}/{model}/files/{path}")
    } else {
        format!("models/{account}/{model}/bundles/{bundle}/{path}")
    }
}

pub(crate) fn file_proto(f: &files::Model) -> ModelFile {
    ModelFile {
        path: f.path.clone(),
        size_bytes: f.size_bytes,
        sha256: f.sha256.clone(),
        uploaded_bytes: f.uploaded_bytes,
        complete: f.complete,
    }
}

/// A model from its row and the rows of its files (uploaded and of its bundles).
pub(crate) fn assemble(row: models::Model, files: &[files::Model]) -> Result<StoredModel> {
    let mut model = Model::decode(row.resource.as_slice())
        .map_err(|e| Error::Internal(format!("stored model does not decode: {e}")))?;
    model.files = files
        .iter()
        .filter(|f| f.bundle.is_empty())
        .map(file_proto)
        .collect();
    for bundle in &mut model.prepared_bundles {
        let name = precision_name(bundle.precision);
        bundle.files = files
            .iter()
            .filter(|f| f.bundle == name)
            .map(file_proto)
            .collect();
    }
    Ok(StoredModel { row, model })
}

pub(crate) fn precision_name(precision: i32) -> String {
    kiln_proto::common::v1::Precision::try_from(precision)
        .map(|p| p.as_str_name().to_ascii_lowercase())
        .unwrap_or_else(|_| format!("precision-{precision}"))
}
