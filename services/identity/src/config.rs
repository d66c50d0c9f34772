//! Identity's configuration: the shared server settings plus its own `[identity]` section.

use kiln_core::config::{ConfigError, Validate};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {
    /// Email of the platform admin user created on first start (`KILN_IDENTITY__ADMIN_EMAIL`).
    pub admin_email: String,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            admin_email: "admin@kiln.local".to_owned(),
        }
    }
}

impl Validate for IdentityConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        crate::rules::validate_email("identity.admin_email", &self.admin_email)
            .map_err(|e| ConfigError::invalid("identity.admin_email", e.to_string()))
    }
}
