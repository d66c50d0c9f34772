//! The command line: `kiln dev`, `kiln serve <service>`, and client commands in the style of
//! firectl (`kiln create|get|list|update|delete <resource>`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use kiln_core::telemetry::OutgoingInterceptor;
use kiln_proto::identity::v1 as idv1;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Prints a line of command output. A closed pipe (`kiln list users | head`) ends the
/// command quietly instead of panicking.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(err) = writeln!(out, $($arg)*) {
            if err.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}
use crate::output::{self, Format};

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Kiln: a self-hostable platform for serving and fine-tuning models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The Kiln server to talk to.
    #[arg(
        long,
        global = true,
        env = "KILN_SERVER",
        default_value = "http://127.0.0.1:7400"
    )]
    pub server: String,
    /// API key (default: the dev admin key in $KILN_DATA_DIR/admin.key or .kiln/admin.key).
    #[arg(long, global = true, env = "KILN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Account the command works in (default: the only account the key can see).
    #[arg(long, global = true, env = "KILN_ACCOUNT")]
    pub account: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    pub output: Format,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run every service in one process, with local state: the quickstart.
    Dev(DevArgs),
    /// Run one service alone.
    Serve(ServeArgs),
    /// Create a resource.
    #[command(subcommand)]
    Create(CreateCommand),
    /// Show one resource.
    #[command(subcommand)]
    Get(GetCommand),
    /// List resources.
    #[command(subcommand)]
    List(ListCommand),
    /// Change a resource.
    #[command(subcommand)]
    Update(UpdateCommand),
    /// Delete a resource.
    #[command(subcommand)]
    Delete(DeleteCommand),
    /// Restore a soft-deleted resource.
    #[command(subcommand)]
    Undelete(crate::scheduler_cli::UndeleteCommand),
    /// Set a resource's replica count.
    #[command(subcommand)]
    Scale(crate::scheduler_cli::ScaleCommand),
    /// Download a model's files or a dataset.
    #[command(subcommand)]
    Download(crate::registry_cli::DownloadCommand),
    /// Chat with a model: its answer streams in the terminal.
    Chat(crate::inference_cli::ChatArgs),
    /// Embed texts with an embedding model.
    Embed(crate::inference_cli::EmbedArgs),
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Address for every gRPC service.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub listen: SocketAddr,
    /// Where state lives (SQLite files, keys).
    #[arg(long, env = "KILN_DATA_DIR", default_value = ".kiln")]
    pub data_dir: PathBuf,
    /// A TOML config file; `KILN_*` variables override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The services this process runs: identity, registry, scheduler, billing, inference (the
    /// others are reached at the URLs in the configuration).
    #[arg(required = true)]
    pub services: Vec<String>,
    /// A TOML config file; `KILN_*` variables override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum CreateCommand {
    /// Create a model and upload a file or folder: a GGUF file, an ONNX folder (model.onnx,
    /// tokenizer.json), or a PEFT folder (a LoRA addon, with --base-model). Resumes an
    /// interrupted upload of the same files.
    Model(crate::registry_cli::CreateModelArgs),
    /// Create a dataset and upload its JSONL file.
    Dataset(crate::registry_cli::CreateDatasetArgs),
    /// Create a deployment: replicas serving a base model (--wait: until it is READY).
    Deployment(Box<crate::scheduler_cli::CreateDeploymentArgs>),
    /// Deploy a model (the base model or a LoRA addon of it) onto a deployment.
    DeployedModel(crate::scheduler_cli::CreateDeployedModelArgs),
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
pub enum GetCommand {
    /// Show a model (an ID in the account, or a full name like accounts/kiln/models/x).
    Model { model: String },
    /// Show a dataset.
    Dataset { dataset: String },
    /// Show a deployment (an ID in the account, or a full name).
    Deployment { deployment: String },
    /// Show a deployed model (an ID in the account, or a full name).
    DeployedModel { deployed_model: String },
    /// Show an account (default: the current one).
    Account { account_id: Option<String> },
    /// Show a user.
    User { user_id: String },
    /// The account's usage and its cost over a time range.
    Usage(crate::billing_cli::UsageArgs),
}

