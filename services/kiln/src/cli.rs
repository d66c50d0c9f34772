//! The command line: `kiln dev`, `kiln serve <service>`, and client commands in the style of
//! firectl (`kiln create|get|list|update|delete|cancel <resource>`). Each resource group
//! (`crate::commands`) declares its resources under each verb; this module puts the groups
//! under the verbs and dispatches to their handlers.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use crate::client::ClientArgs;
use crate::client::{Client, Format};
use crate::commands::{accounts, deployments, fine_tuning, inference, models, usage};

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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run every service in one process, with local state: the quickstart.
    Dev(DevArgs),
    /// Run one service alone.
    Serve(ServeArgs),
    /// Ask a server whether it serves (gRPC health; no key needed): exits 0 when it does. A
    /// container health check.
    Health {
        /// One service (`kiln.identity.v1.IdentityService`, …); default: the whole server.
        #[arg(long, default_value = "")]
        service: String,
    },
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
    /// Stop a job that is not finished.
    #[command(subcommand)]
    Cancel(CancelCommand),
    /// Restore a soft-deleted resource.
    #[command(subcommand)]
    Undelete(deployments::Undelete),
    /// Set a resource's replica count.
    #[command(subcommand)]
    Scale(deployments::Scale),
    /// Load a LoRA addon onto a deployment of its base (with enable_addons): it answers by
    /// the deployed model's name (as `create deployed-model`).
    LoadLora(deployments::CreateDeployedModelArgs),
    /// Unload a LoRA addon: undeploy its deployed model (an ID in the account, or a full
    /// name; as `delete deployed-model`).
    UnloadLora { deployed_model: String },
    /// Download a model's files or a dataset.
    #[command(subcommand)]
    Download(models::Download),
    /// Chat with a model: its answer streams in the terminal.
    Chat(inference::ChatArgs),
    /// Embed texts with an embedding model.
    Embed(inference::EmbedArgs),
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Address for every gRPC service.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub listen: SocketAddr,
    /// Address of the HTTP edge (the public REST API, `/v1` and `/inference/v1`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,
    /// Where state lives (SQLite files, keys).
    #[arg(long, env = "KILN_DATA_DIR", default_value = ".kiln")]
    pub data_dir: PathBuf,
    /// A TOML config file; `KILN_*` variables override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The services this process runs: identity, registry, scheduler, billing, inference,
    /// gateway (the others are reached at the URLs in the configuration).
    #[arg(required = true)]
    pub services: Vec<String>,
    /// A TOML config file; `KILN_*` variables override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Load and validate the configuration as a start would, then exit without starting.
    #[arg(long)]
    pub check: bool,
}

/// Declares a verb's subcommand (`CreateCommand: Create => create`): in it, each resource
/// group's resources under the verb (`Models(models)`: the variant holding `models::Create`),
/// and `run`, which hands the command to the group's handler (`models::create`).
macro_rules! verb {
    ($command:ident: $verb:ident => $handler:ident { $($group:ident($module:ident)),+ }) => {
        #[derive(Debug, Subcommand)]
        pub enum $command {
            $(
                #[command(flatten)]
                $group($module::$verb),
            )+
        }

        impl $command {
            async fn run(self, client: &Client, format: Format) -> anyhow::Result<()> {
                match self {
                    $(Self::$group(command) => $module::$handler(client, format, command).await,)+
                }
            }
        }
    };
}

verb!(CreateCommand: Create => create {
    Models(models), Deployments(deployments), Accounts(accounts), FineTuning(fine_tuning)
});
verb!(GetCommand: Get => get {
    Models(models), Deployments(deployments), Accounts(accounts), Usage(usage),
    FineTuning(fine_tuning)
});
verb!(ListCommand: List => list {
    Models(models), Deployments(deployments), Accounts(accounts), Usage(usage),
    FineTuning(fine_tuning)
});
verb!(UpdateCommand: Update => update {
    Models(models), Deployments(deployments), Accounts(accounts), Usage(usage)
});
verb!(DeleteCommand: Delete => delete {
    Models(models), Deployments(deployments), Accounts(accounts), FineTuning(fine_tuning)
});
verb!(CancelCommand: Cancel => cancel { FineTuning(fine_tuning) });

