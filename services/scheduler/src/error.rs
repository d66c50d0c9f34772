//! The scheduler's errors and their one mapping to `tonic::Status`.

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
    List(#[from] kiln_store::listing::ListError),
    #[error(transparent)]
    Events(#[from] kiln_events::Error),
    /// A call to another service failed.
    #[error("{0}")]
    Remote(Status),
    #[error("{0}")]
    Startup(String),
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Api(api) => api.into(),
            Error::Events(events) => kiln_core::Error::from(events).into(),
            Error::List(kiln_store::listing::ListError::Request(api)) => api.into(),
            Error::Remote(status) => status,
            other => kiln_core::Error::Internal(other.to_string()).into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
