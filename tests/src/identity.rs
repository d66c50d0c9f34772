//! Identity clients and fixtures: accounts, users, keys, a tenant with its owner's key.

use crate::AuthedChannel;
use kiln_proto::identity::v1 as idv1;

pub type Accounts = idv1::account_service_client::AccountServiceClient<AuthedChannel>;
pub type Users = idv1::user_service_client::UserServiceClient<AuthedChannel>;
pub type Keys = idv1::api_key_service_client::ApiKeyServiceClient<AuthedChannel>;

pub fn accounts(ch: &AuthedChannel) -> Accounts {
    Accounts::new(ch.clone())
}

pub fn users(ch: &AuthedChannel) -> Users {
    Users::new(ch.clone())
}

pub fn keys(ch: &AuthedChannel) -> Keys {
    Keys::new(ch.clone())
}

/// Creates an enterprise account `id`.
pub async fn create_account(admin: &AuthedChannel, id: &str) -> idv1::Account {
    accounts(admin)
        .create_account(idv1::CreateAccountRequest {
            account_id: id.to_owned(),
            account: Some(idv1::Account {
                email: format!("owner@{id}.example"),
                ..Default::default()
            }),
        })
        .await
        .expect("create account")
        .into_inner()
}

/// Creates user `user` in `account` with `role`.
pub async fn create_user(
    admin: &AuthedChannel,
    account: &str,
    user: &str,
    role: &str,
) -> idv1::User {
    users(admin)
        .create_user(idv1::CreateUserRequest {
            parent: format!("accounts/{account}"),
            user_id: user.to_owned(),
            user: Some(idv1::User {
                email: format!("{user}@{account}.example"),
                role: role.to_owned(),
                ..Default::default()
            }),
        })
        .await
        .expect("create user")
        .into_inner()
}

/// Creates an API key for `accounts/{account}/users/{user}`, with an optional expiry.
pub async fn create_key(
    ch: &AuthedChannel,
    account: &str,
    user: &str,
    expire_time: Option<prost_types::Timestamp>,
) -> idv1::ApiKey {
    keys(ch)
        .create_api_key(idv1::CreateApiKeyRequest {
            parent: format!("accounts/{account}/users/{user}"),
            api_key: Some(idv1::ApiKey {
                display_name: "test".to_owned(),
                expire_time,
                ..Default::default()
            }),
        })
        .await
        .expect("create api key")
        .into_inner()
}

/// An account with one admin user and that user's key: (account id, key secret).
pub async fn tenant(admin: &AuthedChannel, account: &str) -> String {
    create_account(admin, account).await;
    create_user(admin, account, "owner", "admin").await;
    create_key(admin, account, "owner", None).await.key
}
