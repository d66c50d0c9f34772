//! The router's decisions, apart from the state they read: which route a model string names
//! for a caller, and which of its replicas takes a request here or elsewhere.

use kiln_core::Error;
use kiln_core::auth::Principal;
use kiln_core::names::ChildName;
use kiln_proto::scheduler::v1::{Route, RouteReplica, RoutingTable};

use kiln_core::Result;

/// The route a model string names that `caller` may use: `model#deployment`, a deployed
/// model, or a model alone (its default deployment: the caller's own first, then a shared
/// one). NOT_FOUND when there is none, another account's private route included, so its
/// existence does not leak.
pub(super) fn find_route<'t>(
    table: &'t RoutingTable,
    caller: &Principal,
    field: &str,
    name: &str,
) -> Result<&'t Route> {
    if name.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    let visible = |route: &Route| {
        route.public
            || route
                .account
                .strip_prefix("accounts/")
                .is_some_and(|a| caller.can_access(a))
    };
    let found = if let Some((model, deployment)) = name.split_once('#') {
        let model = ChildName::parse(field, "models", model, Some(&caller.account))?.to_string();
        let deployment =
            ChildName::parse(field, "deployments", deployment, Some(&caller.account))?.to_string();
        table
            .routes
            .iter()
            .find(|r| r.model == model && r.deployment == deployment && visible(r))
    } else if name.contains("/deployedModels/") {
        let deployed = ChildName::parse(field, "deployedModels", name, None)?.to_string();
        table
            .routes
            .iter()
            .find(|r| r.deployed_model == deployed && visible(r))
    } else {
        let model = ChildName::parse(field, "models", name, None)?.to_string();
        let own = format!("accounts/{}", caller.account);
        let defaults = table
            .routes
            .iter()
            .filter(|r| r.model == model && r.default && visible(r));
        // The caller's own default deployment of the model first, then a shared one.
        let mut best: Option<&Route> = None;
        for route in defaults {
            if route.account == own {
                best = Some(route);
                break;
            }
            best.get_or_insert(route);
        }
        best
    };
    found.ok_or_else(|| Error::not_found(name))
}

/// The replica of `route` on `node` (this one) that takes a request: the one with the fewest
/// requests in flight (the first of equals) among those `ready_load` knows. `ready_load` gives
/// a replica's requests in flight when this node holds it ready, None otherwise.
pub(super) fn pick_local<'r>(
    route: &'r Route,
    node: &str,
    ready_load: impl Fn(&str) -> Option<usize>,
) -> Option<&'r RouteReplica> {
    route
        .replicas
        .iter()
        .filter(|r| r.node == node)
        .filter_map(|r| ready_load(&r.replica).map(|load| (r, load)))
        .min_by_key(|&(_, load)| load)
        .map(|(r, _)| r)
}

