//! Keys cached on disk: a second start reads them instead of running keygen, and a file that
//! can't be trusted to be the same keys (corrupt, truncated, another spec, another build) is
//! refused with a reason and replaced, never used and never a panic.

use modelhub_zk::{KeySource, Keys, ZkError, keys, prove, verify, verify_cached};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

use crate::common::{digits, fixture};

fn key_file(dir: &std::path::Path) -> std::path::PathBuf {
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        files.len(),
        1,
        "one key file, no temp files left: {files:?}"
    );
    files.into_iter().next().unwrap()
}

/// Re-seals a modified key file with a valid checksum, as a bug (not bit rot) would write it.
fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
    let n = bytes.len() - 32;
    let sum = Sha256::digest(&bytes[..n]);
    bytes[n..].copy_from_slice(&sum);
    bytes
}

fn read_err(bytes: &[u8]) -> String {
    let f = fixture();
    match Keys::read(&f.params, &f.model.spec, bytes) {
        Err(ZkError::Internal(m)) => m,
        Err(e) => panic!("unexpected error kind: {e}"),
        Ok(_) => panic!("a bad key file was accepted"),
    }
}

#[test]
fn a_second_start_reads_the_keys_and_proves_with_them() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let (made, source) = Keys::load_or_create(&f.params, &f.model.spec, dir.path()).unwrap();
    assert_eq!(
        source,
        KeySource::Keygen {
            stale: None,
            not_stored: None
        }
    );
    let path = key_file(dir.path());
    let (read, source) = Keys::load_or_create(&f.params, &f.model.spec, dir.path()).unwrap();
    assert_eq!(source, KeySource::Disk);
    assert_eq!(read.fingerprint(), made.fingerprint());
    assert_eq!(std::fs::read(&path).unwrap(), read.to_bytes().unwrap());
    // The keys read prove, and the proof verifies against a verifying key rebuilt by keygen.
    let bundle = prove(
        &f.params,
        &read,
        &f.model,
        &f.commitment,
        &f.opening,
        &digits().test[7],
        "job-from-stored-keys",
    )
    .unwrap();
    let honest = bundle.public.model_digest;
    verify(&f.params, &bundle, &honest).unwrap();

    // Verifying with the key file's verifying key (what the prover's Verify uses): the same
    // key as keygen's, and a tampered proof is still refused.
    let vk = Keys::read_verifying_key(&f.params, &f.model.spec, &read.to_bytes().unwrap()).unwrap();
    assert_eq!(
        format!("{:?}", vk.pinned()),
        format!("{:?}", made.vk().pinned())
    );
    verify_cached(&f.params, &bundle, &honest, dir.path()).unwrap();
    let mut tampered = bundle.clone();
    tampered.public.output[0] += 1;
    assert!(matches!(
        verify_cached(&f.params, &tampered, &honest, dir.path()),
        Err(ZkError::Verification(_))
    ));
    let e = Keys::read_verifying_key(&f.params, &f.model.spec, &read.to_bytes().unwrap()[..200]);
    assert!(e.is_err());
}

#[test]
fn a_bad_key_file_is_replaced_with_the_reason() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    Keys::load_or_create(&f.params, &f.model.spec, dir.path()).unwrap();
    let path = key_file(dir.path());
    let good = std::fs::read(&path).unwrap();

    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("bit rot", flipped, "checksum"),
        ("truncated", good[..good.len() / 3].to_vec(), "checksum"),
        ("empty", Vec::new(), "not a key file"),
        (
            "another build",
            {
                let mut b = good.clone();
                b[16] ^= 1; // the code hash follows the 16-byte magic
                reseal(b)
            },
            "another build",
        ),
    ];
    for (what, bytes, reason) in cases {
        std::fs::write(&path, &bytes).unwrap();
        let (keys, source) = Keys::load_or_create(&f.params, &f.model.spec, dir.path()).unwrap();
        match source {
            KeySource::Keygen {
                stale: Some(m),
                not_stored: None,
            } => {
                assert!(m.contains(reason), "{what}: {m}")
            }
            other => panic!("{what}: {other:?}"),
        }
        assert_eq!(keys.fingerprint(), f.keys.fingerprint(), "{what}");
        assert_eq!(std::fs::read(&path).unwrap(), good, "{what}: file replaced");
    }
    // A file made for another spec (same build) is refused by the spec hash in it.
    let mut other = f.model.spec.clone();
    other.output_name.push('x');
    let e = match Keys::read(&f.params, &other, &good) {
        Err(ZkError::Internal(m)) => m,
        other => panic!("{other:?}"),
    };
    assert!(e.contains("another circuit spec"), "{e}");
}

