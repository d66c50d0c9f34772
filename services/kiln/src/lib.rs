//! The `kiln` binary's library: `kiln dev` and `kiln serve <service>...` (hosted by
//! kiln-server), and the firectl-style client commands.

pub mod billing_cli;
pub mod cli;
pub mod inference_cli;
pub mod output;
pub mod registry_cli;
pub mod scheduler_cli;
