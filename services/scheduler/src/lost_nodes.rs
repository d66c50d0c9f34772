//! Lost nodes: a node whose heartbeats stop (or whose stream ends) is marked lost; its
//! replicas stop counting and their accelerators are released, so the next pass starts
//! replacements on the nodes that are left. Which nodes are late and what marking one lost
//! changes are pure; [`Scheduler::lose_node`] acts on them.

use std::time::{Duration, Instant};

use kiln_events::Body;
use kiln_proto::common::v1::Status as ResourceStatus;
use kiln_proto::events::v1 as ev;
use kiln_proto::scheduler::v1::node;

use crate::service::Scheduler;
use crate::state::State;
use crate::time::now;

/// The nodes to mark lost at `now`: not lost yet, and their last heartbeat more than `limit`
/// before `now` (one exactly `limit` old is not late yet).
pub(crate) fn late_nodes(state: &State, limit: Duration, now: Instant) -> Vec<String> {
    state
        .nodes
        .values()
        .filter(|n| {
            n.node.state != node::State::Lost as i32
                && now.saturating_duration_since(n.last_heartbeat) > limit
        })
        .map(|n| n.node.name.clone())
        .collect()
}

/// A node just marked lost: when it was last heard from, and the replicas it held.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LostNode {
    pub last_heartbeat: Option<prost_types::Timestamp>,
    pub replicas: Vec<String>,
}

/// Marks node `name` lost at `at` for `reason` (UNAVAILABLE): it takes no assignments and no
/// placements any more. Returns what it held, or None when there is no such node or it was
/// lost already. Its replicas stay in `state`: the caller removes them (and says so).
pub(crate) fn mark_lost(
    state: &mut State,
    name: &str,
    reason: &str,
    at: prost_types::Timestamp,
) -> Option<LostNode> {
    let entry = state.nodes.get_mut(name)?;
    if entry.node.state == node::State::Lost as i32 {
        return None;
    }
    entry.node.state = node::State::Lost as i32;
    entry.node.status = Some(ResourceStatus {
        code: tonic::Code::Unavailable as i32,
        message: reason.to_owned(),
    });
    entry.node.update_time = Some(at);
    entry.sender = None;
    let last_heartbeat = entry.node.last_heartbeat_time;
    let replicas = state
        .replicas
        .values()
        .filter(|r| r.replica.node == name)
        .map(|r| r.replica.name.clone())
        .collect();
    Some(LostNode {
        last_heartbeat,
        replicas,
    })
}

impl Scheduler {
    /// Loses every node whose heartbeats stopped.
    pub(crate) async fn find_lost_nodes(&self, state: &mut State) {
        let late = late_nodes(state, self.config().node_lost_after, Instant::now());
        for name in late {
            self.lose_node(state, &name, "no heartbeat").await;
        }
    }

    /// Marks a node lost and forgets its replicas, with `node.lost` and each replica's
    /// `replica.stopped`.
    pub(crate) async fn lose_node(&self, state: &mut State, name: &str, reason: &str) {
        let Some(lost) = mark_lost(state, name, reason, now()) else {
            return;
        };
        tracing::warn!(
            node = name,
            reason,
            replicas = lost.replicas.len(),
            "node lost"
        );
        for replica in &lost.replicas {
            self.remove_replica(state, replica, "node lost", None).await;
        }
        let _ = self
            .emit(
                "scheduler.node.lost",
                kiln_core::names::SYSTEM_ACCOUNT,
                name,
                Body::NodeLost(ev::NodeLost {
                    name: name.to_owned(),
                    last_heartbeat_time: lost.last_heartbeat,
                    reason: reason.to_owned(),
                    replicas: lost.replicas,
                }),
            )
            .await;
    }
}

#[cfg(test)]
mod tests;
