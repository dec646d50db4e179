//! Starts a storage service on a loopback port and hands out clients.

use std::path::PathBuf;

use modelhub_core::{ApiError, ErrorCode};
use modelhub_mtls::Identity;
use modelhub_proto::storage::v1 as pb;
use modelhub_proto::storage::v1::put_model_request::Part;
use modelhub_proto::storage::v1::storage_client::StorageClient;
use modelhub_storage::Settings;
use tonic::transport::Channel;

pub struct Running {
    /// Calls as the gateway: `PutModel`, `DeleteModel`.
    pub client: StorageClient<Channel>,
    /// Calls as the inference service: `GetModel`.
    pub reader: StorageClient<Channel>,
    pub data_dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    pub fn blob_dir(&self) -> PathBuf {
        self.data_dir.path().join("blobs")
    }

    /// Files in the blob folder (temporary files included).
    pub fn blob_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.blob_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

pub async fn start(configure: impl FnOnce(&mut Settings)) -> Running {
    let data_dir = tempfile::tempdir().unwrap();
    let pki = modelhub_testkit::tls::TestPki::shared();
    let mut settings = Settings {
        mtls_dir: pki.dir().to_path_buf(),
        ..Settings::for_test(data_dir.path())
    };
    configure(&mut settings);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(modelhub_storage::run(settings, listener, async {
        let _ = stopped.await;
    }));
    let url = format!("https://{addr}");
    let client = |caller| {
        StorageClient::new(pki.channel(caller, Identity::Storage, &url))
            .max_decoding_message_size(64 << 20)
    };
    Running {
        client: client(Identity::Gateway),
        reader: client(Identity::Inference),
        data_dir,
        stop: Some(stop),
        task: Some(task),
    }
}

pub fn header(model_id: &str, version: &str) -> pb::PutModelRequest {
    pb::PutModelRequest {
        part: Some(Part::Header(pb::PutHeader {
            model_id: model_id.into(),
            version: version.into(),
        })),
    }
}

pub fn chunk(bytes: &[u8]) -> pb::PutModelRequest {
    pb::PutModelRequest {
        part: Some(Part::Chunk(bytes.to_vec())),
    }
}

pub fn finish() -> pb::PutModelRequest {
    pb::PutModelRequest {
        part: Some(Part::Finish(pb::PutFinish {})),
    }
}

/// A complete upload: header, `bytes` in pieces of `piece`, finish.
pub fn upload(
    model_id: &str,
    version: &str,
    bytes: &[u8],
    piece: usize,
) -> Vec<pb::PutModelRequest> {
    let mut msgs = vec![header(model_id, version)];
    msgs.extend(bytes.chunks(piece).map(chunk));
    msgs.push(finish());
    msgs
}

pub async fn put(
    client: &mut StorageClient<Channel>,
    msgs: Vec<pb::PutModelRequest>,
) -> Result<pb::PutModelResponse, tonic::Status> {
    client
        .put_model(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

/// Reads a whole GetModel answer: the plaintext, or the status that ended it.
pub async fn get(
    client: &mut StorageClient<Channel>,
    model: modelhub_proto::common::v1::ModelRef,
) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = client
        .get_model(pb::GetModelRequest { model: Some(model) })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await? {
        assert!(chunk.data.len() <= 1024 * 1024);
        out.extend_from_slice(&chunk.data);
    }
    Ok(out)
}

pub fn code(status: &tonic::Status) -> ErrorCode {
    ApiError::from_status(status).code
}

pub fn model_ref(
    model_id: &str,
    version: &str,
    put: &pb::PutModelResponse,
) -> modelhub_proto::common::v1::ModelRef {
    modelhub_proto::common::v1::ModelRef {
        model_id: model_id.into(),
        version: version.into(),
        cid: put.cid.clone(),
        wrapped_dek: put.wrapped_dek.clone(),
        sha256: put.sha256.clone(),
        size: put.size,
    }
}

pub fn digits() -> Vec<u8> {
    std::fs::read(modelhub_testkit::test_model("digits_mlp.onnx")).unwrap()
}
