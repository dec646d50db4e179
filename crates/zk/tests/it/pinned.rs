//! The circuit is pinned: a fixed spec must give the same verifying key, and a stored proof
//! must keep verifying, so a change that would invalidate old proofs fails here and is made on
//! purpose (with a new spec version). Regenerate the vector with
//! `cargo test -p modelhub-zk --test it regenerate_proof_vector -- --ignored`.

use modelhub_zk::{CircuitSpec, Keys, Params, ProofBundle, verify};
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

#[test]
fn stored_proof_still_verifies() {
    let text = std::fs::read_to_string(VECTOR).expect("stored proof vector");
    let bundle: ProofBundle = serde_json::from_str(&text).unwrap();
    let params = Params::load_or_create(&params_dir(), bundle.spec.k).unwrap();
    verify(&params, &bundle).unwrap();
    let mut tampered = bundle.clone();
    tampered.public.output[0] += 1;
    assert!(verify(&params, &tampered).is_err());
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
