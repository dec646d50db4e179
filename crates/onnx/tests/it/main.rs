//! Integration tests of `modelhub-onnx` against the real ONNX Runtime and the generated models.

mod digits;
