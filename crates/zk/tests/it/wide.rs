//! Wider layouts (16, 32 and 64 lanes): a model whose rows fit a smaller circuit with more lanes
//! gets that layout; it proves, verifies and rejects tampering like the 8-lane circuit.

use modelhub_zk::onnx::{FloatLayer, mlp_onnx, random_dense};
use modelhub_zk::{Keys, Params, ProofBundle, ZkError, commit, compile, prove, reference, verify};

use crate::common::{fixture, params_dir};

/// A dense layer of random weights (weights in ±1/√inputs).
fn layer(inputs: usize, outputs: usize, relu: bool, seed: u64) -> FloatLayer {
    random_dense(inputs, outputs, relu, seed, 2.0)
}

fn samples() -> Vec<Vec<f32>> {
    (0..48)
        .map(|i| {
            (0..64)
                .map(|j| (((i * 13 + j * 5) % 29) as f32) / 28.0)
                .collect()
        })
        .collect()
}

#[test]
fn a_wide_model_proves_verifies_and_rejects_tampering() {
    // 64 → 96 → 10: 2^11 rows with 8 lanes, 2^10 with 16 or 32, 2^9 with 64.
    let onnx = mlp_onnx(&[layer(64, 96, true, 7), layer(96, 10, false, 8)]);
    let xs = samples();
    let model = compile(&onnx, &xs).unwrap();
    let spec = &model.spec;
    assert_eq!((spec.lanes, spec.k, spec.version), (64, 9, 1));
    let params = Params::load_or_create(&params_dir(), spec.k).unwrap();
    let keys = crate::common::stored_keys(&params, spec);
    let (c, o) = commit(&model, &params).unwrap();
    assert_eq!(c.lanes(), 64);
    assert_eq!(c.to_hex().len(), 64 * 32 * 2);

    let bundle = prove(&params, &keys, &model, &c, &o, &xs[5], "wide-job").unwrap();
    let honest = bundle.public.model_digest;
    verify(&params, &bundle, &honest).unwrap();
    assert_eq!(
        bundle.public.output,
        reference(&model, &bundle.public.input).unwrap()
    );
    assert_eq!(bundle.link.len(), 64 * 9 * 32);
    let back: ProofBundle = serde_json::from_str(&serde_json::to_string(&bundle).unwrap()).unwrap();
    verify(&params, &back, &honest).unwrap();

    let rejects = |what: &str, b: &ProofBundle| {
        let err = crate::common::refused(&params, b, &honest);
        assert!(matches!(err, ZkError::Verification(_)), "{what}: {err}");
    };
    let mut b = bundle.clone();
    b.public.output[9] += 1;
    rejects("tampered output", &b);
    let mut b = bundle.clone();
    b.public.input[63] += 1;
    rejects("tampered input", &b);
    let mut b = bundle.clone();
    b.public.job_id = "other".into();
    rejects("other job id", &b);
    let mut b = bundle.clone();
    b.public.commitment = commit(&model, &params).unwrap().0;
    rejects("other commitment (same weights, other blinds)", &b);
    let mut b = bundle.clone();
    b.public.commitment = fixture().commitment.clone();
    rejects("an 8-lane commitment", &b);
    let mut b = bundle.clone();
    b.proof[32 * 20 + 3] ^= 1; // weight column 20's commitment
    rejects("flipped weight-column commitment", &b);
    let mut b = bundle.clone();
    b.proof[32 * 133 + 3] ^= 1; // after the 133 advice commitments
    rejects("flipped proof byte", &b);
    let mut b = bundle.clone();
    let last_lane = b.link.len() - 9 * 32;
    b.link[last_lane + 40] ^= 1;
    rejects("flipped link byte in the last lane", &b);
    let mut b = bundle.clone();
    b.link.truncate(8 * 9 * 32);
    rejects("link of 8 lanes", &b);
    for lanes in [8, 16, 32] {
        let mut b = bundle.clone();
        b.spec.lanes = lanes;
        rejects("narrower spec (does not fit k = 9)", &b);
    }

    // Other weights under the same spec cannot use this commitment: the prover refuses.
    let mut float = modelhub_zk::onnx::parse(&onnx).unwrap();
    float.layers[0].weights[30 * 64 + 3] += 0.05; // hidden neuron 30: lane 30
    let other = modelhub_zk::calibrate(&float, &xs).unwrap();
    assert_eq!(other.spec, model.spec);
    assert_ne!(other, model);
    let err = prove(&params, &keys, &other, &c, &o, &xs[5], "wide-job").unwrap_err();
    assert!(err.to_string().contains("commitment"), "{err}");
    // Proved honestly under its own commitment, then claimed under this model's: the weight
    // link fails.
    let (c2, o2) = commit(&other, &params).unwrap();
    let mut forged = prove(&params, &keys, &other, &c2, &o2, &xs[5], "wide-job").unwrap();
    verify(&params, &forged, &forged.public.model_digest).unwrap();
    forged.public.commitment = c.clone();
    forged.public.model_digest = honest;
    let err = verify(&params, &forged, &honest).unwrap_err();
    assert!(err.to_string().contains("weight"), "{err}");

    // The same weights with 16 lanes (what `with_lanes` gives a prover that stored such a
    // spec): its own keys and commitment, and the same output.
    let narrow = model.with_lanes(16).unwrap();
    assert_eq!((narrow.spec.lanes, narrow.spec.k), (16, 10));
    let params16 = Params::load_or_create(&params_dir(), narrow.spec.k).unwrap();
    let keys16 = Keys::new(&params16, &narrow.spec).unwrap();
    let (c16, o16) = commit(&narrow, &params16).unwrap();
    assert_eq!(c16.lanes(), 16);
    let b16 = prove(&params16, &keys16, &narrow, &c16, &o16, &xs[5], "wide-job").unwrap();
    verify(&params16, &b16, &b16.public.model_digest).unwrap();
    assert_eq!(b16.public.output, bundle.public.output);
    assert_eq!(b16.link.len(), 16 * 9 * 32);
    let mut b = b16.clone();
    b.public.commitment = c;
    rejects_with(
        &params16,
        "a 64-lane commitment on a 16-lane spec",
        &b,
        &b16.public.model_digest,
    );
}

fn rejects_with(params: &Params, what: &str, b: &ProofBundle, honest: &modelhub_zk::ModelDigest) {
    let err = crate::common::refused(params, b, honest);
    assert!(matches!(err, ZkError::Verification(_)), "{what}: {err}");
}
