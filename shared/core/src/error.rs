//! The one error type of Kiln's services, and its one mapping to `tonic::Status`.
//!
//! Handlers return [`Error`]; what the caller may see is decided here and nowhere else: a bad
//! request names its field, another account's resource is NOT_FOUND, and an internal failure
//! (database, I/O, a bug) is logged with an error id while the caller gets INTERNAL with that id
//! and never the underlying text. A status that comes back from another service is
//! re-classified by [`Error::from_peer`]: a peer's UNAUTHENTICATED is about this service's
//! credential, not the caller's key.

use std::fmt::Display;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// An API error in google.rpc terms.
#[derive(Debug, Clone, thiserror::Error)]
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
    /// A concurrent change won; the operation can be retried and will see it.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unavailable(String),
    /// A failure that is not the caller's: its text is for the log only.
    #[error("{0}")]
    Internal(String),
    /// The model itself failed on the request's input (a backend's error, e.g. a token id
    /// beyond an embedding table): INTERNAL, with the backend's message, which is about the
    /// input and the graph rather than the service.
    #[error("{0}")]
    ModelFailed(String),
    /// Another service's (or node's) answer about the caller's own request, passed on as it
    /// came, details included.
    #[error("{}", .0.message())]
    Relayed(Status),
}

impl Error {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn not_found(resource: impl Display) -> Self {
        Self::NotFound {
            resource: resource.to_string(),
        }
    }

    pub fn already_exists(resource: impl Display) -> Self {
        Self::AlreadyExists {
            resource: resource.to_string(),
        }
    }

    /// An internal failure: `what` was being done when `err` happened.
    pub fn internal(what: impl Display, err: impl Display) -> Self {
        Self::Internal(format!("{what}: {err}"))
    }

    /// A failed call `call` (e.g. `registry GetModel`) to another Kiln service, as this
    /// service's caller should see it:
    /// - what the peer said about the request itself (not found, invalid, exists, a failed
    ///   precondition, exhausted, aborted) is passed on as it came;
    /// - the peer unreachable, timed out or gone (tonic reports a broken connection as UNKNOWN
    ///   or CANCELLED) is UNAVAILABLE naming the call;
    /// - a refused service credential or the peer's own failure is INTERNAL: it is about how
    ///   this deployment is set up, not about the caller's key.
    pub fn from_peer(call: &str, status: Status) -> Self {
        match status.code() {
            Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::ResourceExhausted
            | Code::Aborted => Self::Relayed(status),
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled => {
                Self::Unavailable(format!("{call}: {}", status.message()))
            }
            code => Self::Internal(format!(
                "{call} answered {}: {}",
                code.description(),
                status.message()
            )),
        }
    }

    /// NOT_FOUND, raised here or relayed from a peer.
    pub fn is_not_found(&self) -> bool {
        self.code() == Code::NotFound
    }

    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::NotFound { .. } => Code::NotFound,
            Self::AlreadyExists { .. } => Code::AlreadyExists,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::ResourceExhausted { .. } => Code::ResourceExhausted,
            Self::Aborted(_) => Code::Aborted,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Internal(_) | Self::ModelFailed(_) => Code::Internal,
            Self::Relayed(status) => status.code(),
        }
    }
}

/// Two errors are equal when the caller would see the same: the same code and message (and
/// the same retry delay).
impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        let retry = |e: &Self| match e {
            Self::ResourceExhausted { retry_after, .. } => *retry_after,
            _ => None,
        };
        self.code() == other.code()
            && self.to_string() == other.to_string()
            && retry(self) == retry(other)
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let code = err.code();
        match err {
            Error::InvalidArgument { field, reason } => Status::with_error_details(
                code,
                format!("{field}: {reason}"),
                ErrorDetails::with_bad_request_violation(field, reason),
            ),
            Error::ResourceExhausted {
                message,
                retry_after: Some(delay),
            } => Status::with_error_details(
                code,
                message,
                ErrorDetails::with_retry_info(Some(delay)),
            ),
            Error::Internal(detail) => {
                let id = uuid::Uuid::new_v4().simple().to_string();
                tracing::error!(error_id = %id, error = %detail, "internal error");
                Status::internal(format!(
                    "internal error (id {id}); the service's log has the details"
                ))
            }
            Error::Relayed(status) => status,
            other => Status::new(code, other.to_string()),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        Self::internal("file system", err)
    }
}

impl From<sea_orm::DbErr> for Error {
    /// A database that cannot be reached (down, restarting, its connections cut or all in
    /// use) is UNAVAILABLE, which callers retry; anything else is an internal error.
    fn from(err: sea_orm::DbErr) -> Self {
        if unreachable_database(&err) {
            tracing::warn!(error = %err, "the database cannot be reached");
            return Self::Unavailable("the database cannot be reached now; retry".into());
        }
        Self::internal("database", err)
    }
}

fn unreachable_database(err: &sea_orm::DbErr) -> bool {
    use sea_orm::sqlx::Error as Sqlx;
    use sea_orm::{DbErr, RuntimeErr};
    match err {
        DbErr::ConnectionAcquire(_) => true,
        DbErr::Conn(RuntimeErr::SqlxError(e))
        | DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e)) => matches!(
            e,
            Sqlx::Io(_) | Sqlx::PoolTimedOut | Sqlx::PoolClosed | Sqlx::WorkerCrashed
        ),
        _ => false,
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_internal_error_reaches_the_caller_as_an_id_only() {
        let err = Error::from(sea_orm::DbErr::Custom(
            "relation \"accounts\" does not exist".into(),
        ));
        assert!(
            err.to_string().contains("does not exist"),
            "the log sees it"
        );
        let status = Status::from(err);
        assert_eq!(status.code(), Code::Internal);
        assert!(status.message().contains("(id "), "{}", status.message());
        assert!(
            !status.message().contains("accounts"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn a_models_own_failure_keeps_its_message() {
        let status = Status::from(Error::ModelFailed("onnxruntime: idx out of range".into()));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "onnxruntime: idx out of range");
    }

    #[test]
    fn a_bad_field_is_named_in_the_message_and_the_details() {
        let status = Status::from(Error::invalid("user.email", "is required"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "user.email: is required");
        let details = status.get_error_details();
        let violation = &details.bad_request().unwrap().field_violations[0];
        assert_eq!(violation.field, "user.email");
    }

    #[test]
    fn a_peers_answer_is_classified_for_the_caller() {
        let relayed = Error::from_peer("registry GetModel", Status::not_found("m not found"));
        assert_eq!(relayed.code(), Code::NotFound);
        assert_eq!(Status::from(relayed).message(), "m not found");

        let refused = Error::from_peer("registry GetModel", Status::unauthenticated("bad key"));
        assert_eq!(refused.code(), Code::Internal, "not the caller's key");
        assert!(refused.to_string().contains("registry GetModel"));

        let gone = Error::from_peer("billing CheckQuota", Status::unknown("h2 protocol error"));
        assert_eq!(gone.code(), Code::Unavailable);
        assert!(gone.to_string().starts_with("billing CheckQuota: "));

        let broken = Error::from_peer("billing CheckQuota", Status::internal("oops"));
        assert_eq!(broken.code(), Code::Internal);
    }

    #[test]
    fn a_relayed_status_keeps_its_details() {
        let original: Status = Error::ResourceExhausted {
            message: "slow down".into(),
            retry_after: Some(Duration::from_secs(3)),
        }
        .into();
        let status = Status::from(Error::from_peer("node", original));
        assert_eq!(status.code(), Code::ResourceExhausted);
        let retry = status.get_error_details().retry_info().cloned().unwrap();
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(3)));
    }
}
