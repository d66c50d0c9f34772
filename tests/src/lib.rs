//! The test harness: the mesh in-process on `127.0.0.1:0` (storage and bus from the
//! environment), extra worker nodes, servers a test controls (NATS, S3), clients and fixtures
//! for each service, and the reference data the suites compare with. The end-to-end suites,
//! the fault tests, the benchmarks and the CLI's tests share it.

pub mod echo {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("kiln.bench.v1");
}

pub mod bench;
pub mod billing;
pub mod deployments;
mod identity;
pub mod inference;
pub mod llm;
mod mesh;
pub mod registry;
mod servers;
mod support;
pub mod workers;

pub use identity::*;
pub use mesh::*;
pub use servers::*;
pub use support::*;
