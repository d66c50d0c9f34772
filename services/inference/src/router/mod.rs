//! The router. It turns a request's model string (a model, a deployed model, or
//! `model#deployment`) into a replica by the scheduler's routing table: served here when this
//! node holds a ready one, else forwarded to the node that does (least loaded from this
//! node's view); a deployment with no ready replica holds the request (bounded in number and
//! in time) while the scheduler starts one.

mod choice;
mod forward;

use kiln_core::Error;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_core::auth::Principal;
use kiln_core::in_flight::{InFlight, InFlightGuard};
use kiln_proto::scheduler::v1::{DeploymentDemand, Route, RoutingTable};
use tokio::sync::watch;
use tonic::transport::Channel;

pub(crate) use forward::{forward, is_forwarded, peer_status};

use crate::config::InferenceConfig;
use crate::engine::{Engine, LoadedModel};
use crate::generation::llm::Adapter;
use crate::replicas::Replicas;
use kiln_core::Result;

/// How long a request waits for the node's first routing table before UNAVAILABLE.
const FIRST_TABLE_WAIT: Duration = Duration::from_secs(10);

/// Which deployed model and replica answer a request, for its usage record.
#[derive(Debug, Clone, Default)]
pub(crate) struct RouteRef {
    pub(crate) deployed_model: String,
    pub(crate) deployment: String,
    pub(crate) deployment_type: i32,
    pub(crate) replica: String,
}

/// A request served on this node.
pub(crate) struct Served {
    pub(crate) model: Arc<LoadedModel>,
    /// The LoRA addon the request goes through (its route names an addon of the base).
    pub(crate) adapter: Option<Arc<Adapter>>,
    pub(crate) route: Option<RouteRef>,
    /// Held until the answer is complete (streams keep it to their end).
    pub(crate) in_flight: Option<InFlightGuard>,
}

/// Where a request goes.
pub(crate) enum Target {
    Local(Served),
    /// Another node's gRPC server; the guard counts the forward against that replica.
    Remote(Channel, InFlightGuard),
}

/// Tells the scheduler how many requests wait for a deployment with no ready replica.
pub(crate) type DemandSink = Box<dyn Fn(DeploymentDemand) + Send + Sync>;

/// A node's router: the routing table, the replicas held here, the way to other nodes.
pub(crate) struct Router {
    engine: Arc<Engine>,
    /// This node's name (`nodes/{id}`), as routes name the nodes of their replicas.
    node: String,
    replicas: Arc<Replicas>,
    routes: watch::Receiver<Arc<RoutingTable>>,
    demand: DemandSink,
    cold_start_timeout: Duration,
    max_waiting: usize,
    peers: Mutex<HashMap<String, Channel>>,
    /// Requests this node forwards now, per replica (its view of remote load).
    forwarded: Mutex<HashMap<String, InFlight>>,
    /// Requests waiting for a deployment with no ready replica.
    waiting: Mutex<HashMap<String, usize>>,
}

impl Router {
    pub(crate) fn new(
        engine: Arc<Engine>,
        node: String,
        replicas: Arc<Replicas>,
        routes: watch::Receiver<Arc<RoutingTable>>,
        demand: DemandSink,
        config: &InferenceConfig,
    ) -> Self {
        Self {
            engine,
            node,
            replicas,
            routes,
            demand,
            cold_start_timeout: config.cold_start_timeout,
            max_waiting: config.max_waiting_requests,
            peers: Default::default(),
            forwarded: Default::default(),
            waiting: Default::default(),
        }
    }

