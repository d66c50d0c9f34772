//! Keeps `Model.deployed_model_refs` current from the scheduler's deployed-model events, so a
//! deployed model cannot be deleted. A durable, idempotent consumer: redelivery changes nothing.

use kiln_events::records::HasRecords as _;
use std::sync::Arc;

use async_trait::async_trait;
use kiln_events::consumer::{EventHandler, OnceEach};
use kiln_events::{Body, Event};
use kiln_proto::registry::v1::{DeployedModelRef, Model};
use kiln_proto::scheduler::v1::DeployedModel;
use prost::Message;
use sea_orm::{ActiveModelTrait, ActiveValue::Set, DatabaseTransaction, EntityTrait};

use crate::db::model as models;

/// The consumer's durable name.
pub const CONSUMER: &str = "registry-deployed-models";
/// What it listens to.
pub const SUBJECTS: &str = "kiln.scheduler.deployed_model.>";

pub struct DeployedModelRefs;

enum Change {
    Upsert(DeployedModel),
    Remove { name: String, model: String },
}

#[async_trait]
impl EventHandler for DeployedModelRefs {
    async fn handle(
        &self,
        txn: &DatabaseTransaction,
        event: &Event,
    ) -> Result<(), kiln_events::Error> {
        let change = match &event.body {
            Some(Body::DeployedModelCreated(b)) => b.deployed_model.clone().map(Change::Upsert),
            Some(Body::DeployedModelUpdated(b)) => b.deployed_model.clone().map(Change::Upsert),
            Some(Body::DeployedModelStateChanged(b)) => {
                b.deployed_model.clone().map(Change::Upsert)
            }
            Some(Body::DeployedModelDeleted(b)) => Some(Change::Remove {
                name: b.name.clone(),
                model: b.model.clone(),
            }),
            _ => None,
        };
        let Some(change) = change else { return Ok(()) };
        let model_name = match &change {
            Change::Upsert(dm) => dm.model.clone(),
            Change::Remove { model, .. } => model.clone(),
        };
        let Some((account, id)) = model_name
            .strip_prefix("accounts/")
            .and_then(|r| r.split_once("/models/"))
        else {
            return Ok(());
        };
        let Some(row) = models::Entity::find_by_id((account.to_owned(), id.to_owned()))
            .one(txn)
            .await?
        else {
            // A model this registry does not have (or no longer has): nothing to keep.
            return Ok(());
        };
        let mut model = Model::decode(row.resource.as_slice()).map_err(|e| {
            kiln_events::Error::Handler(format!("stored model does not decode: {e}"))
        })?;
        match change {
            Change::Upsert(dm) => {
                let state = kiln_proto::scheduler::v1::deployed_model::State::try_from(dm.state)
                    .map(|s| s.as_str_name().to_owned())
                    .unwrap_or_default();
                let reference = DeployedModelRef {
                    name: dm.name.clone(),
                    deployment: dm.deployment,
                    state,
                    default: dm.default,
                    public: dm.public,
                };
                match model
                    .deployed_model_refs
                    .iter_mut()
                    .find(|r| r.name == dm.name)
                {
                    Some(existing) => *existing = reference,
                    None => model.deployed_model_refs.push(reference),
                }
            }
            Change::Remove { name, .. } => model.deployed_model_refs.retain(|r| r.name != name),
        }
        let mut active: models::ActiveModel = row.into();
        active.resource = Set(model.encode_to_vec());
        active.update(txn).await?;
        Ok(())
    }
}

/// Starts the consumer on the host.
pub fn spawn(registry: &crate::Registry, host: &mut kiln_events::host::Host) {
    let once_each = OnceEach::new(registry.db().clone(), CONSUMER, Arc::new(DeployedModelRefs));
    host.consume(CONSUMER, SUBJECTS, 1, once_each);
}
