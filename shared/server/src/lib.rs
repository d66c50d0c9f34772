//! Kiln's server: hosts any subset of the services in one process on one gRPC address and
//! reaches the others remotely. `kiln dev` is [`serve`] of every service; `kiln serve
//! registry` is `serve` of the registry alone. One [`KilnConfig`] describes a process; what a
//! service needs from the services it calls (their URLs, the service credential) is checked
//! before anything starts.

mod config;
mod dev;
mod library;
mod links;
#[cfg(test)]
mod reference;
mod roles;
mod serve;
mod signal;

pub use config::KilnConfig;
pub use dev::dev_page_secret;
pub use roles::{Role, Roles};
pub use serve::{Running, serve};
pub use signal::shutdown_signal;
