//! Property tests of what the zk crate reads from untrusted bytes (issue 13's fuzz targets, in
//! the normal suite): the ONNX → circuit compiler on any bytes and on mutated real models, and
//! the proof-file parser on any bytes and on mutated real proofs, answer or refuse, never
//! panic. (Key files: `keys.rs`.)

use modelhub_zk::{ProofBundle, calibration_inputs, compile};
use proptest::prelude::*;

use crate::common::{fixture, prove_digits};

/// A real proof file, made once.
fn proof_file() -> &'static [u8] {
    static P: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    P.get_or_init(|| serde_json::to_vec(&prove_digits(0, "job_untrusted")).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_compiler_refuses_any_bytes_without_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let calibration = calibration_inputs(64, modelhub_core::InputRange::default());
        prop_assert!(compile(&bytes, &calibration).is_err());
    }

    /// A real model with a few bytes changed (or cut short): compiled or refused, never a
    /// panic.
    #[test]
    fn the_compiler_survives_mutated_models(
        changes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut onnx = fixture().onnx.clone();
        for (at, byte) in &changes {
            let i = at.index(onnx.len());
            onnx[i] = *byte;
        }
        if let Some(cut) = cut {
            onnx.truncate(cut.index(onnx.len()));
        }
        let calibration = calibration_inputs(64, modelhub_core::InputRange::default());
        let _ = compile(&onnx, &calibration);
    }

    #[test]
    fn the_proof_parser_refuses_any_bytes_without_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        prop_assert!(ProofBundle::from_json(&bytes).is_err());
    }

    /// A real proof file with a few bytes changed: read or refused, never a panic.
    #[test]
    fn the_proof_parser_survives_mutated_proofs(
        changes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut file = proof_file().to_vec();
        for (at, byte) in &changes {
            let i = at.index(file.len());
            file[i] = *byte;
        }
        let _ = ProofBundle::from_json(&file);
    }
}
