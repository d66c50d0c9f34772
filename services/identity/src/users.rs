//! Users: create, read, list, update, delete; the lookups that API keys share.

use kiln_core::Error;
use kiln_core::auth::Principal;
use kiln_core::grpc::Update;
use kiln_core::listing::{Field, Fields, Kind, ListRequest, Listing};
use kiln_core::names;
use kiln_core::time::{micros_to_timestamp, now_micros};
use kiln_events::records::HasRecords as _;
use kiln_proto::identity::v1::{User, user};
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter};

use crate::db::{api_key as api_keys, user as users};
use crate::rules::users::{NewUser, check_delete, new_user, user_update};
use crate::service::{Change, Identity};
use kiln_core::Result;

fn user_proto(m: &users::Model) -> User {
    User {
        name: format!("accounts/{}/users/{}", m.account_id, m.user_id),
        display_name: m.display_name.clone(),
        email: m.email.clone(),
        role: m.role.clone(),
        service_account: m.service_account,
        state: m.state,
        status: Some(kiln_proto::common::v1::Status::default()),
        create_time: Some(micros_to_timestamp(m.create_time)),
        update_time: Some(micros_to_timestamp(m.update_time)),
    }
}

impl Identity {
    /// Resolves `parent` to an existing account the caller can see.
    async fn parent_account(
        &self,
        caller: &Principal,
        field: &str,
        parent: &str,
    ) -> Result<names::AccountName> {
        let parent = names::AccountName::parse(field, parent)?;
        caller.check_access(&parent, &parent)?;
        self.cached_account(&parent.account)
            .await?
            .ok_or_else(|| Error::not_found(&parent))?;
        Ok(parent)
    }

    pub(crate) async fn create_user(
        &self,
        caller: &Principal,
        parent: &str,
        user_id: String,
        user: User,
    ) -> Result<User> {
        let parent = self.parent_account(caller, "parent", parent).await?;
        let new = new_user(caller, &parent, &user_id, &user)?;
        self.insert_user(&new).await
    }

    pub(crate) async fn insert_user(&self, new: &NewUser) -> Result<User> {
        let name = new.name();
        if self.user(&new.account, &new.user_id).await?.is_some() {
            return Err(Error::already_exists(&name));
        }
        self.ensure_email_free(&new.account, &new.email).await?;
        let model = new.row(now_micros());
        let proto = user_proto(&model);
        let txn = sea_orm::TransactionTrait::begin(self.db()).await?;
        kiln_store::insert(&txn, users::ActiveModel::from(model), &name).await?;
        self.commit_change(txn, Change::UserCreated(&proto)).await?;
        Ok(proto)
    }

    async fn ensure_email_free(&self, account: &str, email: &str) -> Result<()> {
        let taken = users::Entity::find()
            .filter(users::Column::AccountId.eq(account))
            .filter(users::Column::Email.eq(email))
            .one(self.db())
            .await?;
        match taken {
            Some(u) => Err(Error::already_exists(format!(
                "a user with email {email} (accounts/{account}/users/{})",
                u.user_id
            ))),
            None => Ok(()),
        }
    }

    /// Resolves a user name to an existing user the caller can see.
    pub(crate) async fn existing_user(
        &self,
        caller: &Principal,
        field: &str,
        name: &str,
    ) -> Result<users::Model> {
        let name = names::parse_user_name(field, name)?;
        caller.check_access(&name.account_name(), &name)?;
        self.user(&name.account, &name.id)
            .await?
            .ok_or_else(|| Error::not_found(&name))
    }

    pub(crate) async fn get_user(&self, caller: &Principal, name: &str) -> Result<User> {
        Ok(user_proto(&self.existing_user(caller, "name", name).await?))
    }

    pub(crate) async fn list_users(
        &self,
        caller: &Principal,
        request: &ListRequest,
    ) -> Result<Listing<User>> {
        let parent = self
            .parent_account(caller, "parent", &request.parent)
            .await?;
        let query = USER_FIELDS.query(self.pages(), request, &caller.account)?;
        let select =
            users::Entity::find().filter(users::Column::AccountId.eq(parent.account.clone()));
        Ok(self.list(&query, select).await?.map(|m| user_proto(&m)))
    }

    pub(crate) async fn update_user(
        &self,
        caller: &Principal,
        update: Update<User>,
    ) -> Result<User> {
        let user = &update.resource;
        let existing = self.existing_user(caller, "user.name", &user.name).await?;
        let Some(change) = user_update(caller, &existing, &update, now_micros())? else {
            return Ok(user_proto(&existing));
        };
        if change.model.email != existing.email {
            self.ensure_email_free(&existing.account_id, &change.model.email)
                .await?;
        }
        let proto = user_proto(&change.model);
        let txn = sea_orm::TransactionTrait::begin(self.db()).await?;
        users::Entity::update(users::ActiveModel::from(change.model).reset_all())
            .exec(&txn)
            .await
            .map_err(|err| {
                if kiln_store::is_unique_violation(&err) {
                    Error::already_exists(format!("a user with email {}", user.email))
                } else {
                    err.into()
                }
            })?;
        self.commit_change(txn, Change::UserUpdated(&proto, change.paths))
            .await?;
        Ok(proto)
    }

    pub(crate) async fn delete_user(&self, caller: &Principal, name: &str) -> Result<()> {
        let existing = self.existing_user(caller, "name", name).await?;
        check_delete(caller, &existing)?;
        let name = format!(
            "accounts/{}/users/{}",
            existing.account_id, existing.user_id
        );
        let txn = sea_orm::TransactionTrait::begin(self.db()).await?;
        api_keys::Entity::delete_many()
            .filter(api_keys::Column::AccountId.eq(existing.account_id.clone()))
            .filter(api_keys::Column::UserId.eq(existing.user_id.clone()))
            .exec(&txn)
            .await?;
        users::Entity::delete_by_id((existing.account_id.clone(), existing.user_id.clone()))
            .exec(&txn)
            .await?;
        self.commit_change(txn, Change::UserDeleted(&name)).await?;
        Ok(())
    }
}

/// The fields a user list filters on and orders by.
static USER_FIELDS: Fields<users::Column> = Fields {
    collection: "users",
    fields: &[
        Field::order("name", users::Column::UserId),
        Field::order("create_time", users::Column::CreateTime),
        Field::order("update_time", users::Column::UpdateTime),
        Field::order("display_name", users::Column::DisplayName),
        Field::both("email", users::Column::Email, Kind::Text),
        Field::filter("role", users::Column::Role, Kind::Text),
        Field::filter(
            "state",
            users::Column::State,
            Kind::Enum(|s| user::State::from_str_name(s).map(|v| v as i32)),
        ),
        Field::filter("service_account", users::Column::ServiceAccount, Kind::Bool),
    ],
    tie_break: users::Column::UserId,
};
