//! Integration tests of modelhub-zk: the digits MLP end to end, tampering, the pinned circuit,
//! convolutions and pooling, wide layouts.

mod binding;
mod cnn;
mod common;
mod digits;
mod keys;
mod mnist;
mod pinned;
mod pool;
mod untrusted;
mod wide;
