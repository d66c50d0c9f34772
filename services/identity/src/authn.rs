//! Authentication: identity resolves API keys into principals straight from its tables.

use futures::future::BoxFuture;
use kiln_core::Error;
use kiln_core::auth::{Authenticated, Authenticator};
use kiln_core::time::now_micros;
use kiln_events::records::HasRecords as _;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

use crate::db::{account as accounts, api_key as api_keys, user as users};
use crate::rules::api_keys::{authenticated, is_expired, secret_digest};
use crate::service::Identity;

impl Identity {
    /// Resolves an API key secret into its principal.
    pub(crate) async fn authenticate_key(&self, secret: &str) -> Result<Authenticated, Error> {
        let invalid = || Error::Unauthenticated("invalid API key".into());
        let internal = |e: sea_orm::DbErr| Error::Unavailable(format!("identity database: {e}"));
        let key = api_keys::Entity::find()
            .filter(api_keys::Column::SecretSha256.eq(secret_digest(secret)))
            .one(self.db())
            .await
            .map_err(internal)?
            .ok_or_else(invalid)?;
        if is_expired(key.expire_time, now_micros()) {
            return Err(Error::Unauthenticated("API key expired".into()));
        }
        let user = users::Entity::find_by_id((key.account_id.clone(), key.user_id.clone()))
            .one(self.db())
            .await
            .map_err(internal)?
            .ok_or_else(invalid)?;
        let account = accounts::Entity::find_by_id(key.account_id.clone())
            .one(self.db())
            .await
            .map_err(internal)?
            .ok_or_else(invalid)?;
        Ok(authenticated(&key, &user, &account))
    }
}

/// Identity authenticates its own callers straight from its tables.
impl Authenticator for Identity {
    fn authenticate<'a>(&'a self, api_key: &'a str) -> BoxFuture<'a, Result<Authenticated, Error>> {
        Box::pin(self.authenticate_key(api_key))
    }
}
