//! Deployments, deployed models and nodes: `kiln create|get|list|update|delete deployment`,
//! `kiln undelete|scale deployment`, `kiln create|get|list|delete deployed-model` and
//! `kiln list nodes`.

mod args;
mod print;
mod wait;

use clap::Subcommand;
use kiln_proto::scheduler::v1 as schv1;

use crate::client::{
    Authed, Client, CreateRpc, Format, InParent, ListArgs, create_and_print, delete_and_print,
    get_and_print, list_and_print, print_deleted, print_one, resource, update_and_print,
};
pub use args::{
    CreateDeployedModelArgs, CreateDeploymentArgs, DeleteDeploymentArgs, ListDeploymentsArgs,
    UpdateDeploymentArgs, WaitArgs,
};
use wait::{WaitFor, wait};

#[derive(Debug, Subcommand)]
pub enum Create {
    /// Create a deployment: replicas serving a base model (--wait: until it is READY).
    Deployment(Box<CreateDeploymentArgs>),
    /// Deploy a model (the base model or a LoRA addon of it) onto a deployment.
    DeployedModel(CreateDeployedModelArgs),
}

#[derive(Debug, Subcommand)]
pub enum Get {
    /// Show a deployment (an ID in the account, or a full name).
    Deployment { deployment: String },
    /// Show a deployed model (an ID in the account, or a full name).
    DeployedModel { deployed_model: String },
}

#[derive(Debug, Subcommand)]
pub enum List {
    /// List the account's deployments.
    Deployments(ListDeploymentsArgs),
    /// List the account's deployed models.
    DeployedModels(ListArgs),
    /// List the inference nodes (platform admin).
    Nodes(ListArgs),
}

#[derive(Debug, Subcommand)]
pub enum Update {
    /// Change a deployment (the update mask holds exactly the flags given).
    Deployment(UpdateDeploymentArgs),
}

#[derive(Debug, Subcommand)]
pub enum Delete {
    /// Delete a deployment (soft: `kiln undelete deployment` restores it; --hard: for good).
    Deployment(DeleteDeploymentArgs),
    /// Undeploy a deployed model.
    DeployedModel { deployed_model: String },
}

