//! The proof-file parser (`ProofBundle::from_json`): any bytes are read or refused, never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = modelhub_zk::ProofBundle::from_json(data);
});
