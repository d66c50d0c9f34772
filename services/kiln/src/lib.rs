//! The `kiln` binary's library: `kiln dev` and `kiln serve <service>...` (hosted by
//! kiln-server), and the firectl-style client commands.

pub mod cli;
mod client;
mod commands;