#[derive(Debug, Subcommand)]
pub enum Undelete {
    /// Restore a soft-deleted deployment (before its purge time).
    Deployment {
        /// The deployment: an ID in the account, or a full name.
        deployment: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum Scale {
    /// Set a deployment's replica count by hand (clamped to its min..max replica count).
    Deployment {
        /// The deployment: an ID in the account, or a full name.
        deployment: String,
        /// The replicas wanted.
        #[arg(value_parser = clap::value_parser!(i32).range(0..))]
        replica_count: i32,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

fn deployments(
    client: &Client,
) -> schv1::deployment_service_client::DeploymentServiceClient<Authed> {
    schv1::deployment_service_client::DeploymentServiceClient::new(client.authed())
}

fn deployed_models(
    client: &Client,
) -> schv1::deployed_model_service_client::DeployedModelServiceClient<Authed> {
    schv1::deployed_model_service_client::DeployedModelServiceClient::new(client.authed())
}

fn nodes(client: &Client) -> schv1::node_service_client::NodeServiceClient<Authed> {
    schv1::node_service_client::NodeServiceClient::new(client.authed())
}

resource!(schv1::Deployment, deployments {
    create: create_deployment(schv1::CreateDeploymentRequest),
    get: get_deployment(schv1::GetDeploymentRequest) in "deployments",
    list: list_deployments(schv1::ListDeploymentsRequest, parent) => deployments,
    update: update_deployment(schv1::UpdateDeploymentRequest) deployment,
});
resource!(schv1::DeployedModel, deployed_models {
    create: create_deployed_model(schv1::CreateDeployedModelRequest),
    get: get_deployed_model(schv1::GetDeployedModelRequest) in "deployedModels",
    list: list_deployed_models(schv1::ListDeployedModelsRequest, parent) => deployed_models,
    delete: delete_deployed_model(schv1::DeleteDeployedModelRequest),
});
resource!(schv1::Node, nodes {
    list: list_nodes(schv1::ListNodesRequest) => nodes,
});

pub(crate) async fn create(client: &Client, format: Format, command: Create) -> anyhow::Result<()> {
    match command {
        Create::Deployment(args) => {
            // Check the flags before talking to the server.
            args.deployment(String::new())?;
            let timeout = args.wait.timeout()?;
            let base_model = client.full_name("models", &args.model).await?;
            let request = schv1::CreateDeploymentRequest {
                parent: client.account().await?,
                deployment_id: args.deployment_id.clone().unwrap_or_default(),
                deployment: Some(args.deployment(base_model)?),
                disable_auto_deploy: args.disable_auto_deploy,
                validate_only: args.validate_only,
            };
            let created = schv1::Deployment::create(client, request).await?;
            let shown = match timeout {
                _ if args.validate_only => {
                    eprintln!("the request is valid (nothing was created)");
                    created
                }
                Some(timeout) => {
                    wait(deployments(client), &created.name, timeout, WaitFor::Ready).await?
                }
                None => created,
            };
            print_one(format, &shown);
            Ok(())
        }
        Create::DeployedModel(args) => {
            let request = schv1::CreateDeployedModelRequest {
                parent: client.account().await?,
                deployed_model_id: args.deployed_model_id.unwrap_or_default(),
                deployed_model: Some(schv1::DeployedModel {
                    model: client.full_name("models", &args.model).await?,
                    deployment: client.full_name("deployments", &args.deployment).await?,
                    default: args.default,
                    public: args.public,
                    display_name: args.display_name.unwrap_or_default(),
                    ..Default::default()
                }),
            };
            create_and_print::<schv1::DeployedModel>(client, format, request).await
        }
    }
}

pub(crate) async fn get(client: &Client, format: Format, command: Get) -> anyhow::Result<()> {
    match command {
        Get::Deployment { deployment } => {
            get_and_print::<schv1::Deployment>(client, format, &deployment).await
        }
        Get::DeployedModel { deployed_model } => {
            get_and_print::<schv1::DeployedModel>(client, format, &deployed_model).await
        }
    }
}

pub(crate) async fn list(client: &Client, format: Format, command: List) -> anyhow::Result<()> {
    match command {
        List::Deployments(args) => {
            let mut request = schv1::ListDeploymentsRequest::in_parent(client.account().await?);
            request.show_deleted = args.show_deleted;
            list_and_print::<schv1::Deployment>(client, format, &args.list, request).await
        }
        List::DeployedModels(list) => {
            let request = InParent::in_parent(client.account().await?);
            list_and_print::<schv1::DeployedModel>(client, format, &list, request).await
        }
        List::Nodes(list) => {
            let request = schv1::ListNodesRequest::default();
            list_and_print::<schv1::Node>(client, format, &list, request).await
        }
    }
}

pub(crate) async fn update(client: &Client, format: Format, command: Update) -> anyhow::Result<()> {
    let Update::Deployment(args) = command;
    let id = args.deployment.clone();
    let (mut deployment, mask) = args.update()?;
    deployment.name = client.full_name("deployments", &id).await?;
    update_and_print(client, format, deployment, mask).await
}

pub(crate) async fn delete(client: &Client, format: Format, command: Delete) -> anyhow::Result<()> {
    match command {
        Delete::Deployment(args) => {
            let name = client.full_name("deployments", &args.deployment).await?;
            deployments(client)
                .delete_deployment(schv1::DeleteDeploymentRequest {
                    name: name.clone(),
                    hard: args.hard,
                    ignore_checks: args.ignore_checks,
                })
                .await?;
            print_deleted(format, &name);
            if !args.hard {
                eprintln!("(until it is purged, `kiln undelete deployment {name}` restores it)");
            }
            Ok(())
        }
        Delete::DeployedModel { deployed_model } => {
            delete_and_print::<schv1::DeployedModel>(client, format, &deployed_model).await
        }
    }
}

pub(crate) async fn undelete(
    client: &Client,
    format: Format,
    command: Undelete,
) -> anyhow::Result<()> {
    let Undelete::Deployment { deployment } = command;
    let name = client.full_name("deployments", &deployment).await?;
    let request = schv1::UndeleteDeploymentRequest { name };
    let d = deployments(client).undelete_deployment(request).await?;
    print_one(format, d.get_ref());
    Ok(())
}

pub(crate) async fn scale(client: &Client, format: Format, command: Scale) -> anyhow::Result<()> {
    let Scale::Deployment {
        deployment,
        replica_count,
        wait: wait_args,
    } = command;
    let timeout = wait_args.timeout()?;
    let name = client.full_name("deployments", &deployment).await?;
    let scaled = deployments(client)
        .scale_deployment(schv1::ScaleDeploymentRequest {
            name,
            replica_count,
        })
        .await?
        .into_inner();
    if scaled.desired_replica_count != replica_count {
        eprintln!(
            "{} replicas asked for; {} desired (clamped to the replica count bounds)",
            replica_count, scaled.desired_replica_count
        );
    }
    let shown = match timeout {
        Some(timeout) => wait(deployments(client), &scaled.name, timeout, WaitFor::Scaled).await?,
        None => scaled,
    };
    print_one(format, &shown);
    Ok(())
}
