//! Typed configuration: defaults, then a TOML file, then `KILN_*` environment variables
//! (`__` separates sections: `KILN_IDENTITY__ADMIN_EMAIL`). Validated at start; a bad
//! value stops start-up with a message naming the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use figment::Figment;
use figment::Provider;
use figment::providers::{Env, Format, Toml};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Load(String),
    #[error("invalid configuration: {key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Something that checks its own values after loading.
pub trait Validate {
    fn validate(&self) -> Result<(), ConfigError>;
}

/// `KILN_*` variables that are not configuration: the CLI's (`KILN_API_KEY`, `KILN_ACCOUNT`,
/// `KILN_SERVER`), the asset cache the library is imported from, and the test suites'.
const NOT_CONFIGURATION: &[&str] = &["api_key", "account", "server", "asset_dir", "pg_url_base"];

/// The layered sources of configuration: the TOML `file` if given, then `KILN_*` variables.
pub fn sources(file: Option<&Path>) -> Result<Figment, ConfigError> {
    sources_with_env(file, environment())
}

fn environment() -> Env {
    Env::prefixed("KILN_").split("__").filter(|key| {
        let key = key.as_str().to_ascii_lowercase();
        !(NOT_CONFIGURATION.contains(&key.as_str()) || key.starts_with("test_"))
    })
}

fn sources_with_env(file: Option<&Path>, env: Env) -> Result<Figment, ConfigError> {
    let mut figment = Figment::new();
    if let Some(file) = file {
        if !file.exists() {
            return Err(ConfigError::invalid(
                "config file",
                format!("{} does not exist", file.display()),
            ));
        }
        figment = figment.merge(Toml::file(file));
    }
    Ok(figment.merge(env))
}

/// Reads one section (`None`: the top level) into `T` (fields left out take `T`'s serde
/// defaults) and validates it. Errors name the key, with the section in front.
pub fn section<T>(figment: &Figment, key: Option<&str>) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Validate,
{
    let focused = match key {
        Some(key) => figment.focus(key),
        None => figment.clone(),
    };
    let value: T = focused
        .extract()
        .map_err(|e| ConfigError::Load(describe_figment_error(e, key)))?;
    value.validate()?;
    Ok(value)
}

/// Refuses keys at the top level that are neither a field of `T` nor one of `sections`,
/// naming each and where it came from (the file, or the `KILN_*` variable). Sections check
/// their own keys (`#[serde(deny_unknown_fields)]`).
pub fn refuse_unknown_top_level<T: DeserializeOwned>(
    figment: &Figment,
    sections: &[&str],
) -> Result<(), ConfigError> {
    let fields = field_names::<T>();
    let Ok(top) = figment.data() else {
        return Ok(());
    };
    let mut unknown: Vec<String> = top
        .values()
        .flat_map(|dict| dict.keys())
        .filter(|key| !fields.contains(&key.as_str()) && !sections.contains(&key.as_str()))
        .map(|key| {
            let source = figment
                .find_metadata(key)
                .map(|m| source_of(m, &[key]))
                .unwrap_or_default();
            format!("{key}{source}")
        })
        .collect();
    unknown.sort();
    unknown.dedup();
    match unknown.is_empty() {
        true => Ok(()),
        false => Err(ConfigError::Load(format!(
            "unknown key {}; keys: {}, and the sections {}",
            unknown.join(", unknown key "),
            fields.join(", "),
            sections.join(", ")
        ))),
    }
}

/// Where a value came from: its file, or the `KILN_*` variable that set it.
fn source_of(metadata: &figment::Metadata, path: &[&str]) -> String {
    match &metadata.source {
        Some(figment::Source::File(file)) => format!(" (from {})", file.display()),
        Some(source) => format!(" (from {source})"),
        None if metadata.name.contains("environment") && !path.is_empty() => {
            let names: Vec<String> = path.iter().map(|p| p.to_ascii_uppercase()).collect();
            format!(" (from KILN_{})", names.join("__"))
        }
        None => format!(" (from {})", metadata.name),
    }
}

