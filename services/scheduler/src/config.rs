//! The scheduler's `[scheduler]` configuration section. Durations are written as text
//! (`2s`, `7d`).

use std::time::Duration;

use kiln_core::config::{ConfigError, Validate};
use kiln_core::duration;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// How often nodes send a heartbeat (told to each node when it registers).
    #[serde(with = "duration::serde")]
    #[schemars(with = "duration::Text")]
    pub heartbeat_interval: Duration,
    /// A node whose last heartbeat is older than this is lost: its replicas are placed
    /// elsewhere.
    #[serde(with = "duration::serde")]
    #[schemars(with = "duration::Text")]
    pub node_lost_after: Duration,
    /// How often the reconcile pass runs when nothing wakes it sooner (autoscaling, lost
    /// nodes, placement retries).
    #[serde(with = "duration::serde")]
    #[schemars(with = "duration::Text")]
    pub reconcile_interval: Duration,
    /// How long a soft-deleted deployment can be undeleted.
    #[serde(with = "duration::serde")]
    #[schemars(with = "duration::Text")]
    pub purge_after: Duration,
    /// How long an unloading replica may finish its in-flight requests.
    #[serde(with = "duration::serde")]
    #[schemars(with = "duration::Text")]
    pub drain_timeout: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(2),
            node_lost_after: Duration::from_secs(10),
            reconcile_interval: Duration::from_secs(1),
            purge_after: Duration::from_secs(7 * 24 * 3600),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

impl Validate for SchedulerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let at_least = |key: &str, value: Duration, least: Duration| {
            if value < least {
                return Err(ConfigError::invalid(
                    format!("scheduler.{key}"),
                    format!("must be at least {}", duration::format(least)),
                ));
            }
            Ok(())
        };
        at_least(
            "heartbeat_interval",
            self.heartbeat_interval,
            Duration::from_millis(10),
        )?;
        at_least(
            "reconcile_interval",
            self.reconcile_interval,
            Duration::from_millis(10),
        )?;
        if self.node_lost_after < 2 * self.heartbeat_interval {
            return Err(ConfigError::invalid(
                "scheduler.node_lost_after",
                format!(
                    "must be at least twice heartbeat_interval ({}), so one late heartbeat does not lose a node",
                    duration::format(2 * self.heartbeat_interval)
                ),
            ));
        }
        Ok(())
    }
}
