//! The rules a deployment's fields follow (checked on create and update; errors name the
//! field) and the defaults it gets. Pure.

use kiln_core::Error;
use kiln_proto::common::v1::AcceleratorType;
use kiln_proto::registry::v1::Model;
use kiln_proto::scheduler::v1::{AutoscalingPolicy, Deployment};

use crate::state::State;
use crate::time::seconds;
use kiln_core::Result;

/// Load target keys the autoscaler understands.
const LOAD_TARGET_KEYS: &[&str] = &[
    "concurrent_requests",
    "requests_per_second",
    "tokens_generated_per_second",
    "kv_cache_utilization",
];

/// The most accelerators one replica may ask for.
pub(super) const MAX_ACCELERATORS: i32 = 64;
/// The most replicas a deployment may have.
const MAX_REPLICAS: i32 = 1000;

/// The policy with every left-out field at its default; errors name the bad field.
pub(super) fn complete_policy(policy: Option<AutoscalingPolicy>) -> Result<AutoscalingPolicy> {
    let mut policy = policy.unwrap_or_default();
    for (field, value, default) in [
        ("scale_up_window", &mut policy.scale_up_window, 30),
        ("scale_down_window", &mut policy.scale_down_window, 600),
        (
            "scale_to_zero_window",
            &mut policy.scale_to_zero_window,
            3600,
        ),
    ] {
        match value {
            None => *value = Some(seconds(default)),
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                return Err(Error::invalid(
                    format!("deployment.autoscaling_policy.{field}"),
                    "must not be negative",
                ));
            }
            Some(_) => {}
        }
    }
    if policy.load_targets.is_empty() {
        policy
            .load_targets
            .insert("concurrent_requests".into(), 8.0);
    }
    for (key, target) in &policy.load_targets {
        if !LOAD_TARGET_KEYS.contains(&key.as_str()) {
            return Err(Error::invalid(
                format!("deployment.autoscaling_policy.load_targets[{key}]"),
                format!(
                    "is not a load target; use one of {}",
                    LOAD_TARGET_KEYS.join(", ")
                ),
            ));
        }
        if !(target.is_finite() && *target > 0.0) {
            return Err(Error::invalid(
                format!("deployment.autoscaling_policy.load_targets[{key}]"),
                "must be a positive number",
            ));
        }
    }
    Ok(policy)
}

/// A backend override: empty (the node chooses), tract or onnxruntime.
pub(super) fn check_backend(backend: &str) -> Result<()> {
    if backend.is_empty() || ["tract", "onnxruntime"].contains(&backend) {
        return Ok(());
    }
    Err(Error::invalid(
        "deployment.backend",
        format!("{backend:?} is not a backend; use tract or onnxruntime"),
    ))
}

pub(super) fn check_max_context_length(length: i32) -> Result<()> {
    if length < 0 {
        return Err(Error::invalid(
            "deployment.max_context_length",
            "must not be negative",
        ));
    }
    Ok(())
}

/// Checks min/max replica counts and fills max's default.
pub(super) fn check_replica_bounds(d: &mut Deployment) -> Result<()> {
    if d.min_replica_count < 0 {
        return Err(Error::invalid(
            "deployment.min_replica_count",
            "must not be negative",
        ));
    }
    if d.max_replica_count == 0 {
        d.max_replica_count = d.min_replica_count.max(1);
    }
    if d.max_replica_count < d.min_replica_count || d.max_replica_count > MAX_REPLICAS {
        return Err(Error::invalid(
            "deployment.max_replica_count",
            format!(
                "must be between min_replica_count ({}) and {MAX_REPLICAS}",
                d.min_replica_count
            ),
        ));
    }
    Ok(())
}

/// The size a replica must hold: the model's largest bundle, else its files.
pub(super) fn model_bytes(model: &Model) -> i64 {
    let files: i64 = model.files.iter().map(|f| f.size_bytes).sum();
    model
        .prepared_bundles
        .iter()
        .map(|b| b.files.iter().map(|f| f.size_bytes).sum::<i64>())
        .max()
        .unwrap_or(0)
        .max(files)
}

/// For a deployment that leaves the type out: the GPU kind most nodes offer, else CPU.
pub(super) fn default_accelerator(state: &State) -> i32 {
    let mut counts: std::collections::BTreeMap<i32, usize> = Default::default();
    for node in state.nodes.values().filter(|n| n.is_ready()) {
        for group in &node.node.accelerators {
            if group.r#type != AcceleratorType::Cpu as i32 && group.count > 0 {
                *counts.entry(group.r#type).or_default() += 1;
            }
        }
    }
    counts
        .into_iter()
        .max_by_key(|(kind, n)| (*n, -kind))
        .map(|(kind, _)| kind)
        .unwrap_or(AcceleratorType::Cpu as i32)
}

#[cfg(test)]
mod tests;
