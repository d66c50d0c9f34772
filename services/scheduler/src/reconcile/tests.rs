use super::*;
use crate::state::fixtures;

const CREATING: i32 = deployment::State::Creating as i32;
const READY: i32 = deployment::State::Ready as i32;

/// Deployment d (CREATING, `desired`) and replicas in these states.
fn progress_of(
    desired: i32,
    states: &[replica::State],
    edit: impl Fn(&mut DeploymentEntry),
) -> Progress {
    let mut entry = fixtures::deployment("d", desired);
    entry.deployment.state = CREATING;
    edit(&mut entry);
    let replicas: Vec<ReplicaEntry> = states
        .iter()
        .enumerate()
        .map(|(i, s)| fixtures::replica("d", &format!("r{i}"), "a", *s, i as i32))
        .collect();
    progress(&entry, &replicas.iter().collect::<Vec<_>>())
}

fn failed_replica() -> ResourceStatus {
    ResourceStatus {
        code: tonic::Code::Internal as i32,
        message: "a replica failed on nodes/a: out of memory".into(),
    }
}

#[test]
fn replicas_are_counted_by_phase() {
    use replica::State::*;
    let p = progress_of(
        5,
        &[
            PendingScheduling,
            DownloadingModel,
            DownloadingModel,
            Initializing,
            Ready,
            Stopped,
        ],
        |_| {},
    );
    assert_eq!(p.replica_count, 6);
    assert_eq!(
        p.stats,
        ReplicaStats {
            pending_scheduling_replica_count: 1,
            downloading_model_replica_count: 2,
            initializing_replica_count: 1,
            ready_replica_count: 1,
        }
    );
    assert_eq!(p.state, CREATING);
    assert_eq!(p.status, ResourceStatus::default());
}

#[test]
fn a_starting_deployment_is_ready_once_its_desired_replicas_are() {
    use replica::State::*;
    assert_eq!(
        progress_of(2, &[Ready, Initializing], |_| {}).state,
        CREATING
    );
    assert_eq!(progress_of(2, &[Ready, Ready], |_| {}).state, READY);
    let updating =
        |e: &mut DeploymentEntry| e.deployment.state = deployment::State::Updating as i32;
    assert_eq!(progress_of(1, &[Ready], updating).state, READY);
    // At zero: ready once no replica is left.
    assert_eq!(progress_of(0, &[], |_| {}).state, READY);
    assert_eq!(progress_of(0, &[Ready], |_| {}).state, CREATING);
    // A ready deployment stays ready while it loses replicas (the pass replaces them).
    let ready = |e: &mut DeploymentEntry| e.deployment.state = READY;
    assert_eq!(progress_of(3, &[Initializing], ready).state, READY);
}

#[test]
fn repeated_failures_with_nothing_ready_fail_the_deployment() {
    use replica::State::*;
    let failing = |failures| {
        move |e: &mut DeploymentEntry| {
            e.failures = failures;
            e.deployment.status = Some(failed_replica());
        }
    };
    let p = progress_of(1, &[PendingScheduling], failing(MAX_FAILURES));
    assert_eq!(p.state, deployment::State::Failed as i32);
    assert_eq!(p.status, failed_replica());
    // Fewer failures: still starting, and the status says what failed.
    let p = progress_of(1, &[PendingScheduling], failing(MAX_FAILURES - 1));
    assert_eq!(p.state, CREATING);
    assert_eq!(p.status, failed_replica());
    // A ready replica clears them.
    let p = progress_of(2, &[Ready, PendingScheduling], failing(MAX_FAILURES + 2));
    assert_eq!(p.state, CREATING);
    assert_eq!(p.status, ResourceStatus::default());
}

#[test]
fn replicas_waiting_for_capacity_say_what_they_lack() {
    let p = progress_of(1, &[replica::State::PendingScheduling], |e| {
        e.unplaced = "waiting for capacity: needs 1 × NVIDIA_H100_80GB on one node".into();
        e.failures = 1;
    });
    assert_eq!(p.status.code, tonic::Code::ResourceExhausted as i32);
    assert_eq!(p.status.code, 8, "google.rpc RESOURCE_EXHAUSTED");
    assert!(p.status.message.starts_with("waiting for capacity"));
}
