//! Deployed models: a base model or LoRA addon on a deployment, the name requests use.

use kiln_core::Error;
use kiln_core::auth::Principal;
use kiln_core::grpc::Update;
use kiln_core::listing::{Field, Fields, Getter, Kind, ListRequest, Listing, Value, time_value};
use kiln_core::names::{self, ChildName, validate_display_name};
use kiln_events::records::HasRecords as _;
use kiln_proto::common::v1::Status as ResourceStatus;
use kiln_proto::registry::v1::model;
use kiln_proto::scheduler::v1::{DeployedModel, deployed_model, deployment};

use crate::resource::is_gone;
use crate::service::{DeployedModelChange, Scheduler};
use crate::state::State;
use crate::time::now;
use kiln_core::Result;
use kiln_core::names::account_of;

/// What a caller means to do with a deployed model.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Read it: its own account's, or a public one.
    Read,
    /// Change it: its own account's only.
    Write,
}

/// The deployed model `name` (in `field`) if the caller may have it for `access`; NOT_FOUND
/// otherwise, so others' deployed models do not show.
fn find<'s>(
    state: &'s State,
    caller: &Principal,
    field: &str,
    name: &str,
    access: Access,
) -> Result<&'s DeployedModel> {
    let parsed = ChildName::parse(field, "deployedModels", name, Some(&caller.account))?;
    match state.deployed_models.get(&parsed.to_string()) {
        Some(dm) if caller.can_access(&parsed.account) || (access == Access::Read && dm.public) => {
            Ok(dm)
        }
        _ => Err(Error::not_found(&parsed)),
    }
}

impl Scheduler {
    pub(crate) async fn create_deployed_model(
        &self,
        caller: &Principal,
        parent: &str,
        deployed_model_id: String,
        dm: DeployedModel,
    ) -> Result<DeployedModel> {
        let parent = caller.own_parent(parent)?;
        validate_display_name("deployed_model.display_name", &dm.display_name)?;
        names::validate_text("deployed_model.description", &dm.description)?;
        if dm.public && !caller.is_privileged() {
            return Err(Error::PermissionDenied(
                "only a platform admin makes deployed models public".into(),
            ));
        }
        if dm.model.is_empty() {
            return Err(Error::invalid("deployed_model.model", "is required"));
        }
        if dm.deployment.is_empty() {
            return Err(Error::invalid("deployed_model.deployment", "is required"));
        }
        let model_name = ChildName::parse(
            "deployed_model.model",
            "models",
            &dm.model,
            Some(&caller.account),
        )?;
        let model = match self.catalog().get_model(&model_name.to_string()).await {
            Ok(m) if m.public || caller.can_access(&model_name.account) => m,
            Ok(_) => return Err(Error::not_found(&model_name)),
            Err(e) if e.code() == tonic::Code::NotFound => {
                return Err(Error::not_found(&model_name));
            }
            Err(e) => return Err(e),
        };
        if model.state != model::State::Ready as i32 {
            return Err(Error::FailedPrecondition(format!(
                "{} is not READY",
                model.name
            )));
        }
        let mut state = self.lock().await;
        let target = self.readable(&state, caller, "deployed_model.deployment", &dm.deployment)?;
        let d = target.deployment.clone();
        if !caller.can_access(account_of(&d.name)) {
            return Err(Error::not_found(&d.name));
        }
        if is_gone(&d) {
            return Err(Error::FailedPrecondition(format!("{} is deleted", d.name)));
        }
        if model.kind == model::Kind::LoraAddon as i32 {
            let base = model
                .peft_details
                .as_ref()
                .map(|p| p.base_model.as_str())
                .unwrap_or_default();
            if base != d.base_model {
                return Err(Error::invalid(
                    "deployed_model.model",
                    format!(
                        "{} is an addon of {base}; {} serves {}",
                        model.name, d.name, d.base_model
                    ),
                ));
            }
            if !d.enable_addons {
                return Err(Error::FailedPrecondition(format!(
                    "{} does not take addons (set enable_addons)",
                    d.name
                )));
            }
        } else if model.name != d.base_model {
            return Err(Error::invalid(
                "deployed_model.model",
                format!("{} serves {}, not {}", d.name, d.base_model, model.name),
            ));
        }
        let model_id = model_name.id.clone();
        let id = if deployed_model_id.is_empty() {
            self.free_deployed_model_id(&state, &parent.account, &model_id)
        } else {
            names::validate_id("deployed_model_id", &deployed_model_id)?;
            deployed_model_id
        };
        let name = format!("{parent}/deployedModels/{id}");
        if state.deployed_models.contains_key(&name) {
            return Err(Error::already_exists(&name));
        }
        let has_default = state.deployed_models.values().any(|other| {
            other.model == model.name
                && other.default
                && other.name.starts_with(&format!("{parent}/"))
        });
        let created = now();
        let serverless = d.deployment_type == deployment::DeploymentType::Serverless as i32;
        // An addon is DEPLOYED only once the replicas hold it (the reconcile pass sees to it).
        let ready = d.state == deployment::State::Ready as i32 && model.name == d.base_model;
        let new = DeployedModel {
            name: name.clone(),
            display_name: names::display_name_or(&dm.display_name, &model.display_name),
            description: dm.description.clone(),
            create_time: Some(created),
            update_time: Some(created),
            model: model.name.clone(),
            deployment: d.name.clone(),
            default: dm.default || !has_default,
            state: if ready {
                deployed_model::State::Deployed
            } else {
                deployed_model::State::Deploying
            } as i32,
            serverless,
            status: Some(ResourceStatus::default()),
            public: dm.public,
        };
        if new.default && has_default {
            self.clear_default(&mut state, &parent.account, &model.name)
                .await?;
        }
        let mut new = new;
        self.save_deployed_model(&mut new, DeployedModelChange::Created)
            .await?;
        state.deployed_models.insert(name, new.clone());
        drop(state);
        self.wake();
        Ok(new)
    }

