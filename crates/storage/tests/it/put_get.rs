//! Upload and download: round trips, validation, limits, tampering.

use modelhub_core::{DataType, ErrorCode, TensorSpec};
use sha2::{Digest, Sha256};

use crate::harness::{self, chunk, code, digits, get, header, model_ref, put, start, upload};

#[tokio::test]
async fn a_model_put_in_small_chunks_comes_back_byte_identical() {
    let mut s = start(|_| {}).await;
    let bytes = digits();
    let first = put(&mut s.client, upload("mdl_1", "1", &bytes, 100))
        .await
        .unwrap();
    assert_eq!(first.size, bytes.len() as u64);
    assert_eq!(first.sha256, hex::encode(Sha256::digest(&bytes)));
    assert!(
        first.cid.starts_with("bafk") || first.cid.starts_with("bafy"),
        "{}",
        first.cid
    );
    let inputs: Vec<TensorSpec> = first
        .inputs
        .iter()
        .cloned()
        .map(|s| s.try_into().unwrap())
        .collect();
    assert_eq!(
        inputs,
        vec![TensorSpec {
            name: "X".into(),
            datatype: DataType::Fp32,
            shape: vec![-1, 64]
        }]
    );
    let outputs: Vec<String> = first.outputs.iter().map(|o| o.name.clone()).collect();
    assert_eq!(outputs, ["label", "probabilities"]);

    // The stored blob is ciphertext named by its CID, never the plaintext.
    let stored = std::fs::read(s.blob_dir().join(&first.cid)).unwrap();
    assert_eq!(&stored[..4], b"MHE1");
    assert!(!stored.windows(32).any(|w| w == &bytes[100..132]));
    assert_eq!(
        modelhub_storage::unixfs::cid_of_bytes(&stored).to_string(),
        first.cid
    );

    let back = get(&mut s.reader, model_ref("mdl_1", "1", &first))
        .await
        .unwrap();
    assert_eq!(back, bytes);

    // Same bytes again: a fresh data key, so different ciphertext and a different blob.
    let second = put(&mut s.client, upload("mdl_1", "1", &bytes, 4096))
        .await
        .unwrap();
    assert_ne!(second.cid, first.cid);
    assert_ne!(second.wrapped_dek, first.wrapped_dek);
    assert_eq!(second.sha256, first.sha256);
    assert_eq!(s.blob_files().len(), 2);
    let back = get(&mut s.reader, model_ref("mdl_1", "1", &second))
        .await
        .unwrap();
    assert_eq!(back, bytes);
    s.stop().await;
}

#[tokio::test]
async fn bytes_that_are_not_onnx_are_unprocessable_and_not_stored() {
    let mut s = start(|_| {}).await;
    let junk = std::fs::read(modelhub_testkit::test_model("not_onnx.bin")).unwrap();
    let status = put(&mut s.client, upload("mdl_2", "1", &junk, 64))
        .await
        .unwrap_err();
    assert_eq!(code(&status), ErrorCode::Unprocessable);
    assert!(
        status.message().starts_with("not a loadable ONNX model"),
        "{}",
        status.message()
    );
    let bytes = digits();
    let status = put(
        &mut s.client,
        upload("mdl_2", "1", &bytes[..bytes.len() / 2], 512),
    )
    .await
    .unwrap_err();
    assert_eq!(code(&status), ErrorCode::Unprocessable);
    assert!(s.blob_files().is_empty());
    s.stop().await;
}

#[tokio::test]
async fn an_upload_without_finish_or_header_stores_nothing() {
    let mut s = start(|_| {}).await;
    let bytes = digits();
    let mut msgs = upload("mdl_3", "1", &bytes, 1000);
    msgs.pop(); // no finish
    let status = put(&mut s.client, msgs).await.unwrap_err();
    assert_eq!(code(&status), ErrorCode::BadRequest);
    assert!(
        status.message().contains("without finish"),
        "{}",
        status.message()
    );

    let status = put(&mut s.client, vec![chunk(&bytes), harness::finish()])
        .await
        .unwrap_err();
    assert_eq!(code(&status), ErrorCode::BadRequest);
    assert!(status.message().contains("header"), "{}", status.message());

    let status = put(&mut s.client, vec![header("", "1"), harness::finish()])
        .await
        .unwrap_err();
    assert_eq!(code(&status), ErrorCode::BadRequest);
    assert!(s.blob_files().is_empty());
    s.stop().await;
}

#[tokio::test]
async fn an_oversize_model_is_payload_too_large() {
    let mut s = start(|settings| settings.max_model_bytes = 4000).await;
    let bytes = digits();
    assert!(bytes.len() > 4000);
    let status = put(&mut s.client, upload("mdl_4", "1", &bytes, 1000))
        .await
        .unwrap_err();
    assert_eq!(code(&status), ErrorCode::PayloadTooLarge);
    assert!(s.blob_files().is_empty());
    s.stop().await;
}

#[tokio::test]
async fn a_tampered_blob_never_reads_back_as_success() {
    let mut s = start(|_| {}).await;
    let bytes = digits();
    let put_ok = put(&mut s.client, upload("mdl_5", "1", &bytes, 1000))
        .await
        .unwrap();
    let path = s.blob_dir().join(&put_ok.cid);
    let mut stored = std::fs::read(&path).unwrap();
    let middle = stored.len() / 2;
    stored[middle] ^= 0x01;
    std::fs::write(&path, &stored).unwrap();
    let status = get(&mut s.reader, model_ref("mdl_5", "1", &put_ok))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal);
    assert!(
        status.message().contains("integrity"),
        "{}",
        status.message()
    );
    s.stop().await;
}

#[tokio::test]
async fn a_wrong_key_or_hash_or_cid_is_an_error() {
    let mut s = start(|_| {}).await;
    let bytes = digits();
    let put_ok = put(&mut s.client, upload("mdl_6", "1", &bytes, 1000))
        .await
        .unwrap();

    let mut wrong_dek = model_ref("mdl_6", "1", &put_ok);
    wrong_dek.wrapped_dek[20] ^= 1;
    let status = get(&mut s.reader, wrong_dek).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal);
    assert_eq!(status.message(), "model key could not be unwrapped");

    // The key is bound to the model version.
    let status = get(&mut s.reader, model_ref("mdl_6", "2", &put_ok))
        .await
        .unwrap_err();
    assert_eq!(status.message(), "model key could not be unwrapped");

    let mut wrong_hash = model_ref("mdl_6", "1", &put_ok);
    wrong_hash.sha256 = hex::encode([7u8; 32]);
    let status = get(&mut s.reader, wrong_hash).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal);
    assert!(
        status.message().contains("integrity"),
        "{}",
        status.message()
    );

    let mut unknown = model_ref("mdl_6", "1", &put_ok);
    unknown.cid = modelhub_storage::unixfs::cid_of_bytes(b"nothing").to_string();
    let status = get(&mut s.reader, unknown).await.unwrap_err();
    assert_eq!(code(&status), ErrorCode::NotFound);
    s.stop().await;
}
