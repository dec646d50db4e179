//! The ONNX → circuit compiler (`modelhub_zk::compile`) on any bytes: a circuit or a refusal,
//! never a panic, and within the memory limit libFuzzer sets.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static CALIBRATION: OnceLock<Vec<Vec<f32>>> = OnceLock::new();
    let calibration = CALIBRATION.get_or_init(|| {
        modelhub_zk::calibration_inputs(64, modelhub_core::InputRange::default())
    });
    let _ = modelhub_zk::compile(data, calibration);
});
