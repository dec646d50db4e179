//! Model Hub's gRPC messages and services, generated from `proto/modelhub/**`.
//!
//! Protobuf types stay at the edge: services convert them into domain types (see
//! `modelhub-core`) as soon as they are received.

/// `modelhub.common.v1`: tensors, tensor specs and model references.
pub mod common {
    #[rustfmt::skip]
    #[allow(clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("modelhub.common.v1");
    }
}

/// `modelhub.registry.v1`: accounts, keys, models, credits.
#[cfg(feature = "registry")]
pub mod registry {
    #[rustfmt::skip]
    #[allow(clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("modelhub.registry.v1");
    }
}

/// `modelhub.storage.v1`: encrypted model blobs.
#[cfg(feature = "storage")]
pub mod storage {
    #[rustfmt::skip]
    #[allow(clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("modelhub.storage.v1");
    }
}

/// `modelhub.inference.v1`: ONNX Runtime workers.
#[cfg(feature = "inference")]
pub mod inference {
    #[rustfmt::skip]
    #[allow(clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("modelhub.inference.v1");
    }
}

/// `modelhub.prover.v1`: zero-knowledge proofs of predictions.
#[cfg(feature = "prover")]
pub mod prover {
    #[rustfmt::skip]
    #[allow(clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("modelhub.prover.v1");
    }
}

/// Encoded `FileDescriptorSet` of every Model Hub proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("modelhub_descriptor");