/// The field names of a struct that derives `Deserialize`, as serde knows them.
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{self, Deserializer, Visitor};

    struct Names(&'static [&'static str]);
    struct Capture<'a>(&'a mut Option<&'static [&'static str]>);

    impl<'de> Deserializer<'de> for Capture<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = Some(fields);
            Err(de::Error::custom("captured"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    let mut captured = None;
    let _ = T::deserialize(Capture(&mut captured));
    Names(captured.unwrap_or(&[])).0
}

/// Loads a whole configuration from the file and the environment.
pub trait Load: Sized {
    fn from_sources(figment: &Figment) -> Result<Self, ConfigError>;

    fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::from_sources(&sources(file)?)
    }
}

impl Load for ServerConfig {
    fn from_sources(figment: &Figment) -> Result<Self, ConfigError> {
        section(figment, None)
    }
}

fn describe_figment_error(err: figment::Error, section: Option<&str>) -> String {
    err.into_iter()
        .map(|e| {
            let path: Vec<&str> = section
                .into_iter()
                .chain(e.path.iter().map(String::as_str))
                .collect();
            let key = path.join(".");
            let source = e
                .metadata
                .as_ref()
                .map(|m| source_of(m, &path))
                .unwrap_or_default();
            if key.is_empty() {
                format!("{}{source}", e.kind)
            } else {
                format!("{key}: {}{source}", e.kind)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Settings every Kiln server shares.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct ServerConfig {
    /// Address the gRPC server listens on (`KILN_LISTEN`).
    pub listen: SocketAddr,
    /// Where state lives when no external database is configured (`KILN_DATA_DIR`).
    pub data_dir: PathBuf,
    /// `sqlite://...` or `postgres://...`; default: a SQLite file per service under `data_dir`.
    pub database_url: Option<String>,
    /// `nats://host:port`; default: the in-process bus (single-process only).
    pub nats_url: Option<String>,
    /// The JetStream stream that holds every Kiln event.
    pub nats_stream: String,
    /// OTLP/gRPC collector endpoint; tracing spans are exported there when set.
    pub otlp_endpoint: Option<String>,
    /// Credential services present to each other (`authorization: Bearer <token>`).
    pub service_token: Option<String>,
    /// More service credentials accepted from callers, never sent: a rotation without
    /// downtime first adds the new token here on every service, then makes it
    /// `service_token` with the old one here, then drops the old one.
    pub accepted_service_tokens: Vec<String>,
    /// Where services that are not identity authenticate API keys, e.g. `http://identity:7400`.
    pub identity_url: Option<String>,
    /// Where services that are not the registry read models, e.g. `http://registry:7401`.
    pub registry_url: Option<String>,
    /// Where the scheduler checks quotas and inference nodes read rate limits, e.g.
    /// `http://billing:7404`. A process that runs the scheduler or inference without billing
    /// needs it, unless `enforce_quotas` is false.
    pub billing_url: Option<String>,
    /// Whether quotas and rate limits are enforced; false lets a process without billing run
    /// without `billing_url` (nothing is then limited).
    pub enforce_quotas: bool,
    /// How long a resolved API key is trusted before asking identity again (`60s`).
    /// Deletions reach caches sooner, through events.
    #[serde(with = "crate::duration::serde")]
    #[schemars(with = "crate::duration::Text")]
    pub auth_cache_ttl: Duration,
    /// Secret that signs page tokens; default: derived from the service token.
    pub page_token_secret: Option<String>,
    /// `text` or `json` log lines.
    pub log_format: LogFormat,
    /// Where Prometheus scrapes `GET /metrics` (`KILN_METRICS_LISTEN`, e.g. `0.0.0.0:9464`);
    /// unset: no metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// On SIGTERM or Ctrl-C, how long the calls in flight (streams included) may go on once
    /// no new ones are accepted (`30s`); those still open then end as UNAVAILABLE.
    #[serde(with = "crate::duration::serde")]
    #[schemars(with = "crate::duration::Text")]
    pub shutdown_grace: Duration,
    /// PEM certificate (chain) the gRPC server presents: set with `tls_key_file`, the server
    /// speaks only TLS, and the other services reach it at `https://` URLs. Unset: plaintext.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// PEM certificates of the CAs trusted for `https://` URLs of other Kiln services (the
    /// `*_url` settings, the scheduler's, another node's). Unset: the system's roots.
    pub tls_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            data_dir: PathBuf::from(".kiln"),
            database_url: None,
            nats_url: None,
            nats_stream: "KILN".to_owned(),
            otlp_endpoint: None,
            service_token: None,
            accepted_service_tokens: Vec::new(),
            identity_url: None,
            registry_url: None,
            billing_url: None,
            enforce_quotas: true,
            auth_cache_ttl: Duration::from_secs(60),
            page_token_secret: None,
            log_format: LogFormat::Text,
            metrics_listen: None,
            shutdown_grace: Duration::from_secs(30),
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
        }
    }
}

impl ServerConfig {
    /// The database URL of `service`: the configured one, or a SQLite file under the data dir.
    pub fn database_url_for(&self, service: &str) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join(format!("{service}.db")).display()
            ),
        }
    }
}

