//! The circuit is pinned: a fixed spec must give the same verifying key, and a stored proof
//! must keep verifying, so a change that would invalidate old proofs fails here and is made on
//! purpose (with a new spec version). Regenerate the vector with
//! `cargo test -p modelhub-zk --test it regenerate_proof_vector -- --ignored`.

use modelhub_zk::{CircuitSpec, Keys, ModelDigest, Params, ProofBundle, verify};
use sha2::{Digest, Sha256};

use crate::common::{digits, fixture, params_dir};

const SPEC: &str = r#"{"version":1,"k":9,"lanes":8,"input_name":"X","output_name":"y",
 "activation_range":[-128,127],"output_range":[-32768,32767],"limb_bits":8,"input_scale":6,
 "layers":[{"inputs":64,"outputs":16,"relu":true,"input_scale":6,"weight_scale":6,"output_scale":4,"shift":8},
           {"inputs":16,"outputs":10,"relu":false,"input_scale":4,"weight_scale":6,"output_scale":3,"shift":7}]}"#;

const VECTOR: &str = "tests/data/digits_proof.json";

#[test]
fn verifying_key_fingerprint() {
    let spec: CircuitSpec = serde_json::from_str(SPEC).unwrap();
    spec.validate().unwrap();
    let params = Params::load_or_create(&params_dir(), spec.k).unwrap();
    let keys = Keys::new(&params, &spec).unwrap();
    let pinned = format!("{:?}", keys.vk().pinned());
    let fp = hex::encode(Sha256::digest(pinned.as_bytes()));
    assert_eq!(keys.fingerprint(), fp);
    assert_eq!(
        fp, "babbf72a1ea28c7e53e9d83c02cbdaea160c1435982967e875bdc11c8df0954b",
        "the circuit changed: bump SPEC_VERSION and re-pin"
    );
}

/// The model digest of the stored vector's model (its spec and commitment), pinned: the digest
/// encoding (docs/ZK.md) must not change silently either.
const VECTOR_DIGEST: &str = "75bdd50a560291f30fad7127d6eb25e60c615282868a18a1626bd61bb25245e5";

#[test]
fn stored_proof_still_verifies() {
    let text = std::fs::read_to_string(VECTOR).expect("stored proof vector");
    let bundle = ProofBundle::from_json(text.as_bytes()).unwrap();
    let expected: ModelDigest = VECTOR_DIGEST.parse().unwrap();
    assert_eq!(
        ModelDigest::of(&bundle.spec, &bundle.public.commitment),
        expected
    );
    let params = Params::load_or_create(&params_dir(), bundle.spec.k).unwrap();
    verify(&params, &bundle, &expected).unwrap();
    let mut tampered = bundle.clone();
    tampered.public.output[0] += 1;
    assert!(verify(&params, &tampered, &expected).is_err());
}

/// A proof file of the old format (which did not name its model) is refused, and the message
/// names the current format.
#[test]
fn an_old_format_proof_is_refused_naming_the_new_format() {
    let text = std::fs::read_to_string(VECTOR).expect("stored proof vector");
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["format"] = "modelhub-proof/1".into();
    v["public"].as_object_mut().unwrap().remove("model_digest");
    let err = ProofBundle::from_json(v.to_string().as_bytes()).unwrap_err();
    assert!(err.to_string().contains("modelhub-proof/2"), "{err}");
    assert!(err.to_string().contains("modelhub-proof/1"), "{err}");
    // Also when it reaches verify some other way.
    let mut bundle = ProofBundle::from_json(text.as_bytes()).unwrap();
    bundle.format = "modelhub-proof/1".into();
    let params = Params::load_or_create(&params_dir(), bundle.spec.k).unwrap();
    let err = verify(&params, &bundle, &bundle.public.model_digest).unwrap_err();
    assert!(err.to_string().contains("modelhub-proof/2"), "{err}");
    assert!(ProofBundle::from_json(b"{\"format\": \"x\"}").is_err());
    assert!(ProofBundle::from_json(b"[]").is_err());
}

#[test]
#[ignore = "writes the stored proof vector"]
fn regenerate_proof_vector() {
    let f = fixture();
    let bundle = modelhub_zk::prove(
        &f.params,
        &f.keys,
        &f.model,
        &f.commitment,
        &f.opening,
        &digits().test[0],
        "test-vector-job",
    )
    .unwrap();
    std::fs::write(VECTOR, serde_json::to_string_pretty(&bundle).unwrap()).unwrap();
}
