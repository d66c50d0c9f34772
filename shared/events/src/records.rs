//! What a service that keeps resources holds: its database, the outbox that publishes their
//! changes with them, and the signer of its listings' page tokens.

use kiln_core::page::PageTokens;
use sea_orm::DatabaseConnection;

use crate::outbox::Outbox;

/// A service's database, outbox and page tokens.
pub struct Records {
    db: DatabaseConnection,
    outbox: Outbox,
    pages: PageTokens,
}

impl Records {
    /// The records of `service` (its name in the outbox).
    pub fn new(service: &'static str, db: DatabaseConnection, pages: PageTokens) -> Self {
        Self {
            db,
            outbox: Outbox::new(service),
            pages,
        }
    }
}

/// A service's way to its [`Records`].
pub trait HasRecords {
    fn records(&self) -> &Records;

    fn db(&self) -> &DatabaseConnection {
        &self.records().db
    }

    fn outbox(&self) -> &Outbox {
        &self.records().outbox
    }

    fn pages(&self) -> &PageTokens {
        &self.records().pages
    }
}
