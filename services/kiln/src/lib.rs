//! The `kiln` binary's library: the whole mesh in one process (`kiln dev`, and the testkit),
//! single services (`kiln serve <service>`), and the firectl-style client commands.

pub mod billing_cli;
pub mod cli;
pub mod config;
pub mod inference_cli;
pub mod mesh;
pub mod output;
pub mod registry_cli;
pub mod scheduler_cli;
