//! The configuration of a Kiln process: the shared server settings and one section per
//! service, and what each service needs from the others when they run elsewhere.

use kiln_billing::config::BillingConfig;
use std::path::Path;

use kiln_core::config::{ConfigError, Figment, ServerConfig, refuse_unknown_top_level, section};
use kiln_gateway::GatewayConfig;
use kiln_identity::config::IdentityConfig;
use kiln_inference::config::InferenceConfig;
use kiln_registry::config::RegistryConfig;
use kiln_scheduler::config::SchedulerConfig;

use crate::roles::{Role, Roles};

/// The top level (shared server settings) and one section per service.
#[derive(Debug, Clone, Default)]
pub struct KilnConfig {
    pub server: ServerConfig,
    pub identity: IdentityConfig,
    pub registry: RegistryConfig,
    pub inference: InferenceConfig,
    pub scheduler: SchedulerConfig,
    pub billing: BillingConfig,
    pub gateway: GatewayConfig,
    /// Import the public library from the asset cache at start and put it on serverless
    /// deployments (`kiln dev` does; needs the registry and the scheduler in process).
    pub import_library: bool,
}

/// The sections of a configuration, one per service.
const SECTIONS: [&str; 6] = [
    "identity",
    "registry",
    "scheduler",
    "billing",
    "inference",
    "gateway",
];

impl KilnConfig {
    /// Loads the configuration of a process that runs `roles`: the TOML `file`, then `KILN_*`
    /// variables. Unknown keys are refused; only the sections of `roles` are read and
    /// validated (a bad `[billing]` value does not stop a registry); what `roles` need from
    /// the services they call is checked.
    pub fn load(file: Option<&Path>, roles: Roles) -> Result<Self, ConfigError> {
        Self::from_sources(&kiln_core::config::sources(file)?, roles)
    }

    fn from_sources(figment: &Figment, roles: Roles) -> Result<Self, ConfigError> {
        refuse_unknown_top_level::<ServerConfig>(figment, &SECTIONS)?;
        let mut config = Self {
            server: section(figment, None)?,
            ..Self::default()
        };
        for role in roles.iter() {
            match role {
                Role::Identity => config.identity = section(figment, Some("identity"))?,
                Role::Registry => config.registry = section(figment, Some("registry"))?,
                Role::Scheduler => config.scheduler = section(figment, Some("scheduler"))?,
                Role::Billing => config.billing = section(figment, Some("billing"))?,
                Role::Inference => config.inference = section(figment, Some("inference"))?,
                Role::Gateway => config.gateway = section(figment, Some("gateway"))?,
            }
        }
        config.check_roles(roles)?;
        Ok(config)
    }

    /// Checks that every service `roles` runs can reach the services it calls: those not in
    /// this process need their URL, and any remote call needs the service credential.
    pub fn check_roles(&self, roles: Roles) -> Result<(), ConfigError> {
        if roles.is_empty() {
            return Err(ConfigError::invalid(
                "services",
                "name at least one service",
            ));
        }
        let server = &self.server;
        let needs = |role: Role| roles.iter().any(|r| calls(r).contains(&role));
        let remote = |role: Role| needs(role) && !roles.has(role);
        let mut missing = Vec::new();
        if !roles.has(Role::Identity) && server.identity_url.is_none() {
            missing.push(("identity_url", "to authenticate API keys with identity"));
        }
        if remote(Role::Registry) && server.registry_url.is_none() {
            missing.push(("registry_url", "to read models from the registry"));
        }
        if remote(Role::Billing) && server.billing_url.is_none() && server.enforce_quotas {
            missing.push((
                "billing_url",
                "to check quotas with billing (or set enforce_quotas = false)",
            ));
        }
        // The edge calls the whole gRPC API: here, or at its grpc_url.
        let api_here = Role::ALL
            .iter()
            .all(|r| *r == Role::Gateway || roles.has(*r));
        let unreached = self.gateway.unreached();
        if roles.has(Role::Gateway) && !api_here && !unreached.is_empty() {
            missing.push((
                "gateway.grpc_url",
                "(or each of gateway.identity_url, registry_url, scheduler_url, billing_url, \
                 inference_url) to reach the gRPC API the edge transcodes to",
            ));
        }
        if let Some((key, why)) = missing.first() {
            return Err(ConfigError::invalid(
                *key,
                format!("is required {why}, which this process does not run (it runs {roles})"),
            ));
        }
        let calls_out = server.identity_url.is_some()
            || remote(Role::Registry)
            || (remote(Role::Billing) && server.billing_url.is_some())
            || (roles.has(Role::Inference) && !self.inference.scheduler_url.is_empty());
        if calls_out && server.service_token.is_none() {
            return Err(ConfigError::invalid(
                "service_token",
                format!("is required: {roles} call other Kiln services with it"),
            ));
        }
        if self.import_library && !(roles.has(Role::Registry) && roles.has(Role::Scheduler)) {
            return Err(ConfigError::invalid(
                "import_library",
                "needs the registry and the scheduler in this process",
            ));
        }
        Ok(())
    }
}

