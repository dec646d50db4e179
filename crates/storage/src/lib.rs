//! Model Hub storage service: model uploads are validated as ONNX, sealed with a fresh data key
//! (AES-256-GCM STREAM segments, the key wrapped by the KEK) and kept as content-addressed
//! blobs named by their IPFS CID; authorized reads stream the plaintext back after checking
//! every segment and the plaintext SHA-256.
//!
//! Modules: [`unixfs`] (the kubo-compatible CID), [`blob`] (the blob store trait and the local
//! disk store), [`service`] (the gRPC service), [`error`].

pub mod blob;
pub mod client;
pub mod error;
pub mod service;
pub mod unixfs;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use modelhub_core::crypto::Kek;
use modelhub_proto::storage::v1::storage_server::StorageServer;

pub use blob::{BlobStore, LocalBlobStore};
pub use error::StorageError;
pub use service::StorageService;

/// Largest gRPC message the service accepts or sends (upload chunks are usually far smaller).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Settings of the storage service.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Folder for blobs and, by default, the KEK file.
    #[arg(
        long = "data-dir",
        env = "MODELHUB_STORAGE_DATA_DIR",
        default_value = "./modelhub-data/storage"
    )]
    pub data_dir: PathBuf,
    /// File holding the key-encryption key (base64 of 32 bytes); created when missing.
    /// Default: `<data_dir>/kek`.
    #[arg(long = "kek-file", env = "MODELHUB_STORAGE_KEK_FILE")]
    pub kek_file: Option<PathBuf>,
    /// Largest model accepted, in bytes.
    #[arg(
        long = "max-model-bytes",
        env = "MODELHUB_STORAGE_MAX_MODEL_BYTES",
        default_value_t = 1 << 30
    )]
    pub max_model_bytes: u64,
}

impl Settings {
    /// Settings for tests (and `modelhub up`): everything under `data_dir`, the default limits.
    pub fn for_test(data_dir: &Path) -> Settings {
        Settings {
            data_dir: data_dir.to_path_buf(),
            kek_file: None,
            max_model_bytes: 1 << 30,
        }
    }

    /// The KEK file in use.
    pub fn kek_path(&self) -> PathBuf {
        self.kek_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("kek"))
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_model_bytes > 0,
            "MODELHUB_STORAGE_MAX_MODEL_BYTES must be positive"
        );
        Ok(())
    }
}

/// Opens the blob store and the KEK and builds the service.
pub fn build(settings: &Settings) -> anyhow::Result<StorageService> {
    settings.validate()?;
    modelhub_onnx::init().context("storage validates models with ONNX Runtime")?;
    let blobs = LocalBlobStore::open(&settings.data_dir)?;
    let kek = Kek::load_or_generate(&settings.kek_path()).context("loading the KEK")?;
    Ok(StorageService::new(
        Arc::new(blobs),
        kek,
        settings.max_model_bytes,
    ))
}

/// Serves the storage service (and `grpc.health.v1`) on `listener` until `shutdown` resolves
/// and in-flight requests have finished.
pub async fn run(
    settings: Settings,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let service = build(&settings)?;
    let addr = listener.local_addr()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<StorageServer<StorageService>>().await;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tracing::info!(%addr, data_dir = %settings.data_dir.display(), "storage listening");
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(
            StorageServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("storage server")?;
    tracing::info!("storage stopped");
    Ok(())
}
