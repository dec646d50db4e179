//! Zero-knowledge proofs of predictions for Model Hub.
//!
//! An ONNX model (dense and convolution layers with ReLU, average and max pooling, sigmoid and
//! tanh by lookup table; see [`onnx`]) is compiled ([`compile`]) into a fixed-point
//! [`QuantizedModel`] whose public [`CircuitSpec`] fixes a halo2 circuit (IPA over the Pasta
//! curves, no trusted setup). The weights are private witnesses bound to a public
//! [`Commitment`] made once at upload ([`commit()`]); [`prove`] proves that the quantized output is the model applied to the
//! quantized input for one job id; [`verify`] checks a [`ProofBundle`] from the spec alone,
//! against the [`ModelDigest`] the verifier expects (the digest of spec and commitment that the
//! registry and the chain record for the model: a proof names the model it proves).
//! The spec's neuron lanes per row (8, 16, 32 or 64, [`LANE_CHOICES`]) are chosen by
//! [`choose_lanes`] from the layer shapes: the layout with the smallest circuit (the cheapest
//! verification), 8 for small models (the original circuit).
//!
//! ```text
//! compile(onnx, samples) -> QuantizedModel { spec, weights }
//! commit(model, params)  -> (Commitment, Opening)        at upload
//! Keys::load_or_create(params, spec, dir) -> Keys         keygen once per spec, then from disk
//! prove(params, keys, model, commitment, opening, input, job_id) -> ProofBundle
//! ModelDigest::of(spec, commitment) -> ModelDigest      what the registry and chain record
//! verify(params, bundle, expected_digest)                  anyone, from bundle.spec
//! verify_cached(params, bundle, expected_digest, dir)      the same, verifying key kept on disk
//! ```
//!
//! Keys and their files are in [`keys`] (halo2_proofs patched with key serialization,
//! vendor/halo2_proofs/MODELHUB.md).

mod circuit;
pub mod commit;
pub mod digest;
mod error;
pub mod field;
pub mod keys;
pub mod onnx;
mod proof;
pub mod quant;
pub mod shape;

pub use commit::{Commitment, Opening, Params, commit};
pub use digest::ModelDigest;
pub use error::ZkError;
pub use keys::{KeySource, Keys};
pub use proof::{
    PROOF_FORMAT, ProofBundle, PublicInstance, prove, verify, verify_cached,
    verify_with_prover_keys,
};
pub use quant::{
    CircuitSpec, LANE_CHOICES, LayerSpec, QuantizedModel, calibrate, choose_lanes,
    dequantize_output, quantize_input, reference,
};
pub use shape::{ConvShape, LayerKind};

/// Compiles an ONNX model into a quantized model, calibrating scales on `calibration` inputs
/// (float input vectors; if empty, pseudo-random values in `[0, 1]` are used).
pub fn compile(onnx: &[u8], calibration: &[Vec<f32>]) -> Result<QuantizedModel, ZkError> {
    let model = onnx::parse(onnx)?;
    calibrate(&model, calibration)
}
