//! The autoscaler's decision: how many replicas a deployment wants, from the load its ready
//! replicas report against its targets, honouring its windows. Pure (no clock, no I/O, no
//! lock): the reconcile pass gathers the input, calls [`decide`] and stores what it returns.
//!
//! - Load above target for the whole scale-up window: up to what the load needs (at most
//!   max). Below target for the whole scale-down window: down to what it needs (at least min,
//!   and at least 1: only idleness scales to zero).
//! - Load is judged only while every replica there is serving, so a replica still starting
//!   is not taken for spare capacity.
//! - No request for the scale-to-zero window (with min 0): to zero. A request waiting at a
//!   node for a deployment at zero: back to one at once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kiln_proto::scheduler::v1::{Deployment, ReplicaLoad};

use crate::time::duration_of;

/// What the autoscaler reads from a deployment: its bounds, targets and windows.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Policy {
    pub min: i32,
    pub max: i32,
    /// Load target key → the load one replica should carry.
    pub load_targets: HashMap<String, f32>,
    pub scale_up_window: Duration,
    pub scale_down_window: Duration,
    pub scale_to_zero_window: Duration,
}

impl Policy {
    pub fn of(d: &Deployment) -> Self {
        let policy = d.autoscaling_policy.clone().unwrap_or_default();
        Self {
            min: d.min_replica_count,
            max: d.max_replica_count,
            load_targets: policy.load_targets,
            scale_up_window: duration_of(policy.scale_up_window.as_ref()),
            scale_down_window: duration_of(policy.scale_down_window.as_ref()),
            scale_to_zero_window: duration_of(policy.scale_to_zero_window.as_ref()),
        }
    }
}

/// What a deployment is doing now.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Observed<'a> {
    /// Its desired replica count now.
    pub desired: i32,
    /// How many replicas it has, in any state.
    pub replicas: usize,
    /// The loads its ready replicas report.
    pub loads: &'a [ReplicaLoad],
    /// A node holds requests for it while it has no ready replica.
    pub demand: bool,
}

/// What the autoscaler remembers about a deployment between passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timers {
    /// Since when load has been above target (for the scale-up window).
    pub above_since: Option<Instant>,
    /// Since when load has been below target (for the scale-down window).
    pub below_since: Option<Instant>,
    /// The last time a request was in flight or waiting for it (for scale-to-zero).
    pub last_activity: Instant,
}

impl Timers {
    /// No window running, and active at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            above_since: None,
            below_since: None,
            last_activity: now,
        }
    }
}

/// Why the autoscaler changed a desired count (the `reason` of `deployment.scaled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// A request waits for a deployment at zero replicas.
    ScaleFromZero,
    /// Load above or below target for a whole window.
    Autoscaler,
    /// No request for the scale-to-zero window.
    ScaleToZero,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ScaleFromZero => "scale_from_zero",
            Self::Autoscaler => "autoscaler",
            Self::ScaleToZero => "scale_to_zero",
        }
    }
}

/// The desired replica count to set now and why, or None to leave it. Updates `timers` (the
/// windows start, run out or reset as load crosses the targets).
pub(crate) fn decide(
    policy: &Policy,
    observed: &Observed<'_>,
    timers: &mut Timers,
    now: Instant,
) -> Option<(i32, Reason)> {
    let (min, max, desired) = (policy.min, policy.max, observed.desired);
    let busy = observed
        .loads
        .iter()
        .any(|l| l.in_flight_requests + l.queue_depth > 0 || l.requests_per_second > 0.0);
    if busy || observed.demand {
        timers.last_activity = now;
    }
    if observed.demand && desired == 0 {
        return Some((1.min(max), Reason::ScaleFromZero));
    }
    let needed = replicas_needed(&policy.load_targets, observed.loads);
    if !observed.loads.is_empty() && observed.loads.len() == observed.replicas {
        if needed > desired && desired < max {
            let since = *timers.above_since.get_or_insert(now);
            timers.below_since = None;
            if now.duration_since(since) >= policy.scale_up_window {
                timers.above_since = None;
                return Some((needed.min(max), Reason::Autoscaler));
            }
        } else if needed < desired && desired > min.max(1) {
            let since = *timers.below_since.get_or_insert(now);
            timers.above_since = None;
            if now.duration_since(since) >= policy.scale_down_window {
                timers.below_since = None;
                return Some((needed.max(min).max(1), Reason::Autoscaler));
            }
        } else {
            timers.above_since = None;
            timers.below_since = None;
        }
    }
    if min == 0
        && desired > 0
        && now.duration_since(timers.last_activity) >= policy.scale_to_zero_window
    {
        return Some((0, Reason::ScaleToZero));
    }
    None
}

/// The replicas the load needs now: for each target, the load summed over `loads` divided by
/// the target, rounded up; the largest of these (0 without targets). Unknown keys count
/// concurrent requests, as `concurrent_requests` does.
pub(crate) fn replicas_needed(targets: &HashMap<String, f32>, loads: &[ReplicaLoad]) -> i32 {
    targets
        .iter()
        .map(|(key, target)| {
            let total: f32 = loads
                .iter()
                .map(|l| match key.as_str() {
                    "requests_per_second" => l.requests_per_second,
                    "tokens_generated_per_second" => l.tokens_generated_per_second,
                    "kv_cache_utilization" => l.kv_cache_utilization,
                    _ => (l.in_flight_requests + l.queue_depth) as f32,
                })
                .sum();
            (total / target).ceil() as i32
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
