//! Small rules on the scheduler's resources and their names. A leaf: it uses nothing else in
//! the crate but the error type.

use kiln_proto::scheduler::v1::{Deployment, deployment};
use prost::Message;

use kiln_core::Result;

/// A stored resource (encoded protobuf); INTERNAL when it does not decode.
pub(crate) fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M> {
    M::decode(bytes)
        .map_err(|e| kiln_core::Error::Internal(format!("stored resource does not decode: {e}")))
}

/// Whether a deployment is deleted or being deleted.
pub(crate) fn is_gone(d: &Deployment) -> bool {
    d.state == deployment::State::Deleted as i32 || d.state == deployment::State::Deleting as i32
}

/// A deployment state's name, e.g. `DELETED`.
pub(crate) fn state_name(state: i32) -> &'static str {
    deployment::State::try_from(state)
        .map(|s| s.as_str_name())
        .unwrap_or("STATE_UNSPECIFIED")
}
