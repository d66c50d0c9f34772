//! Scheduler clients, requests and waits for the suites.

use std::time::Duration;

use tonic::Status;

use crate::{AuthedChannel, wait_for_ok};
use kiln_proto::scheduler::v1 as schv1;

clients! {
    Deployments, deployments = schv1::deployment_service_client::DeploymentServiceClient<AuthedChannel>;
    Nodes, nodes = schv1::node_service_client::NodeServiceClient<AuthedChannel>;
    DeployedModels, deployed_models = schv1::deployed_model_service_client::DeployedModelServiceClient<AuthedChannel>;
}

pub use crate::calls::{get_deployed_model, get_deployment, update_deployment};

/// A deployment on `count` accelerators of `kind` (an `AcceleratorType` name); the rest of
/// the fields come after it: `Deployment { base_model, ..on("CPU", 1) }`.
pub fn on(kind: &str, count: i32) -> schv1::Deployment {
    let kind = kiln_proto::common::v1::AcceleratorType::from_str_name(kind).expect("kind");
    schv1::Deployment {
        accelerator_type: kind as i32,
        accelerator_count: count,
        ..Default::default()
    }
}

pub async fn create(
    ch: &AuthedChannel,
    parent: &str,
    id: &str,
    deployment: schv1::Deployment,
) -> Result<schv1::Deployment, Status> {
    let (parent, deployment_id) = (parent.to_owned(), id.to_owned());
    let deployment = Some(deployment);
    let request = schv1::CreateDeploymentRequest {
        parent,
        deployment_id,
        deployment,
        ..Default::default()
    };
    Ok(deployments(ch)
        .create_deployment(request)
        .await?
        .into_inner())
}

pub async fn get(ch: &AuthedChannel, name: &str) -> schv1::Deployment {
    get_deployment(ch, name).await.expect("get deployment")
}

/// Deletes a deployment (soft, with the checks).
pub async fn delete(ch: &AuthedChannel, name: &str) -> Result<(), Status> {
    let request = schv1::DeleteDeploymentRequest {
        name: name.to_owned(),
        ..Default::default()
    };
    deployments(ch).delete_deployment(request).await.map(drop)
}

/// Waits until `check` holds for the deployment, and returns it.
pub async fn wait_until(
    ch: &AuthedChannel,
    name: &str,
    timeout: Duration,
    what: &str,
    check: impl Fn(&schv1::Deployment) -> bool,
) -> schv1::Deployment {
    wait_for_ok(timeout, what, || async {
        let d = get(ch, name).await;
        if check(&d) {
            Ok(d)
        } else {
            Err(format!("the deployment is {d:?}"))
        }
    })
    .await
}

/// Waits until the deployment is READY with `ready` ready replicas.
pub async fn wait_ready(ch: &AuthedChannel, name: &str, ready: i32) -> schv1::Deployment {
    wait_until(
        ch,
        name,
        Duration::from_secs(120),
        "the deployment to be ready",
        |d| {
            d.state == schv1::deployment::State::Ready as i32
                && d.replica_stats.as_ref().map(|s| s.ready_replica_count) == Some(ready)
        },
    )
    .await
}

/// Deploys `model` (accounts/{a}/models/{m}) in its account with every default and waits
/// until it serves.
pub async fn deploy(ch: &AuthedChannel, model: &str) -> schv1::Deployment {
    let account = model.split('/').nth(1).expect("a model name");
    let created = create(
        ch,
        &format!("accounts/{account}"),
        "",
        schv1::Deployment {
            base_model: model.to_owned(),
            ..Default::default()
        },
    )
    .await
    .expect("create the deployment");
    wait_ready(ch, &created.name, 1).await
}

/// Every node as ListNodes shows it (admin only).
pub async fn list_nodes(admin: &AuthedChannel) -> Vec<schv1::Node> {
    let request = schv1::ListNodesRequest::default();
    let listed = nodes(admin).list_nodes(request).await;
    listed.expect("list nodes").into_inner().nodes
}

/// The nodes holding the deployment's replicas (admin only).
pub async fn replica_nodes(admin: &AuthedChannel, deployment: &str) -> Vec<String> {
    let mut held: Vec<String> = list_nodes(admin)
        .await
        .iter()
        .filter(|n| n.replicas.iter().any(|r| r.deployment == deployment))
        .map(|n| n.name.clone())
        .collect();
    held.sort();
    held
}

/// The replicas of `deployment` as ListNodes shows them (admin only).
pub async fn replicas(admin: &AuthedChannel, deployment: &str) -> Vec<schv1::Replica> {
    let all = list_nodes(admin).await.into_iter().flat_map(|n| n.replicas);
    all.filter(|r| r.deployment == deployment).collect()
}

/// The deployed models under `parent` (`accounts/{a}`), the first page.
pub async fn list_deployed_models(ch: &AuthedChannel, parent: &str) -> Vec<schv1::DeployedModel> {
    let request = schv1::ListDeployedModelsRequest {
        parent: parent.to_owned(),
        ..Default::default()
    };
    let listed = deployed_models(ch).list_deployed_models(request).await;
    listed
        .expect("list deployed models")
        .into_inner()
        .deployed_models
}

/// Deploys `model` onto `deployment` as deployed model `id` of `account`.
pub async fn create_deployed_model(
    ch: &AuthedChannel,
    account: &str,
    id: &str,
    model: &str,
    deployment: &str,
) -> Result<schv1::DeployedModel, Status> {
    let deployed_model = schv1::DeployedModel {
        model: model.to_owned(),
        deployment: deployment.to_owned(),
        ..Default::default()
    };
    let request = schv1::CreateDeployedModelRequest {
        parent: format!("accounts/{account}"),
        deployed_model_id: id.to_owned(),
        deployed_model: Some(deployed_model),
    };
    let created = deployed_models(ch).create_deployed_model(request).await?;
    Ok(created.into_inner())
}
