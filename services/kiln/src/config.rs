//! `kiln`'s configuration: the shared server settings and each service's section.

use kiln_billing::config::BillingConfig;
use kiln_core::config::{ConfigError, Load, ServerConfig, section};
use kiln_identity::config::IdentityConfig;
use kiln_inference::config::InferenceConfig;
use kiln_registry::config::RegistryConfig;
use kiln_scheduler::config::SchedulerConfig;

/// The top level (shared server settings) and one section per service.
#[derive(Debug, Clone, Default)]
pub struct KilnConfig {
    pub server: ServerConfig,
    pub identity: IdentityConfig,
    pub registry: RegistryConfig,
    pub inference: InferenceConfig,
    pub scheduler: SchedulerConfig,
    pub billing: BillingConfig,
    /// Import the public library from the asset cache at start (`kiln dev` does).
    pub import_library: bool,
}

impl Load for KilnConfig {
    fn from_sources(figment: &kiln_core::config::Figment) -> Result<Self, ConfigError> {
        Ok(Self {
            server: section(figment, None)?,
            identity: section(figment, Some("identity"))?,
            registry: section(figment, Some("registry"))?,
            inference: section(figment, Some("inference"))?,
            scheduler: section(figment, Some("scheduler"))?,
            billing: section(figment, Some("billing"))?,
            import_library: false,
        })
    }
}

impl KilnConfig {
    /// Identity's own view of this configuration.
    pub fn identity_config(&self) -> kiln_identity::config::Config {
        kiln_identity::config::Config {
            server: self.server.clone(),
            identity: self.identity.clone(),
        }
    }
}
