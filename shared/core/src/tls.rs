//! TLS between Kiln services (rustls): the server's certificate and key, and the CAs a
//! process trusts when it calls another service at an `https://` URL. The trust is set once
//! at start for the whole process, so every channel the process opens (to identity, to the
//! registry, node to node) uses it without each caller passing it along.

use std::path::Path;
use std::sync::RwLock;

pub use tonic::transport::ServerTlsConfig;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::config::ServerConfig;
use crate::error::Error;

/// The CAs `https://` endpoints of this process trust; None: the system's roots.
static TRUSTED: RwLock<Option<Certificate>> = RwLock::new(None);

fn read(key: &str, path: &Path) -> Result<Vec<u8>, Error> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::invalid(key, format!("cannot read {}: {e}", path.display())))?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
        return Err(Error::invalid(
            key,
            format!("{} is not PEM", path.display()),
        ));
    }
    Ok(bytes)
}

/// Trusts the CAs in `pem` (PEM certificates) for every `https://` endpoint made after.
pub fn trust(pem: &[u8]) {
    *TRUSTED.write().expect("not poisoned") = Some(Certificate::from_pem(pem));
}

/// Reads the configured CA file (if any) and trusts it: see [`trust`].
pub fn trust_configured(server: &ServerConfig) -> Result<(), Error> {
    if let Some(path) = &server.tls_ca_file {
        trust(&read("tls_ca_file", path)?);
    }
    Ok(())
}

/// The client TLS of an `https://` endpoint: the trusted CAs, or the system's roots.
pub(crate) fn client_config() -> ClientTlsConfig {
    match TRUSTED.read().expect("not poisoned").clone() {
        Some(ca) => ClientTlsConfig::new().ca_certificate(ca),
        None => ClientTlsConfig::new().with_native_roots(),
    }
}

/// The server's TLS from its certificate and key files; None when they are not set.
pub fn server_config(server: &ServerConfig) -> Result<Option<ServerTlsConfig>, Error> {
    let (Some(cert), Some(key)) = (&server.tls_cert_file, &server.tls_key_file) else {
        return Ok(None);
    };
    let identity = Identity::from_pem(read("tls_cert_file", cert)?, read("tls_key_file", key)?);
    Ok(Some(ServerTlsConfig::new().identity(identity)))
}
