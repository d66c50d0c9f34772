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
    /// The gRPC API the edge transcodes to. Empty: this process's own gRPC server (the
    /// gateway runs beside the services, as in `kiln dev`).
    pub grpc_url: String,
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
    /// The largest request body (JSON, a multipart upload or a PUT to a signed URL).
    pub max_body_bytes: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            grpc_url: String::new(),
            public_url: String::new(),
            url_signing_secret: String::new(),
            signed_url_ttl: Duration::from_secs(3600),
            max_body_bytes: 1 << 30,
        }
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
        if self.max_body_bytes < 1024 {
            return Err(ConfigError::invalid(
                "gateway.max_body_bytes",
                "must be at least 1024",
            ));
        }
        Ok(())
    }
}
