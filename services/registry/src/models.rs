//! Models: create, read, list, update, delete; the read rule of the public library.

use kiln_core::Error;
use kiln_core::auth::Principal;
use kiln_core::listing::{Field, Fields, Kind, ListRequest, Listing};
use kiln_core::names::{self, ChildName};
use kiln_core::time::{micros_to_timestamp, now_micros};
use kiln_events::Body;
use kiln_events::records::HasRecords as _;
use kiln_proto::events::v1 as ev;
use kiln_proto::registry::v1::{Model, model};
use prost::Message;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

use crate::db::{model as models, model_file as files};
use crate::service::Registry;
use crate::stored::{StoredModel, assemble};
use kiln_core::Result;
use kiln_core::grpc::Update;
use kiln_core::names::validate_display_name;

impl Registry {
    /// Reads a model row and its files. No access check.
    pub(crate) async fn stored_model(
        &self,
        account: &str,
        id: &str,
    ) -> Result<Option<StoredModel>> {
        let Some(row) = models::Entity::find_by_id((account.to_owned(), id.to_owned()))
            .one(self.db())
            .await?
        else {
            return Ok(None);
        };
        let files = files::Entity::find()
            .filter(files::Column::AccountId.eq(account))
            .filter(files::Column::ModelId.eq(id))
            .all(self.db())
            .await?;
        Ok(Some(assemble(row, &files)?))
    }

    /// A model the caller may read (its own account's, or a public one), else NOT_FOUND.
    pub(crate) async fn readable_model(
        &self,
        caller: &Principal,
        field: &str,
        name: &str,
    ) -> Result<StoredModel> {
        let name = ChildName::parse(field, "models", name, Some(&caller.account))?;
        let stored = self.stored_model(&name.account, &name.id).await?;
        match stored {
            Some(s) if caller.can_access(&name.account) || s.row.public => Ok(s),
            _ => Err(Error::not_found(&name)),
        }
    }

    /// A model the caller may change: its own account's (public ones of others are read-only;
    /// the system account's library is the platform admin's).
    pub(crate) async fn writable_model(
        &self,
        caller: &Principal,
        field: &str,
        name: &str,
    ) -> Result<StoredModel> {
        let stored = self.readable_model(caller, field, name).await?;
        if !caller.can_access(stored.account()) {
            return Err(Error::PermissionDenied(format!(
                "{} is public and read-only",
                stored.model.name
            )));
        }
        Ok(stored)
    }

    /// Writes a model row (insert or full update) and its event in one transaction.
    /// Stores `model` as `change` left it (its update time now, unless it is new) with the
    /// event that says so, in one transaction.
    pub(crate) async fn save_model(&self, model: &mut Model, change: ModelChange) -> Result<()> {
        let insert = matches!(change, ModelChange::Created);
        if !insert {
            model.update_time = Some(micros_to_timestamp(now_micros()));
        }
        let (event_type, body) = change.event(model);
        let name = ChildName::parse("model.name", "models", &model.name, None)?;
        let mut stored = model.clone();
        // Files and refs live in their own rows; the resource keeps the rest.
        stored.files.clear();
        for bundle in &mut stored.prepared_bundles {
            bundle.files.clear();
        }
        let row = models::Model {
            account_id: name.account.clone(),
            model_id: name.id.clone(),
            kind: model.kind,
            state: model.state,
            public: model.public,
            display_name: model.display_name.clone(),
            base_model: model
                .peft_details
                .as_ref()
                .map(|p| p.base_model.clone())
                .unwrap_or_default(),
            create_time: kiln_core::time::micros_of(&model.create_time),
            update_time: kiln_core::time::micros_of(&model.update_time),
            resource: stored.encode_to_vec(),
        };
        let txn = sea_orm::TransactionTrait::begin(self.db()).await?;
        let mut row = row;
        if !insert {
            // Lock the row first (on SQLite: take the write lock before reading, so the
            // transaction never has to upgrade a stale read snapshot).
            models::Entity::update_many()
                .col_expr(
                    models::Column::UpdateTime,
                    sea_orm::sea_query::Expr::col(models::Column::UpdateTime).into(),
                )
                .filter(models::Column::AccountId.eq(name.account.clone()))
                .filter(models::Column::ModelId.eq(name.id.clone()))
                .exec(&txn)
                .await?;
            // deployed_model_refs belong to the scheduler-events consumer: keep what it wrote.
            if let Some(current) =
                models::Entity::find_by_id((name.account.clone(), name.id.clone()))
                    .one(&txn)
                    .await?
            {
                let current = Model::decode(current.resource.as_slice())
                    .map_err(|e| Error::Internal(format!("stored model does not decode: {e}")))?;
                stored.deployed_model_refs = current.deployed_model_refs;
                row.resource = stored.encode_to_vec();
            }
        }
        kiln_store::save(&txn, models::ActiveModel::from(row), insert, &name).await?;
        let outbox = self.outbox();
        Ok(outbox
            .commit_event(txn, event_type, &name.account, &model.name, body)
            .await?)
    }

