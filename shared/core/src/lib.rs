//! Kiln's shared core: resource names, API errors, configuration, telemetry, authentication,
//! list pagination and the common server plumbing every service uses.

pub mod auth;
pub mod auth_client;
pub mod backoff;
pub mod config;
pub mod duration;
pub mod error;
pub mod grpc;
pub mod in_flight;
pub mod listing;
pub mod metrics;
pub mod names;
pub mod page;
pub mod server;
pub mod telemetry;
pub mod time;
pub mod tls;

pub use error::{Error, Result};
