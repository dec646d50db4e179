//! Integration tests of the registry: the gRPC service started with `run` on 127.0.0.1:0, and
//! the binary.

mod binary;
mod grpc;
