//! Kiln's gRPC contract, generated from `proto/` at build time.
#![allow(clippy::all, clippy::pedantic, missing_docs, rust_2018_idioms)]

/// The encoded `FileDescriptorSet` of every Kiln proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/kiln_descriptor.bin"));

pub mod kiln {
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("kiln.common.v1");
        }
    }
    pub mod identity {
        pub mod v1 {
            tonic::include_proto!("kiln.identity.v1");
        }
    }
    pub mod registry {
        pub mod v1 {
            tonic::include_proto!("kiln.registry.v1");
        }
    }
    pub mod scheduler {
        pub mod v1 {
            tonic::include_proto!("kiln.scheduler.v1");
        }
    }
    pub mod billing {
        pub mod v1 {
            tonic::include_proto!("kiln.billing.v1");
        }
    }
    pub mod inference {
        pub mod v1 {
            tonic::include_proto!("kiln.inference.v1");
        }
    }
    pub mod events {
        pub mod v1 {
            tonic::include_proto!("kiln.events.v1");
        }
    }
}

/// The Open Inference Protocol v2 (`inference.GRPCInferenceService`), as published.
pub mod inference {
    tonic::include_proto!("inference");
}

pub use kiln::{
    billing, common, events, identity, inference as kiln_inference, registry, scheduler,
};
