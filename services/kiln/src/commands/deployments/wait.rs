//! `--wait`: polling a deployment until it is ready (or scaled), with its progress on stderr.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use kiln_proto::scheduler::v1 as schv1;
use schv1::deployment::State as DeploymentState;

use super::print::{ready_replicas, status_message};
use crate::client::{Authed, ProgressLine, enum_name};

/// How often `--wait` asks for the deployment.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// One line of a deployment's progress: `CREATING  replicas 0/1 ready (1 pending scheduling,
/// 0 downloading, 0 initializing)  <status message>`.
fn progress_text(d: &schv1::Deployment) -> String {
    let none = schv1::ReplicaStats::default();
    let stats = d.replica_stats.as_ref().unwrap_or(&none);
    let mut text = format!(
        "{}  replicas {}/{} ready ({} pending scheduling, {} downloading, {} initializing)",
        enum_name(d.state, DeploymentState::as_str_name),
        stats.ready_replica_count,
        d.desired_replica_count,
        stats.pending_scheduling_replica_count,
        stats.downloading_model_replica_count,
        stats.initializing_replica_count,
    );
    let message = status_message(&d.status);
    if !message.is_empty() {
        text.push_str("  ");
        text.push_str(message);
    }
    text
}

/// What `--wait` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WaitFor {
    /// State READY.
    Ready,
    /// State READY with as many ready replicas as desired.
    Scaled,
}

/// Whether waiting is over: `Some(Ok)` when done, `Some(Err)` when it never will be, `None`
/// to keep waiting.
fn wait_outcome(d: &schv1::Deployment, wait_for: WaitFor) -> Option<anyhow::Result<()>> {
    match DeploymentState::try_from(d.state) {
        Ok(DeploymentState::Ready) => match wait_for {
            WaitFor::Ready => Some(Ok(())),
            WaitFor::Scaled => (ready_replicas(d) == d.desired_replica_count).then_some(Ok(())),
        },
        Ok(DeploymentState::Failed) => {
            let message = match status_message(&d.status) {
                "" => "no status message",
                m => m,
            };
            Some(Err(anyhow!("{} failed: {message}", d.name)))
        }
        Ok(state @ (DeploymentState::Deleting | DeploymentState::Deleted)) => Some(Err(anyhow!(
            "{} is {} and will not become READY",
            d.name,
            state.as_str_name()
        ))),
        _ => None,
    }
}

/// Polls the deployment every 500 ms, showing its progress on stderr, until `wait_for`
/// holds, it fails, or the timeout (`text`, `length`) passes.
pub(super) async fn wait(
    mut deployments: schv1::deployment_service_client::DeploymentServiceClient<Authed>,
    name: &str,
    (timeout_text, timeout): (&str, Duration),
    wait_for: WaitFor,
) -> anyhow::Result<schv1::Deployment> {
    let deadline = Instant::now() + timeout;
    let mut err = std::io::stderr();
    let mut line = ProgressLine::new(err.is_terminal());
    loop {
        let polled = deployments
            .get_deployment(schv1::GetDeploymentRequest {
                name: name.to_owned(),
            })
            .await;
        let d = match polled {
            Ok(d) => d.into_inner(),
            Err(status) => {
                let _ = line.finish(&mut err);
                return Err(status.into());
            }
        };
        let _ = line.show(&mut err, &progress_text(&d));
        if let Some(outcome) = wait_outcome(&d, wait_for) {
            let _ = line.finish(&mut err);
            return outcome.map(|()| d);
        }
        if Instant::now() >= deadline {
            let _ = line.finish(&mut err);
            bail!(
                "timed out after {timeout_text} waiting for {name} (state {})",
                enum_name(d.state, DeploymentState::as_str_name)
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use kiln_proto::common::v1 as commonv1;

    use super::*;

    fn error(result: anyhow::Result<()>) -> String {
        format!("{:#}", result.unwrap_err())
    }

    fn deployment(state: DeploymentState, ready: i32, desired: i32) -> schv1::Deployment {
        schv1::Deployment {
            name: "accounts/a/deployments/d".into(),
            state: state as i32,
            desired_replica_count: desired,
            replica_stats: Some(schv1::ReplicaStats {
                pending_scheduling_replica_count: 1,
                downloading_model_replica_count: 2,
                initializing_replica_count: 3,
                ready_replica_count: ready,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn progress_text_shows_replica_phases_and_status() {
        let mut d = deployment(DeploymentState::Creating, 0, 1);
        assert_eq!(
            progress_text(&d),
            "CREATING  replicas 0/1 ready (1 pending scheduling, 2 downloading, 3 initializing)"
        );
        d.status = Some(commonv1::Status {
            code: 0,
            message: "waiting for a node with 1×CPU".into(),
        });
        assert_eq!(
            progress_text(&d),
            "CREATING  replicas 0/1 ready (1 pending scheduling, 2 downloading, 3 initializing)  \
             waiting for a node with 1×CPU"
        );
        assert_eq!(
            progress_text(&schv1::Deployment::default()),
            "STATE_UNSPECIFIED  replicas 0/0 ready (0 pending scheduling, 0 downloading, 0 \
             initializing)"
        );
    }

    #[test]
    fn waiting_ends_on_ready_failed_or_deleted() {
        use DeploymentState as S;
        assert!(wait_outcome(&deployment(S::Creating, 0, 1), WaitFor::Ready).is_none());
        assert!(wait_outcome(&deployment(S::Updating, 1, 1), WaitFor::Ready).is_none());
        assert!(matches!(
            wait_outcome(&deployment(S::Ready, 1, 1), WaitFor::Ready),
            Some(Ok(()))
        ));
        // A scale waits for the ready replicas to match the desired count.
        assert!(wait_outcome(&deployment(S::Ready, 1, 3), WaitFor::Scaled).is_none());
        assert!(wait_outcome(&deployment(S::Ready, 3, 1), WaitFor::Scaled).is_none());
        assert!(matches!(
            wait_outcome(&deployment(S::Ready, 3, 3), WaitFor::Scaled),
            Some(Ok(()))
        ));
        let mut failed = deployment(S::Failed, 0, 1);
        failed.status = Some(commonv1::Status {
            code: 9,
            message: "no node has 8×NVIDIA_H100_80GB".into(),
        });
        let e = error(wait_outcome(&failed, WaitFor::Ready).unwrap());
        assert_eq!(
            e,
            "accounts/a/deployments/d failed: no node has 8×NVIDIA_H100_80GB"
        );
        let e = error(wait_outcome(&deployment(S::Deleted, 0, 0), WaitFor::Ready).unwrap());
        assert_eq!(
            e,
            "accounts/a/deployments/d is DELETED and will not become READY"
        );
    }
}