    pub async fn create_model(
        &self,
        caller: &Principal,
        parent: &str,
        model_id: String,
        model: Model,
    ) -> Result<Model> {
        let parent = caller.own_parent(parent)?;
        names::validate_id("model_id", &model_id)?;
        validate_display_name("model.display_name", &model.display_name)?;
        names::validate_text("model.description", &model.description)?;
        let kind = model::Kind::try_from(model.kind).unwrap_or(model::Kind::Unspecified);
        if kind == model::Kind::Unspecified {
            return Err(Error::invalid(
                "model.kind",
                "is required: BASE_MODEL, LORA_ADDON, EMBEDDING_MODEL or TENSOR_MODEL",
            ));
        }
        if model.public && !caller.is_privileged() {
            return Err(Error::PermissionDenied(
                "only a platform admin publishes models".into(),
            ));
        }
        if model.context_length < 0 {
            return Err(Error::invalid(
                "model.context_length",
                "must not be negative",
            ));
        }
        let mut peft = model.peft_details.clone();
        if kind == model::Kind::LoraAddon {
            let details = peft
                .as_mut()
                .filter(|p| !p.base_model.is_empty())
                .ok_or_else(|| {
                    Error::invalid(
                        "model.peft_details.base_model",
                        "is required for a LoRA addon",
                    )
                })?;
            let base = self
                .readable_model(caller, "model.peft_details.base_model", &details.base_model)
                .await?;
            if base.model.kind != model::Kind::BaseModel as i32 {
                return Err(Error::invalid(
                    "model.peft_details.base_model",
                    format!("{} is not a base model", base.model.name),
                ));
            }
            details.base_model = base.model.name.clone();
        } else if peft.is_some() {
            return Err(Error::invalid(
                "model.peft_details",
                "only LORA_ADDON models have peft_details",
            ));
        }
        let now = micros_to_timestamp(now_micros());
        let created = Model {
            name: format!("{parent}/models/{model_id}"),
            display_name: names::display_name_or(&model.display_name, &model_id),
            description: model.description.clone(),
            create_time: Some(now),
            update_time: Some(now),
            state: model::State::Uploading as i32,
            status: Some(kiln_proto::common::v1::Status::default()),
            kind: kind as i32,
            public: model.public,
            context_length: model.context_length,
            base_model_details: if kind == model::Kind::LoraAddon {
                None
            } else {
                Some(model.base_model_details.clone().unwrap_or_default())
            },
            peft_details: peft,
            conversation_config: model.conversation_config.clone(),
            supports_image_input: model.supports_image_input,
            supports_tools: model.supports_tools,
            supports_lora: model.supports_lora,
            supports_serverless: model.supports_serverless,
            imported_from: model.imported_from.clone(),
            hugging_face_url: model.hugging_face_url.clone(),
            // Only the platform says a model came from a fine-tuning job, and for whom.
            fine_tuning_job: match caller.is_privileged() {
                true => model.fine_tuning_job.clone(),
                false => String::new(),
            },
            created_by: match caller.is_privileged() && !model.created_by.is_empty() {
                true => model.created_by.clone(),
                false => caller.creator(),
            },
            ..Default::default()
        };
        let mut created = created;
        self.save_model(&mut created, ModelChange::Created).await?;
        Ok(created)
    }

