//! A proof names the model it proves (issue 20): whoever holds the opening of the registered
//! commitment (the hub's prover) can prove *another function* of the committed weights by
//! editing the public spec, and a same-shaped twin model proves under its own commitment.
//! Both make proofs that verify in themselves; verifying against the registered model's digest
//! must refuse them.

use modelhub_zk::{Keys, ModelDigest, ProofBundle, ZkError, onnx, prove, verify};

use crate::common::{digits, fixture};

/// The registered model's digest.
fn registered() -> ModelDigest {
    let f = fixture();
    ModelDigest::of(&f.model.spec, &f.commitment)
}

/// Proves `model` (the fixture's weights under an edited spec) with the fixture's honest
/// opening and registered commitment: the attack of issue 20.
fn prove_edited(model: &modelhub_zk::QuantizedModel, job: &str) -> ProofBundle {
    let f = fixture();
    model
        .spec
        .validate()
        .expect("the edited spec is a valid circuit");
    let keys = Keys::new(&f.params, &model.spec).expect("keygen for the edited spec");
    prove(
        &f.params,
        &keys,
        model,
        &f.commitment,
        &f.opening,
        &digits().test[11],
        job,
    )
    .expect("the same weights open the registered commitment under any spec of that layout")
}

/// The edited proof is valid in itself and shows the registered commitment, yet is refused
/// against the registered digest, and no relabelling gets it through.
fn assert_refused_against_registered(bundle: &ProofBundle, spec_message: bool) {
    let f = fixture();
    let expected = registered();
    assert_eq!(
        bundle.public.commitment, f.commitment,
        "the registered commitment"
    );
    // Valid as a proof of *its* model: this is why a verifier must say which model it expects.
    verify(&f.params, bundle, &bundle.public.model_digest).expect("valid in itself");
    assert_ne!(bundle.public.model_digest, expected);

    let err = verify(&f.params, bundle, &expected).unwrap_err();
    assert!(matches!(err, ZkError::Verification(_)), "{err}");
    assert!(err.to_string().contains("not the expected model"), "{err}");
    // Claiming the registered digest in the file does not help.
    let mut relabelled = bundle.clone();
    relabelled.public.model_digest = expected;
    let err = verify(&f.params, &relabelled, &expected).unwrap_err();
    assert!(
        err.to_string().contains("not the digest of its spec"),
        "{err}"
    );
    // Nor does swapping in the registered spec: then the proof does not verify.
    let mut respecced = bundle.clone();
    respecced.spec = f.model.spec.clone();
    respecced.public.model_digest = expected;
    if respecced.public.output.len() == f.model.spec.output_len() {
        assert!(verify(&f.params, &respecced, &expected).is_err());
    }
    // A verifier holding the registered record learns which part differs.
    let err = bundle
        .check_model(&f.model.spec, &f.commitment)
        .unwrap_err()
        .to_string();
    if spec_message {
        assert!(err.contains("circuit spec"), "{err}");
    }
}

#[test]
fn a_relu_switched_off_is_refused() {
    let f = fixture();
    let mut edited = f.model.clone();
    assert!(edited.spec.layers[0].relu);
    edited.spec.layers[0].relu = false;
    let bundle = prove_edited(&edited, "edit-relu");
    let honest = prove(
        &f.params,
        &f.keys,
        &f.model,
        &f.commitment,
        &f.opening,
        &digits().test[11],
        "edit-relu",
    )
    .unwrap();
    verify(&f.params, &honest, &registered()).unwrap();
    assert_eq!(honest.public.input, bundle.public.input);
    assert_refused_against_registered(&bundle, true);
}

#[test]
fn a_changed_scale_is_refused() {
    let f = fixture();
    // The last layer's weight and output scales up by 5: every integer the same, the
    // dequantized outputs divided by 32.
    let mut edited = f.model.clone();
    let last = edited.spec.layers.len() - 1;
    edited.spec.layers[last].weight_scale += 5;
    edited.spec.layers[last].output_scale += 5;
    let bundle = prove_edited(&edited, "edit-scale");
    assert_refused_against_registered(&bundle, true);
}

#[test]
fn a_changed_layer_size_is_refused() {
    let f = fixture();
    // One more output neuron with zero weights and bias: the weight columns, hence the
    // commitment, are unchanged (the new neuron's cells were zero already).
    let mut float = onnx::parse(&f.onnx).unwrap();
    let last = float.layers.last_mut().unwrap();
    last.weights.extend(vec![0.0; last.inputs]);
    last.bias.push(0.0);
    last.outputs += 1;
    let mut edited = modelhub_zk::calibrate(&float, &digits().train).unwrap();
    edited.spec.output_name = f.model.spec.output_name.clone();
    assert_eq!(edited.spec.k, f.model.spec.k);
    assert_eq!(edited.spec.output_len(), f.model.spec.output_len() + 1);
    let bundle = prove_edited(&edited, "edit-size");
    assert_refused_against_registered(&bundle, true);
}

#[test]
fn a_same_shaped_twin_model_is_refused() {
    let f = fixture();
    // Same architecture and spec, other weights, committed and proved honestly.
    let mut float = onnx::parse(&f.onnx).unwrap();
    float.layers[0].weights[100] += 0.3;
    let mut twin = modelhub_zk::calibrate(&float, &digits().train).unwrap();
    twin.spec = f.model.spec.clone();
    let (c, o) = modelhub_zk::commit(&twin, &f.params).unwrap();
    let bundle = prove(
        &f.params,
        &f.keys,
        &twin,
        &c,
        &o,
        &digits().test[11],
        "twin",
    )
    .unwrap();
    verify(&f.params, &bundle, &bundle.public.model_digest).expect("valid for the twin");
    let err = verify(&f.params, &bundle, &registered()).unwrap_err();
    assert!(err.to_string().contains("not the expected model"), "{err}");
    let err = bundle
        .check_model(&f.model.spec, &f.commitment)
        .unwrap_err()
        .to_string();
    assert!(err.contains("weight commitment differs"), "{err}");
}
