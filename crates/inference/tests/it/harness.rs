//! Starts storage and inference on loopback ports, uploads models, builds requests.

use modelhub_core::{ApiError, ErrorCode, Tensor};
use modelhub_inference::InferenceService;
use modelhub_mtls::Identity;
use modelhub_proto::common::v1::ModelRef;
use modelhub_proto::inference::v1 as pb;
use modelhub_proto::inference::v1::inference_client::InferenceClient;
use modelhub_proto::storage::v1::storage_client::StorageClient;
use modelhub_testkit::grpc::Server;
use tonic::transport::Channel;

pub struct Cluster {
    pub storage: StorageClient<Channel>,
    pub storage_server: Server,
    pub inference: InferenceClient<Channel>,
    pub inference_server: Server,
    pub service: InferenceService,
    pub data: tempfile::TempDir,
}

pub async fn start() -> Cluster {
    start_with(|_| {}).await
}

/// [`start`] with inference settings changed by `configure`.
pub async fn start_with(configure: impl FnOnce(&mut modelhub_inference::Settings)) -> Cluster {
    let data = tempfile::tempdir().unwrap();
    let mtls_dir = modelhub_testkit::tls::TestPki::shared().dir().to_path_buf();
    let storage_settings = modelhub_storage::Settings {
        mtls_dir: mtls_dir.clone(),
        ..modelhub_storage::Settings::for_test(data.path())
    };
    let storage_server =
        Server::start(|l, stop| modelhub_storage::run(storage_settings, l, stop)).await;
    let mut settings = modelhub_inference::Settings {
        mtls_dir,
        ..modelhub_inference::Settings::for_test(&storage_server.url)
    };
    configure(&mut settings);
    let service = InferenceService::new(&settings).unwrap();
    let serving = service.clone();
    let inference_server =
        Server::start(|l, stop| modelhub_inference::serve(serving, l, stop)).await;
    Cluster {
        storage: StorageClient::new(storage_server.channel(Identity::Gateway, Identity::Storage)),
        storage_server,
        inference: InferenceClient::new(
            inference_server.channel(Identity::Gateway, Identity::Inference),
        ),
        inference_server,
        service,
        data,
    }
}

pub fn digits() -> Vec<u8> {
    std::fs::read(modelhub_testkit::test_model("digits_mlp.onnx")).unwrap()
}

/// Uploads `bytes` as `model_id` version 1 and returns the reference a registry would keep.
pub async fn upload(
    storage: &mut StorageClient<Channel>,
    model_id: &str,
    bytes: &[u8],
) -> ModelRef {
    modelhub_testkit::grpc::put_model(storage, model_id, bytes)
        .await
        .unwrap()
        .0
}

pub async fn predict(
    client: &mut InferenceClient<Channel>,
    model: &ModelRef,
    inputs: Vec<Tensor>,
) -> Result<Vec<Tensor>, ApiError> {
    predict_as(client, "acc_test", model, inputs).await
}

/// [`predict`] on behalf of `account`.
pub async fn predict_as(
    client: &mut InferenceClient<Channel>,
    account: &str,
    model: &ModelRef,
    inputs: Vec<Tensor>,
) -> Result<Vec<Tensor>, ApiError> {
    client
        .predict(pb::PredictRequest {
            model: Some(model.clone()),
            inputs: inputs.into_iter().map(Tensor::into_proto).collect(),
            job_id: "job_test".into(),
            account_id: account.into(),
            ..Default::default()
        })
        .await
        .map(|r| {
            r.into_inner()
                .outputs
                .into_iter()
                .map(|t| Tensor::try_from(t).unwrap())
                .collect()
        })
        .map_err(|s| ApiError::from_status(&s))
}

pub fn assert_code(e: &ApiError, code: ErrorCode) {
    assert_eq!(e.code, code, "{e}");
}

/// Puts `bytes` into storage's blob store the way storage would, but without storage's checks:
/// a model that an older release (or a hole) let in.
pub async fn plant(data_dir: &std::path::Path, model_id: &str, bytes: &[u8]) -> ModelRef {
    use modelhub_core::crypto::{Kek, SecretKey, encrypt_all, model_aad};
    use modelhub_storage::BlobStore;
    use sha2::Digest;
    let kek = Kek::load(&data_dir.join("kek")).unwrap();
    let dek = SecretKey::generate();
    let ciphertext = encrypt_all(&dek, &model_aad(model_id, "1"), bytes).unwrap();
    let blobs = modelhub_storage::LocalBlobStore::open(data_dir).unwrap();
    let cid = blobs.put(bytes::Bytes::from(ciphertext)).await.unwrap();
    ModelRef {
        model_id: model_id.into(),
        version: "1".into(),
        cid,
        wrapped_dek: kek.wrap_dek(&dek, model_id, "1"),
        sha256: hex::encode(sha2::Sha256::digest(bytes)),
        size: bytes.len() as u64,
    }
}
