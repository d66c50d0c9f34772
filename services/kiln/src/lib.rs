//! The `kiln` binary's library: the whole mesh in one process (`kiln dev`, and the testkit),
//! single services (`kiln serve <service>`), and the firectl-style client commands.

pub mod cli;
mod client;
mod commands;
pub mod config;
pub mod mesh;