#[test]
fn a_verifier_stores_its_verifying_key_once() {
    let f = fixture();
    let spec = &f.model.spec;
    let dir = tempfile::tempdir().unwrap();
    let (vk, source) = keys::verifying_key(&f.params, spec, dir.path()).unwrap();
    assert!(matches!(
        source,
        KeySource::Keygen {
            stale: None,
            not_stored: None
        }
    ));
    assert_eq!(keys::fingerprint(&vk), f.keys.fingerprint());
    let path = key_file(dir.path());
    assert!(
        path.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("vk-")
    );
    let (vk, source) = keys::verifying_key(&f.params, spec, dir.path()).unwrap();
    assert_eq!(source, KeySource::Disk);
    assert_eq!(keys::fingerprint(&vk), f.keys.fingerprint());

    // A damaged or foreign file is replaced, with the reason.
    let good = std::fs::read(&path).unwrap();
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 4;
    for (bytes, reason) in [
        (bad, "checksum"),
        (f.keys.to_bytes().unwrap(), "not a key file of this kind"),
        (
            reseal([&good[..good.len() - 32], &[0u8; 33][..]].concat()),
            "trailing",
        ),
    ] {
        std::fs::write(&path, bytes).unwrap();
        let (vk, source) = keys::verifying_key(&f.params, spec, dir.path()).unwrap();
        match source {
            KeySource::Keygen {
                stale: Some(m),
                not_stored: None,
            } => {
                assert!(m.contains(reason), "{m}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(keys::fingerprint(&vk), f.keys.fingerprint());
        assert_eq!(std::fs::read(&path).unwrap(), good);
    }

    // Where the prover keeps its key file, the verifying key comes from it: no second file.
    let prover = tempfile::tempdir().unwrap();
    Keys::load_or_create(&f.params, spec, prover.path()).unwrap();
    let (vk, source) = keys::verifying_key(&f.params, spec, prover.path()).unwrap();
    assert_eq!(source, KeySource::Disk);
    assert_eq!(keys::fingerprint(&vk), f.keys.fingerprint());
    assert!(key_file(prover.path()).to_str().unwrap().contains("keys-"));
}

#[test]
fn the_provers_verify_never_stores_keys_for_a_callers_circuit() {
    let f = fixture();
    let bundle = crate::common::prove_digits(5, "job-verify-files");
    // Specs no other test verifies (so their keys are not in memory): the same circuit under
    // other output names. The proofs don't verify (the spec is in the statement), but each
    // verification (against the digest of the renamed model, so that it gets past the digest
    // check) first looks for the verifying key.
    let renamed = |name: &str| {
        let mut b = bundle.clone();
        b.spec.output_name = name.into();
        b.public.model_digest = b.computed_digest();
        b
    };
    let dir = tempfile::tempdir().unwrap();
    let bad = renamed("logits-for-the-prover");
    let expected = bad.public.model_digest;
    assert!(modelhub_zk::verify_with_prover_keys(&f.params, &bad, &expected, dir.path()).is_err());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing stored"
    );
    // A verifier that keeps keys (modelhub proofs verify) stores the one it made.
    let bad = renamed("logits-for-the-cli");
    assert!(verify_cached(&f.params, &bad, &bad.public.model_digest, dir.path()).is_err());
    assert!(key_file(dir.path()).to_str().unwrap().contains("vk-"));
    // The prover's own key file serves its verifications.
    Keys::load_or_create(&f.params, &f.model.spec, dir.path()).unwrap();
    let honest = bundle.public.model_digest;
    modelhub_zk::verify_with_prover_keys(&f.params, &bundle, &honest, dir.path()).unwrap();
}

#[test]
fn concurrent_first_uses_leave_one_good_file() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| Keys::load_or_create(&f.params, &f.model.spec, dir.path())))
            .collect();
        for h in handles {
            let (keys, source) = h.join().unwrap().unwrap();
            assert_eq!(keys.fingerprint(), f.keys.fingerprint());
            // Each one either read a file another stored or stored its own without a clash.
            assert!(
                matches!(
                    source,
                    KeySource::Disk
                        | KeySource::Keygen {
                            not_stored: None,
                            ..
                        }
                ),
                "{source:?}"
            );
        }
    });
    key_file(dir.path());
    let (_, source) = Keys::load_or_create(&f.params, &f.model.spec, dir.path()).unwrap();
    assert_eq!(source, KeySource::Disk);
}

