use kiln_proto::scheduler::v1::{DeployedModel, deployment, node};

use super::*;
use crate::state::fixtures::{self, H100};

const ADDON: &str = "accounts/acme/models/m-lora";

fn deployed(
    id: &str,
    deployment: &str,
    model: &str,
    state: deployed_model::State,
) -> DeployedModel {
    DeployedModel {
        name: format!("accounts/acme/deployedModels/{id}"),
        model: model.into(),
        deployment: format!("accounts/acme/deployments/{deployment}"),
        state: state as i32,
        ..Default::default()
    }
}

/// Deployment `d` with replicas r1 and r5 (ready, on node a), r2 (initializing, on a), r3
/// (ready, on lost node b) and r4 (waiting for a node); deployed as `m` (DEPLOYED) and
/// `m-lora`, an addon (DEPLOYING) loaded on r1 only.
fn state() -> State {
    let mut r1 = fixtures::replica("d", "r1", "a", replica::State::Ready, 0);
    r1.replica.loaded_addons = vec![ADDON.into()];
    let mut state = fixtures::state(
        vec![fixtures::deployment("d", 3)],
        vec![
            fixtures::node("a", node::State::Ready, 3),
            fixtures::node("b", node::State::Lost, 1),
        ],
        vec![
            r1,
            fixtures::replica("d", "r2", "a", replica::State::Initializing, 1),
            fixtures::replica("d", "r3", "b", replica::State::Ready, 0),
            fixtures::replica("d", "r4", "", replica::State::PendingScheduling, 0),
            fixtures::replica("d", "r5", "a", replica::State::Ready, 2),
        ],
    );
    for dm in [
        deployed(
            "m",
            "d",
            "accounts/acme/models/m",
            deployed_model::State::Deployed,
        ),
        deployed("lora", "d", ADDON, deployed_model::State::Deploying),
    ] {
        state.deployed_models.insert(dm.name.clone(), dm);
    }
    state
}

fn route<'t>(table: &'t RoutingTable, deployed_model: &str) -> &'t Route {
    table
        .routes
        .iter()
        .find(|r| r.deployed_model == format!("accounts/acme/deployedModels/{deployed_model}"))
        .unwrap_or_else(|| panic!("no route for {deployed_model}: {table:?}"))
}

/// (replica id, ready) of a route, in name order.
fn readiness(route: &Route) -> Vec<(&str, bool)> {
    route
        .replicas
        .iter()
        .map(|r| (r.replica.rsplit('/').next().unwrap_or_default(), r.ready))
        .collect()
}

#[test]
fn a_replica_takes_requests_only_when_it_and_its_node_are_ready() {
    let table = routing_table(&state(), 6);
    assert_eq!(table.version, 7);
    let base = route(&table, "m");
    // r4 has no node yet: not routed at all. r3's node is lost: listed, not ready.
    assert_eq!(
        readiness(base),
        vec![("r1", true), ("r2", false), ("r3", false), ("r5", true)]
    );
    let r1 = &base.replicas[0];
    assert_eq!(r1.node, "nodes/a");
    assert_eq!(r1.address, "http://a:8080");
    assert_eq!((r1.accelerator_type, r1.accelerator_count), (H100, 1));
}

#[test]
fn an_addon_is_routed_only_where_it_is_loaded() {
    let table = routing_table(&state(), 0);
    let addon = route(&table, "lora");
    assert_eq!(addon.model, ADDON);
    assert_eq!(addon.base_model, "accounts/acme/models/m");
    assert_eq!(
        readiness(addon),
        vec![("r1", true), ("r2", false), ("r3", false), ("r5", false)]
    );
    assert_eq!(addon.state, deployed_model::State::Deploying as i32);
}

#[test]
fn only_live_deployed_models_of_known_deployments_are_routed() {
    let mut state = state();
    use deployed_model::State::{Deployed, Failed, Undeploying, Updating};
    for (id, deployment, live) in [
        ("updating", "d", Updating),
        ("going", "d", Undeploying),
        ("failed", "d", Failed),
        ("orphan", "gone", Deployed),
    ] {
        let dm = deployed(id, deployment, "accounts/acme/models/m", live);
        state.deployed_models.insert(dm.name.clone(), dm);
    }
    let table = routing_table(&state, 0);
    let mut routed: Vec<&str> = table
        .routes
        .iter()
        .map(|r| r.deployed_model.rsplit('/').next().unwrap_or_default())
        .collect();
    routed.sort();
    assert_eq!(routed, vec!["lora", "m", "updating"]);
}

#[test]
fn a_route_carries_its_deployed_models_settings() {
    let mut state = state();
    let d = &mut state
        .deployments
        .get_mut("accounts/acme/deployments/d")
        .expect("d")
        .deployment;
    d.deployment_type = deployment::DeploymentType::Serverless as i32;
    let dm = state
        .deployed_models
        .get_mut("accounts/acme/deployedModels/m")
        .expect("m");
    dm.default = true;
    dm.public = true;
    let table = routing_table(&state, 0);
    let m = route(&table, "m");
    assert!(m.default && m.public);
    assert_eq!(m.account, "accounts/acme");
    assert_eq!(m.deployment, "accounts/acme/deployments/d");
    assert_eq!(
        m.deployment_type,
        deployment::DeploymentType::Serverless as i32
    );
    let lora = route(&table, "lora");
    assert!(!lora.default && !lora.public);
}

#[test]
fn a_deployment_without_placed_replicas_has_an_empty_route() {
    let mut state = state();
    state.replicas.clear();
    let table = routing_table(&state, 0);
    assert!(route(&table, "m").replicas.is_empty());
    assert_eq!(table.routes.len(), 2);
}