/// The ready replica of `route` on another node than `node` that a request is forwarded to:
/// the one this node forwards the fewest requests to now (`forwarded`), the first of equals.
pub(super) fn pick_remote<'r>(
    route: &'r Route,
    node: &str,
    forwarded: impl Fn(&str) -> usize,
) -> Option<&'r RouteReplica> {
    route
        .replicas
        .iter()
        .filter(|r| r.ready && r.node != node)
        .min_by_key(|r| forwarded(&r.replica))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use kiln_core::auth::Role;
    use tonic::{Code, Status};
    use tonic_types::StatusExt;

    use super::*;

    fn caller(account: &str) -> Principal {
        Principal {
            account: account.into(),
            user: "u1".into(),
            api_key: String::new(),
            roles: vec![Role::User],
            suspend_state: 0,
        }
    }

    /// A default, private route of deployment `deployment` in `account` serving `model`.
    fn route(account: &str, model: &str, deployment: &str) -> Route {
        let model = format!("accounts/{model}");
        Route {
            deployed_model: format!("accounts/{account}/deployedModels/{deployment}-m"),
            base_model: model.clone(),
            model,
            deployment: format!("accounts/{account}/deployments/{deployment}"),
            default: true,
            account: format!("accounts/{account}"),
            ..Default::default()
        }
    }

    fn public(mut route: Route) -> Route {
        route.public = true;
        route
    }

    fn table(routes: Vec<Route>) -> RoutingTable {
        RoutingTable {
            routes,
            ..Default::default()
        }
    }

    /// The deployment of the route found, or the status of the failure.
    fn found(table: &RoutingTable, caller: &Principal, name: &str) -> Result<String, Status> {
        find_route(table, caller, "model", name)
            .map(|r| r.deployment.clone())
            .map_err(Status::from)
    }

    #[test]
    fn a_model_name_takes_the_callers_own_default_deployment_before_a_shared_one() {
        let routes = table(vec![
            public(route("lib", "lib/models/llama", "shared")),
            route("acme", "lib/models/llama", "mine"),
        ]);
        assert_eq!(
            found(&routes, &caller("acme"), "accounts/lib/models/llama").unwrap(),
            "accounts/acme/deployments/mine"
        );
        // Another account has no deployment of its own: the shared one.
        assert_eq!(
            found(&routes, &caller("globex"), "accounts/lib/models/llama").unwrap(),
            "accounts/lib/deployments/shared"
        );
    }

    #[test]
    fn a_model_name_ignores_deployments_that_are_not_its_default() {
        let mut other = route("acme", "lib/models/llama", "canary");
        other.default = false;
        let routes = table(vec![other.clone()]);
        let status = found(&routes, &caller("acme"), "accounts/lib/models/llama").unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        // Named with its deployment, it answers.
        assert_eq!(
            found(&routes, &caller("acme"), "accounts/lib/models/llama#canary").unwrap(),
            other.deployment
        );
    }

    #[test]
    fn a_deployed_model_name_finds_its_route() {
        let routes = table(vec![
            route("acme", "lib/models/llama", "one"),
            route("acme", "lib/models/llama", "two"),
        ]);
        assert_eq!(
            found(
                &routes,
                &caller("acme"),
                "accounts/acme/deployedModels/two-m"
            )
            .unwrap(),
            "accounts/acme/deployments/two"
        );
    }

    #[test]
    fn model_hash_deployment_takes_full_names_or_ids_in_the_callers_account() {
        let routes = table(vec![
            route("acme", "acme/models/tuned", "one"),
            route("acme", "acme/models/tuned", "two"),
        ]);
        let acme = caller("acme");
        assert_eq!(
            found(&routes, &acme, "tuned#two").unwrap(),
            "accounts/acme/deployments/two"
        );
        assert_eq!(
            found(
                &routes,
                &acme,
                "accounts/acme/models/tuned#accounts/acme/deployments/one"
            )
            .unwrap(),
            "accounts/acme/deployments/one"
        );
        // The right model on a deployment that does not serve it.
        assert_eq!(
            found(&routes, &acme, "tuned#three").unwrap_err().code(),
            Code::NotFound
        );
    }

    #[test]
    fn another_accounts_private_route_is_not_found_whichever_way_it_is_named() {
        let routes = table(vec![route("acme", "acme/models/tuned", "one")]);
        let globex = caller("globex");
        for name in [
            "accounts/acme/models/tuned",
            "accounts/acme/deployedModels/one-m",
            "accounts/acme/models/tuned#accounts/acme/deployments/one",
        ] {
            let status = found(&routes, &globex, name).unwrap_err();
            assert_eq!(status.code(), Code::NotFound, "{name}");
            assert_eq!(status.message(), format!("{name} not found"));
        }
        // The service principal sees every account's routes.
        assert!(found(&routes, &Principal::service(), "accounts/acme/models/tuned").is_ok());
    }

    #[test]
    fn an_empty_or_malformed_name_is_invalid_and_names_the_field() {
        let routes = table(vec![route("acme", "acme/models/tuned", "one")]);
        for name in ["", "tuned", "accounts/acme/things/x"] {
            let status = found(&routes, &caller("acme"), name).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{name:?}");
            let fields: Vec<String> = status
                .get_details_bad_request()
                .expect("a bad request")
                .field_violations
                .into_iter()
                .map(|v| v.field)
                .collect();
            assert_eq!(fields, ["model"], "{name:?}");
        }
    }

    /// A route with replicas on this node (`nodes/a`) and two others, some not ready.
    fn spread() -> Route {
        let replicas = [
            ("a-busy", "nodes/a", true),
            ("b1", "nodes/b", true),
            ("a-stale", "nodes/a", false),
            ("a-idle", "nodes/a", true),
            ("a-also-idle", "nodes/a", true),
            ("c-starting", "nodes/c", false),
            ("b2", "nodes/b", true),
            ("c1", "nodes/c", true),
        ];
        Route {
            replicas: replicas
                .iter()
                .map(|&(name, node, ready)| RouteReplica {
                    replica: name.into(),
                    node: node.into(),
                    address: format!("http://{node}"),
                    ready,
                    ..Default::default()
                })
                .collect(),
            ..route("acme", "acme/models/tuned", "one")
        }
    }

    #[test]
    fn the_local_pick_is_the_least_loaded_replica_held_ready_here() {
        let route = spread();
        // The replicas this node holds ready, with their requests in flight (b1 is not
        // held here, whatever this map says).
        let mut held = HashMap::from([("a-busy", 3), ("a-idle", 1), ("a-also-idle", 1), ("b1", 0)]);
        let pick = |held: &HashMap<&str, usize>, node| {
            pick_local(&route, node, |r| held.get(r).copied()).map(|r| r.replica.clone())
        };
        // The first of the least loaded.
        assert_eq!(pick(&held, "nodes/a").unwrap(), "a-idle");
        // This node's own state decides over the table's, which lags behind it.
        held.insert("a-stale", 0);
        assert_eq!(pick(&held, "nodes/a").unwrap(), "a-stale");
        assert_eq!(pick(&held, "nodes/d"), None);
        assert_eq!(pick(&HashMap::new(), "nodes/a"), None);
    }

    #[test]
    fn the_remote_pick_is_the_ready_replica_elsewhere_this_node_forwards_least_to() {
        let route = spread();
        let mut forwarded = HashMap::from([("b1", 4), ("b2", 2)]);
        let pick = |forwarded: &HashMap<&str, usize>, node| {
            pick_remote(&route, node, |r| forwarded.get(r).copied().unwrap_or(0))
                .map(|r| r.replica.clone())
        };
        // None forwarded to c1 yet.
        assert_eq!(pick(&forwarded, "nodes/a").unwrap(), "c1");
        forwarded.insert("c1", 9);
        assert_eq!(pick(&forwarded, "nodes/a").unwrap(), "b2");
        // Seen from another node, this one's replicas are candidates as well.
        assert_eq!(pick(&forwarded, "nodes/x").unwrap(), "a-busy");
        // Only this node's replica is ready: nothing to forward to.
        let here_only = Route {
            replicas: vec![route.replicas[0].clone()],
            ..spread()
        };
        assert!(pick_remote(&here_only, "nodes/a", |_| 0).is_none());
    }
}
