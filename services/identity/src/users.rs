//! Users: create, read, list, update, delete; the lookups that API keys share.

use kiln_core::Error as ApiError;
use kiln_core::auth::Principal;
use kiln_core::names;
use kiln_core::page::enum_filter_value;
use kiln_core::time::{micros_to_timestamp, now_micros};
use kiln_events::Body;
use kiln_proto::identity::v1::User;
use kiln_store::listing::Listing;
use sea_orm::{ActiveModelTrait, ColumnTrait, Condition, EntityTrait, QueryFilter};

use crate::db::{api_key as api_keys, user as users};
use crate::error::Result;
use crate::rules::users::{NewUser, check_delete, new_user, user_update};
use crate::service::{Identity, term_expr, to_order};

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
            .ok_or_else(|| ApiError::not_found(&parent))?;
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
            return Err(ApiError::already_exists(&name).into());
        }
        self.ensure_email_free(&new.account, &new.email).await?;
        let model = new.row(now_micros());
        let proto = user_proto(&model);
        let txn = sea_orm::TransactionTrait::begin(self.db()).await?;
        match users::Entity::insert(users::ActiveModel::from(model))
            .exec_without_returning(&txn)
            .await
        {
            Ok(_) => {}
            Err(err) if kiln_store::is_unique_violation(&err) => {
                txn.rollback().await?;
                return Err(ApiError::already_exists(&name).into());
            }
            Err(err) => return Err(err.into()),
        }
        self.commit_with_event(
            txn,
            "identity.user.created",
            &new.account,
            &name,
            Body::UserCreated(kiln_proto::events::v1::UserCreated {
                user: Some(proto.clone()),
            }),
        )
        .await?;
        Ok(proto)
    }

    async fn ensure_email_free(&self, account: &str, email: &str) -> Result<()> {
        let taken = users::Entity::find()
            .filter(users::Column::AccountId.eq(account))
            .filter(users::Column::Email.eq(email))
            .one(self.db())
            .await?;
        match taken {
            Some(u) => Err(ApiError::already_exists(format!(
                "a user with email {email} (accounts/{account}/users/{})",
                u.user_id
            ))
            .into()),
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
            .ok_or_else(|| ApiError::not_found(&name).into())
    }

    pub(crate) async fn get_user(&self, caller: &Principal, name: &str) -> Result<User> {
        Ok(user_proto(&self.existing_user(caller, "name", name).await?))
    }

    pub(crate) async fn list_users(
        &self,
        caller: &Principal,
        parent: &str,
        page_size: i32,
        page_token: &str,
        filter: &str,
        order_by: &str,
    ) -> Result<Listing<User>> {
        let parent = self.parent_account(caller, "parent", parent).await?;
        let mut cond = Condition::all().add(users::Column::AccountId.eq(parent.account.clone()));
        for term in
            kiln_core::page::parse_filter(filter, &["role", "state", "email", "service_account"])?
        {
            let expr = match term.field.as_str() {
                "role" => term_expr(&term, users::Column::Role, term.value.clone().into()),
                "email" => term_expr(&term, users::Column::Email, term.value.clone().into()),
                "state" => term_expr(
                    &term,
                    users::Column::State,
                    enum_filter_value("state", &term.value, |s| {
                        kiln_proto::identity::v1::user::State::from_str_name(s).map(|v| v as i32)
                    })?
                    .into(),
                ),
                _ => {
                    let flag = match term.value.as_str() {
                        "true" => true,
                        "false" => false,
                        other => {
                            return Err(ApiError::invalid(
                                "filter",
                                format!("service_account is true or false, got {other:?}"),
                            )
                            .into());
                        }
                    };
                    term_expr(&term, users::Column::ServiceAccount, flag.into())
                }
            };
            cond = cond.add(expr);
        }
        let order = kiln_core::page::parse_order_by(
            order_by,
            &[
                "name",
                "create_time",
                "update_time",
                "email",
                "display_name",
            ],
        )?
        .iter()
        .map(|k| {
            let col = match k.field.as_str() {
                "create_time" => users::Column::CreateTime,
                "update_time" => users::Column::UpdateTime,
                "email" => users::Column::Email,
                "display_name" => users::Column::DisplayName,
                _ => users::Column::UserId,
            };
            (col, to_order(k))
        })
        .collect();
        let scope = format!("users|{parent}|{filter}|{order_by}|{}", caller.account);
        let listing = self
            .list(
                users::Entity::find().filter(cond),
                &scope,
                page_size,
                page_token,
                order,
                vec![users::Column::UserId],
            )
            .await?;
        Ok(Listing {
            items: listing.items.iter().map(user_proto).collect(),
            next_page_token: listing.next_page_token,
            total_size: listing.total_size,
        })
    }

    pub(crate) async fn update_user(
        &self,
        caller: &Principal,
        user: User,
        mask: Option<prost_types::FieldMask>,
    ) -> Result<User> {
        let existing = self.existing_user(caller, "user.name", &user.name).await?;
        let Some(change) = user_update(caller, &existing, &user, mask, now_micros())? else {
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
                    crate::error::Error::from(ApiError::already_exists(format!(
                        "a user with email {}",
                        user.email
                    )))
                } else {
                    err.into()
                }
            })?;
        self.commit_with_event(
            txn,
            "identity.user.updated",
            &existing.account_id,
            &proto.name,
            Body::UserUpdated(kiln_proto::events::v1::UserUpdated {
                user: Some(proto.clone()),
                update_mask: Some(prost_types::FieldMask {
                    paths: change.paths,
                }),
            }),
        )
        .await?;
        self.forget_principals(&proto.name);
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
        self.commit_with_event(
            txn,
            "identity.user.deleted",
            &existing.account_id,
            &name,
            Body::UserDeleted(kiln_proto::events::v1::UserDeleted { name: name.clone() }),
        )
        .await?;
        self.forget_principals(&name);
        Ok(())
    }
}
