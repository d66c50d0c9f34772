//! Accounts: create, read, list, update, delete.

use kiln_core::Error;
use kiln_core::auth::Principal;
use kiln_core::grpc::Update;
use kiln_core::listing::{Field, Fields, Kind, ListRequest, Listing};
use kiln_core::names;
use kiln_core::time::{micros_to_timestamp, now_micros};
use kiln_events::records::HasRecords as _;
use kiln_proto::identity::v1::{Account, account};
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter};

use crate::db::{account as accounts, api_key as api_keys, user as users};
use crate::rules::accounts::{account_update, check_delete, new_account};
use crate::service::{Change, Identity};
use kiln_core::Result;

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
                        return Err(Error::already_exists(format!("accounts/{id}")));
                    }
                    continue;
                }
                Err(err) => return Err(err.into()),
            }
            self.commit_change(txn, Change::AccountCreated(&proto))
                .await?;
            return Ok(proto);
        }
        Err(Error::Internal("no free account ID".into()))
    }

    pub(crate) async fn get_account(&self, caller: &Principal, name: &str) -> Result<Account> {
        let name = names::AccountName::parse("name", name)?;
        caller.check_access(&name, &name)?;
        let model = self
            .cached_account(&name.account)
            .await?
            .ok_or_else(|| Error::not_found(&name))?;
        Ok(account_proto(&model))
    }

    pub(crate) async fn list_accounts(
        &self,
        caller: &Principal,
        request: &ListRequest,
    ) -> Result<Listing<Account>> {
        let query = ACCOUNT_FIELDS.query(self.pages(), request, &caller.account)?;
        let mut select = accounts::Entity::find();
        if !caller.is_privileged() {
            select = select.filter(accounts::Column::Id.eq(caller.account.clone()));
        }
        Ok(self.list(&query, select).await?.map(|m| account_proto(&m)))
    }

    pub(crate) async fn update_account(
        &self,
        caller: &Principal,
        update: Update<Account>,
    ) -> Result<Account> {
        let account = &update.resource;
        let name = names::AccountName::parse("account.name", &account.name)?;
        caller.check_access(&name, &name)?;
        let existing = self
            .account(&name.account)
            .await?
            .ok_or_else(|| Error::not_found(&name))?;
        let Some(change) = account_update(caller, &existing, &update, now_micros())? else {
            return Ok(account_proto(&existing));
        };
        let proto = account_proto(&change.model);
        let txn = sea_orm::TransactionTrait::begin(self.db()).await?;
        accounts::Entity::update(accounts::ActiveModel::from(change.model).reset_all())
            .exec(&txn)
            .await?;
        self.commit_change(txn, Change::AccountUpdated(&proto, change.paths))
            .await?;
        Ok(proto)
    }

    pub(crate) async fn delete_account(&self, caller: &Principal, name: &str) -> Result<()> {
        let name = names::AccountName::parse("name", name)?;
        caller.check_access(&name, &name)?;
        check_delete(caller, &name)?;
        self.account(&name.account)
            .await?
            .ok_or_else(|| Error::not_found(&name))?;
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
        self.commit_change(txn, Change::AccountDeleted(&name.to_string()))
            .await?;
        Ok(())
    }
}

/// The fields an account list filters on and orders by.
static ACCOUNT_FIELDS: Fields<accounts::Column> = Fields {
    collection: "accounts",
    fields: &[
        Field::order("name", accounts::Column::Id),
        Field::order("create_time", accounts::Column::CreateTime),
        Field::order("update_time", accounts::Column::UpdateTime),
        Field::order("display_name", accounts::Column::DisplayName),
        Field::filter("email", accounts::Column::Email, Kind::Text),
        Field::filter(
            "state",
            accounts::Column::State,
            Kind::Enum(|s| account::State::from_str_name(s).map(|v| v as i32)),
        ),
        Field::filter(
            "account_type",
            accounts::Column::AccountType,
            Kind::Enum(|s| account::AccountType::from_str_name(s).map(|v| v as i32)),
        ),
        Field::filter(
            "suspend_state",
            accounts::Column::SuspendState,
            Kind::Enum(|s| account::SuspendState::from_str_name(s).map(|v| v as i32)),
        ),
    ],
    tie_break: accounts::Column::Id,
};
