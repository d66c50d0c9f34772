//! PrepareModel: turns a READY model's files into a servable bundle (ONNX graph(s),
//! tokenizer.json and manifest.json) by the preparer registered for its checkpoint format:
//! an ONNX checkpoint's files as they are, a GGUF checkpoint converted by kiln-formats.

use kiln_core::Error;
use kiln_events::records::HasRecords as _;

use kiln_core::auth::Principal;
use kiln_core::time::{micros_to_timestamp, now_micros};
use kiln_proto::common::v1::Precision;
use kiln_proto::registry::v1::{
    Model, PreparedBundle, base_model_details::CheckpointFormat, model, prepared_bundle,
};
use sea_orm::EntityTrait;

use crate::db::model_file as files;
use crate::models::ModelChange;
use crate::service::Registry;
use crate::stored::precision_name;
use kiln_core::Result;

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
            .prepare(self.artifacts(), &stored, &bundle_name, precision)
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
        self.save_model(&mut model, ModelChange::Prepared(bundle))
            .await?;
        let fresh = self
            .stored_model(stored.account(), stored.id())
            .await?
            .ok_or_else(|| Error::not_found(&model.name))?;
        Ok(fresh.model)
    }
}
