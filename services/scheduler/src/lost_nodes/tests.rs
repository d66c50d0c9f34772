use kiln_proto::scheduler::v1::replica;

use super::*;
use crate::placement;
use crate::replicas::{Plan, capacities, plan};
use crate::state::ReplicaEntry;
use crate::state::fixtures;

const LIMIT: Duration = Duration::from_secs(10);

/// Nodes a (2 H100s), b (2 H100s) and c (already lost); deployment d wants 2 replicas, one
/// on a and one on b. Node a was last heard from at `t0`, b 5 s later.
fn state(t0: Instant) -> State {
    let mut a = fixtures::node("a", node::State::Ready, 2);
    a.last_heartbeat = t0;
    a.node.last_heartbeat_time = Some(prost_types::Timestamp {
        seconds: 100,
        nanos: 0,
    });
    let mut b = fixtures::node("b", node::State::Ready, 2);
    b.last_heartbeat = t0 + Duration::from_secs(5);
    let mut c = fixtures::node("c", node::State::Lost, 2);
    c.last_heartbeat = t0;
    fixtures::state(
        vec![fixtures::deployment("d", 2)],
        vec![a, b, c],
        vec![
            fixtures::replica("d", "r1", "a", replica::State::Ready, 0),
            fixtures::replica("d", "r2", "b", replica::State::Ready, 0),
        ],
    )
}

#[test]
fn a_node_is_late_only_once_its_heartbeat_is_older_than_the_limit() {
    let t0 = Instant::now();
    let state = state(t0);
    assert!(
        late_nodes(&state, LIMIT, t0 + LIMIT).is_empty(),
        "exactly the limit"
    );
    assert_eq!(
        late_nodes(&state, LIMIT, t0 + LIMIT + Duration::from_nanos(1)),
        vec!["nodes/a"]
    );
    // A node lost already is not lost again.
    assert_eq!(
        late_nodes(&state, LIMIT, t0 + Duration::from_secs(60)),
        vec!["nodes/a", "nodes/b"]
    );
    assert!(late_nodes(&state, LIMIT, t0).is_empty());
}

#[test]
fn marking_a_node_lost_stops_it_taking_work_and_names_its_replicas() {
    let t0 = Instant::now();
    let mut state = state(t0);
    let at = prost_types::Timestamp {
        seconds: 200,
        nanos: 0,
    };
    let lost = mark_lost(&mut state, "nodes/a", "no heartbeat", at).expect("a was ready");
    assert_eq!(
        lost,
        LostNode {
            last_heartbeat: Some(prost_types::Timestamp {
                seconds: 100,
                nanos: 0
            }),
            replicas: vec!["accounts/acme/deployments/d/replicas/r1".into()],
        }
    );
    let a = &state.nodes["nodes/a"];
    assert_eq!(a.node.state, node::State::Lost as i32);
    assert!(!a.is_ready() && a.sender.is_none());
    let status = a.node.status.clone().unwrap_or_default();
    assert_eq!(status.code, tonic::Code::Unavailable as i32);
    assert_eq!(status.message, "no heartbeat");
    assert_eq!(a.node.update_time, Some(at));
    // Once is enough; an unknown node is nothing to lose.
    assert_eq!(mark_lost(&mut state, "nodes/a", "again", at), None);
    assert_eq!(mark_lost(&mut state, "nodes/zz", "unknown", at), None);
}

#[test]
fn a_lost_nodes_replicas_are_replaced_on_the_nodes_left() {
    let t0 = Instant::now();
    let mut state = state(t0);
    let lost = mark_lost(
        &mut state,
        "nodes/a",
        "stream closed",
        prost_types::Timestamp::default(),
    )
    .expect("a was ready");
    for replica in &lost.replicas {
        state.replicas.remove(replica);
    }
    // The deployment is one short: the next pass starts one...
    let d = "accounts/acme/deployments/d";
    let ours: Vec<&ReplicaEntry> = state
        .replicas
        .values()
        .filter(|r| r.replica.deployment == d)
        .collect();
    assert_eq!(plan(2, &ours), Plan::Start(1));
    // ...and it can only go to b, beside r2.
    let mut nodes = capacities(&state);
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, vec!["nodes/b"]);
    let need = placement::Need {
        kind: fixtures::H100,
        count: 1,
        model_bytes: 1 << 30,
    };
    let placed = placement::place(&mut nodes, &[need]);
    assert_eq!(
        placed[0],
        Some(placement::Placed {
            node: 0,
            indices: vec![1]
        })
    );
}
