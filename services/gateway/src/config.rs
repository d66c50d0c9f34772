//! The gateway's `[gateway]` configuration.

use std::net::SocketAddr;
use std::time::Duration;

use kiln_core::config::{ConfigError, Validate};
use kiln_core::duration;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Where the HTTP edge listens (the public REST API, `/v1` and `/inference/v1`).
    pub listen: SocketAddr,
    /// The gRPC API the edge transcodes to, every service at one address. Empty: this
    /// process's own gRPC server (the gateway beside the services, as in `kiln dev`).
    pub grpc_url: String,
    /// Where identity answers, when the services run apart (empty: `grpc_url`).
    pub identity_url: String,
    /// Where the registry answers (empty: `grpc_url`).
    pub registry_url: String,
    /// Where the scheduler answers (empty: `grpc_url`).
    pub scheduler_url: String,
    /// Where billing answers (empty: `grpc_url`).
    pub billing_url: String,
    /// Where inference answers: any inference node (empty: `grpc_url`).
    pub inference_url: String,
    /// The base URL clients reach the edge at, used in the signed upload and download URLs
    /// it hands out. Empty: `http://` + the bound address.
    pub public_url: String,
    /// The secret that signs upload and download URLs (HMAC-SHA256). Empty: the service
    /// token when one is set, else a random secret per start (URLs die with the process).
    pub url_signing_secret: String,
    /// How long a signed upload or download URL stays valid.
    #[serde(with = "duration::serde")]
    #[schemars(with = "duration::Text")]
    pub signed_url_ttl: Duration,
    /// The largest upload (a multipart dataset or a PUT to a signed URL); the bytes are
    /// spooled to disk on their way to the registry.
    pub max_upload_bytes: u64,
    /// The largest JSON request body (held in memory while it is transcoded).
    pub max_json_bytes: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            grpc_url: String::new(),
            identity_url: String::new(),
            registry_url: String::new(),
            scheduler_url: String::new(),
            billing_url: String::new(),
            inference_url: String::new(),
            public_url: String::new(),
            url_signing_secret: String::new(),
            signed_url_ttl: Duration::from_secs(3600),
            max_upload_bytes: 1 << 30,
            max_json_bytes: 16 << 20,
        }
    }
}

/// The services the edge calls, by the area of their package (`kiln.<area>.v1`).
pub const AREAS: [&str; 5] = ["identity", "registry", "scheduler", "billing", "inference"];

impl GatewayConfig {
    /// Where the services of `area` answer; None when neither its own URL nor `grpc_url`
    /// is set.
    pub fn url_of(&self, area: &str) -> Option<&str> {
        let own = match area {
            "identity" => &self.identity_url,
            "registry" => &self.registry_url,
            "scheduler" => &self.scheduler_url,
            "billing" => &self.billing_url,
            "inference" => &self.inference_url,
            _ => return None,
        };
        [own, &self.grpc_url]
            .into_iter()
            .find(|u| !u.is_empty())
            .map(String::as_str)
    }

    /// The areas without a URL (all of them when the edge runs beside the whole API).
    pub fn unreached(&self) -> Vec<&'static str> {
        AREAS
            .into_iter()
            .filter(|a| self.url_of(a).is_none())
            .collect()
    }
}

impl Validate for GatewayConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let url = &self.public_url;
        if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ConfigError::invalid(
                "gateway.public_url",
                format!("must be an http(s) URL, got {:?}", self.public_url),
            ));
        }
        if self.signed_url_ttl < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "gateway.signed_url_ttl",
                "must be at least 1s",
            ));
        }
        for (key, value) in [
            ("gateway.max_upload_bytes", self.max_upload_bytes),
            ("gateway.max_json_bytes", self.max_json_bytes),
        ] {
            if value < 1024 {
                return Err(ConfigError::invalid(key, "must be at least 1024"));
            }
        }
        Ok(())
    }
}
