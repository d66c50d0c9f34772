//! The client commands, one module per resource group: each holds its part of the clap tree
//! (the resources under each verb) beside the handlers. The `cli` module puts the groups under
//! the verbs and dispatches to them.

pub(crate) mod accounts;
pub(crate) mod deployments;
pub(crate) mod fine_tuning;
mod flags;
pub(crate) mod inference;
pub(crate) mod models;
pub(crate) mod usage;
