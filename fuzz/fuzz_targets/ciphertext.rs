//! The segmented ciphertext reader: any bytes, fed whole or in pieces of sizes taken from the
//! input, are refused (no key but the right one opens anything), never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelhub_core::crypto::{self, SecretKey, SegmentDecryptor};

fuzz_target!(|data: &[u8]| {
    let dek = SecretKey::from_bytes([7; 32]);
    assert!(crypto::decrypt_all(&dek, b"model\0v1", data).is_err());
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut dec = SegmentDecryptor::new(dek, b"model\0v1".to_vec());
    let mut out = Vec::new();
    for piece in rest.chunks(step) {
        if dec.update(piece, &mut out).is_err() {
            return;
        }
    }
    assert!(dec.finish(&mut out).is_err());
});
