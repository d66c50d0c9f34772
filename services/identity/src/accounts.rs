//! Accounts: create, read, list, update, delete.

use kiln_core::Error as ApiError;
use kiln_core::auth::Principal;
use kiln_core::names;
use kiln_core::page::enum_filter_value;
use kiln_core::time::{micros_to_timestamp, now_micros};
use kiln_events::Body;
use kiln_proto::identity::v1::{Account, account};
use kiln_store::listing::Listing;
use sea_orm::{ActiveModelTrait, ColumnTrait, Condition, EntityTrait, QueryFilter};

use crate::db::{account as accounts, api_key as api_keys, user as users};
use crate::error::Result;
use crate::rules::accounts::{account_update, check_delete, new_account};
use crate::service::{Identity, term_expr, to_order};

pub(crate) fn account_proto(m: &accounts::Model) -> Account {
    Account {
        name: format!("accounts/{}", m.id),
        display_name: m.display_name.clone(),
        account_type: m.account_type,
        email: m.email.clone(),
        state: m.state,
        status: Some(kiln_proto::common::v1::Status {
            code: m.status_code,
            message: m.status_message.clone(),
        }),
        suspend_state: m.suspend_state,
        create_time: Some(micros_to_timestamp(m.create_time)),
        update_time: Some(micros_to_timestamp(m.update_time)),
    }
}

impl Identity {
    pub(crate) async fn create_account(
        &self,
        caller: &Principal,
        account_id: String,
        account: Account,
    ) -> Result<Account> {
        let new = new_account(caller, &account_id, &account)?;
        let now = now_micros();
        for (attempt, id) in new.candidate_ids.iter().enumerate() {
            let model = new.row(id, now);
            let proto = account_proto(&model);
            let txn = sea_orm::TransactionTrait::begin(self.db()).await?;
            match accounts::Entity::insert(accounts::ActiveModel::from(model))
                .exec_without_returning(&txn)
                .await
            {
                Ok(_) => {}
                Err(err) if kiln_store::is_unique_violation(&err) => {
                    txn.rollback().await?;
                    if attempt + 1 == new.candidate_ids.len() {
                        return Err(ApiError::already_exists(format!("accounts/{id}")).into());
                    }
                    continue;
                }
                Err(err) => return Err(err.into()),
            }
            self.commit_with_event(
                txn,
                "identity.account.created",
                id,
                &proto.name,
                Body::AccountCreated(kiln_proto::events::v1::AccountCreated {
                    account: Some(proto.clone()),
                }),
            )
            .await?;
            return Ok(proto);
        }
        Err(ApiError::Internal("no free account ID".into()).into())
    }

    pub(crate) async fn get_account(&self, caller: &Principal, name: &str) -> Result<Account> {
        let name = names::AccountName::parse("name", name)?;
        caller.check_access(&name, &name)?;
        let model = self
            .cached_account(&name.account)
            .await?
            .ok_or_else(|| ApiError::not_found(&name))?;
        Ok(account_proto(&model))
    }

    pub(crate) async fn list_accounts(
        &self,
        caller: &Principal,
        page_size: i32,
        page_token: &str,
        filter: &str,
        order_by: &str,
    ) -> Result<Listing<Account>> {
        let mut cond = Condition::all();
        if !caller.is_privileged() {
            cond = cond.add(accounts::Column::Id.eq(caller.account.clone()));
        }
        for term in kiln_core::page::parse_filter(
            filter,
            &["state", "account_type", "suspend_state", "email"],
        )? {
            let expr = match term.field.as_str() {
                "state" => term_expr(
                    &term,
                    accounts::Column::State,
                    enum_filter_value("state", &term.value, |s| {
                        account::State::from_str_name(s).map(|v| v as i32)
                    })?
                    .into(),
                ),
                "account_type" => term_expr(
                    &term,
                    accounts::Column::AccountType,
                    enum_filter_value("account_type", &term.value, |s| {
                        account::AccountType::from_str_name(s).map(|v| v as i32)
                    })?
                    .into(),
                ),
                "suspend_state" => term_expr(
                    &term,
                    accounts::Column::SuspendState,
                    enum_filter_value("suspend_state", &term.value, |s| {
                        account::SuspendState::from_str_name(s).map(|v| v as i32)
                    })?
                    .into(),
                ),
                _ => term_expr(&term, accounts::Column::Email, term.value.clone().into()),
            };
            cond = cond.add(expr);
        }
        let order = kiln_core::page::parse_order_by(
            order_by,
            &["name", "create_time", "update_time", "display_name"],
        )?
        .iter()
        .map(|k| {
            let col = match k.field.as_str() {
                "create_time" => accounts::Column::CreateTime,
                "update_time" => accounts::Column::UpdateTime,
                "display_name" => accounts::Column::DisplayName,
                _ => accounts::Column::Id,
            };
            (col, to_order(k))
        })
        .collect();
        let scope = format!("accounts||{filter}|{order_by}|{}", caller.account);
        let listing = self
            .list(
                accounts::Entity::find().filter(cond),
                &scope,
                page_size,
                page_token,
                order,
                vec![accounts::Column::Id],
            )
            .await?;
        Ok(Listing {
            items: listing.items.iter().map(account_proto).collect(),
            next_page_token: listing.next_page_token,
            total_size: listing.total_size,
        })
    }

    pub(crate) async fn update_account(
        &self,
        caller: &Principal,
        account: Account,
        mask: Option<prost_types::FieldMask>,
    ) -> Result<Account> {
        let name = names::AccountName::parse("account.name", &account.name)?;
        caller.check_access(&name, &name)?;
        let existing = self
            .account(&name.account)
            .await?
            .ok_or_else(|| ApiError::not_found(&name))?;
        let Some(change) = account_update(caller, &existing, &account, mask, now_micros())? else {
            return Ok(account_proto(&existing));
        };
        let proto = account_proto(&change.model);
        let txn = sea_orm::TransactionTrait::begin(self.db()).await?;
        accounts::Entity::update(accounts::ActiveModel::from(change.model).reset_all())
            .exec(&txn)
            .await?;
        self.commit_with_event(
            txn,
            "identity.account.updated",
            &name.account,
            &proto.name,
            Body::AccountUpdated(kiln_proto::events::v1::AccountUpdated {
                account: Some(proto.clone()),
                update_mask: Some(prost_types::FieldMask {
                    paths: change.paths,
                }),
            }),
        )
        .await?;
        self.forget_principals(&proto.name);
        Ok(proto)
    }

    pub(crate) async fn delete_account(&self, caller: &Principal, name: &str) -> Result<()> {
        let name = names::AccountName::parse("name", name)?;
        caller.check_access(&name, &name)?;
        check_delete(caller, &name)?;
        self.account(&name.account)
            .await?
            .ok_or_else(|| ApiError::not_found(&name))?;
        let txn = sea_orm::TransactionTrait::begin(self.db()).await?;
        api_keys::Entity::delete_many()
            .filter(api_keys::Column::AccountId.eq(name.account.clone()))
            .exec(&txn)
            .await?;
        users::Entity::delete_many()
            .filter(users::Column::AccountId.eq(name.account.clone()))
            .exec(&txn)
            .await?;
        accounts::Entity::delete_by_id(name.account.clone())
            .exec(&txn)
            .await?;
        self.commit_with_event(
            txn,
            "identity.account.deleted",
            &name.account,
            &name.to_string(),
            Body::AccountDeleted(kiln_proto::events::v1::AccountDeleted {
                name: name.to_string(),
            }),
        )
        .await?;
        self.forget_principals(&name.to_string());
        Ok(())
    }
}