#[test]
fn keys_that_cannot_be_stored_are_still_given() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    // The key folder's path is taken by a file: nothing can be stored below it.
    let blocked = dir.path().join("keys");
    std::fs::write(&blocked, b"not a folder").unwrap();
    let (keys, source) = Keys::load_or_create(&f.params, &f.model.spec, &blocked).unwrap();
    assert_eq!(keys.fingerprint(), f.keys.fingerprint());
    assert!(
        matches!(
            &source,
            KeySource::Keygen {
                stale: None,
                not_stored: Some(_)
            }
        ),
        "{source:?}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temp file left"
    );
}

#[test]
fn inconsistent_key_contents_are_errors() {
    let good = fixture().keys.to_bytes().unwrap();
    // After the 16-byte magic and two hashes: halo2's "halo2pk1", "halo2vk1", k, then counts.
    let body = 16 + 64;
    assert_eq!(&good[body..body + 8], b"halo2pk1");
    assert_eq!(&good[body + 8..body + 16], b"halo2vk1");
    let mut wrong_k = good.clone();
    wrong_k[body + 16] ^= 1;
    assert!(read_err(&reseal(wrong_k)).contains("k = "));
    let mut many_fixed = good.clone();
    many_fixed[body + 20..body + 24].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(read_err(&reseal(many_fixed)).contains("fixed columns"));
    let mut trailing = good[..good.len() - 32].to_vec();
    trailing.push(0);
    trailing.extend_from_slice(&[0; 32]);
    assert!(read_err(&reseal(trailing)).contains("trailing"));
    // The last column value made non-canonical (the modulus is below 2^255).
    let mut scalar = good.clone();
    let end = scalar.len() - 32;
    scalar[end - 1] = 0xff;
    assert!(read_err(&reseal(scalar)).contains("non-canonical"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever a buggy writer puts in a correctly sealed file, reading it never panics.
    #[test]
    fn sealed_garbage_never_panics(
        at in 0usize..4096,
        len in 1usize..64,
        byte in any::<u8>(),
        cut in proptest::option::of(0usize..8192),
    ) {
        let f = fixture();
        let mut bytes = f.keys.to_bytes().unwrap();
        let n = bytes.len() - 32;
        let start = (80 + at).min(n - 1);
        for b in &mut bytes[start..(start + len).min(n)] {
            *b = byte;
        }
        let mut bytes = reseal(bytes);
        if let Some(cut) = cut {
            let keep = (80 + cut).min(bytes.len() - 32);
            let tail = bytes.split_off(keep);
            drop(tail);
            bytes.extend_from_slice(&[0; 32]);
            bytes = reseal(bytes);
        }
        let _ = Keys::read(&f.params, &f.model.spec, &bytes);
    }
}
