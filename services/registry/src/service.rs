//! The registry's shared state and small helpers its operations use.

use kiln_core::Error;
use std::sync::Arc;

use kiln_core::page::PageTokens;
use kiln_events::records::{HasRecords, Records};
use sea_orm::DatabaseConnection;

use crate::artifacts::Artifacts;
use crate::config::RegistryConfig;
use crate::preparers::Preparers;
use kiln_core::Result;

/// The service's name in the outbox and migrations.
pub const SERVICE: &str = "registry";

/// The registry, shared by its handlers.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    records: Records,
    artifacts: Artifacts,
    config: RegistryConfig,
    preparers: Preparers,
}

impl HasRecords for Registry {
    fn records(&self) -> &Records {
        &self.inner.records
    }
}

impl Registry {
    pub(crate) fn new(
        db: DatabaseConnection,
        pages: PageTokens,
        artifacts: Artifacts,
        config: RegistryConfig,
        preparers: Preparers,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                records: Records::new(SERVICE, db, pages),
                artifacts,
                config,
                preparers,
            }),
        }
    }

    pub(crate) fn preparers(&self) -> &Preparers {
        &self.inner.preparers
    }

    pub fn artifacts(&self) -> &Artifacts {
        &self.inner.artifacts
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.inner.config
    }
}

/// Checks a file path inside a model: relative, '/'-separated, no `..`, at most 256 bytes.
pub(crate) fn validate_file_path(field: &str, path: &str) -> Result<(), Error> {
    let ok = !path.is_empty()
        && path.len() <= 256
        && !path.starts_with('/')
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c))
        });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "{path:?} is not a relative file path of letters, digits, '.', '_', '-', '+' and '/'"
            ),
        ))
    }
}

/// Checks a declared SHA-256: 64 lowercase hex digits.
pub(crate) fn validate_sha256(field: &str, sha: &str) -> Result<(), Error> {
    if sha.len() == 64
        && sha
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            "must be 64 lowercase hex digits (SHA-256)",
        ))
    }
}
