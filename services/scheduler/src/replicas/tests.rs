use kiln_proto::scheduler::v1::{Accelerator, node};

use super::*;
use crate::state::fixtures::{self, CPU, H100};

fn names(stop: Plan) -> Vec<String> {
    match stop {
        Plan::Stop(names) => names
            .into_iter()
            .map(|n| n.rsplit('/').next().unwrap_or_default().to_owned())
            .collect(),
        other => panic!("expected stops, got {other:?}"),
    }
}

fn loaded(mut r: ReplicaEntry, in_flight: i32, queued: i32) -> ReplicaEntry {
    r.load.in_flight_requests = in_flight;
    r.load.queue_depth = queued;
    r
}

#[test]
fn fewer_replicas_than_desired_start_the_difference() {
    let r = fixtures::replica("d", "r1", "a", replica::State::Ready, 0);
    assert_eq!(plan(3, &[&r]), Plan::Start(2));
    assert_eq!(plan(1, &[]), Plan::Start(1));
    assert_eq!(plan(1, &[&r]), Plan::Keep);
    assert_eq!(plan(0, &[]), Plan::Keep);
}

#[test]
fn surplus_replicas_stop_the_least_useful_first() {
    // Queued requests count as load as much as those in flight.
    let busy = loaded(
        fixtures::replica("d", "busy", "a", replica::State::Ready, 0),
        1,
        4,
    );
    let quiet = loaded(
        fixtures::replica("d", "quiet", "a", replica::State::Ready, 1),
        2,
        0,
    );
    let starting = fixtures::replica("d", "starting", "b", replica::State::DownloadingModel, 0);
    let waiting = fixtures::replica("d", "waiting", "", replica::State::PendingScheduling, 0);
    let all = [&busy, &quiet, &starting, &waiting];
    assert_eq!(names(plan(3, &all)), vec!["waiting"]);
    assert_eq!(names(plan(2, &all)), vec!["waiting", "starting"]);
    assert_eq!(names(plan(1, &all)), vec!["waiting", "starting", "quiet"]);
    assert_eq!(
        names(plan(0, &all)),
        vec!["waiting", "starting", "quiet", "busy"]
    );
    // Equally loaded: by name, so the choice is stable.
    let other = loaded(
        fixtures::replica("d", "another", "a", replica::State::Ready, 1),
        2,
        0,
    );
    assert_eq!(names(plan(1, &[&quiet, &other])), vec!["another"]);
}

#[test]
fn a_new_replica_copies_its_deployments_settings_and_waits() {
    let mut d = fixtures::deployment("d", 1).deployment;
    d.backend = "tract".into();
    d.accelerator_count = 2;
    d.deployment_type = 2;
    let created = prost_types::Timestamp {
        seconds: 9,
        nanos: 0,
    };
    let r = pending_replica(&d, 5 << 30, "abc", created);
    assert_eq!(r.replica.name, "accounts/acme/deployments/d/replicas/abc");
    assert_eq!(r.replica.deployment, d.name);
    assert_eq!(r.replica.model, d.base_model);
    assert_eq!(r.replica.backend, "tract");
    assert_eq!(
        (r.replica.accelerator_type, r.replica.accelerator_count),
        (H100, 2)
    );
    assert_eq!(r.state(), replica::State::PendingScheduling);
    assert!(r.replica.node.is_empty() && r.replica.ready_time.is_none());
    assert_eq!(r.replica.create_time, Some(created));
    assert_eq!((r.deployment_type, r.model_bytes), (2, 5 << 30));
}

#[test]
fn capacity_is_what_ready_nodes_have_left() {
    let mut cpu = fixtures::node("cpu", node::State::Ready, 0);
    cpu.node.accelerators = vec![Accelerator {
        r#type: CPU,
        count: 4,
        memory_bytes: 8 << 30,
    }];
    let mut closed = fixtures::node("closed", node::State::Ready, 2);
    closed.sender = None;
    let mut on_cpu = fixtures::replica("d", "c1", "cpu", replica::State::Ready, 0);
    on_cpu.replica.accelerator_type = CPU;
    on_cpu.model_bytes = 3 << 30;
    let state = fixtures::state(
        vec![],
        vec![
            fixtures::node("a", node::State::Ready, 2),
            fixtures::node("lost", node::State::Lost, 2),
            closed,
            cpu,
        ],
        vec![
            fixtures::replica("d", "r1", "a", replica::State::Ready, 1),
            fixtures::replica("d", "r2", "lost", replica::State::Ready, 0),
            on_cpu,
        ],
    );
    let mut nodes = capacities(&state);
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, vec!["nodes/a", "nodes/cpu"], "only ready nodes");
    // Device 1 of a is taken: one H100 left, device 0.
    let one = Need {
        kind: H100,
        count: 1,
        model_bytes: 0,
    };
    let placed = placement::place(&mut nodes, &[one, one]);
    assert_eq!(placed[0].as_ref().map(|p| p.indices.clone()), Some(vec![0]));
    assert_eq!(placed[1], None);
    // The CPU replica holds 3 of the 8 GiB: 5 GiB fit, 6 do not.
    let cpu_need = |gib: i64| Need {
        kind: CPU,
        count: 1,
        model_bytes: gib << 30,
    };
    assert!(placement::place(&mut capacities(&state), &[cpu_need(5)])[0].is_some());
    assert!(placement::place(&mut capacities(&state), &[cpu_need(6)])[0].is_none());
}

#[test]
fn an_unload_names_its_replica_and_drain() {
    let message = unload_assignment(
        "accounts/acme/deployments/d/replicas/r1",
        Some(crate::time::seconds(30)),
    );
    let Some(scheduler_message::Payload::Assignment(a)) = message.payload else {
        panic!("an assignment");
    };
    assert_eq!(
        a.assignment_id,
        "unload-accounts/acme/deployments/d/replicas/r1"
    );
    let Some(assignment::Action::UnloadReplica(unload)) = a.action else {
        panic!("an unload");
    };
    assert_eq!(unload.replica, "accounts/acme/deployments/d/replicas/r1");
    assert_eq!(unload.drain_timeout, Some(crate::time::seconds(30)));
}
