//! How deployments, deployed models and nodes print.

use kiln_proto::common::v1 as commonv1;
use kiln_proto::scheduler::v1 as schv1;

use crate::client::{enum_name, printable, time, yes_no};

pub(super) fn status_message(status: &Option<commonv1::Status>) -> &str {
    status.as_ref().map(|s| s.message.as_str()).unwrap_or("")
}

pub(super) fn ready_replicas(d: &schv1::Deployment) -> i32 {
    d.replica_stats
        .as_ref()
        .map(|s| s.ready_replica_count)
        .unwrap_or(0)
}

/// `2×NVIDIA_H100_80GB` (just the type when the count is unset).
fn accelerator_text(accelerator_type: i32, count: i32) -> String {
    let name = enum_name(accelerator_type, commonv1::AcceleratorType::as_str_name);
    if count > 0 {
        format!("{count}×{name}")
    } else {
        name
    }
}

printable!(schv1::Deployment, "kiln.scheduler.v1.Deployment" {
    "NAME" => |d| d.name.clone(),
    "STATE" => |d| enum_name(d.state, schv1::deployment::State::as_str_name),
    "MODEL" => |d| d.base_model.clone(),
    "TYPE" => |d| enum_name(d.deployment_type, schv1::deployment::DeploymentType::as_str_name),
    "ACCELERATOR" => |d| accelerator_text(d.accelerator_type, d.accelerator_count),
    "READY" => |d| format!("{}/{}", ready_replicas(d), d.desired_replica_count),
    "STATUS" => |d| status_message(&d.status).to_owned(),
});
printable!(schv1::DeployedModel, "kiln.scheduler.v1.DeployedModel" {
    "NAME" => |m| m.name.clone(),
    "STATE" => |m| enum_name(m.state, schv1::deployed_model::State::as_str_name),
    "MODEL" => |m| m.model.clone(),
    "DEPLOYMENT" => |m| m.deployment.clone(),
    "DEFAULT" => |m| yes_no(m.default),
    "PUBLIC" => |m| yes_no(m.public),
    "STATUS" => |m| status_message(&m.status).to_owned(),
});
printable!(schv1::Node, "kiln.scheduler.v1.Node" {
    "NAME" => |n| n.name.clone(),
    "STATE" => |n| enum_name(n.state, schv1::node::State::as_str_name),
    "ADDRESS" => |n| n.address.clone(),
    "ACCELERATORS" => node_accelerators,
    "REPLICAS" => |n| n.replicas.len().to_string(),
    "LAST HEARTBEAT" => |n| time(&n.last_heartbeat_time),
});

/// A node's accelerators, e.g. `2×NVIDIA_H100_80GB, 16×CPU` (`-` for none).
fn node_accelerators(node: &schv1::Node) -> String {
    let accelerators: Vec<String> = node
        .accelerators
        .iter()
        .map(|a| accelerator_text(a.r#type, a.count))
        .collect();
    if accelerators.is_empty() {
        "-".to_owned()
    } else {
        accelerators.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Printable, to_json};

    #[test]
    fn tables_show_what_matters() {
        let d = schv1::Deployment {
            name: "accounts/a/deployments/d".into(),
            state: schv1::deployment::State::Ready as i32,
            desired_replica_count: 2,
            replica_stats: Some(schv1::ReplicaStats {
                ready_replica_count: 1,
                ..Default::default()
            }),
            base_model: "accounts/kiln/models/m".into(),
            deployment_type: schv1::deployment::DeploymentType::Dedicated as i32,
            accelerator_type: commonv1::AcceleratorType::NvidiaH10080gb as i32,
            accelerator_count: 2,
            ..Default::default()
        };
        assert_eq!(
            d.row(),
            [
                "accounts/a/deployments/d",
                "READY",
                "accounts/kiln/models/m",
                "DEDICATED",
                "2×NVIDIA_H100_80GB",
                "1/2",
                ""
            ]
        );
        let node = schv1::Node {
            name: "nodes/n1".into(),
            state: schv1::node::State::Ready as i32,
            address: "http://10.0.0.5:7443".into(),
            accelerators: vec![
                schv1::Accelerator {
                    r#type: commonv1::AcceleratorType::NvidiaH10080gb as i32,
                    count: 2,
                    memory_bytes: 80 << 30,
                },
                schv1::Accelerator {
                    r#type: commonv1::AcceleratorType::Cpu as i32,
                    count: 16,
                    memory_bytes: 64 << 30,
                },
            ],
            replicas: vec![schv1::Replica::default()],
            last_heartbeat_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
            ..Default::default()
        };
        assert_eq!(
            node.row(),
            [
                "nodes/n1",
                "READY",
                "http://10.0.0.5:7443",
                "2×NVIDIA_H100_80GB, 16×CPU",
                "1",
                "2023-11-14T22:13:20Z"
            ]
        );
        let empty = schv1::Node::default();
        assert_eq!(empty.row()[3], "-");
        let m = schv1::DeployedModel {
            default: true,
            ..Default::default()
        };
        assert_eq!(m.row()[4..6], ["yes", "no"]);
    }

    #[test]
    fn json_covers_scheduler_messages() {
        let d = schv1::Deployment {
            name: "accounts/a/deployments/d".into(),
            state: schv1::deployment::State::Ready as i32,
            replica_stats: Some(schv1::ReplicaStats {
                ready_replica_count: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let json = to_json(schv1::Deployment::PROTO_NAME, &d);
        assert_eq!(json["name"], "accounts/a/deployments/d");
        assert_eq!(json["state"], "READY");
        assert_eq!(json["replica_stats"]["ready_replica_count"], 1);
        let m = schv1::DeployedModel {
            default: true,
            ..Default::default()
        };
        assert_eq!(
            to_json(schv1::DeployedModel::PROTO_NAME, &m)["default"],
            true
        );
        let n = to_json(schv1::Node::PROTO_NAME, &schv1::Node::default());
        assert!(n["accelerators"].as_array().is_some_and(|a| a.is_empty()));
    }
}