    pub async fn get_model(&self, caller: &Principal, name: &str) -> Result<Model> {
        Ok(self.readable_model(caller, "name", name).await?.model)
    }

    pub async fn list_models(
        &self,
        caller: &Principal,
        request: &ListRequest,
    ) -> Result<Listing<Model>> {
        let parent = names::AccountName::parse("parent", &request.parent)?;
        let query = MODEL_FIELDS.query(self.pages(), request, &caller.account)?;
        let mut select =
            models::Entity::find().filter(models::Column::AccountId.eq(parent.account.clone()));
        if !caller.can_access(&parent.account) {
            // Another account: only what it publishes.
            select = select.filter(models::Column::Public.eq(true));
        }
        let page = kiln_store::listing::list(self.db(), self.pages(), &query, select).await?;
        // The page's files in one query, not one per model.
        let ids: Vec<String> = page.items.iter().map(|r| r.model_id.clone()).collect();
        let files = files::Entity::find()
            .filter(files::Column::AccountId.eq(parent.account.clone()))
            .filter(files::Column::ModelId.is_in(ids))
            .all(self.db())
            .await?;
        let mut items = Vec::with_capacity(page.items.len());
        for row in page.items {
            let own: Vec<files::Model> = files
                .iter()
                .filter(|f| f.model_id == row.model_id)
                .cloned()
                .collect();
            items.push(assemble(row, &own)?.model);
        }
        Ok(Listing {
            items,
            next_page_token: page.next_page_token,
            total_size: page.total_size,
        })
    }

    pub async fn update_model(&self, caller: &Principal, request: Update<Model>) -> Result<Model> {
        let paths = request.paths(&[
            ("display_name", !request.resource.display_name.is_empty()),
            ("description", !request.resource.description.is_empty()),
        ]);
        let update = request.resource;
        let stored = self
            .writable_model(caller, "model.name", &update.name)
            .await?;
        let mut model = stored.model.clone();
        for path in &paths {
            match path.as_str() {
                "display_name" => {
                    validate_display_name("model.display_name", &update.display_name)?;
                    model.display_name = update.display_name.clone();
                }
                "description" => {
                    names::validate_text("model.description", &update.description)?;
                    model.description = update.description.clone();
                }
                "public" => {
                    if !caller.is_privileged() {
                        return Err(Error::PermissionDenied(
                            "only a platform admin publishes models".into(),
                        ));
                    }
                    model.public = update.public;
                }
                "context_length" => {
                    if update.context_length < 0 {
                        return Err(Error::invalid(
                            "model.context_length",
                            "must not be negative",
                        ));
                    }
                    model.context_length = update.context_length;
                }
                "conversation_config" => {
                    model.conversation_config = update.conversation_config.clone()
                }
                "supports_image_input" => model.supports_image_input = update.supports_image_input,
                "supports_tools" => model.supports_tools = update.supports_tools,
                "supports_lora" => model.supports_lora = update.supports_lora,
                "supports_serverless" => model.supports_serverless = update.supports_serverless,
                "hugging_face_url" => model.hugging_face_url = update.hugging_face_url.clone(),
                "base_model_details.default_precision" | "base_model_details.tunable" => {
                    let Some(details) = model.base_model_details.as_mut() else {
                        return Err(Error::invalid(
                            "update_mask",
                            format!("{path}: this model has no base_model_details"),
                        ));
                    };
                    let new = update.base_model_details.clone().unwrap_or_default();
                    if path.ends_with("tunable") {
                        details.tunable = new.tunable;
                    } else {
                        details.default_precision = new.default_precision;
                    }
                }
                other => {
                    return Err(Error::invalid(
                        "update_mask",
                        format!("{other:?} is not an updatable field of a model"),
                    ));
                }
            }
        }
        if model == stored.model {
            return Ok(model);
        }
        self.save_model(&mut model, ModelChange::Updated(paths))
            .await?;
        Ok(model)
    }