#[derive(Debug, Subcommand)]
pub enum ListCommand {
    /// List the account's models (with --account kiln: the public library).
    Models(ListArgs),
    /// List the account's datasets.
    Datasets(ListArgs),
    /// List the account's deployments.
    Deployments(crate::scheduler_cli::ListDeploymentsArgs),
    /// List the account's deployed models.
    DeployedModels(ListArgs),
    /// List the inference nodes (platform admin).
    Nodes(ListArgs),
    /// List the accounts the key can see.
    Accounts(ListArgs),
    /// List the account's users.
    Users(ListArgs),
    /// List the account's quotas, their limits and current use.
    Quotas(ListArgs),
    /// List a user's API keys.
    ApiKeys {
        #[arg(long)]
        user: String,
        #[command(flatten)]
        list: ListArgs,
    },
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// AIP-160 filter, e.g. 'role = "admin"'.
    #[arg(long, default_value = "")]
    pub filter: String,
    /// e.g. "create_time desc".
    #[arg(long, default_value = "")]
    pub order_by: String,
    /// Stop after this many (default: all).
    #[arg(long)]
    pub limit: Option<usize>,
}

#[derive(Debug, Subcommand)]
pub enum UpdateCommand {
    Model {
        model: String,
        #[arg(long)]
        display_name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// Publish to every account (platform admin).
        #[arg(long)]
        public: Option<bool>,
    },
    Dataset {
        dataset: String,
        #[arg(long)]
        display_name: Option<String>,
    },
    /// Change a deployment (the update mask holds exactly the flags given).
    Deployment(crate::scheduler_cli::UpdateDeploymentArgs),
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
    User {
        user_id: String,
        #[arg(long)]
        display_name: Option<String>,
        #[arg(long)]
        email: Option<String>,
        #[arg(long)]
        role: Option<String>,
    },
    /// Change a quota (an ID such as monthly-spend-usd, or a full name).
    Quota {
        quota: String,
        /// The limit (up to max_value; platform admins go beyond it).
        #[arg(long)]
        value: Option<i64>,
        /// The most the account may set itself (platform admin).
        #[arg(long)]
        max_value: Option<i64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeleteCommand {
    Model {
        model: String,
    },
    Dataset {
        dataset: String,
    },
    /// Delete a deployment (soft: `kiln undelete deployment` restores it; --hard: for good).
    Deployment(crate::scheduler_cli::DeleteDeploymentArgs),
    DeployedModel {
        deployed_model: String,
    },
    Account {
        account_id: String,
    },
    User {
        user_id: String,
    },
    ApiKey {
        key_id: String,
        #[arg(long)]
        user: String,
    },
}

pub(crate) type Authed = InterceptedService<Channel, OutgoingInterceptor>;

/// A connected client with the caller's key.
pub struct Client {
    channel: Channel,
    interceptor: OutgoingInterceptor,
    args: ClientArgs,
}

fn default_key_file() -> PathBuf {
    std::env::var_os("KILN_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".kiln"))
        .join("admin.key")
}

impl Client {
    pub async fn connect(args: ClientArgs) -> anyhow::Result<Self> {
        let key = match &args.api_key {
            Some(k) => k.clone(),
            None => {
                let path = default_key_file();
                std::fs::read_to_string(&path)
                    .map(|s| s.trim().to_owned())
                    .with_context(|| {
                        format!("no API key: pass --api-key, set KILN_API_KEY, or run `kiln dev` (which writes {})", path.display())
                    })?
            }
        };
        let channel = kiln_core::server::endpoint(&args.server)
            .map_err(|e| anyhow::anyhow!("--server: {e}"))?
            .connect()
            .await
            .with_context(|| format!("cannot reach Kiln at {}", args.server))?;
        let interceptor =
            OutgoingInterceptor::new(Some(&key)).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Self {
            channel,
            interceptor,
            args,
        })
    }

    pub(crate) fn authed(&self) -> Authed {
        InterceptedService::new(self.channel.clone(), self.interceptor.clone())
    }

    fn accounts(&self) -> idv1::account_service_client::AccountServiceClient<Authed> {
        idv1::account_service_client::AccountServiceClient::new(self.authed())
    }

    fn users(&self) -> idv1::user_service_client::UserServiceClient<Authed> {
        idv1::user_service_client::UserServiceClient::new(self.authed())
    }

    fn keys(&self) -> idv1::api_key_service_client::ApiKeyServiceClient<Authed> {
        idv1::api_key_service_client::ApiKeyServiceClient::new(self.authed())
    }

    /// The account to work in: --account, or the only one the key can see.
    pub(crate) async fn account(&self) -> anyhow::Result<String> {
        if let Some(a) = &self.args.account {
            return Ok(if a.starts_with("accounts/") {
                a.clone()
            } else {
                format!("accounts/{a}")
            });
        }
        let listed = self
            .accounts()
            .list_accounts(idv1::ListAccountsRequest {
                page_size: 2,
                ..Default::default()
            })
            .await?
            .into_inner();
        match listed.accounts.as_slice() {
            [only] => Ok(only.name.clone()),
            _ => bail!("this key sees several accounts: pass --account or set KILN_ACCOUNT"),
        }
    }
}

/// Parses `30d`, `12h`, `45m`, `90s`.
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .with_context(|| format!("{text:?} is not a duration like 30d or 12h"))?;
    let secs = match unit {
        "d" => n * 86_400,
        "h" => n * 3_600,
        "m" => n * 60,
        "s" | "" => n,
        _ => bail!("{text:?}: unit must be d, h, m or s"),
    };
    Ok(Duration::from_secs(secs))
}

fn enum_value(field: &str, value: &str, from_name: fn(&str) -> Option<i32>) -> anyhow::Result<i32> {
    from_name(&value.to_ascii_uppercase())
        .with_context(|| format!("--{field}: unknown value {value:?}"))
}

fn account_row(a: &idv1::Account) -> Vec<String> {
    vec![
        a.name.clone(),
        a.display_name.clone(),
        idv1::account::AccountType::try_from(a.account_type)
            .map(|t| t.as_str_name())
            .unwrap_or("?")
            .to_owned(),
        a.email.clone(),
        idv1::account::State::try_from(a.state)
            .map(|t| t.as_str_name())
            .unwrap_or("?")
            .to_owned(),
        idv1::account::SuspendState::try_from(a.suspend_state)
            .map(|t| t.as_str_name())
            .unwrap_or("?")
            .to_owned(),
        output::time(&a.create_time),
    ]
}
const ACCOUNT_HEADERS: &[&str] = &[
    "NAME",
    "DISPLAY NAME",
    "TYPE",
    "EMAIL",
    "STATE",
    "SUSPEND STATE",
    "CREATED",
];

fn user_row(u: &idv1::User) -> Vec<String> {
    vec![
        u.name.clone(),
        u.email.clone(),
        u.role.clone(),
        idv1::user::State::try_from(u.state)
            .map(|t| t.as_str_name())
            .unwrap_or("?")
            .to_owned(),
        output::time(&u.create_time),
    ]
}
const USER_HEADERS: &[&str] = &["NAME", "EMAIL", "ROLE", "STATE", "CREATED"];

fn key_row(k: &idv1::ApiKey) -> Vec<String> {
    vec![
        k.name.clone(),
        k.display_name.clone(),
        k.prefix.clone(),
        output::time(&k.create_time),
        output::time(&k.expire_time),
    ]
}
const KEY_HEADERS: &[&str] = &["NAME", "DISPLAY NAME", "PREFIX", "CREATED", "EXPIRES"];

pub(crate) fn print<M: prost::Message>(
    format: Format,
    full_name: &str,
    items: &[M],
    headers: &[&str],
    row: fn(&M) -> Vec<String>,
    single: bool,
) {
    match format {
        Format::Json => {
            let values: Vec<_> = items
                .iter()
                .map(|m| output::to_json(full_name, m))
                .collect();
            let value = if single && values.len() == 1 {
                values[0].clone()
            } else {
                serde_json::Value::Array(values)
            };
            say!(
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
        }
        Format::Table => {
            let rows: Vec<_> = items.iter().map(row).collect();
            say!("{}", output::table(headers, &rows).trim_end());
        }
    }
}

/// Follows `next_page_token` until the listing ends or `limit` items are in.
pub(crate) async fn collect_pages<T, F, Fut>(
    limit: Option<usize>,
    mut fetch: F,
) -> anyhow::Result<Vec<T>>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(Vec<T>, String)>>,
{
    let limit = limit.unwrap_or(usize::MAX);
    let mut items = Vec::new();
    let mut page_token = String::new();
    loop {
        let (page, next) = fetch(page_token).await?;
        items.extend(page);
        if next.is_empty() || items.len() >= limit {
            break;
        }
        page_token = next;
    }
    items.truncate(limit);
    Ok(items)
}

/// Runs a client command.
pub async fn run_client(command: Command, args: ClientArgs) -> anyhow::Result<()> {
    let format = args.output;
    let client = Client::connect(args).await?;
    match command {
        Command::Create(CreateCommand::Account {
            account_id,
            email,
            display_name,
            account_type,
        }) => {
            let account_type = match account_type.as_deref() {
                None => 0,
                Some(t) => enum_value("type", t, |s| {
                    idv1::account::AccountType::from_str_name(s).map(|v| v as i32)
                })?,
            };
            let account = client
                .accounts()
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
            print(
                format,
                "kiln.identity.v1.Account",
                &[account],
                ACCOUNT_HEADERS,
                account_row,
                true,
            );
        }
        Command::Create(CreateCommand::User {
            user_id,
            email,
            display_name,
            role,
            service_account,
        }) => {
            let parent = client.account().await?;
            let user = client
                .users()
                .create_user(idv1::CreateUserRequest {
                    parent,
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
            print(
                format,
                "kiln.identity.v1.User",
                &[user],
                USER_HEADERS,
                user_row,
                true,
            );
        }
        Command::Create(CreateCommand::ApiKey {
            user,
            display_name,
            expire_time,
            expires_in,
        }) => {
            let parent = format!("{}/users/{user}", client.account().await?);
            let expire_time = match (expire_time, expires_in) {
                (Some(t), _) => Some(
                    t.parse::<prost_types::Timestamp>()
                        .map_err(|e| anyhow::anyhow!("--expire-time {t:?}: {e}"))?,
                ),
                (None, Some(d)) => {
                    let at = std::time::SystemTime::now() + parse_duration(&d)?;
                    Some(prost_types::Timestamp::from(at))
                }
                (None, None) => None,
            };
            let key = client
                .keys()
                .create_api_key(idv1::CreateApiKeyRequest {
                    parent,
                    api_key: Some(idv1::ApiKey {
                        display_name: display_name.unwrap_or_default(),
                        expire_time,
                        ..Default::default()
                    }),
                })
                .await?
                .into_inner();
            match format {
                Format::Json => print(
                    format,
                    "kiln.identity.v1.ApiKey",
                    &[key],
                    KEY_HEADERS,
                    key_row,
                    true,
                ),
                Format::Table => {
                    print(
                        format,
                        "kiln.identity.v1.ApiKey",
                        std::slice::from_ref(&key),
                        KEY_HEADERS,
                        key_row,
                        true,
                    );
                    say!("\nAPI key (shown only now; store it safely):\n{}", key.key);
                }
            }
        }
        Command::Get(GetCommand::Account { account_id }) => {
            let name = match account_id {
                Some(a) => a,
                None => client.account().await?,
            };
            let account = client
                .accounts()
                .get_account(idv1::GetAccountRequest { name })
                .await?
                .into_inner();
            print(
                format,
                "kiln.identity.v1.Account",
                &[account],
                ACCOUNT_HEADERS,
                account_row,
                true,
            );
        }
        Command::Get(GetCommand::User { user_id }) => {
            let name = format!("{}/users/{user_id}", client.account().await?);
            let user = client
                .users()
                .get_user(idv1::GetUserRequest { name })
                .await?
                .into_inner();
            print(
                format,
                "kiln.identity.v1.User",
                &[user],
                USER_HEADERS,
                user_row,
                true,
            );
        }
        Command::List(ListCommand::Accounts(list)) => {
            let items = collect_pages(list.limit, |page_token| {
                let mut accounts = client.accounts();
                let request = idv1::ListAccountsRequest {
                    page_size: 200,
                    page_token,
                    filter: list.filter.clone(),
                    order_by: list.order_by.clone(),
                };
                async move {
                    let page = accounts.list_accounts(request).await?.into_inner();
                    Ok((page.accounts, page.next_page_token))
                }
            })
            .await?;
            print(
                format,
                "kiln.identity.v1.Account",
                &items,
                ACCOUNT_HEADERS,
                account_row,
                false,
            );
        }
        Command::List(ListCommand::Users(list)) => {
            let parent = client.account().await?;
            let items = collect_pages(list.limit, |page_token| {
                let mut users = client.users();
                let request = idv1::ListUsersRequest {
                    parent: parent.clone(),
                    page_size: 200,
                    page_token,
                    filter: list.filter.clone(),
                    order_by: list.order_by.clone(),
                };
                async move {
                    let page = users.list_users(request).await?.into_inner();
                    Ok((page.users, page.next_page_token))
                }
            })
            .await?;
            print(
                format,
                "kiln.identity.v1.User",
                &items,
                USER_HEADERS,
                user_row,
                false,
            );
        }
        Command::List(ListCommand::ApiKeys { user, list }) => {
            let parent = format!("{}/users/{user}", client.account().await?);
            let items = collect_pages(list.limit, |page_token| {
                let mut keys = client.keys();
                let request = idv1::ListApiKeysRequest {
                    parent: parent.clone(),
                    page_size: 200,
                    page_token,
                    filter: list.filter.clone(),
                    order_by: list.order_by.clone(),
                };
                async move {
                    let page = keys.list_api_keys(request).await?.into_inner();
                    Ok((page.api_keys, page.next_page_token))
                }
            })
            .await?;
            print(
                format,
                "kiln.identity.v1.ApiKey",
                &items,
                KEY_HEADERS,
                key_row,
                false,
            );
        }
        Command::Update(UpdateCommand::Account {
            account_id,
            display_name,
            email,
            suspend_state,
        }) => {
            let name = match account_id {
                Some(a) if a.starts_with("accounts/") => a,
                Some(a) => format!("accounts/{a}"),
                None => client.account().await?,
            };
            let mut paths = Vec::new();
            let mut account = idv1::Account {
                name,
                ..Default::default()
            };
            if let Some(v) = display_name {
                account.display_name = v;
                paths.push("display_name".to_owned());
            }
            if let Some(v) = email {
                account.email = v;
                paths.push("email".to_owned());
            }
            if let Some(v) = suspend_state {
                account.suspend_state = enum_value("suspend-state", &v, |s| {
                    idv1::account::SuspendState::from_str_name(s).map(|v| v as i32)
                })?;
                paths.push("suspend_state".to_owned());
            }
            if paths.is_empty() {
                bail!("nothing to update: pass --display-name, --email or --suspend-state");
            }
            let account = client
                .accounts()
                .update_account(idv1::UpdateAccountRequest {
                    account: Some(account),
                    update_mask: Some(prost_types::FieldMask { paths }),
                })
                .await?
                .into_inner();
            print(
                format,
                "kiln.identity.v1.Account",
                &[account],
                ACCOUNT_HEADERS,
                account_row,
                true,
            );
        }
        Command::Update(UpdateCommand::User {
            user_id,
            display_name,
            email,
            role,
        }) => {
            let name = format!("{}/users/{user_id}", client.account().await?);
            let mut paths = Vec::new();
            let mut user = idv1::User {
                name,
                ..Default::default()
            };
            if let Some(v) = display_name {
                user.display_name = v;
                paths.push("display_name".to_owned());
            }
            if let Some(v) = email {
                user.email = v;
                paths.push("email".to_owned());
            }
            if let Some(v) = role {
                user.role = v;
                paths.push("role".to_owned());
            }
            if paths.is_empty() {
                bail!("nothing to update: pass --display-name, --email or --role");
            }
            let user = client
                .users()
                .update_user(idv1::UpdateUserRequest {
                    user: Some(user),
                    update_mask: Some(prost_types::FieldMask { paths }),
                })
                .await?
                .into_inner();
            print(
                format,
                "kiln.identity.v1.User",
                &[user],
                USER_HEADERS,
                user_row,
                true,
            );
        }
        Command::Delete(DeleteCommand::Account { account_id }) => {
            let name = if account_id.starts_with("accounts/") {
                account_id
            } else {
                format!("accounts/{account_id}")
            };
            client
                .accounts()
                .delete_account(idv1::DeleteAccountRequest { name: name.clone() })
                .await?;
            say!("deleted {name}");
        }
        Command::Delete(DeleteCommand::User { user_id }) => {
            let name = format!("{}/users/{user_id}", client.account().await?);
            client
                .users()
                .delete_user(idv1::DeleteUserRequest { name: name.clone() })
                .await?;
            say!("deleted {name}");
        }
        Command::Delete(DeleteCommand::ApiKey { key_id, user }) => {
            let name = format!("{}/users/{user}/apiKeys/{key_id}", client.account().await?);
            client
                .keys()
                .delete_api_key(idv1::DeleteApiKeyRequest { name: name.clone() })
                .await?;
            say!("deleted {name}");
        }
        Command::Create(CreateCommand::Model(args)) => {
            crate::registry_cli::create_model(&client, format, args).await?
        }
        Command::Create(CreateCommand::Dataset(args)) => {
            crate::registry_cli::create_dataset(&client, format, args).await?
        }
        Command::Get(GetCommand::Model { model }) => {
            crate::registry_cli::get_model(&client, format, &model).await?
        }
        Command::Get(GetCommand::Dataset { dataset }) => {
            crate::registry_cli::get_dataset(&client, format, &dataset).await?
        }
        Command::List(ListCommand::Models(list)) => {
            crate::registry_cli::list_models(&client, format, list).await?
        }
        Command::List(ListCommand::Datasets(list)) => {
            crate::registry_cli::list_datasets(&client, format, list).await?
        }
        Command::Update(UpdateCommand::Model {
            model,
            display_name,
            description,
            public,
        }) => {
            crate::registry_cli::update_model(
                &client,
                format,
                &model,
                display_name,
                description,
                public,
            )
            .await?
        }
        Command::Update(UpdateCommand::Dataset {
            dataset,
            display_name,
        }) => crate::registry_cli::update_dataset(&client, format, &dataset, display_name).await?,
        Command::Delete(DeleteCommand::Model { model }) => {
            crate::registry_cli::delete_model(&client, &model).await?
        }
        Command::Delete(DeleteCommand::Dataset { dataset }) => {
            crate::registry_cli::delete_dataset(&client, &dataset).await?
        }
        Command::Download(command) => crate::registry_cli::download(&client, command).await?,
        Command::Create(CreateCommand::Deployment(args)) => {
            crate::scheduler_cli::create_deployment(&client, format, *args).await?
        }
        Command::Create(CreateCommand::DeployedModel(args)) => {
            crate::scheduler_cli::create_deployed_model(&client, format, args).await?
        }
        Command::Get(GetCommand::Deployment { deployment }) => {
            crate::scheduler_cli::get_deployment(&client, format, &deployment).await?
        }
        Command::Get(GetCommand::DeployedModel { deployed_model }) => {
            crate::scheduler_cli::get_deployed_model(&client, format, &deployed_model).await?
        }
        Command::List(ListCommand::Deployments(args)) => {
            crate::scheduler_cli::list_deployments(&client, format, args).await?
        }
        Command::List(ListCommand::DeployedModels(list)) => {
            crate::scheduler_cli::list_deployed_models(&client, format, list).await?
        }
        Command::List(ListCommand::Nodes(list)) => {
            crate::scheduler_cli::list_nodes(&client, format, list).await?
        }
        Command::Update(UpdateCommand::Deployment(args)) => {
            crate::scheduler_cli::update_deployment(&client, format, args).await?
        }
        Command::Delete(DeleteCommand::Deployment(args)) => {
            crate::scheduler_cli::delete_deployment(&client, args).await?
        }
        Command::Delete(DeleteCommand::DeployedModel { deployed_model }) => {
            crate::scheduler_cli::delete_deployed_model(&client, &deployed_model).await?
        }
        Command::Undelete(command) => {
            crate::scheduler_cli::undelete(&client, format, command).await?
        }
        Command::Scale(command) => crate::scheduler_cli::scale(&client, format, command).await?,
        Command::Get(GetCommand::Usage(args)) => {
            crate::billing_cli::get_usage(&client, format, args).await?
        }
        Command::List(ListCommand::Quotas(list)) => {
            crate::billing_cli::list_quotas(&client, format, list).await?
        }
        Command::Update(UpdateCommand::Quota {
            quota,
            value,
            max_value,
        }) => crate::billing_cli::update_quota(&client, format, quota, value, max_value).await?,
        Command::Chat(args) => crate::inference_cli::chat(&client, args).await?,
        Command::Embed(args) => crate::inference_cli::embed(&client, format, args).await?,
        Command::Dev(_) | Command::Serve(_) => {
            unreachable!("server commands are not client commands")
        }
    }
    Ok(())
}
