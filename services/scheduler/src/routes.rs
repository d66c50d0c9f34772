//! The routing table every node follows: for each live deployed model, its deployment's
//! replicas and whether each takes requests now. Pure: built from the state after each pass
//! and published when it changed.

use std::collections::BTreeMap;

use kiln_proto::scheduler::v1::{Route, RouteReplica, RoutingTable, deployed_model, replica};

use crate::state::State;
use kiln_core::names::account_name;

/// Where every deployed model is served, from the current state.
pub(crate) fn routing_table(state: &State, version: i64) -> RoutingTable {
    let mut by_deployment: BTreeMap<&str, Vec<RouteReplica>> = BTreeMap::new();
    for r in state.replicas.values() {
        if r.replica.node.is_empty() {
            continue;
        }
        let Some(node) = state.nodes.get(&r.replica.node) else {
            continue;
        };
        by_deployment
            .entry(r.replica.deployment.as_str())
            .or_default()
            .push(RouteReplica {
                replica: r.replica.name.clone(),
                node: node.node.name.clone(),
                address: node.node.address.clone(),
                ready: r.state() == replica::State::Ready && node.is_ready(),
                accelerator_type: r.replica.accelerator_type,
                accelerator_count: r.replica.accelerator_count,
            });
    }
    let routes = state
        .deployed_models
        .values()
        .filter(|dm| {
            dm.state == deployed_model::State::Deploying as i32
                || dm.state == deployed_model::State::Deployed as i32
                || dm.state == deployed_model::State::Updating as i32
        })
        .filter_map(|dm| {
            let d = &state.deployments.get(&dm.deployment)?.deployment;
            let mut replicas = by_deployment
                .get(dm.deployment.as_str())
                .cloned()
                .unwrap_or_default();
            if dm.model != d.base_model {
                // An addon is served only where it is loaded.
                for route in &mut replicas {
                    route.ready &= state
                        .replicas
                        .get(&route.replica)
                        .is_some_and(|r| r.replica.loaded_addons.contains(&dm.model));
                }
            }
            Some(Route {
                deployed_model: dm.name.clone(),
                model: dm.model.clone(),
                deployment: dm.deployment.clone(),
                base_model: d.base_model.clone(),
                default: dm.default,
                public: dm.public,
                deployment_type: d.deployment_type,
                account: account_name(&dm.name),
                replicas,
                state: dm.state,
            })
        })
        .collect();
    RoutingTable {
        version: version + 1,
        routes,
    }
}

#[cfg(test)]
mod tests;