/// The services a service calls.
fn calls(role: Role) -> &'static [Role] {
    match role {
        Role::Identity | Role::Registry | Role::Billing => &[],
        Role::Scheduler => &[Role::Registry, Role::Billing],
        Role::Inference => &[Role::Registry, Role::Billing],
        // Over gateway.grpc_url, checked apart.
        Role::Gateway => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roles(names: &[Role]) -> Roles {
        names.iter().copied().collect()
    }

    #[test]
    fn everything_in_one_process_needs_nothing_else() {
        KilnConfig::default().check_roles(Roles::all()).unwrap();
    }

    #[test]
    fn a_service_alone_names_what_it_lacks() {
        let mut config = KilnConfig::default();
        let err = config.check_roles(roles(&[Role::Registry])).unwrap_err();
        assert!(err.to_string().contains("identity_url"), "{err}");

        config.server.identity_url = Some("http://identity:7400".into());
        let err = config.check_roles(roles(&[Role::Registry])).unwrap_err();
        assert!(err.to_string().contains("service_token"), "{err}");

        config.server.service_token = Some("a-long-enough-service-token".into());
        config.check_roles(roles(&[Role::Registry])).unwrap();

        let err = config.check_roles(roles(&[Role::Scheduler])).unwrap_err();
        assert!(err.to_string().contains("registry_url"), "{err}");
        config.server.registry_url = Some("http://registry:7400".into());
        let err = config.check_roles(roles(&[Role::Scheduler])).unwrap_err();
        assert!(err.to_string().contains("billing_url"), "{err}");
        config.server.enforce_quotas = false;
        config.check_roles(roles(&[Role::Scheduler])).unwrap();
        config.server.enforce_quotas = true;
        config.server.billing_url = Some("http://billing:7400".into());
        config
            .check_roles(roles(&[Role::Scheduler, Role::Inference]))
            .unwrap();
    }

    #[test]
    fn an_edge_apart_from_the_api_needs_its_urls() {
        let mut config = KilnConfig::default();
        config.server.identity_url = Some("http://identity:7400".into());
        config.server.service_token = Some("a-long-enough-service-token".into());
        let err = config.check_roles(roles(&[Role::Gateway])).unwrap_err();
        assert!(err.to_string().contains("gateway.grpc_url"), "{err}");
        for area in kiln_gateway::config::AREAS {
            let key = format!("{area}_url");
            let mut apart = config.gateway.clone();
            for other in kiln_gateway::config::AREAS.iter().filter(|a| **a != area) {
                let url = format!("http://{other}:7400");
                match *other {
                    "identity" => apart.identity_url = url,
                    "registry" => apart.registry_url = url,
                    "scheduler" => apart.scheduler_url = url,
                    "billing" => apart.billing_url = url,
                    _ => apart.inference_url = url,
                }
            }
            assert_eq!(apart.unreached(), [area], "{key}");
        }
        config.gateway.grpc_url = "http://envoy:7400".into();
        config.check_roles(roles(&[Role::Gateway])).unwrap();
        KilnConfig::default().check_roles(Roles::all()).unwrap();
    }

    #[test]
    fn the_library_import_needs_registry_and_scheduler_here() {
        let config = KilnConfig {
            import_library: true,
            ..KilnConfig::default()
        };
        config.check_roles(Roles::all()).unwrap();
        let err = config
            .check_roles(roles(&[Role::Identity, Role::Registry]))
            .unwrap_err();
        assert!(err.to_string().contains("import_library"), "{err}");
    }

    fn figment(toml: &str) -> Figment {
        use figment::providers::Format;
        Figment::new().merge(figment::providers::Toml::string(toml))
    }

    #[test]
    fn a_service_reads_only_its_own_section() {
        let toml = "identity_url = \"http://identity:7400\"\n\
                    service_token = \"a-long-enough-service-token\"\n\
                    [billing]\ningest_batch = \"many\"\n\
                    [registry]\nmax_file_bytes = 1024\n";
        let registry = KilnConfig::from_sources(&figment(toml), roles(&[Role::Registry])).unwrap();
        assert_eq!(registry.registry.max_file_bytes, 1024);
        let err = KilnConfig::from_sources(&figment(toml), roles(&[Role::Billing])).unwrap_err();
        assert!(err.to_string().contains("billing.ingest_batch"), "{err}");
    }

    #[test]
    fn an_unknown_section_or_key_stops_the_load() {
        let err =
            KilnConfig::from_sources(&figment("[biling]\nx = 1\n"), Roles::all()).unwrap_err();
        assert!(err.to_string().contains("unknown key biling"), "{err}");
        let err =
            KilnConfig::from_sources(&figment("[registry]\nmax_file_byte = 1\n"), Roles::all())
                .unwrap_err();
        assert!(err.to_string().contains("registry.max_file_byte"), "{err}");
    }

    #[test]
    fn the_example_configuration_loads_for_every_service() {
        use figment::providers::Format;
        let example = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/kiln.example.toml"
        );
        let figment = Figment::new().merge(figment::providers::Toml::file(example));
        let config = KilnConfig::from_sources(&figment, Roles::all()).unwrap();
        assert_eq!(
            config.scheduler.purge_after,
            std::time::Duration::from_secs(7 * 86_400)
        );
    }

    #[test]
    fn no_service_is_an_error() {
        let err = KilnConfig::default()
            .check_roles(Roles::default())
            .unwrap_err();
        assert!(err.to_string().contains("at least one"), "{err}");
    }
}
