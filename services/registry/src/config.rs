//! The registry's `[registry]` configuration section.

use kiln_core::config::{ConfigError, Validate};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Where artifacts live: empty for the local file system under `<data_dir>/objects`, or
    /// `s3://bucket[/prefix]` for any S3-compatible store (credentials and endpoint from the
    /// usual AWS_* variables, e.g. AWS_ENDPOINT for MinIO).
    pub object_store_url: String,
    /// The largest single file an upload may declare.
    pub max_file_bytes: u64,
    /// The largest dataset file.
    pub max_dataset_bytes: u64,
    /// The S3 endpoint (MinIO, another S3-compatible store); empty: `AWS_ENDPOINT`, else AWS.
    pub s3_endpoint: String,
    /// Empty: `AWS_REGION`.
    pub s3_region: String,
    /// Empty: `AWS_ACCESS_KEY_ID`.
    pub s3_access_key_id: String,
    /// Empty: `AWS_SECRET_ACCESS_KEY`.
    pub s3_secret_access_key: String,
    /// Allow a plain-http endpoint (MinIO or a local test server).
    pub s3_allow_http: bool,
    /// Where the public library is imported from on first start (`kiln dev`): the asset cache
    /// `deploy/fetch-assets.sh` fills. Empty: `$KILN_ASSET_DIR`, else `~/.cache/kiln/assets`.
    pub asset_dir: String,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            object_store_url: String::new(),
            max_file_bytes: 64 << 30,
            max_dataset_bytes: 4 << 30,
            asset_dir: String::new(),
            s3_endpoint: String::new(),
            s3_region: String::new(),
            s3_access_key_id: String::new(),
            s3_secret_access_key: String::new(),
            s3_allow_http: false,
        }
    }
}

impl Validate for RegistryConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(self.object_store_url.is_empty() || self.object_store_url.starts_with("s3://")) {
            return Err(ConfigError::invalid(
                "registry.object_store_url",
                format!(
                    "must be empty (local files) or s3://bucket[/prefix], got {:?}",
                    self.object_store_url
                ),
            ));
        }
        if self.max_file_bytes == 0 {
            return Err(ConfigError::invalid(
                "registry.max_file_bytes",
                "must be positive",
            ));
        }
        if self.max_dataset_bytes == 0 {
            return Err(ConfigError::invalid(
                "registry.max_dataset_bytes",
                "must be positive",
            ));
        }
        Ok(())
    }
}
