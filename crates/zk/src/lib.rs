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

pub use commit::{Commitment, Opening, Params, commit, recommit};
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

/// How many pseudo-random samples [`calibration_inputs`] adds to the all-min and all-max ones:
/// the model's declared input range (`[0, 1]` by default) is what the circuit is calibrated
/// on; inputs outside it fail cleanly at proving time (docs/ZK.md).
pub const CALIBRATION_SAMPLES: usize = 64;

/// Deterministic calibration inputs for a model with `len` input values in `range`: all-min,
/// all-max, and [`CALIBRATION_SAMPLES`] pseudo-random vectors. The hub compiles uploads with
/// them, so anyone with the ONNX file and the declared range compiles the same circuit.
pub fn calibration_inputs(len: usize, range: modelhub_core::InputRange) -> Vec<Vec<f32>> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let u = (state >> 40) as f32 / (1u64 << 24) as f32;
        (range.min + u * (range.max - range.min)).clamp(range.min, range.max)
    };
    let mut samples = vec![vec![range.min; len], vec![range.max; len]];
    samples.extend((0..CALIBRATION_SAMPLES).map(|_| (0..len).map(|_| next()).collect()));
    samples
}

/// Number of values of the model's one input, from its declared signature.
pub fn input_len(inputs: &[modelhub_core::TensorSpec]) -> Result<usize, String> {
    let [input] = inputs else {
        return Err(format!(
            "proofs support models with one input; this one has {}",
            inputs.len()
        ));
    };
    if input.datatype != modelhub_core::DataType::Fp32 {
        return Err(format!(
            "proofs support FP32 inputs; input {:?} is {}",
            input.name, input.datatype
        ));
    }
    let dims: Vec<i64> = input
        .shape
        .iter()
        .skip(usize::from(input.shape.first() == Some(&-1)))
        .copied()
        .collect();
    if dims.iter().any(|&d| d < 1) {
        return Err(format!(
            "proofs need a fixed input shape (batch aside); input {:?} is {:?}",
            input.name, input.shape
        ));
    }
    // Bounded before the calibration samples are allocated (66 vectors of this length).
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
        .filter(|&n| n <= onnx::MAX_VALUES)
        .ok_or_else(|| {
            format!(
                "input {:?} of shape {:?} has more than {} values, more than any circuit holds",
                input.name,
                input.shape,
                onnx::MAX_VALUES
            )
        })
}
