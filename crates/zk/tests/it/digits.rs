//! The digits MLP: accuracy of the quantized model, prove and verify, and every tampering.

use modelhub_zk::{ZkError, dequantize_output, onnx, prove, quantize_input, reference, verify};

use crate::common::{argmax, digits, fixture};

#[test]
fn compiles_the_sklearn_model_and_keeps_the_argmax() {
    let f = fixture();
    let spec = &f.model.spec;
    assert_eq!(spec.input_name, "X");
    assert_eq!(
        spec.output_name, "add_result1",
        "proves the logits before Softmax"
    );
    assert_eq!((spec.input_len(), spec.output_len()), (64, 10));
    assert_eq!(spec.k, 9);
    // Linear layers only: still the original circuit (spec version 1, same keys and proofs).
    assert_eq!(spec.version, modelhub_zk::quant::SPEC_VERSION_LINEAR);
    let float = onnx::parse(&f.onnx).unwrap();
    let d = digits();
    let (mut same, mut correct) = (0, 0);
    for (x, &label) in d.test.iter().zip(&d.test_labels) {
        let q = reference(&f.model, &quantize_input(spec, x).unwrap()).unwrap();
        let proved = argmax(&dequantize_output(spec, &q));
        same += usize::from(proved == argmax(&float.forward(x)));
        correct += usize::from(proved == usize::from(label));
    }
    let n = d.test.len();
    eprintln!("quantized argmax = float argmax on {same}/{n}; accuracy {correct}/{n}");
    assert!(same * 1000 >= n * 985, "argmax agreement {same}/{n}");
}

