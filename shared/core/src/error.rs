//! The errors an API handler returns, and their one mapping to `tonic::Status`.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// An API error in google.rpc terms. Service crates wrap it in their own error enum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A request field is malformed or out of range; `field` names it (e.g. `user.email`).
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// Also returned for another account's private resource, so existence never leaks.
    #[error("{resource} not found")]
    NotFound { resource: String },
    #[error("{resource} already exists")]
    AlreadyExists { resource: String },
    #[error("{0}")]
    FailedPrecondition(String),
    /// A quota or rate limit; `retry_after` goes into google.rpc.RetryInfo.
    #[error("{message}")]
    ResourceExhausted {
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn not_found(resource: impl std::fmt::Display) -> Self {
        Self::NotFound {
            resource: resource.to_string(),
        }
    }

    pub fn already_exists(resource: impl std::fmt::Display) -> Self {
        Self::AlreadyExists {
            resource: resource.to_string(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::NotFound { .. } => Code::NotFound,
            Self::AlreadyExists { .. } => Code::AlreadyExists,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::ResourceExhausted { .. } => Code::ResourceExhausted,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let code = err.code();
        let message = err.to_string();
        match err {
            Error::InvalidArgument { field, reason } => Status::with_error_details(
                code,
                message,
                ErrorDetails::with_bad_request_violation(field, reason),
            ),
            Error::ResourceExhausted {
                retry_after: Some(delay),
                ..
            } => Status::with_error_details(
                code,
                message,
                ErrorDetails::with_retry_info(Some(delay)),
            ),
            Error::Internal(_) => {
                tracing::error!(error = %message, "internal error");
                Status::new(code, message)
            }
            _ => Status::new(code, message),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
