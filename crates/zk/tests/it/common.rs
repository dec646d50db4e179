//! Shared fixtures: the digits data, the compiled digits model and its keys (made once).

use std::sync::OnceLock;

use modelhub_zk::{Commitment, Keys, Opening, Params, QuantizedModel};

pub struct Digits {
    pub train: Vec<Vec<f32>>,
    pub test: Vec<Vec<f32>>,
    pub test_labels: Vec<u8>,
}

fn decode(rows: &serde_json::Value) -> Vec<Vec<f32>> {
    rows.as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            r.as_str()
                .expect("row string")
                .bytes()
                .map(|b| f32::from(b - b'a') / 16.0)
                .collect()
        })
        .collect()
}

/// The bundled scikit-learn digits, split as digits_mlp.onnx was trained (tests/data/gen_digits.py).
pub fn digits() -> &'static Digits {
    static D: OnceLock<Digits> = OnceLock::new();
    D.get_or_init(|| {
        let text = include_str!("../data/digits.json");
        let v: serde_json::Value = serde_json::from_str(text).expect("digits.json");
        Digits {
            train: decode(&v["train"]),
            test: decode(&v["test"]),
            test_labels: v["test_labels"]
                .as_array()
                .expect("labels")
                .iter()
                .map(|l| l.as_u64().expect("label") as u8)
                .collect(),
        }
    })
}

pub struct Fixture {
    pub onnx: Vec<u8>,
    pub model: QuantizedModel,
    pub params: Params,
    pub keys: Keys,
    pub commitment: Commitment,
    pub opening: Opening,
}

/// The digits MLP of the test models (64 → 16 → 10, sklearn, Softmax head), compiled,
/// committed and keyed.
pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let onnx =
            std::fs::read(modelhub_testkit::test_model("digits_mlp.onnx")).expect("read model");
        let model = modelhub_zk::compile(&onnx, &digits().train).expect("compile");
        let params = Params::load_or_create(&params_dir(), model.spec.k).expect("params");
        let keys = stored_keys(&params, &model.spec);
        let (commitment, opening) = modelhub_zk::commit(&model, &params).expect("commit");
        Fixture {
            onnx,
            model,
            params,
            keys,
            commitment,
            opening,
        }
    })
}

/// A proof of the digits fixture on test row `row` for `job`.
pub fn prove_digits(row: usize, job: &str) -> modelhub_zk::ProofBundle {
    let f = fixture();
    modelhub_zk::prove(
        &f.params,
        &f.keys,
        &f.model,
        &f.commitment,
        &f.opening,
        &digits().test[row],
        job,
    )
    .expect("prove")
}

/// Keys as a restarted prover gets them: made by keygen, written in the key file format, and
/// read back. The keys read must be the keys made (same bytes, same verifying key); the caller
/// then proves with them and verifies against a verifying key rebuilt by keygen.
pub fn stored_keys(params: &Params, spec: &modelhub_zk::CircuitSpec) -> Keys {
    let made = Keys::new(params, spec).expect("keygen");
    let bytes = made.to_bytes().expect("write keys");
    let read = Keys::read(params, spec, &bytes).expect("read keys");
    assert_eq!(read.fingerprint(), made.fingerprint(), "same verifying key");
    assert!(
        read.to_bytes().unwrap() == bytes,
        "the keys read write the same bytes"
    );
    read
}

/// A params cache shared by test runs (under the target directory).
pub fn params_dir() -> std::path::PathBuf {
    modelhub_testkit::workspace_root().join("target/zk-params")
}

pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// Verifies `b` against the digest of its own spec and commitment, as a verifier told that
/// model would (for tests of every check after the digest).
pub fn verify_own(
    params: &modelhub_zk::Params,
    b: &modelhub_zk::ProofBundle,
) -> Result<(), modelhub_zk::ZkError> {
    let mut b = b.clone();
    b.public.model_digest = b.computed_digest();
    modelhub_zk::verify(params, &b, &b.public.model_digest)
}

/// Asserts that a tampered bundle is refused against the honest model's digest and also
/// against the digest of whatever spec and commitment it now carries; returns the latter error.
pub fn refused(
    params: &modelhub_zk::Params,
    b: &modelhub_zk::ProofBundle,
    honest: &modelhub_zk::ModelDigest,
) -> modelhub_zk::ZkError {
    assert!(
        modelhub_zk::verify(params, b, honest).is_err(),
        "accepted against the honest digest"
    );
    verify_own(params, b).expect_err("accepted against its own digest")
}
