//! The scheduler's `[scheduler]` configuration section.

use kiln_core::config::{ConfigError, Validate};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// How often nodes send a heartbeat (told to each node when it registers).
    pub heartbeat_interval_ms: u64,
    /// A node whose last heartbeat is older than this is lost: its replicas are placed
    /// elsewhere.
    pub node_lost_after_ms: u64,
    /// How often the reconcile pass runs when nothing wakes it sooner (autoscaling, lost
    /// nodes, placement retries).
    pub reconcile_interval_ms: u64,
    /// How long a soft-deleted deployment can be undeleted.
    pub purge_after_secs: u64,
    /// How long an unloading replica may finish its in-flight requests.
    pub drain_timeout_secs: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 2_000,
            node_lost_after_ms: 10_000,
            reconcile_interval_ms: 1_000,
            purge_after_secs: 7 * 24 * 3600,
            drain_timeout_secs: 30,
        }
    }
}

impl SchedulerConfig {
    pub fn heartbeat_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.heartbeat_interval_ms)
    }

    pub fn node_lost_after(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.node_lost_after_ms)
    }

    pub fn reconcile_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.reconcile_interval_ms)
    }
}

impl Validate for SchedulerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat_interval_ms < 10 {
            return Err(ConfigError::invalid(
                "scheduler.heartbeat_interval_ms",
                "must be at least 10",
            ));
        }
        if self.node_lost_after_ms < 2 * self.heartbeat_interval_ms {
            return Err(ConfigError::invalid(
                "scheduler.node_lost_after_ms",
                format!(
                    "must be at least twice heartbeat_interval_ms ({}), so one late heartbeat does not lose a node",
                    2 * self.heartbeat_interval_ms
                ),
            ));
        }
        if self.reconcile_interval_ms < 10 {
            return Err(ConfigError::invalid(
                "scheduler.reconcile_interval_ms",
                "must be at least 10",
            ));
        }
        Ok(())
    }
}
