//! Property tests of the parsers that take untrusted bytes (issue 13's fuzz targets, in the
//! normal suite so CI exercises them): the `Authorization` header, tensor JSON, and the
//! segmented ciphertext reader and the KEK's unwrap never panic on any input, and round-trip
//! what they should.

use modelhub_core::crypto::{self, SecretKey};
use modelhub_core::signing::{Authorization, REQUIRED_SIGNED_HEADERS};
use modelhub_core::tensor::JsonTensor;
use modelhub_core::{DataType, Tensor};
use proptest::prelude::*;

/// Segment size of the ciphertext format (64 KiB): inputs cross segment boundaries.
const SEGMENT: usize = 64 * 1024;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any header value: parsed or refused with a reason, never a panic.
    #[test]
    fn any_authorization_value_is_parsed_or_refused(value in ".{0,300}") {
        let _ = Authorization::parse(&value);
        let with_prefix = format!("MH-HMAC-SHA256 {value}");
        let _ = Authorization::parse(&with_prefix);
    }

    /// A well-formed header reads back as written.
    #[test]
    fn a_written_authorization_reads_back(
        key_id in "[a-z0-9_]{1,40}",
        extra in proptest::collection::btree_set("x-[a-z]{1,8}", 0..4),
        signature in "[0-9a-f]{64}",
    ) {
        let mut signed_headers: Vec<String> =
            REQUIRED_SIGNED_HEADERS.iter().map(|h| h.to_string()).collect();
        signed_headers.extend(extra);
        signed_headers.sort();
        signed_headers.dedup();
        let a = Authorization { key_id, signed_headers, signature };
        prop_assert_eq!(Authorization::parse(&a.to_header()).unwrap(), a);
    }

    /// Any JSON text as a tensor: decoded or refused, never a panic.
    #[test]
    fn any_tensor_json_is_decoded_or_refused(
        name in "[a-zA-Z]{0,8}",
        shape in proptest::collection::vec(any::<i64>(), 0..5),
        datatype in prop::sample::select(vec!["FP32", "FP16", "INT64", "BOOL", "UINT8", "BYTES", "fp32"]),
        data in ".{0,64}",
    ) {
        let text = format!(
            r#"{{"name":{name:?},"shape":{shape:?},"datatype":{datatype:?},"data":{}}}"#,
            if serde_json::from_str::<serde_json::Value>(&data).is_ok() { data.clone() } else { format!("{data:?}") }
        );
        if let Ok(json) = serde_json::from_str::<JsonTensor>(&text) {
            let _ = Tensor::from_json(&json);
        }
    }

    /// Shapes whose element count overflows or is negative are refused, not allocated.
    #[test]
    fn huge_or_negative_shapes_are_refused(dims in proptest::collection::vec(any::<i64>(), 1..4)) {
        let count = dims.iter().try_fold(1i64, |n, &d| if d < 0 { None } else { n.checked_mul(d) });
        prop_assume!(count.is_none_or(|n| n > 16));
        let text = format!(r#"{{"name":"x","shape":{dims:?},"datatype":"FP32","data":[1.0]}}"#);
        let json: JsonTensor = serde_json::from_str(&text).unwrap();
        prop_assert!(Tensor::from_json(&json).is_err());
    }

    /// FP32 tensors read back from their JSON exactly.
    #[test]
    fn fp32_tensors_round_trip_through_json(values in proptest::collection::vec(-1e6f32..1e6, 1..64)) {
        let text = serde_json::json!({
            "name": "x", "shape": [1, values.len()], "datatype": "FP32", "data": values,
        })
        .to_string();
        let json: JsonTensor = serde_json::from_str(&text).unwrap();
        let tensor = Tensor::from_json(&json).unwrap();
        prop_assert_eq!(tensor.datatype, DataType::Fp32);
        prop_assert_eq!(tensor.as_f32().unwrap(), values);
        let again: JsonTensor = serde_json::from_value(tensor.to_json()).unwrap();
        prop_assert_eq!(Tensor::from_json(&again).unwrap(), tensor);
    }

    /// Any bytes given as a ciphertext: refused, never a panic and never a plaintext.
    /// A wrapped key (a KEK ring's wrap): any bytes it did not make are refused, never a
    /// panic, and any one changed byte of one it made is refused too.
    #[test]
    fn a_kek_opens_only_its_own_wraps_unchanged(
        bytes in proptest::collection::vec(any::<u8>(), 0..128),
        secret in proptest::collection::vec(any::<u8>(), 0..64),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let kek = crypto::Kek::new(SecretKey::generate());
        prop_assert!(kek.unwrap(&bytes, b"aad").is_err());
        let wrapped = kek.wrap(&secret, b"aad");
        prop_assert_eq!(kek.unwrap(&wrapped, b"aad").unwrap(), secret);
        let mut changed = wrapped.clone();
        changed[at.index(wrapped.len())] ^= flip;
        prop_assert!(kek.unwrap(&changed, b"aad").is_err());
    }

    #[test]
    fn any_bytes_as_ciphertext_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let dek = SecretKey::from_bytes([3; 32]);
        prop_assert!(crypto::decrypt_all(&dek, b"m\0v", &bytes).is_err());
        let kek = crypto::Kek::new(SecretKey::from_bytes([4; 32]));
        prop_assert!(kek.unwrap(&bytes, b"aad").is_err());
    }

    /// A ciphertext read in pieces of any size gives the plaintext back; any change to it, a
    /// truncation, or other associated data is refused.
    #[test]
    fn ciphertexts_read_in_any_pieces_and_refuse_any_change(
        len in prop_oneof![0usize..512, (SEGMENT - 2)..(SEGMENT + 2), (2 * SEGMENT - 1)..(2 * SEGMENT + 300)],
        cut in proptest::collection::vec(1usize..70_000, 1..8),
        flip in any::<prop::sample::Index>(),
        truncate in any::<prop::sample::Index>(),
    ) {
        let dek = SecretKey::from_bytes([9; 32]);
        let plaintext: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let ct = crypto::encrypt_all(&dek, b"m\0v", &plaintext).unwrap();

        let mut dec = crypto::SegmentDecryptor::new(dek.clone(), b"m\0v".to_vec());
        let (mut out, mut at, mut i) = (Vec::new(), 0, 0);
        while at < ct.len() {
            let n = cut[i % cut.len()].min(ct.len() - at);
            dec.update(&ct[at..at + n], &mut out).unwrap();
            at += n;
            i += 1;
        }
        dec.finish(&mut out).unwrap();
        prop_assert_eq!(&out, &plaintext);

        let mut changed = ct.clone();
        changed[flip.index(ct.len())] ^= 0x01;
        prop_assert!(crypto::decrypt_all(&dek, b"m\0v", &changed).is_err());
        let short = &ct[..truncate.index(ct.len())];
        prop_assert!(crypto::decrypt_all(&dek, b"m\0v", short).is_err());
        prop_assert!(crypto::decrypt_all(&dek, b"m\0w", &ct).is_err());
    }
}
