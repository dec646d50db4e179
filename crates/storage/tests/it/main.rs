//! Integration tests of the storage service over real gRPC on 127.0.0.1:0.

mod harness;
mod hostile;
mod ipfs;
mod put_get;
