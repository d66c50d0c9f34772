//! Billing's errors and their one mapping to `tonic::Status`.

use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Api(#[from] kiln_core::Error),
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
    #[error(transparent)]
    Store(#[from] kiln_store::Error),
    #[error(transparent)]
    Events(#[from] kiln_events::Error),
    #[error("{0}")]
    Startup(String),
    /// A concurrent change won; retrying the operation will see it.
    #[error("{0}")]
    Contended(String),
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Api(api) => api.into(),
            Error::Events(events) => kiln_core::Error::from(events).into(),
            Error::Contended(message) => Status::aborted(message),
            other => kiln_core::Error::Internal(other.to_string()).into(),
        }
    }
}

impl From<Error> for kiln_events::Error {
    fn from(err: Error) -> Self {
        match err {
            Error::Events(events) => events,
            Error::Database(db) => kiln_events::Error::Database(db),
            other => kiln_events::Error::Handler(other.to_string()),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
