//! Integration tests of `run`: on a real listener, under a multi-thread Tokio runtime as
//! `modelhub up` uses it. `serve` needs no backing service (their addresses point at a closed
//! port); `registry` runs the real registry for the routes that need only it. The full
//! marketplace is exercised by the end-to-end suite of `modelhub-cli`.

mod doors;
mod registry;
mod serve;