impl Validate for ServerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "tls_key_file",
                    "is required with tls_cert_file",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "tls_cert_file",
                    "is required with tls_key_file",
                ));
            }
            _ => {}
        }
        if let Some(url) = &self.database_url
            && !(url.starts_with("sqlite:")
                || url.starts_with("postgres://")
                || url.starts_with("postgresql://"))
        {
            return Err(ConfigError::invalid(
                "database_url",
                format!("must start with sqlite:, postgres:// or postgresql://, got {url:?}"),
            ));
        }
        if let Some(url) = &self.nats_url
            && !(url.starts_with("nats://") || url.starts_with("tls://") || !url.contains("://"))
        {
            return Err(ConfigError::invalid(
                "nats_url",
                format!("must be nats://host:port, got {url:?}"),
            ));
        }
        if self.nats_stream.is_empty()
            || !self
                .nats_stream
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ConfigError::invalid(
                "nats_stream",
                "must be letters, digits, '_' or '-'",
            ));
        }
        if let Some(endpoint) = &self.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(ConfigError::invalid(
                "otlp_endpoint",
                format!("must be an http:// or https:// URL, got {endpoint:?}"),
            ));
        }
        if let Some(url) = &self.identity_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::invalid(
                "identity_url",
                format!("must be an http:// or https:// URL, got {url:?}"),
            ));
        }
        if let Some(token) = &self.service_token
            && token.len() < 16
        {
            return Err(ConfigError::invalid(
                "service_token",
                "must be at least 16 characters",
            ));
        }
        if self.accepted_service_tokens.iter().any(|t| t.len() < 16) {
            return Err(ConfigError::invalid(
                "accepted_service_tokens",
                "each must be at least 16 characters",
            ));
        }
        if self.auth_cache_ttl < Duration::from_secs(1)
            || self.auth_cache_ttl > Duration::from_secs(3600)
        {
            return Err(ConfigError::invalid(
                "auth_cache_ttl",
                "must be between 1s and 1h",
            ));
        }
        if self.shutdown_grace > Duration::from_secs(3600) {
            return Err(ConfigError::invalid("shutdown_grace", "must be at most 1h"));
        }
        Ok(())
    }
}

/// Writes the bootstrap admin key to `<data_dir>/admin.key`, readable by its owner only.
pub fn write_admin_key(data_dir: &Path, key: &str) -> std::io::Result<PathBuf> {
    let path = data_dir.join("admin.key");
    write_private_file(&path, &format!("{key}\n"))?;
    Ok(path)
}

