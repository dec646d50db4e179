//! Integration tests of the registry: the gRPC service started with `run` on 127.0.0.1:0, and
//! the binary, and the MongoDB store against a real MongoDB-wire server.

mod binary;
mod grpc;
mod mongo;
