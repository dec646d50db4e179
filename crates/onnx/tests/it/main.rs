//! Integration tests of `modelhub-onnx` against the real ONNX Runtime and the generated models.

mod bombs;
mod digits;

/// The memory budget of every run in this test process.
pub const TEST_MEMORY_BUDGET: u64 = 256 << 20;

/// Loads the runtime with the test budget; every test calls it first.
pub fn setup() {
    modelhub_onnx::init_with(TEST_MEMORY_BUDGET).unwrap();
}
