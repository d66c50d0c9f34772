//! Connecting with the caller's key, and resolving the account and resource names.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use kiln_core::telemetry::OutgoingInterceptor;
use kiln_proto::identity::v1 as idv1;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::output::Format;

/// Where to connect, with which key, in which account, and how to print.
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
    /// PEM certificates of the CAs that sign an `https://` server's certificate (default:
    /// the system's roots).
    #[arg(long, global = true, env = "KILN_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
}

impl ClientArgs {
    /// Trusts `--tls-ca-file` for the `https://` servers this command calls.
    pub fn trust(&self) -> anyhow::Result<()> {
        if let Some(path) = &self.tls_ca_file {
            let pem = std::fs::read(path)
                .with_context(|| format!("--tls-ca-file: cannot read {}", path.display()))?;
            kiln_core::tls::trust(&pem);
        }
        Ok(())
    }
}

/// A channel to Kiln whose calls carry the caller's key.
pub(crate) type Authed = InterceptedService<Channel, OutgoingInterceptor>;

/// A connected client with the caller's key.
pub(crate) struct Client {
    channel: Channel,
    interceptor: OutgoingInterceptor,
    /// `--account`, as a full name.
    account: Option<String>,
}

fn default_key_file() -> PathBuf {
    std::env::var_os("KILN_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".kiln"))
        .join("admin.key")
}

impl Client {
    pub(crate) async fn connect(args: &ClientArgs) -> anyhow::Result<Self> {
        args.trust()?;
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
            account: args.account.as_deref().map(kiln_core::names::account_name),
        })
    }

    /// The channel for a service client.
    pub(crate) fn authed(&self) -> Authed {
        InterceptedService::new(self.channel.clone(), self.interceptor.clone())
    }

    /// The account to work in: --account, or the only one the key can see.
    pub(crate) async fn account(&self) -> anyhow::Result<String> {
        if let Some(account) = &self.account {
            return Ok(account.clone());
        }
        let listed = idv1::account_service_client::AccountServiceClient::new(self.authed())
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

    /// The full name of a resource given by its ID in the account's `collection` (e.g.
    /// `models`, `users/alice/apiKeys`), or by its full name.
    pub(crate) async fn full_name(&self, collection: &str, id: &str) -> anyhow::Result<String> {
        if id.starts_with("accounts/") {
            return Ok(id.to_owned());
        }
        Ok(format!("{}/{collection}/{id}", self.account().await?))
    }
}
