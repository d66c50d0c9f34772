//! The test harness: the mesh in-process on `127.0.0.1:0` (storage and bus from the
//! environment), extra worker nodes, servers a test controls (NATS, S3), clients and fixtures
//! for each service, and the reference data the suites compare with. The end-to-end suites,
//! the fault tests, the benchmarks and the CLI's tests share it.

pub mod echo {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("kiln.bench.v1");
}

/// Declares, for each service, a client type on [`AuthedChannel`] and a function that makes
/// one from a channel (with a larger message limit where the service's answers are large).
macro_rules! clients {
    ($($alias:ident, $make:ident = $client:path $(, limit $limit:expr)?;)*) => {$(
        pub type $alias = $client;
        pub fn $make(ch: &crate::AuthedChannel) -> $alias {
            <$alias>::new(ch.clone())$(.max_decoding_message_size($limit))?
        }
    )*};
}

pub mod bench;
pub mod billing;
mod calls;
pub mod deployments;
pub mod events;
pub mod fine_tuning;
mod identity;
pub mod inference;
pub mod llm;
pub mod lora;
mod mesh;
pub mod python;
pub mod registry;
mod servers;
mod support;
pub mod tiny_llama;
pub mod workers;

pub use calls::*;
pub use identity::*;
pub use mesh::*;
pub use servers::*;
pub use support::*;
