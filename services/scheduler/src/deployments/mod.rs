//! Deployments: create, read, list, update, (soft) delete, undelete, scale. Handlers change
//! the stored resource and the in-memory mirror under the state lock, then wake the
//! reconcile pass, which does the placing.

mod create;
mod delete;
mod rules;
mod update;

use kiln_core::Error;
use kiln_core::auth::Principal;
use kiln_core::listing::{Field, Fields, Kind, ListRequest, Listing};
use kiln_core::names::{self, ChildName};
use kiln_events::records::HasRecords as _;
use kiln_proto::common::v1::AcceleratorType;
use kiln_proto::registry::v1::{Model, model};
use kiln_proto::scheduler::v1::{Deployment, deployment};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

use crate::db::deployment as rows;
use crate::quota::{self, QuotaLimits};
use crate::resource::decode;
use crate::service::Scheduler;
use crate::state::{DeploymentEntry, State};
use kiln_core::Result;

impl Scheduler {
    /// A deployment the caller may read (its own account's, or a serverless one).
    pub(crate) fn readable<'s>(
        &self,
        state: &'s State,
        caller: &Principal,
        field: &str,
        name: &str,
    ) -> Result<&'s DeploymentEntry> {
        let parsed = ChildName::parse(field, "deployments", name, Some(&caller.account))?;
        let full = parsed.to_string();
        match state.deployments.get(&full) {
            Some(entry)
                if caller.can_access(&parsed.account)
                    || entry.deployment.deployment_type
                        == deployment::DeploymentType::Serverless as i32 =>
            {
                Ok(entry)
            }
            _ => Err(Error::not_found(&parsed)),
        }
    }

    /// A deployment the caller may change: its own account's.
    pub(crate) fn writable<'s>(
        &self,
        state: &'s mut State,
        caller: &Principal,
        field: &str,
        name: &str,
    ) -> Result<&'s mut DeploymentEntry> {
        let parsed = ChildName::parse(field, "deployments", name, Some(&caller.account))?;
        let full = parsed.to_string();
        match state.deployments.get_mut(&full) {
            Some(entry) if caller.can_access(&parsed.account) => Ok(entry),
            _ => Err(Error::not_found(&parsed)),
        }
    }

    /// The account of deployment `name` (in `field`) and its quota limits, read before the
    /// state lock is taken: an answer from billing never holds up the scheduler. No limits
    /// when the caller may not touch the account (the lookup under the lock says NOT_FOUND).
    async fn account_limits(
        &self,
        caller: &Principal,
        field: &str,
        name: &str,
    ) -> Result<(String, Option<QuotaLimits>)> {
        let account = ChildName::parse(field, "deployments", name, Some(&caller.account))?.account;
        let limits = if caller.can_access(&account) {
            quota::read_limits(self.quotas(), &account).await?
        } else {
            None
        };
        Ok((account, limits))
    }

    /// The base model a deployment names, if the caller may use it and it can be served.
    async fn servable_base(&self, caller: &Principal, name: &str) -> Result<Model> {
        let field = "deployment.base_model";
        if name.is_empty() {
            return Err(Error::invalid(field, "is required"));
        }
        let parsed = ChildName::parse(field, "models", name, Some(&caller.account))?;
        let model = match self.catalog().get_model(&parsed.to_string()).await {
            Ok(model) => model,
            Err(e) if e.code() == tonic::Code::NotFound => {
                return Err(Error::not_found(&parsed));
            }
            Err(err) => return Err(err),
        };
        if !(model.public || caller.can_access(&parsed.account)) {
            return Err(Error::not_found(&parsed));
        }
        if model.state != model::State::Ready as i32 {
            return Err(Error::FailedPrecondition(format!(
                "{} is not READY (state {})",
                model.name,
                model::State::try_from(model.state)
                    .map(|s| s.as_str_name())
                    .unwrap_or("unknown")
            )));
        }
        Ok(model)
    }

    pub(crate) async fn get_deployment(
        &self,
        caller: &Principal,
        name: &str,
    ) -> Result<Deployment> {
        let state = self.lock().await;
        Ok(self
            .readable(&state, caller, "name", name)?
            .deployment
            .clone())
    }

    pub async fn list_deployments(
        &self,
        caller: &Principal,
        request: &ListRequest,
        show_deleted: bool,
    ) -> Result<Listing<Deployment>> {
        let parent = names::AccountName::parse("parent", &request.parent)?;
        let scope = format!("{show_deleted}|{}", caller.account);
        let query = DEPLOYMENT_FIELDS.query(self.pages(), request, &scope)?;
        let mut select =
            rows::Entity::find().filter(rows::Column::AccountId.eq(parent.account.clone()));
        if !caller.can_access(&parent.account) {
            select = select.filter(
                rows::Column::DeploymentType.eq(deployment::DeploymentType::Serverless as i32),
            );
        }
        if !show_deleted {
            select = select.filter(rows::Column::State.ne(deployment::State::Deleted as i32));
        }
        let page = kiln_store::listing::list(self.db(), self.pages(), &query, select).await?;
        // The stored row is a little behind the live counts: answer from memory where it has
        // the deployment.
        let state = self.lock().await;
        let mut items = Vec::with_capacity(page.items.len());
        for row in page.items {
            let stored: Deployment = decode(&row.resource)?;
            items.push(
                state
                    .deployments
                    .get(&stored.name)
                    .map(|e| e.deployment.clone())
                    .unwrap_or(stored),
            );
        }
        Ok(Listing {
            items,
            next_page_token: page.next_page_token,
            total_size: page.total_size,
        })
    }
}

/// The fields a deployment list filters on and orders by.
static DEPLOYMENT_FIELDS: Fields<rows::Column> = Fields {
    collection: "deployments",
    fields: &[
        Field::order("name", rows::Column::DeploymentId),
        Field::order("create_time", rows::Column::CreateTime),
        Field::order("update_time", rows::Column::UpdateTime),
        Field::both("display_name", rows::Column::DisplayName, Kind::Text),
        Field::filter("base_model", rows::Column::BaseModel, Kind::Text),
        Field::filter(
            "state",
            rows::Column::State,
            Kind::Enum(|s| deployment::State::from_str_name(s).map(|v| v as i32)),
        ),
        Field::filter(
            "accelerator_type",
            rows::Column::AcceleratorType,
            Kind::Enum(|s| AcceleratorType::from_str_name(s).map(|v| v as i32)),
        ),
        Field::filter(
            "deployment_type",
            rows::Column::DeploymentType,
            Kind::Enum(|s| deployment::DeploymentType::from_str_name(s).map(|v| v as i32)),
        ),
    ],
    tie_break: rows::Column::DeploymentId,
};
