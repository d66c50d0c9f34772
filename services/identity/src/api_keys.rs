//! API keys: create, list, delete. Their secrets are shown once and stored only as digests.

use kiln_core::Error;
use kiln_core::auth::Principal;
use kiln_core::listing::{Field, Fields, Kind, ListRequest, Listing};
use kiln_core::names;
use kiln_core::time::{micros_to_timestamp, now_micros};
use kiln_events::records::HasRecords as _;
use kiln_proto::identity::v1::ApiKey;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

use crate::db::api_key as api_keys;
use crate::rules::api_keys::{check_delete, key_name, new_key, new_key_expiry};
use crate::service::{Change, Identity};
use kiln_core::Result;

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
        self.commit_change(txn, Change::ApiKeyCreated(&proto))
            .await?;
        proto.key = secret;
        Ok(proto)
    }

    pub(crate) async fn list_api_keys(
        &self,
        caller: &Principal,
        request: &ListRequest,
    ) -> Result<Listing<ApiKey>> {
        let user = self
            .existing_user(caller, "parent", &request.parent)
            .await?;
        let query = API_KEY_FIELDS.query(self.pages(), request, &caller.account)?;
        let select = api_keys::Entity::find()
            .filter(api_keys::Column::AccountId.eq(user.account_id.clone()))
            .filter(api_keys::Column::UserId.eq(user.user_id.clone()));
        Ok(self.list(&query, select).await?.map(|m| api_key_proto(&m)))
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
        .ok_or_else(|| Error::not_found(&key_name))?;
        let owner = self
            .user(&model.account_id, &model.user_id)
            .await?
            .ok_or_else(|| Error::not_found(&key_name))?;
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
        self.commit_change(txn, Change::ApiKeyDeleted(&name))
            .await?;
        Ok(())
    }
}

/// The fields an API-key list filters on and orders by.
static API_KEY_FIELDS: Fields<api_keys::Column> = Fields {
    collection: "apiKeys",
    fields: &[
        Field::order("name", api_keys::Column::KeyId),
        Field::order("create_time", api_keys::Column::CreateTime),
        Field::order("expire_time", api_keys::Column::ExpireTime),
        Field::both("display_name", api_keys::Column::DisplayName, Kind::Text),
        Field::filter("prefix", api_keys::Column::Prefix, Kind::Text),
    ],
    tie_break: api_keys::Column::KeyId,
};
