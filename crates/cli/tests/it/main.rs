//! End-to-end tests: the real gateway and the real gRPC services, started in-process on port 0
//! (and once as separate `modelhub serve` processes), driven over HTTP with signed requests.

mod accounting;
mod errors;
mod faults;
mod harness;
mod hostile;
mod kek;
mod ledger;
mod mtls;
mod names;
mod processes;
mod proofs;
mod rates;
mod restart;
mod secrets;
mod signing;
mod storage;
mod upload_predict;
