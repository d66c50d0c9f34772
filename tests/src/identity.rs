//! Identity clients and fixtures: accounts, users, keys, a tenant with its owner's key; and
//! the calls the suites make again and again, by resource name.

use tonic::Status;

use crate::AuthedChannel;
use kiln_proto::identity::v1 as idv1;

clients! {
    Accounts, accounts = idv1::account_service_client::AccountServiceClient<AuthedChannel>;
    Users, users = idv1::user_service_client::UserServiceClient<AuthedChannel>;
    Keys, keys = idv1::api_key_service_client::ApiKeyServiceClient<AuthedChannel>;
    Auth, auth = idv1::auth_service_client::AuthServiceClient<AuthedChannel>;
}

/// Creates account `id` (empty: a developer account named from the email).
pub async fn try_create_account(
    ch: &AuthedChannel,
    id: &str,
    account: Option<idv1::Account>,
) -> Result<idv1::Account, Status> {
    let request = idv1::CreateAccountRequest {
        account_id: id.to_owned(),
        account,
    };
    Ok(accounts(ch).create_account(request).await?.into_inner())
}

/// Creates an enterprise account `id`.
pub async fn create_account(admin: &AuthedChannel, id: &str) -> idv1::Account {
    let email = format!("owner@{id}.example");
    let account = idv1::Account {
        email,
        ..Default::default()
    };
    try_create_account(admin, id, Some(account))
        .await
        .expect("create account")
}

/// Creates user `id` in `account`.
pub async fn try_create_user(
    ch: &AuthedChannel,
    account: &str,
    id: &str,
    user: idv1::User,
) -> Result<idv1::User, Status> {
    let request = idv1::CreateUserRequest {
        parent: format!("accounts/{account}"),
        user_id: id.to_owned(),
        user: Some(user),
    };
    Ok(users(ch).create_user(request).await?.into_inner())
}

/// Creates user `user` in `account` with `role`.
pub async fn create_user(
    admin: &AuthedChannel,
    account: &str,
    user: &str,
    role: &str,
) -> idv1::User {
    let email = format!("{user}@{account}.example");
    let fields = idv1::User {
        email,
        role: role.to_owned(),
        ..Default::default()
    };
    try_create_user(admin, account, user, fields)
        .await
        .expect("create user")
}

/// Creates an API key for user `parent` (`accounts/{account}/users/{user}`).
pub async fn try_create_key(
    ch: &AuthedChannel,
    parent: &str,
    api_key: idv1::ApiKey,
) -> Result<idv1::ApiKey, Status> {
    let parent = parent.to_owned();
    let api_key = Some(api_key);
    let request = idv1::CreateApiKeyRequest { parent, api_key };
    Ok(keys(ch).create_api_key(request).await?.into_inner())
}

/// Creates an API key for `accounts/{account}/users/{user}`, with an optional expiry.
pub async fn create_key(
    ch: &AuthedChannel,
    account: &str,
    user: &str,
    expire_time: Option<prost_types::Timestamp>,
) -> idv1::ApiKey {
    let parent = format!("accounts/{account}/users/{user}");
    let display_name = "test".to_owned();
    let key = idv1::ApiKey {
        display_name,
        expire_time,
        ..Default::default()
    };
    let created = try_create_key(ch, &parent, key).await;
    created.expect("create api key")
}

/// Creates user `user` in `account` with `role`, and an API key for them.
pub async fn user_with_key(
    ch: &AuthedChannel,
    account: &str,
    user: &str,
    role: &str,
) -> idv1::ApiKey {
    create_user(ch, account, user, role).await;
    create_key(ch, account, user, None).await
}

/// An account with one admin user and that user's key: (account id, key secret).
pub async fn tenant(admin: &AuthedChannel, account: &str) -> String {
    create_account(admin, account).await;
    create_user(admin, account, "owner", "admin").await;
    create_key(admin, account, "owner", None).await.key
}

pub async fn list_users(
    ch: &AuthedChannel,
    request: idv1::ListUsersRequest,
) -> Result<idv1::ListUsersResponse, Status> {
    Ok(users(ch).list_users(request).await?.into_inner())
}

pub async fn list_keys(
    ch: &AuthedChannel,
    parent: &str,
) -> Result<idv1::ListApiKeysResponse, Status> {
    let request = idv1::ListApiKeysRequest {
        parent: parent.to_owned(),
        ..Default::default()
    };
    Ok(keys(ch).list_api_keys(request).await?.into_inner())
}

/// What the internal Authenticate RPC says of `api_key` (services only).
pub async fn authenticate(ch: &AuthedChannel, api_key: &str) -> Result<idv1::Principal, Status> {
    let api_key = api_key.to_owned();
    let request = idv1::AuthenticateRequest { api_key };
    let answer = auth(ch).authenticate(request).await?.into_inner();
    Ok(answer.principal.expect("a principal"))
}
