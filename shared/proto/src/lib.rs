//! Kiln's gRPC contract, generated from `proto/` at build time.
#![allow(clippy::all, clippy::pedantic, missing_docs, rust_2018_idioms)]

/// The encoded `FileDescriptorSet` of every Kiln proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/kiln_descriptor.bin"));

/// `pub mod $package { pub mod v1 { ... } }` for each `kiln.$package.v1`.
macro_rules! kiln_packages {
    ($($package:ident),*) => {
        $(pub mod $package {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/kiln.", stringify!($package), ".v1.rs"));
            }
        })*
    };
}

pub mod kiln {
    kiln_packages!(
        common, identity, registry, scheduler, billing, inference, events
    );
}

/// The Open Inference Protocol v2 (`inference.GRPCInferenceService`), as published.
pub mod inference {
    tonic::include_proto!("inference");
}

pub use kiln::{
    billing, common, events, identity, inference as kiln_inference, registry, scheduler,
};
