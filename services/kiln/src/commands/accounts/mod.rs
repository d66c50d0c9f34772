//! Accounts, users and API keys: `kiln create|get|list|update|delete account|user|api-key`.

mod args;

use clap::Subcommand;
use kiln_proto::identity::v1 as idv1;

use super::flags::parse_enum;
use crate::client::{
    Authed, Client, CreateRpc, Format, InParent, ListArgs, account_name, changes, create_and_print,
    delete_and_print, enum_name, get_and_print, list_and_print, print_deleted, print_one,
    printable, resource, say, time, update_and_print,
};
pub use args::{CreateAccountArgs, CreateApiKeyArgs, CreateUserArgs};

#[derive(Debug, Subcommand)]
pub enum Create {
    /// Create an account (platform admin). Without an ID, a developer account whose ID is
    /// derived from --email.
    Account(CreateAccountArgs),
    /// Add a user to the account.
    User(CreateUserArgs),
    /// Create an API key for a user; the secret is printed once.
    ApiKey(CreateApiKeyArgs),
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
    create: create_account(idv1::CreateAccountRequest),
    list: list_accounts(idv1::ListAccountsRequest) => accounts,
    update: update_account(idv1::UpdateAccountRequest) account,
});
resource!(idv1::User, users {
    create: create_user(idv1::CreateUserRequest),
    get: get_user(idv1::GetUserRequest) in "users",
    list: list_users(idv1::ListUsersRequest, parent) => users,
    update: update_user(idv1::UpdateUserRequest) user,
    delete: delete_user(idv1::DeleteUserRequest),
});
resource!(idv1::ApiKey, keys {
    create: create_api_key(idv1::CreateApiKeyRequest),
    list: list_api_keys(idv1::ListApiKeysRequest, parent) => api_keys,
});

printable!(idv1::Account, "kiln.identity.v1.Account" {
    "NAME" => |a| a.name.clone(),
    "DISPLAY NAME" => |a| a.display_name.clone(),
    "TYPE" => |a| enum_name(a.account_type, idv1::account::AccountType::as_str_name),
    "EMAIL" => |a| a.email.clone(),
    "STATE" => |a| enum_name(a.state, idv1::account::State::as_str_name),
    "SUSPEND STATE" => |a| enum_name(a.suspend_state, idv1::account::SuspendState::as_str_name),
    "CREATED" => |a| time(&a.create_time),
});
printable!(idv1::User, "kiln.identity.v1.User" {
    "NAME" => |u| u.name.clone(),
    "EMAIL" => |u| u.email.clone(),
    "ROLE" => |u| u.role.clone(),
    "STATE" => |u| enum_name(u.state, idv1::user::State::as_str_name),
    "CREATED" => |u| time(&u.create_time),
});
printable!(idv1::ApiKey, "kiln.identity.v1.ApiKey" {
    "NAME" => |k| k.name.clone(),
    "DISPLAY NAME" => |k| k.display_name.clone(),
    "PREFIX" => |k| k.prefix.clone(),
    "CREATED" => |k| time(&k.create_time),
    "EXPIRES" => |k| time(&k.expire_time),
});

pub(crate) async fn create(client: &Client, format: Format, command: Create) -> anyhow::Result<()> {
    match command {
        Create::Account(args) => {
            create_and_print::<idv1::Account>(client, format, args.request()?).await
        }
        Create::User(args) => {
            let request = args.request(client.account().await?);
            create_and_print::<idv1::User>(client, format, request).await
        }
        Create::ApiKey(args) => {
            // The flags are checked before anything is asked of the server.
            let api_key = args.api_key(std::time::SystemTime::now())?;
            let request = idv1::CreateApiKeyRequest {
                parent: client.full_name("users", &args.user).await?,
                api_key: Some(api_key),
            };
            let key = idv1::ApiKey::create(client, request).await?;
            print_one(format, &key);
            if format == Format::Table {
                say!("\nAPI key (shown only now; store it safely):\n{}", key.key);
            }
            Ok(())
        }
    }
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
                .map(|s| parse_enum::<SuspendState>("suspend-state", &s).map(i32::from))
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
    use super::*;
    use crate::client::{Printable, to_json};

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
        assert_eq!(idv1::Account::headers()[5], "SUSPEND STATE");
        assert_eq!(
            to_json(idv1::Account::PROTO_NAME, &account)["account_type"],
            "ENTERPRISE"
        );
        let user = idv1::User::default();
        assert_eq!(
            idv1::User::headers(),
            ["NAME", "EMAIL", "ROLE", "STATE", "CREATED"]
        );
        assert_eq!(user.row(), ["", "", "", "STATE_UNSPECIFIED", "-"]);
        to_json(idv1::User::PROTO_NAME, &user);
        let key = idv1::ApiKey::default();
        assert_eq!(key.row()[3..], ["-", "-"]);
        to_json(idv1::ApiKey::PROTO_NAME, &key);
    }
}