/// Writes a secret to `path` (creating its folder), readable and writable by its owner only.
pub fn write_private_file(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path)?;
    // A file that existed before keeps its mode through open(): narrow it.
    #[cfg(unix)]
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(contents.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An env provider that sees nothing, so tests do not depend on the shell's `KILN_*`.
    fn no_env() -> Env {
        Env::prefixed("KILN_CONFIG_TEST_UNSET_PREFIX_")
    }

    #[test]
    fn toml_then_validation_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kiln.toml");
        let load = |toml: &str| {
            std::fs::write(&file, toml).unwrap();
            section::<ServerConfig>(&sources_with_env(Some(&file), no_env()).unwrap(), None)
        };
        let err = load("listen = \"127.0.0.1:9000\"\nauth_cache_ttl = \"0s\"\n").unwrap_err();
        assert!(err.to_string().contains("auth_cache_ttl"), "{err}");

        let err = load("auth_cache_ttl = \"60\"\n").unwrap_err();
        assert!(
            err.to_string().contains("auth_cache_ttl") && err.to_string().contains("missing unit"),
            "{err}"
        );

        let err = load("listen = \"not an address\"\n").unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");

        let ok = load("listen = \"127.0.0.1:9000\"\n").unwrap();
        assert_eq!(ok.listen.port(), 9000);

        // A certificate without its key (and the reverse) names the missing one.
        let err = load("tls_cert_file = \"cert.pem\"\n").unwrap_err();
        assert!(err.to_string().contains("tls_key_file"), "{err}");
        let err = load("tls_key_file = \"key.pem\"\n").unwrap_err();
        assert!(err.to_string().contains("tls_cert_file"), "{err}");
        // Files that cannot be read, or are not PEM, are named when the server starts.
        let ok =
            load("tls_cert_file = \"/nonexistent.pem\"\ntls_key_file = \"/nonexistent.key\"\n");
        let err = crate::tls::server_config(&ok.unwrap()).unwrap_err();
        assert!(err.to_string().contains("tls_cert_file"), "{err}");
        std::fs::write(dir.path().join("ca.pem"), "not a certificate").unwrap();
        let ca = dir.path().join("ca.pem").display().to_string();
        let ok = load(&format!("tls_ca_file = {ca:?}\n")).unwrap();
        let err = crate::tls::trust_configured(&ok).unwrap_err();
        assert!(
            err.to_string().contains("tls_ca_file") && err.to_string().contains("not PEM"),
            "{err}"
        );
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Section {
        #[allow(dead_code)]
        size: u32,
    }

    #[test]
    fn unknown_keys_are_named_with_their_source() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kiln.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\nlisten_adress = 1\n[section]\nsize = 1\n",
        )
        .unwrap();
        let figment = sources_with_env(Some(&file), no_env()).unwrap();
        let err = refuse_unknown_top_level::<ServerConfig>(&figment, &["section"]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("unknown key listen_adress"), "{text}");
        assert!(text.contains("kiln.toml"), "{text}");
        assert!(!text.contains("unknown key listen "), "{text}");

        std::fs::write(&file, "[section]\nsize = 1\nsise = 2\n").unwrap();
        let figment = sources_with_env(Some(&file), no_env()).unwrap();
        refuse_unknown_top_level::<ServerConfig>(&figment, &["section"]).unwrap();
        let err = figment
            .focus("section")
            .extract::<Section>()
            .map_err(|e| describe_figment_error(e, Some("section")))
            .unwrap_err();
        assert!(err.contains("section.sise"), "{err}");
    }

    #[test]
    fn serde_reports_the_fields_of_a_struct() {
        let names = field_names::<ServerConfig>();
        assert!(names.contains(&"listen") && names.contains(&"billing_url"));
        assert!(field_names::<u32>().is_empty());
    }

    #[test]
    fn bad_database_url_is_refused() {
        let cfg = ServerConfig {
            database_url: Some("mysql://x".into()),
            ..ServerConfig::default()
        };
        let err = cfg.validate().unwrap_err();
        assert!(err.to_string().contains("database_url"), "{err}");
    }
}
