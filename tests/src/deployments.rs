//! Scheduler clients and waits for the suites.

use std::time::Duration;

use crate::AuthedChannel;
use kiln_proto::scheduler::v1 as schv1;

pub type Deployments = schv1::deployment_service_client::DeploymentServiceClient<AuthedChannel>;
pub type Nodes = schv1::node_service_client::NodeServiceClient<AuthedChannel>;

pub fn deployments(ch: &AuthedChannel) -> Deployments {
    schv1::deployment_service_client::DeploymentServiceClient::new(ch.clone())
}

pub fn nodes(ch: &AuthedChannel) -> Nodes {
    schv1::node_service_client::NodeServiceClient::new(ch.clone())
}

pub fn deployed_models(
    ch: &AuthedChannel,
) -> schv1::deployed_model_service_client::DeployedModelServiceClient<AuthedChannel> {
    schv1::deployed_model_service_client::DeployedModelServiceClient::new(ch.clone())
}

pub async fn create(
    ch: &AuthedChannel,
    parent: &str,
    id: &str,
    deployment: schv1::Deployment,
) -> Result<schv1::Deployment, tonic::Status> {
    deployments(ch)
        .create_deployment(schv1::CreateDeploymentRequest {
            parent: parent.to_owned(),
            deployment_id: id.to_owned(),
            deployment: Some(deployment),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

pub async fn get(ch: &AuthedChannel, name: &str) -> schv1::Deployment {
    deployments(ch)
        .get_deployment(schv1::GetDeploymentRequest {
            name: name.to_owned(),
        })
        .await
        .expect("get deployment")
        .into_inner()
}

/// Waits until `check` holds for the deployment, and returns it.
pub async fn wait_until(
    ch: &AuthedChannel,
    name: &str,
    timeout: Duration,
    what: &str,
    check: impl Fn(&schv1::Deployment) -> bool,
) -> schv1::Deployment {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let d = get(ch, name).await;
        if check(&d) {
            return d;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; the deployment is {d:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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

/// The nodes holding the deployment's replicas (admin only).
pub async fn replica_nodes(admin: &AuthedChannel, deployment: &str) -> Vec<String> {
    let listed = nodes(admin)
        .list_nodes(schv1::ListNodesRequest::default())
        .await
        .expect("list nodes")
        .into_inner();
    let mut held: Vec<String> = listed
        .nodes
        .iter()
        .filter(|n| n.replicas.iter().any(|r| r.deployment == deployment))
        .map(|n| n.name.clone())
        .collect();
    held.sort();
    held
}
