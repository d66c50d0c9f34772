//! API keys: create, list, delete. Their secrets are shown once and stored only as digests.

use kiln_core::Error as ApiError;
use kiln_core::auth::Principal;
use kiln_core::names;
use kiln_core::time::{micros_to_timestamp, now_micros};
use kiln_events::Body;
use kiln_proto::identity::v1::ApiKey;
use kiln_store::listing::Listing;
use sea_orm::{ColumnTrait, Condition, EntityTrait, QueryFilter};

use crate::db::api_key as api_keys;
use crate::error::Result;
use crate::rules::api_keys::{check_delete, key_name, new_key, new_key_expiry};
use crate::service::{Identity, term_expr, to_order};

fn api_key_proto(m: &api_keys::Model) -> ApiKey {
    ApiKey {
        name: key_name(m),
        key_id: m.key_id.clone(),
        display_name: m.display_name.clone(),
        key: String::new(),
        prefix: m.prefix.clone(),
        create_time: Some(micros_to_timestamp(m.create_time)),
        expire_time: m.expire_time.map(micros_to_timestamp),
    }
}

impl Identity {
    pub(crate) async fn create_api_key(
        &self,
        caller: &Principal,
        parent: &str,
        api_key: ApiKey,
    ) -> Result<ApiKey> {
        let user = self.existing_user(caller, "parent", parent).await?;
        let now = now_micros();
        let expire_time = new_key_expiry(caller, &user, &api_key, now)?;
        let (model, secret) = new_key(&user, &api_key.display_name, expire_time, now);
        let mut proto = api_key_proto(&model);
        let txn = sea_orm::TransactionTrait::begin(self.db()).await?;
        api_keys::Entity::insert(api_keys::ActiveModel::from(model))
            .exec_without_returning(&txn)
            .await?;
        self.commit_with_event(
            txn,
            "identity.api_key.created",
            &user.account_id,
            &proto.name,
            Body::ApiKeyCreated(kiln_proto::events::v1::ApiKeyCreated {
                api_key: Some(proto.clone()),
            }),
        )
        .await?;
        proto.key = secret;
        Ok(proto)
    }

    pub(crate) async fn list_api_keys(
        &self,
        caller: &Principal,
        parent: &str,
        page_size: i32,
        page_token: &str,
        filter: &str,
        order_by: &str,
    ) -> Result<Listing<ApiKey>> {
        let user = self.existing_user(caller, "parent", parent).await?;
        let mut cond = Condition::all()
            .add(api_keys::Column::AccountId.eq(user.account_id.clone()))
            .add(api_keys::Column::UserId.eq(user.user_id.clone()));
        for term in kiln_core::page::parse_filter(filter, &["display_name", "prefix"])? {
            let col = if term.field == "prefix" {
                api_keys::Column::Prefix
            } else {
                api_keys::Column::DisplayName
            };
            cond = cond.add(term_expr(&term, col, term.value.clone().into()));
        }
        let order = kiln_core::page::parse_order_by(
            order_by,
            &["name", "create_time", "expire_time", "display_name"],
        )?
        .iter()
        .map(|k| {
            let col = match k.field.as_str() {
                "create_time" => api_keys::Column::CreateTime,
                "expire_time" => api_keys::Column::ExpireTime,
                "display_name" => api_keys::Column::DisplayName,
                _ => api_keys::Column::KeyId,
            };
            (col, to_order(k))
        })
        .collect();
        let scope = format!("apiKeys|{}|{filter}|{order_by}|{}", parent, caller.account);
        let listing = self
            .list(
                api_keys::Entity::find().filter(cond),
                &scope,
                page_size,
                page_token,
                order,
                vec![api_keys::Column::KeyId],
            )
            .await?;
        Ok(Listing {
            items: listing.items.iter().map(api_key_proto).collect(),
            next_page_token: listing.next_page_token,
            total_size: listing.total_size,
        })
    }

    pub(crate) async fn delete_api_key(&self, caller: &Principal, name: &str) -> Result<()> {
        let key_name = names::ApiKeyName::parse("name", name)?;
        caller.check_access(&key_name.user_name().account_name(), &key_name)?;
        let model = api_keys::Entity::find_by_id((
            key_name.account.clone(),
            key_name.user.clone(),
            key_name.key.clone(),
        ))
        .one(self.db())
        .await?
        .ok_or_else(|| ApiError::not_found(&key_name))?;
        let owner = self
            .user(&model.account_id, &model.user_id)
            .await?
            .ok_or_else(|| ApiError::not_found(&key_name))?;
        check_delete(caller, &owner)?;
        let name = key_name.to_string();
        let txn = sea_orm::TransactionTrait::begin(self.db()).await?;
        api_keys::Entity::delete_by_id((
            model.account_id.clone(),
            model.user_id.clone(),
            model.key_id.clone(),
        ))
        .exec(&txn)
        .await?;
        self.commit_with_event(
            txn,
            "identity.api_key.deleted",
            &model.account_id,
            &name,
            Body::ApiKeyDeleted(kiln_proto::events::v1::ApiKeyDeleted { name: name.clone() }),
        )
        .await?;
        self.forget_principals(&name);
        Ok(())
    }
}
