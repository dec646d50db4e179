//! The `modelhub` command: runs the marketplace (`up` for everything in one process, `serve`
//! for one service) and is a client of the public API for people (`keys`, `models`,
//! `predict`, `account`), signing requests with the code the gateway verifies with.

pub mod certs;
pub mod chain;
pub mod client;
pub mod commands;
pub mod kek;
pub mod proofs;
pub mod up;
