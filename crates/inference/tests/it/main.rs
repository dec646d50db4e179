//! Integration tests of the inference service against a real storage service, both over gRPC
//! on 127.0.0.1:0.

mod harness;
mod hostile;
mod limits;
mod predict;
