//! The inference service's errors and their one mapping to `tonic::Status`.

use tonic::Status;

use crate::backend::BackendError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Api(#[from] kiln_core::Error),
    /// A backend failed: INTERNAL with the backend's message.
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
    #[error(transparent)]
    Store(#[from] kiln_store::Error),
    #[error(transparent)]
    Events(#[from] kiln_events::Error),
    #[error("file system: {0}")]
    Io(#[from] std::io::Error),
    /// A call to another service failed with this status.
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
            Error::Remote(status) => status,
            Error::Backend(backend) => kiln_core::Error::ModelFailed(backend.to_string()).into(),
            other => kiln_core::Error::Internal(other.to_string()).into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