    pub async fn delete_model(&self, caller: &Principal, name: &str) -> Result<()> {
        let stored = self.writable_model(caller, "name", name).await?;
        if !stored.model.deployed_model_refs.is_empty() {
            let refs: Vec<&str> = stored
                .model
                .deployed_model_refs
                .iter()
                .map(|r| r.name.as_str())
                .collect();
            return Err(Error::FailedPrecondition(format!(
                "{} is deployed ({}); undeploy it first",
                stored.model.name,
                refs.join(", ")
            )));
        }
        let addons = models::Entity::find()
            .filter(models::Column::BaseModel.eq(stored.model.name.clone()))
            .one(self.db())
            .await?;
        if let Some(addon) = addons {
            return Err(Error::FailedPrecondition(format!(
                "{} is the base of accounts/{}/models/{}; delete the addon first",
                stored.model.name, addon.account_id, addon.model_id
            )));
        }
        let txn = sea_orm::TransactionTrait::begin(self.db()).await?;
        files::Entity::delete_many()
            .filter(files::Column::AccountId.eq(stored.account()))
            .filter(files::Column::ModelId.eq(stored.id()))
            .exec(&txn)
            .await?;
        models::Entity::delete_by_id((stored.account().to_owned(), stored.id().to_owned()))
            .exec(&txn)
            .await?;
        self.outbox()
            .commit_event(
                txn,
                "registry.model.deleted",
                stored.account(),
                &stored.model.name,
                Body::ModelDeleted(ev::ModelDeleted {
                    name: stored.model.name.clone(),
                }),
            )
            .await?;
        // The bytes go after the rows: a crash in between leaves only unreferenced objects.
        self.artifacts()
            .delete_prefix(&format!("models/{}/{}", stored.account(), stored.id()))
            .await?;
        Ok(())
    }
}

/// A change to a model, and so its event.
pub(crate) enum ModelChange {
    Created,
    Updated(Vec<String>),
    StateChanged { previous: i32 },
    Prepared(kiln_proto::registry::v1::PreparedBundle),
}

impl ModelChange {
    fn event(self, model: &Model) -> (&'static str, Body) {
        let model_now = || Some(model.clone());
        match self {
            Self::Created => (
                "registry.model.created",
                Body::ModelCreated(ev::ModelCreated { model: model_now() }),
            ),
            Self::Updated(paths) => (
                "registry.model.updated",
                Body::ModelUpdated(ev::ModelUpdated {
                    model: model_now(),
                    update_mask: Some(prost_types::FieldMask { paths }),
                }),
            ),
            Self::StateChanged { previous } => (
                "registry.model.state_changed",
                Body::ModelStateChanged(ev::ModelStateChanged {
                    model: model_now(),
                    previous_state: previous,
                }),
            ),
            Self::Prepared(bundle) => (
                "registry.model.prepared",
                Body::ModelPrepared(ev::ModelPrepared {
                    name: model.name.clone(),
                    bundle: Some(bundle),
                }),
            ),
        }
    }
}

/// The fields a model list filters on and orders by.
static MODEL_FIELDS: Fields<models::Column> = Fields {
    collection: "models",
    fields: &[
        Field::order("name", models::Column::ModelId),
        Field::order("create_time", models::Column::CreateTime),
        Field::order("update_time", models::Column::UpdateTime),
        Field::both("display_name", models::Column::DisplayName, Kind::Text),
        Field::filter(
            "state",
            models::Column::State,
            Kind::Enum(|s| model::State::from_str_name(s).map(|v| v as i32)),
        ),
        Field::filter(
            "kind",
            models::Column::Kind,
            Kind::Enum(|s| model::Kind::from_str_name(s).map(|v| v as i32)),
        ),
        Field::filter("public", models::Column::Public, Kind::Bool),
        Field::filter(
            "peft_details.base_model",
            models::Column::BaseModel,
            Kind::Text,
        ),
    ],
    tie_break: models::Column::ModelId,
};