#[test]
fn quantized_logits_track_onnxruntime() {
    let f = fixture();
    let expected = modelhub_testkit::digits_expected();
    for case in expected["cases"].as_array().unwrap() {
        let x: Vec<f32> = case["input"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let q = reference(&f.model, &quantize_input(&f.model.spec, &x).unwrap()).unwrap();
        let logits = dequantize_output(&f.model.spec, &q);
        assert_eq!(argmax(&logits) as u64, case["label"].as_u64().unwrap());
    }
}

#[test]
fn proves_and_verifies_and_rejects_tampering() {
    let f = fixture();
    let t = std::time::Instant::now();
    let bundle = crate::common::prove_digits(3, "job-1");
    let prove_time = t.elapsed();
    let t = std::time::Instant::now();
    let honest = bundle.public.model_digest;
    assert_eq!(
        honest,
        modelhub_zk::ModelDigest::of(&f.model.spec, &f.commitment)
    );
    verify(&f.params, &bundle, &honest).unwrap();
    eprintln!(
        "prove {prove_time:?}, verify {:?}, proof {} B, link {} B",
        t.elapsed(),
        bundle.proof.len(),
        bundle.link.len()
    );
    assert_eq!(bundle.format, "modelhub-proof/2");
    assert_eq!(
        bundle.public.output,
        reference(&f.model, &bundle.public.input).unwrap()
    );

    // The JSON file round-trips and still verifies.
    let json = serde_json::to_string(&bundle).unwrap();
    let back: modelhub_zk::ProofBundle = serde_json::from_str(&json).unwrap();
    verify(&f.params, &back, &honest).unwrap();
    let read = modelhub_zk::ProofBundle::from_json(json.as_bytes()).unwrap();
    verify(&f.params, &read, &honest).unwrap();

    let rejects = |what: &str, b: &modelhub_zk::ProofBundle| {
        let err = crate::common::refused(&f.params, b, &honest);
        assert!(matches!(err, ZkError::Verification(_)), "{what}: {err}");
    };
    let mut b = bundle.clone();
    b.public.output[2] += 1;
    rejects("tampered output", &b);
    let mut b = bundle.clone();
    b.public.input[20] += 1;
    rejects("tampered input", &b);
    let mut b = bundle.clone();
    b.public.job_id = "job-2".into();
    rejects("other job id", &b);
    let mut b = bundle.clone();
    let (other_commitment, _) = modelhub_zk::commit(&f.model, &f.params).unwrap();
    b.public.commitment = other_commitment;
    rejects("other commitment (same weights, other blinds)", &b);
    let mut b = bundle.clone();
    b.proof[100] ^= 1;
    rejects("flipped proof byte", &b);
    let mut b = bundle.clone();
    b.link[40] ^= 1;
    rejects("flipped link byte", &b);
    let mut b = bundle.clone();
    b.spec.layers[0].shift += 1;
    b.spec.layers[0].output_scale -= 1;
    b.spec.layers[1].input_scale -= 1;
    b.spec.layers[1].output_scale -= 1;
    rejects("other spec", &b);
    let mut b = bundle.clone();
    b.format = "x".into();
    rejects("format", &b);
    let mut b = bundle.clone();
    b.proof.truncate(10);
    rejects("truncated", &b);
    // Bytes after the halo2 transcript: one encoding per proof.
    let mut b = bundle.clone();
    b.proof.push(0);
    let err = verify(&f.params, &b, &honest).unwrap_err();
    assert!(
        err.to_string().contains("after the end of the proof"),
        "{err}"
    );
    let mut b = bundle.clone();
    b.proof.extend_from_slice(&[7; 64]);
    rejects("trailing bytes", &b);
    // A proof that names another digest than its spec and commitment give.
    let mut b = bundle.clone();
    b.public.model_digest = modelhub_zk::ModelDigest([9; 32]);
    let err = verify(&f.params, &b, &honest).unwrap_err();
    assert!(
        err.to_string().contains("not the digest of its spec"),
        "{err}"
    );
    // The right proof checked against another model's digest.
    let err = verify(&f.params, &bundle, &modelhub_zk::ModelDigest([9; 32])).unwrap_err();
    assert!(err.to_string().contains("not the expected model"), "{err}");
}

#[test]
fn a_different_models_weights_do_not_verify_under_the_commitment() {
    let f = fixture();
    // Same architecture (same spec), slightly different weights.
    let mut float = onnx::parse(&f.onnx).unwrap();
    float.layers[1].weights[7] += 0.5;
    float.layers[0].bias[3] -= 0.2;
    let mut other = modelhub_zk::calibrate(&float, &digits().train).unwrap();
    assert_eq!(other.spec.layers.len(), f.model.spec.layers.len());
    other.spec = f.model.spec.clone(); // force the same spec (keys), weights differ
    let x = &digits().test[0];
    // The prover refuses: the proof's weight columns would not match the commitment.
    let err = prove(
        &f.params,
        &f.keys,
        &other,
        &f.commitment,
        &f.opening,
        x,
        "job-9",
    )
    .unwrap_err();
    assert!(err.to_string().contains("commitment"), "{err}");
    // A forger proves the other model honestly under its own commitment, then claims the
    // original model's commitment: the weight link fails.
    let (c2, o2) = modelhub_zk::commit(&other, &f.params).unwrap();
    let mut bundle = prove(&f.params, &f.keys, &other, &c2, &o2, x, "job-9").unwrap();
    verify(&f.params, &bundle, &bundle.public.model_digest).unwrap();
    bundle.public.commitment = f.commitment.clone();
    bundle.public.model_digest = bundle.computed_digest();
    let honest = modelhub_zk::ModelDigest::of(&f.model.spec, &f.commitment);
    let err = verify(&f.params, &bundle, &honest).unwrap_err();
    assert!(err.to_string().contains("weight"), "{err}");
}

#[test]
fn out_of_range_input_is_an_error_not_a_panic() {
    let f = fixture();
    let mut x = digits().test[0].clone();
    x[5] = 100.0;
    let err = prove(
        &f.params,
        &f.keys,
        &f.model,
        &f.commitment,
        &f.opening,
        &x,
        "j",
    )
    .unwrap_err();
    assert!(matches!(err, ZkError::OutOfRange { .. }), "{err}");
    assert_eq!(err.code(), modelhub_core::ErrorCode::BadRequest);
    x[5] = f32::NAN;
    assert!(matches!(
        quantize_input(&f.model.spec, &x),
        Err(ZkError::OutOfRange { .. })
    ));
    let err = prove(
        &f.params,
        &f.keys,
        &f.model,
        &f.commitment,
        &f.opening,
        &x[..10],
        "j",
    )
    .unwrap_err();
    assert!(matches!(err, ZkError::OutOfRange { .. }), "{err}");
    // An input inside the input range but far from the calibration data, aligned with a
    // hidden neuron's weights, overflows that neuron's activation range.
    let float = onnx::parse(&f.onnx).unwrap();
    let w0 = &float.layers[0].weights[..64];
    let big: Vec<f32> = w0
        .iter()
        .map(|w| if *w > 0.0 { 1.9 } else { -1.9 })
        .collect();
    assert!(quantize_input(&f.model.spec, &big).is_ok());
    let err = prove(
        &f.params,
        &f.keys,
        &f.model,
        &f.commitment,
        &f.opening,
        &big,
        "j",
    )
    .unwrap_err();
    assert!(matches!(err, ZkError::OutOfRange { .. }), "{err}");
}

#[test]
fn unsupported_graphs_say_why() {
    let not_onnx = std::fs::read(modelhub_testkit::test_model("not_onnx.bin")).unwrap();
    let err = modelhub_zk::compile(&not_onnx, &[]).unwrap_err();
    assert!(matches!(err, ZkError::Unsupported { .. }));
    assert_eq!(err.code(), modelhub_core::ErrorCode::Unprocessable);
}

#[test]
fn garbage_proofs_are_errors_not_panics() {
    let f = fixture();
    let bundle = crate::common::prove_digits(7, "job-g");
    let honest = bundle.public.model_digest;
    let mut state = 0x1234_5678_9abc_def0u64;
    for len in [
        0usize,
        31,
        640,
        bundle.proof.len(),
        bundle.proof.len() + 100,
    ] {
        let mut b = bundle.clone();
        b.proof = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        crate::common::refused(&f.params, &b, &honest);
        // Keep the real advice commitments, garble the rest.
        let mut b = bundle.clone();
        for byte in b.proof.iter_mut().skip(640) {
            *byte = byte.wrapping_mul(31).wrapping_add(7);
        }
        crate::common::refused(&f.params, &b, &honest);
    }
    let mut b = bundle.clone();
    b.link.truncate(100);
    crate::common::refused(&f.params, &b, &honest);
    let mut b = bundle;
    b.spec.k = 30;
    crate::common::refused(&f.params, &b, &honest);
}

#[test]
fn oversized_models_are_unsupported() {
    use modelhub_zk::{LayerKind, onnx::FloatLayer};
    let big = FloatLayer {
        kind: LayerKind::Dense,
        inputs: 4096,
        outputs: 1024,
        weights: vec![0.01; 4096 * 1024],
        bias: vec![0.0; 1024],
        relu: false,
    };
    let err = modelhub_zk::compile(&onnx::mlp_onnx(&[big]), &[]).unwrap_err();
    assert!(matches!(err, ZkError::Unsupported { .. }), "{err}");
}

/// Absurd biases (found by fuzzing: they overflowed the accumulators) are refused as
/// unsupported, at any sign, never a panic or a wrapped-around circuit.
#[test]
fn absurd_biases_are_unsupported() {
    use modelhub_zk::{LayerKind, onnx::FloatLayer};
    for bias in [3e38f32, -3e38, 1e20] {
        let layer = FloatLayer {
            kind: LayerKind::Dense,
            inputs: 4,
            outputs: 2,
            weights: vec![0.5; 8],
            bias: vec![bias, 0.0],
            relu: true,
        };
        let calibration = modelhub_zk::calibration_inputs(4, modelhub_core::InputRange::default());
        let err = modelhub_zk::compile(&onnx::mlp_onnx(&[layer]), &calibration).unwrap_err();
        assert!(matches!(err, ZkError::Unsupported { .. }), "{bias}: {err}");
    }
}
