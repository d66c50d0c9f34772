//! The scheduler's gauges, set from its state after every reconcile pass: replicas desired
//! and ready per deployment, replicas waiting for a node, nodes by state, fine-tuning jobs by
//! state. [`snapshot`] is pure; [`publish`] replaces the previous values (a deleted
//! deployment's series go away).

use std::collections::BTreeMap;
use std::sync::LazyLock;

use kiln_core::metrics::{self, Family, Gauge, Labels};
use kiln_proto::scheduler::v1::{node, replica, supervised_fine_tuning_job::JobState};

use crate::state::State;

/// What the gauges show after a pass.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Snapshot {
    /// Per deployment: (desired, ready).
    pub replicas: BTreeMap<String, (i64, i64)>,
    pub pending_replicas: i64,
    pub nodes: BTreeMap<&'static str, i64>,
    pub jobs: BTreeMap<&'static str, i64>,
}

pub(crate) fn snapshot(state: &State) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for (name, entry) in &state.deployments {
        let desired = i64::from(entry.deployment.desired_replica_count);
        snapshot.replicas.insert(name.clone(), (desired, 0));
    }
    for entry in state.replicas.values() {
        match entry.state() {
            replica::State::Ready => {
                if let Some((_, ready)) = snapshot.replicas.get_mut(&entry.replica.deployment) {
                    *ready += 1;
                }
            }
            replica::State::PendingScheduling => snapshot.pending_replicas += 1,
            _ => {}
        }
    }
    for state in [node::State::Ready, node::State::Draining, node::State::Lost] {
        snapshot.nodes.insert(state.as_str_name(), 0);
    }
    for entry in state.nodes.values() {
        let name = node::State::try_from(entry.node.state)
            .unwrap_or(node::State::Unspecified)
            .as_str_name();
        *snapshot.nodes.entry(name).or_default() += 1;
    }
    for job in state.jobs.values() {
        let name = JobState::try_from(job.state)
            .unwrap_or(JobState::Unspecified)
            .as_str_name();
        *snapshot.jobs.entry(name).or_default() += 1;
    }
    snapshot
}

struct Families {
    desired: Family<Labels<1>, Gauge>,
    ready: Family<Labels<1>, Gauge>,
    pending: Gauge,
    nodes: Family<Labels<1>, Gauge>,
    jobs: Family<Labels<1>, Gauge>,
}

static FAMILIES: LazyLock<Families> = LazyLock::new(|| Families {
    desired: metrics::register(
        "kiln_scheduler_replicas_desired",
        "Replicas a deployment should have (after autoscaling)",
        false,
        Family::default(),
    ),
    ready: metrics::register(
        "kiln_scheduler_replicas_ready",
        "Replicas of a deployment that serve",
        false,
        Family::default(),
    ),
    pending: metrics::register(
        "kiln_scheduler_pending_placements",
        "Replicas waiting for a node with room for them",
        false,
        Gauge::default(),
    ),
    nodes: metrics::register(
        "kiln_scheduler_nodes",
        "Inference nodes by state",
        false,
        Family::default(),
    ),
    jobs: metrics::register(
        "kiln_scheduler_fine_tuning_jobs",
        "Supervised fine-tuning jobs by state",
        false,
        Family::default(),
    ),
});

pub(crate) fn publish(snapshot: &Snapshot) {
    let f = &*FAMILIES;
    f.desired.clear();
    f.ready.clear();
    for (deployment, (desired, ready)) in &snapshot.replicas {
        let labels = [("deployment", deployment.clone())];
        f.desired.get_or_create(&labels).set(*desired);
        f.ready.get_or_create(&labels).set(*ready);
    }
    f.pending.set(snapshot.pending_replicas);
    for (family, counts) in [(&f.nodes, &snapshot.nodes), (&f.jobs, &snapshot.jobs)] {
        family.clear();
        for (state, count) in counts {
            family
                .get_or_create(&[("state", (*state).to_owned())])
                .set(*count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{deployment, node, replica, state};

    #[test]
    fn the_snapshot_counts_replicas_nodes_and_jobs() {
        let s = snapshot(&state(
            vec![deployment("d", 3), deployment("idle", 0)],
            vec![
                node("n", node::State::Ready, 2),
                node("gone", node::State::Lost, 1),
            ],
            vec![
                replica("d", "r0", "n", replica::State::Ready, 0),
                replica("d", "r1", "n", replica::State::Ready, 1),
                replica("d", "r2", "", replica::State::PendingScheduling, 0),
                replica("d", "r3", "n", replica::State::Initializing, 0),
            ],
        ));
        assert_eq!(s.replicas["accounts/acme/deployments/d"], (3, 2));
        assert_eq!(s.replicas["accounts/acme/deployments/idle"], (0, 0));
        assert_eq!(s.pending_replicas, 1);
        assert_eq!(s.nodes["READY"], 1);
        assert_eq!(s.nodes["LOST"], 1);
        assert_eq!(s.nodes["DRAINING"], 0);
        assert!(s.jobs.is_empty());
    }
}