/// Runs a client command.
pub async fn run_client(command: Command, args: ClientArgs) -> anyhow::Result<()> {
    let format = args.output;
    let client = &Client::connect(&args).await?;
    match command {
        Command::Create(c) => c.run(client, format).await,
        Command::Get(c) => c.run(client, format).await,
        Command::List(c) => c.run(client, format).await,
        Command::Update(c) => c.run(client, format).await,
        Command::Delete(c) => c.run(client, format).await,
        Command::Cancel(c) => c.run(client, format).await,
        Command::Undelete(c) => deployments::undelete(client, format, c).await,
        Command::Scale(c) => deployments::scale(client, format, c).await,
        Command::LoadLora(args) => {
            let command = deployments::Create::DeployedModel(args);
            deployments::create(client, format, command).await
        }
        Command::UnloadLora { deployed_model } => {
            let command = deployments::Delete::DeployedModel { deployed_model };
            deployments::delete(client, format, command).await
        }
        Command::Download(c) => models::download(client, c).await,
        Command::Chat(args) => inference::chat(client, args).await,
        Command::Embed(args) => inference::embed(client, format, args).await,
        Command::Dev(_) | Command::Serve(_) | Command::Health { .. } => {
            unreachable!("server commands are not client commands")
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::client::Format;

    /// Parses a command line with the real `kiln` parser.
    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("kiln").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn the_tree_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn verbs_reach_each_group() {
        assert!(matches!(
            parse(&["create", "account", "acme", "--email", "o@acme.example"]).command,
            Command::Create(CreateCommand::Accounts(accounts::Create::Account { .. }))
        ));
        assert!(matches!(
            parse(&["create", "model", "m", "./m.gguf"]).command,
            Command::Create(CreateCommand::Models(models::Create::Model(_)))
        ));
        match parse(&[
            "create",
            "deployed-model",
            "m",
            "--deployment",
            "d",
            "--default",
        ])
        .command
        {
            Command::Create(CreateCommand::Deployments(deployments::Create::DeployedModel(a))) => {
                assert_eq!((a.model.as_str(), a.deployment.as_str()), ("m", "d"));
                assert!(a.default && !a.public);
            }
            other => panic!("parsed as {other:?}"),
        }
        match parse(&["load-lora", "tone", "--deployment", "chat"]).command {
            Command::LoadLora(a) => {
                assert_eq!((a.model.as_str(), a.deployment.as_str()), ("tone", "chat"));
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(matches!(
            parse(&["unload-lora", "tone-on-chat"]).command,
            Command::UnloadLora { deployed_model } if deployed_model == "tone-on-chat"
        ));
        assert!(matches!(
            parse(&["get", "usage", "--group-by", "model,day"]).command,
            Command::Get(GetCommand::Usage(usage::Get::Usage(_)))
        ));
        assert!(matches!(
            parse(&["list", "deployments", "--show-deleted"]).command,
            Command::List(ListCommand::Deployments(deployments::List::Deployments(
                deployments::ListDeploymentsArgs {
                    show_deleted: true,
                    ..
                }
            )))
        ));
        assert!(matches!(
            parse(&["list", "nodes"]).command,
            Command::List(ListCommand::Deployments(deployments::List::Nodes(_)))
        ));
        assert!(matches!(
            parse(&["list", "api-keys", "--user", "alice", "--limit", "3"]).command,
            Command::List(ListCommand::Accounts(accounts::List::ApiKeys { .. }))
        ));
        assert!(matches!(
            parse(&["update", "quota", "monthly-spend-usd", "--value", "50"]).command,
            Command::Update(UpdateCommand::Usage(usage::Update::Quota {
                value: Some(50),
                ..
            }))
        ));
        assert!(matches!(
            parse(&["delete", "api-key", "k1", "--user", "alice"]).command,
            Command::Delete(DeleteCommand::Accounts(accounts::Delete::ApiKey { .. }))
        ));
    }

    #[test]
    fn deployment_verbs_parse() {
        match parse(&["scale", "deployment", "d", "3", "--wait", "--timeout", "2m"]).command {
            Command::Scale(deployments::Scale::Deployment {
                deployment,
                replica_count,
                wait,
            }) => {
                assert_eq!((deployment.as_str(), replica_count), ("d", 3));
                assert!(wait.wait);
                assert_eq!(wait.timeout.as_deref(), Some("2m"));
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(matches!(
            parse(&["undelete", "deployment", "d"]).command,
            Command::Undelete(deployments::Undelete::Deployment { .. })
        ));
        let cli = |a: &[&str]| Cli::try_parse_from(a.iter().copied());
        assert!(cli(&["kiln", "scale", "deployment", "d", "-1"]).is_err());
        assert!(cli(&["kiln", "create", "deployment", "m", "--timeout", "1m"]).is_err());
    }

    #[test]
    fn fine_tuning_verbs_parse_by_long_and_short_names() {
        use fine_tuning::{Cancel, Create, Delete, Get, List};
        for resource in ["supervised-fine-tuning-job", "sftj"] {
            let line = [
                "create",
                resource,
                "tone",
                "--dataset",
                "d",
                "--base-model",
                "m",
            ];
            match parse(&line).command {
                Command::Create(CreateCommand::FineTuning(Create::SupervisedFineTuningJob(a))) => {
                    assert_eq!(a.job_id.as_deref(), Some("tone"));
                    assert_eq!(
                        (a.dataset.as_str(), a.base_model.as_deref()),
                        ("d", Some("m"))
                    );
                }
                other => panic!("{line:?} parsed as {other:?}"),
            }
            assert!(matches!(
                parse(&["get", resource, "j"]).command,
                Command::Get(GetCommand::FineTuning(Get::SupervisedFineTuningJob { job })) if job == "j"
            ));
            assert!(matches!(
                parse(&["cancel", resource, "j"]).command,
                Command::Cancel(CancelCommand::FineTuning(Cancel::SupervisedFineTuningJob { job }))
                    if job == "j"
            ));
            assert!(matches!(
                parse(&["delete", resource, "accounts/a/supervisedFineTuningJobs/j"]).command,
                Command::Delete(DeleteCommand::FineTuning(Delete::SupervisedFineTuningJob { job }))
                    if job == "accounts/a/supervisedFineTuningJobs/j"
            ));
        }
        for resource in [
            "supervised-fine-tuning-jobs",
            "supervised-fine-tuning-job",
            "sftj",
            "sftjs",
        ] {
            match parse(&[
                "list",
                resource,
                "--filter",
                "state = \"JOB_STATE_RUNNING\"",
                "--order-by",
                "create_time desc",
            ])
            .command
            {
                Command::List(ListCommand::FineTuning(List::SupervisedFineTuningJobs(list))) => {
                    assert_eq!(list.filter, "state = \"JOB_STATE_RUNNING\"");
                    assert_eq!(list.order_by, "create_time desc");
                }
                other => panic!("list {resource} parsed as {other:?}"),
            }
        }
        // Only jobs are cancelled.
        let cli = |a: &[&str]| Cli::try_parse_from(a.iter().copied());
        assert!(cli(&["kiln", "cancel", "deployment", "d"]).is_err());
        assert!(cli(&["kiln", "create", "sftj", "--dataset", "d"]).is_err());
    }

    #[test]
    fn global_flags_go_anywhere_and_delete_takes_the_output_format() {
        let cli = parse(&[
            "delete",
            "model",
            "m",
            "-o",
            "json",
            "--account",
            "acme",
            "--server",
            "http://kiln:7400",
        ]);
        assert_eq!(cli.client.output, Format::Json);
        assert_eq!(cli.client.account.as_deref(), Some("acme"));
        assert_eq!(cli.client.server, "http://kiln:7400");
        assert!(matches!(
            cli.command,
            Command::Delete(DeleteCommand::Models(models::Delete::Model { .. }))
        ));
        assert_eq!(parse(&["list", "users"]).client.output, Format::Table);
    }
}