    /// Takes `default` off the account's current default deployed model of `model`.
    async fn clear_default(&self, state: &mut State, account: &str, model: &str) -> Result<()> {
        let prefix = format!("accounts/{account}/");
        let current: Vec<String> = state
            .deployed_models
            .values()
            .filter(|dm| dm.model == model && dm.default && dm.name.starts_with(&prefix))
            .map(|dm| dm.name.clone())
            .collect();
        for name in current {
            let mut dm = state.deployed_models[&name].clone();
            dm.default = false;
            self.save_deployed_model(
                &mut dm,
                DeployedModelChange::Updated(vec!["default".into()]),
            )
            .await?;
            state.deployed_models.insert(name, dm);
        }
        Ok(())
    }

    pub(crate) async fn get_deployed_model(
        &self,
        caller: &Principal,
        name: &str,
    ) -> Result<DeployedModel> {
        let state = self.lock().await;
        Ok(find(&state, caller, "name", name, Access::Read)?.clone())
    }

    pub async fn list_deployed_models(
        &self,
        caller: &Principal,
        request: &ListRequest,
    ) -> Result<Listing<DeployedModel>> {
        let parent = names::AccountName::parse("parent", &request.parent)?;
        let query = DEPLOYED_MODEL_FIELDS.query(self.pages(), request, &caller.account)?;
        let prefix = format!("{parent}/");
        let state = self.lock().await;
        let items: Vec<DeployedModel> = state
            .deployed_models
            .values()
            .filter(|dm| dm.name.starts_with(&prefix))
            .filter(|dm| caller.can_access(&parent.account) || dm.public)
            .cloned()
            .collect();
        drop(state);
        Ok(query.page_of(self.pages(), items))
    }

    pub(crate) async fn update_deployed_model(
        &self,
        caller: &Principal,
        request: Update<DeployedModel>,
    ) -> Result<DeployedModel> {
        // Its flags default to false, a meaningful value: the mask must name the fields.
        let paths = request.paths(&[]);
        let update = request.resource;
        let mut state = self.lock().await;
        let current = find(
            &state,
            caller,
            "deployed_model.name",
            &update.name,
            Access::Write,
        )?
        .clone();
        let mut dm = current.clone();
        if paths.is_empty() {
            return Err(Error::invalid("update_mask", "name the fields to change"));
        }
        for path in &paths {
            match path.as_str() {
                "display_name" => {
                    validate_display_name("deployed_model.display_name", &update.display_name)?;
                    dm.display_name = update.display_name.clone();
                }
                "description" => {
                    names::validate_text("deployed_model.description", &update.description)?;
                    dm.description = update.description.clone();
                }
                "default" => dm.default = update.default,
                "public" => {
                    if !caller.is_privileged() {
                        return Err(Error::PermissionDenied(
                            "only a platform admin makes deployed models public".into(),
                        ));
                    }
                    dm.public = update.public;
                }
                other => {
                    return Err(Error::invalid(
                        "update_mask",
                        format!("{other:?} is not an updatable field of a deployed model"),
                    ));
                }
            }
        }
        if dm == current {
            return Ok(dm);
        }
        if dm.default && !current.default {
            self.clear_default(&mut state, account_of(&dm.name), &dm.model)
                .await?;
        }
        self.save_deployed_model(&mut dm, DeployedModelChange::Updated(paths))
            .await?;
        state.deployed_models.insert(dm.name.clone(), dm.clone());
        drop(state);
        self.wake();
        Ok(dm)
    }

    pub(crate) async fn delete_deployed_model(&self, caller: &Principal, name: &str) -> Result<()> {
        let mut state = self.lock().await;
        let dm = find(&state, caller, "name", name, Access::Write)?.clone();
        self.delete_deployed_model_row(&dm).await?;
        state.deployed_models.remove(&dm.name);
        drop(state);
        self.wake();
        Ok(())
    }
}

/// The fields a deployed-model list filters on and orders by.
static DEPLOYED_MODEL_FIELDS: Fields<Getter<DeployedModel>> = Fields {
    collection: "deployedModels",
    fields: &[
        Field::order("name", |dm| Value::Text(dm.name.clone())),
        Field::order("create_time", |dm| time_value(&dm.create_time)),
        Field::order("update_time", |dm| time_value(&dm.update_time)),
        Field::both(
            "display_name",
            |dm| Value::Text(dm.display_name.clone()),
            Kind::Text,
        ),
        Field::filter(
            "state",
            |dm| Value::Int(dm.state.into()),
            Kind::Enum(|s| deployed_model::State::from_str_name(s).map(|v| v as i32)),
        ),
        Field::filter("model", |dm| Value::Text(dm.model.clone()), Kind::Text),
        Field::filter(
            "deployment",
            |dm| Value::Text(dm.deployment.clone()),
            Kind::Text,
        ),
        Field::filter("default", |dm| Value::Bool(dm.default), Kind::Bool),
        Field::filter("serverless", |dm| Value::Bool(dm.serverless), Kind::Bool),
        Field::filter("public", |dm| Value::Bool(dm.public), Kind::Bool),
    ],
    tie_break: |dm| Value::Text(dm.name.clone()),
};
