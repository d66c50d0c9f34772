//! The bootstrap: the system account, its platform admin and, on the very first start, the
//! admin's API key.

use kiln_core::auth::Principal;
use kiln_core::names::SYSTEM_ACCOUNT;
use kiln_events::records::HasRecords as _;
use kiln_proto::identity::v1::{Account, ApiKey, account};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

use crate::db::api_key as api_keys;
use crate::rules::users::NewUser;
use crate::service::Identity;
use kiln_core::{Error, Result};

/// The user that the bootstrap creates in the system account.
const BOOTSTRAP_USER: &str = "admin";

impl Identity {
    /// Makes sure the system account and its admin user exist; on the first start (no key for
    /// that user yet) creates an admin API key and returns its secret, which is shown once.
    pub(crate) async fn bootstrap(&self, admin_email: &str) -> Result<Option<String>> {
        let system = Principal::service();
        if self.account(SYSTEM_ACCOUNT).await?.is_none() {
            let created = self
                .create_account(
                    &system,
                    SYSTEM_ACCOUNT.to_owned(),
                    Account {
                        display_name: "Kiln".to_owned(),
                        account_type: account::AccountType::Enterprise as i32,
                        email: admin_email.to_owned(),
                        ..Default::default()
                    },
                )
                .await;
            match created {
                Ok(_) => {}
                // Another instance won the race.
                Err(Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let admin = match self.user(SYSTEM_ACCOUNT, BOOTSTRAP_USER).await? {
            Some(u) => u,
            None => {
                match self
                    .insert_user(&NewUser::platform_admin(BOOTSTRAP_USER, admin_email))
                    .await
                {
                    Ok(_) | Err(Error::AlreadyExists { .. }) => {}
                    Err(e) => return Err(e),
                }
                self.user(SYSTEM_ACCOUNT, BOOTSTRAP_USER)
                    .await?
                    .ok_or_else(|| Error::Internal("admin user vanished".into()))?
            }
        };
        let has_key = api_keys::Entity::find()
            .filter(api_keys::Column::AccountId.eq(SYSTEM_ACCOUNT))
            .filter(api_keys::Column::UserId.eq(BOOTSTRAP_USER))
            .one(self.db())
            .await?
            .is_some();
        if has_key {
            return Ok(None);
        }
        let key = self
            .create_api_key(
                &system,
                &format!("accounts/{SYSTEM_ACCOUNT}/users/{}", admin.user_id),
                ApiKey {
                    display_name: "bootstrap admin key".to_owned(),
                    ..Default::default()
                },
            )
            .await?;
        Ok(Some(key.key))
    }
}
