//! Starts storage and inference on loopback ports, uploads models, builds requests.

use modelhub_core::{ApiError, ErrorCode, Tensor};
use modelhub_inference::InferenceService;
use modelhub_proto::common::v1::ModelRef;
use modelhub_proto::inference::v1 as pb;
use modelhub_proto::inference::v1::inference_client::InferenceClient;
use modelhub_proto::storage::v1::storage_client::StorageClient;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub struct Server {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    /// Stops the server and waits until it has returned.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

pub struct Cluster {
    pub storage: StorageClient<Channel>,
    pub storage_server: Server,
    pub inference: InferenceClient<Channel>,
    pub inference_server: Server,
    pub service: InferenceService,
    _data: tempfile::TempDir,
}

async fn listener() -> (tokio::net::TcpListener, String) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    (l, url)
}

pub async fn start() -> Cluster {
    let data = tempfile::tempdir().unwrap();
    let (sl, storage_url) = listener().await;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(modelhub_storage::run(
        modelhub_storage::Settings::for_test(data.path()),
        sl,
        async {
            let _ = stopped.await;
        },
    ));
    let storage_server = Server {
        stop: Some(stop),
        task: Some(task),
    };

    let service =
        InferenceService::new(&modelhub_inference::Settings::for_test(&storage_url)).unwrap();
    let (il, inference_url) = listener().await;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(modelhub_inference::serve(service.clone(), il, async {
        let _ = stopped.await;
    }));
    let inference_server = Server {
        stop: Some(stop),
        task: Some(task),
    };
    let channel = |url: String| Channel::from_shared(url).unwrap().connect_lazy();
    Cluster {
        storage: StorageClient::new(channel(storage_url)),
        storage_server,
        inference: InferenceClient::new(channel(inference_url)),
        inference_server,
        service,
        _data: data,
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
    client
        .predict(pb::PredictRequest {
            model: Some(model.clone()),
            inputs: inputs.into_iter().map(Tensor::into_proto).collect(),
            job_id: "job_test".into(),
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
