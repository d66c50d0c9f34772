//! Accounts, users and API keys: `kiln create|get|list|update|delete account|user|api-key`.

use clap::Subcommand;
use kiln_proto::identity::v1 as idv1;

use super::flags::{parse_duration, parse_enum, parse_time};
use crate::client::{
    Authed, Client, Format, InParent, ListArgs, Printable, account_name, changes, delete_and_print,
    enum_name, get_and_print, list_and_print, print_deleted, print_one, resource, say, time,
    update_and_print,
};

#[derive(Debug, Subcommand)]
pub enum Create {
    /// Create an account (platform admin). Without an ID, a developer account whose ID is
    /// derived from --email.
    Account {
        account_id: Option<String>,
        #[arg(long)]
        email: Option<String>,
        #[arg(long)]
        display_name: Option<String>,
        /// developer or enterprise (default: enterprise when an ID is given).
        #[arg(long = "type")]
        account_type: Option<String>,
    },
    /// Add a user to the account.
    User {
        user_id: String,
        #[arg(long)]
        email: String,
        #[arg(long)]
        display_name: Option<String>,
        /// admin or user.
        #[arg(long, default_value = "user")]
        role: String,
        #[arg(long)]
        service_account: bool,
    },
    /// Create an API key for a user; the secret is printed once.
    ApiKey {
        /// The user ID the key belongs to.
        #[arg(long)]
        user: String,
        #[arg(long)]
        display_name: Option<String>,
        /// Expiry as RFC 3339, e.g. 2027-01-01T00:00:00Z.
        #[arg(long, conflicts_with = "expires_in")]
        expire_time: Option<String>,
        /// Expiry from now, e.g. 30d, 12h, 45m, 90s.
        #[arg(long)]
        expires_in: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum Get {
    /// Show an account (default: the current one).
    Account { account_id: Option<String> },
    /// Show a user.
    User { user_id: String },
}

#[derive(Debug, Subcommand)]
pub enum List {
    /// List the accounts the key can see.
    Accounts(ListArgs),
    /// List the account's users.
    Users(ListArgs),
    /// List a user's API keys.
    ApiKeys {
        #[arg(long)]
        user: String,
        #[command(flatten)]
        list: ListArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum Update {
    /// Change an account (default: the current one).
    Account {
        account_id: Option<String>,
        #[arg(long)]
        display_name: Option<String>,
        #[arg(long)]
        email: Option<String>,
        /// e.g. UNSUSPENDED, MONTHLY_SPEND_LIMIT_EXCEEDED (platform admin).
        #[arg(long)]
        suspend_state: Option<String>,
    },
    /// Change a user.
    User {
        user_id: String,
        #[arg(long)]
        display_name: Option<String>,
        #[arg(long)]
        email: Option<String>,
        #[arg(long)]
        role: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum Delete {
    /// Delete an account.
    Account { account_id: String },
    /// Delete a user.
    User { user_id: String },
    /// Delete one of a user's API keys.
    ApiKey {
        key_id: String,
        #[arg(long)]
        user: String,
    },
}

fn accounts(client: &Client) -> idv1::account_service_client::AccountServiceClient<Authed> {
    idv1::account_service_client::AccountServiceClient::new(client.authed())
}

fn users(client: &Client) -> idv1::user_service_client::UserServiceClient<Authed> {
    idv1::user_service_client::UserServiceClient::new(client.authed())
}

fn keys(client: &Client) -> idv1::api_key_service_client::ApiKeyServiceClient<Authed> {
    idv1::api_key_service_client::ApiKeyServiceClient::new(client.authed())
}

resource!(idv1::Account, accounts {
    list: list_accounts(idv1::ListAccountsRequest) => accounts,
    update: update_account(idv1::UpdateAccountRequest) account,
});
resource!(idv1::User, users {
    get: get_user(idv1::GetUserRequest) in "users",
    list: list_users(idv1::ListUsersRequest, parent) => users,
    update: update_user(idv1::UpdateUserRequest) user,
    delete: delete_user(idv1::DeleteUserRequest),
});
resource!(idv1::ApiKey, keys {
    list: list_api_keys(idv1::ListApiKeysRequest, parent) => api_keys,
});

impl Printable for idv1::Account {
    const PROTO_NAME: &'static str = "kiln.identity.v1.Account";
    const HEADERS: &'static [&'static str] = &[
        "NAME",
        "DISPLAY NAME",
        "TYPE",
        "EMAIL",
        "STATE",
        "SUSPEND STATE",
        "CREATED",
    ];
    fn row(&self) -> Vec<String> {
        use idv1::account::{AccountType, State, SuspendState};
        vec![
            self.name.clone(),
            self.display_name.clone(),
            enum_name(self.account_type, AccountType::as_str_name),
            self.email.clone(),
            enum_name(self.state, State::as_str_name),
            enum_name(self.suspend_state, SuspendState::as_str_name),
            time(&self.create_time),
        ]
    }
}

impl Printable for idv1::User {
    const PROTO_NAME: &'static str = "kiln.identity.v1.User";
    const HEADERS: &'static [&'static str] = &["NAME", "EMAIL", "ROLE", "STATE", "CREATED"];
    fn row(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.email.clone(),
            self.role.clone(),
            enum_name(self.state, idv1::user::State::as_str_name),
            time(&self.create_time),
        ]
    }
}

impl Printable for idv1::ApiKey {
    const PROTO_NAME: &'static str = "kiln.identity.v1.ApiKey";
    const HEADERS: &'static [&'static str] =
        &["NAME", "DISPLAY NAME", "PREFIX", "CREATED", "EXPIRES"];
    fn row(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.display_name.clone(),
            self.prefix.clone(),
            time(&self.create_time),
            time(&self.expire_time),
        ]
    }
}

/// A key's expiry from `--expire-time` or `--expires-in` (from now).
fn expiry(
    expire_time: Option<&str>,
    expires_in: Option<&str>,
    now: std::time::SystemTime,
) -> anyhow::Result<Option<prost_types::Timestamp>> {
    Ok(match (expire_time, expires_in) {
        (Some(t), _) => Some(parse_time("expire-time", t)?),
        (None, Some(d)) => Some((now + parse_duration("expires-in", d)?).into()),
        (None, None) => None,
    })
}

pub(crate) async fn create(client: &Client, format: Format, command: Create) -> anyhow::Result<()> {
    match command {
        Create::Account {
            account_id,
            email,
            display_name,
            account_type,
        } => {
            use idv1::account::AccountType;
            let account_type = match account_type {
                Some(t) => parse_enum(
                    "type",
                    &t,
                    AccountType::from_str_name,
                    AccountType::as_str_name,
                )? as i32,
                None => 0,
            };
            let account = accounts(client)
                .create_account(idv1::CreateAccountRequest {
                    account_id: account_id.unwrap_or_default(),
                    account: Some(idv1::Account {
                        email: email.unwrap_or_default(),
                        display_name: display_name.unwrap_or_default(),
                        account_type,
                        ..Default::default()
                    }),
                })
                .await?
                .into_inner();
            print_one(format, &account);
        }
        Create::User {
            user_id,
            email,
            display_name,
            role,
            service_account,
        } => {
            let user = users(client)
                .create_user(idv1::CreateUserRequest {
                    parent: client.account().await?,
                    user_id,
                    user: Some(idv1::User {
                        email,
                        display_name: display_name.unwrap_or_default(),
                        role,
                        service_account,
                        ..Default::default()
                    }),
                })
                .await?
                .into_inner();
            print_one(format, &user);
        }
        Create::ApiKey {
            user,
            display_name,
            expire_time,
            expires_in,
        } => {
            let expire_time = expiry(
                expire_time.as_deref(),
                expires_in.as_deref(),
                std::time::SystemTime::now(),
            )?;
            let key = keys(client)
                .create_api_key(idv1::CreateApiKeyRequest {
                    parent: client.full_name("users", &user).await?,
                    api_key: Some(idv1::ApiKey {
                        display_name: display_name.unwrap_or_default(),
                        expire_time,
                        ..Default::default()
                    }),
                })
                .await?
                .into_inner();
            print_one(format, &key);
            if format == Format::Table {
                say!("\nAPI key (shown only now; store it safely):\n{}", key.key);
            }
        }
    }
    Ok(())
}

/// The account named by `account_id`, or the one the command works in.
async fn account_or_current(client: &Client, account_id: Option<String>) -> anyhow::Result<String> {
    match account_id {
        Some(id) => Ok(account_name(&id)),
        None => client.account().await,
    }
}

pub(crate) async fn get(client: &Client, format: Format, command: Get) -> anyhow::Result<()> {
    match command {
        Get::Account { account_id } => {
            let name = account_or_current(client, account_id).await?;
            let request = idv1::GetAccountRequest { name };
            let account = accounts(client).get_account(request).await?;
            print_one(format, account.get_ref());
            Ok(())
        }
        Get::User { user_id } => get_and_print::<idv1::User>(client, format, &user_id).await,
    }
}

pub(crate) async fn list(client: &Client, format: Format, command: List) -> anyhow::Result<()> {
    match command {
        List::Accounts(list) => {
            let request = idv1::ListAccountsRequest::default();
            list_and_print::<idv1::Account>(client, format, &list, request).await
        }
        List::Users(list) => {
            let request = InParent::in_parent(client.account().await?);
            list_and_print::<idv1::User>(client, format, &list, request).await
        }
        List::ApiKeys { user, list } => {
            let request = InParent::in_parent(client.full_name("users", &user).await?);
            list_and_print::<idv1::ApiKey>(client, format, &list, request).await
        }
    }
}

pub(crate) async fn update(client: &Client, format: Format, command: Update) -> anyhow::Result<()> {
    match command {
        Update::Account {
            account_id,
            display_name,
            email,
            suspend_state,
        } => {
            use idv1::account::SuspendState;
            let suspend_state = suspend_state
                .map(|s| {
                    let state = parse_enum(
                        "suspend-state",
                        &s,
                        SuspendState::from_str_name,
                        SuspendState::as_str_name,
                    );
                    state.map(|s| s as i32)
                })
                .transpose()?;
            let (mut account, mask) = changes!(idv1::Account {
                display_name,
                email,
                suspend_state
            })?;
            account.name = account_or_current(client, account_id).await?;
            update_and_print(client, format, account, mask).await
        }
        Update::User {
            user_id,
            display_name,
            email,
            role,
        } => {
            let (mut user, mask) = changes!(idv1::User {
                display_name,
                email,
                role
            })?;
            user.name = client.full_name("users", &user_id).await?;
            update_and_print(client, format, user, mask).await
        }
    }
}

pub(crate) async fn delete(client: &Client, format: Format, command: Delete) -> anyhow::Result<()> {
    match command {
        Delete::Account { account_id } => {
            let name = account_name(&account_id);
            let request = idv1::DeleteAccountRequest { name: name.clone() };
            accounts(client).delete_account(request).await?;
            print_deleted(format, &name);
        }
        Delete::User { user_id } => {
            delete_and_print::<idv1::User>(client, format, &user_id).await?;
        }
        Delete::ApiKey { key_id, user } => {
            let name = client
                .full_name(&format!("users/{user}/apiKeys"), &key_id)
                .await?;
            let request = idv1::DeleteApiKeyRequest { name: name.clone() };
            keys(client).delete_api_key(request).await?;
            print_deleted(format, &name);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::client::to_json;

    #[test]
    fn expiry_is_a_time_or_a_duration_from_now() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(expiry(None, None, now).unwrap(), None);
        let in_a_day = expiry(None, Some("1d"), now).unwrap().unwrap();
        assert_eq!(in_a_day.seconds, 1_000 + 86_400);
        let at = expiry(Some("2027-01-01T00:00:00Z"), None, now).unwrap();
        assert_eq!(at.unwrap().seconds, 1_798_761_600);
        // One grammar with the other duration flags: a bare number is refused.
        let e = expiry(None, Some("90"), now).unwrap_err().to_string();
        assert!(e.starts_with("--expires-in: \"90\": missing unit"), "{e}");
    }

    #[test]
    fn identity_resources_print() {
        let account = idv1::Account {
            name: "accounts/acme".into(),
            account_type: idv1::account::AccountType::Enterprise as i32,
            suspend_state: 99,
            ..Default::default()
        };
        assert_eq!(
            account.row(),
            [
                "accounts/acme",
                "",
                "ENTERPRISE",
                "",
                "STATE_UNSPECIFIED",
                "?",
                "-"
            ]
        );
        assert_eq!(account.row().len(), idv1::Account::HEADERS.len());
        assert_eq!(
            to_json(idv1::Account::PROTO_NAME, &account)["account_type"],
            "ENTERPRISE"
        );
        let user = idv1::User::default();
        assert_eq!(user.row().len(), idv1::User::HEADERS.len());
        to_json(idv1::User::PROTO_NAME, &user);
        let key = idv1::ApiKey::default();
        assert_eq!(key.row().len(), idv1::ApiKey::HEADERS.len());
        to_json(idv1::ApiKey::PROTO_NAME, &key);
    }
}