    /// The replica a request's model string names, here or on another node. A `forwarded`
    /// request is served here or fails: it never goes on to a third node.
    pub(crate) async fn target(
        &self,
        caller: &Principal,
        field: &str,
        name: &str,
        forwarded: bool,
    ) -> Result<Target> {
        let mut routes = self.routes.clone();
        let deadline = tokio::time::Instant::now() + self.cold_start_timeout;
        let mut waiting: Option<WaitGuard<'_>> = None;
        loop {
            let table = routes.borrow_and_update().clone();
            let route = match choice::find_route(&table, caller, field, name) {
                Ok(route) => route,
                // The node that forwarded it saw this node serve it: this node's table is
                // behind (it has just started, or its scheduler has): a retry, not NOT_FOUND.
                Err(_) if forwarded => {
                    return Err(Error::Unavailable(format!(
                        "{} has no route to {name} yet; retry",
                        self.node
                    )));
                }
                // No table from the scheduler yet (the node has just started): wait for it,
                // a few seconds at most.
                Err(_) if table.version == 0 => {
                    let first = deadline.min(tokio::time::Instant::now() + FIRST_TABLE_WAIT);
                    match tokio::time::timeout_at(first, routes.changed()).await {
                        Ok(Ok(())) => continue,
                        _ => {
                            return Err(Error::Unavailable(
                                "the node has no routing table yet; retry".into(),
                            ));
                        }
                    }
                }
                Err(e) => return Err(e),
            };
            if let Some(served) = self.local(route).await? {
                return Ok(Target::Local(served));
            }
            if forwarded {
                return Err(Error::Unavailable(format!(
                    "{} no longer serves {name}; retry",
                    self.node
                )));
            }
            if let Some(target) = self.remote(route)? {
                return Ok(target);
            }
            if waiting.is_none() {
                waiting = Some(self.wait_for(&route.deployment)?);
            }
            let count = waiting.as_ref().map_or(1, |w| w.count());
            (self.demand)(DeploymentDemand {
                deployment: route.deployment.clone(),
                waiting_requests: count as i32,
            });
            let deployment = route.deployment.clone();
            match tokio::time::timeout_at(deadline, routes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return Err(Error::Unavailable("the node is shutting down".into()));
                }
                Err(_) => {
                    return Err(Error::Unavailable(format!(
                        "{deployment} has no ready replica after {} s; retry later",
                        self.cold_start_timeout.as_secs()
                    )));
                }
            }
        }
    }

    /// Whether a replica that `caller` may use serves `name` now.
    pub(crate) fn is_ready(&self, caller: &Principal, name: &str) -> bool {
        let table = self.routes.borrow().clone();
        choice::find_route(&table, caller, "name", name)
            .is_ok_and(|r| r.replicas.iter().any(|r| r.ready))
    }

    /// The route's replica on this node, if it is ready here (and, for an addon, holds its
    /// files).
    async fn local(&self, route: &Route) -> Result<Option<Served>> {
        let addon = (route.model != route.base_model).then_some(route.model.as_str());
        let claimed = {
            let replicas = self.replicas.lock();
            choice::pick_local(route, &self.node, |replica| {
                let held = replicas.get(replica)?;
                match addon {
                    Some(addon) if !held.addon_dirs.contains_key(addon) => None,
                    _ => held.ready_load(),
                }
            })
            .and_then(|picked| replicas.get(&picked.replica))
            .map(|h| {
                let dir = addon.and_then(|a| h.addon_dirs.get(a)).cloned();
                (h.replica.name.clone(), h.variant.clone(), dir, h.claim())
            })
        };
        let Some((replica, variant, addon_dir, guard)) = claimed else {
            return Ok(None);
        };
        // The replica's model served as its deployment asked.
        let model = self
            .engine
            .model_on(&Principal::service(), "model", &route.base_model, &variant)
            .await?;
        let adapter = match addon_dir {
            Some(dir) => Some(self.engine.adapter(&route.model, &dir).await?),
            None => None,
        };
        Ok(Some(Served {
            model,
            adapter,
            route: Some(RouteRef {
                deployed_model: route.deployed_model.clone(),
                deployment: route.deployment.clone(),
                deployment_type: route.deployment_type,
                replica,
            }),
            in_flight: Some(guard),
        }))
    }

    /// The least loaded (from this node's view) ready replica elsewhere.
    fn remote(&self, route: &Route) -> Result<Option<Target>> {
        let mut forwarded = self.forwarded.lock().expect("forwarded");
        let best = choice::pick_remote(route, &self.node, |replica| {
            forwarded.get(replica).map_or(0, InFlight::get)
        });
        let Some(best) = best else {
            return Ok(None);
        };
        let guard = forwarded.entry(best.replica.clone()).or_default().enter();
        drop(forwarded);
        let channel = self.peer(&best.address)?;
        Ok(Some(Target::Remote(channel, guard)))
    }

    /// The channel to the node at `address`, opened at its first use.
    fn peer(&self, address: &str) -> Result<Channel> {
        let mut peers = self.peers.lock().expect("peers");
        if let Some(channel) = peers.get(address) {
            return Ok(channel.clone());
        }
        let channel = kiln_core::server::endpoint(address)
            .map_err(|e| Error::Internal(format!("node address: {e}")))?
            .connect_lazy();
        peers.insert(address.to_owned(), channel.clone());
        Ok(channel)
    }

    fn wait_for(&self, deployment: &str) -> Result<WaitGuard<'_>> {
        let mut waiting = self.waiting.lock().expect("waiting");
        let count = waiting.entry(deployment.to_owned()).or_default();
        if *count >= self.max_waiting {
            return Err(Error::ResourceExhausted {
                message: format!(
                    "{deployment} is starting and already holds {count} waiting requests; retry shortly"
                ),
                retry_after: Some(Duration::from_secs(1)),
            });
        }
        *count += 1;
        Ok(WaitGuard {
            router: self,
            deployment: deployment.to_owned(),
        })
    }
}

/// A request counted as waiting for a deployment.
struct WaitGuard<'a> {
    router: &'a Router,
    deployment: String,
}

impl WaitGuard<'_> {
    fn count(&self) -> usize {
        self.router
            .waiting
            .lock()
            .expect("waiting")
            .get(&self.deployment)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let mut waiting = self.router.waiting.lock().expect("waiting");
        if let Some(count) = waiting.get_mut(&self.deployment) {
            *count = count.saturating_sub(1);
        }
    }
}
