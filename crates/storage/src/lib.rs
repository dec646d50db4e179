//! Model Hub storage service: model uploads are validated as ONNX, sealed with a fresh data key
//! (AES-256-GCM STREAM segments, the key wrapped by the KEK) and kept as content-addressed
//! blobs named by their IPFS CID; authorized reads stream the plaintext back after checking
//! every segment and the plaintext SHA-256.
//!
//! Blobs live on local disk ([`LocalBlobStore`]) or, when `--ipfs-api` names a node, on IPFS
//! ([`IpfsBlobStore`], pinned); both name a blob by the same CID, so blobs move between them
//! without a registry change ([`reconcile::export`]).
//!
//! Modules: [`unixfs`] (the kubo-compatible CID), [`blob`] (the blob store trait and the local
//! disk store), [`ipfs`] (the IPFS node store), [`reconcile`] (verify and export), [`service`]
//! (the gRPC service), [`client`] (the `GetModel` client side), [`error`].

pub mod blob;
pub mod client;
pub mod error;
pub mod ipfs;
pub mod reconcile;
pub mod service;
pub mod unixfs;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use modelhub_core::crypto::Kek;
use modelhub_mtls::{Identity, TlsDir, policy};
use modelhub_proto::storage::v1::storage_server::StorageServer;

pub use blob::{BlobStore, LocalBlobStore};
pub use error::StorageError;
pub use ipfs::{IpfsBlobStore, IpfsOptions};
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
    /// RPC API of an IPFS node (kubo API), e.g. `http://127.0.0.1:5001`: blobs go there,
    /// pinned, instead of `<data_dir>/blobs`.
    #[arg(long = "ipfs-api", env = "MODELHUB_STORAGE_IPFS_API")]
    pub ipfs_api: Option<String>,
    /// Bound on every IPFS call, and on each wait for progress while a blob streams, in ms.
    #[arg(
        long = "ipfs-timeout-ms",
        env = "MODELHUB_STORAGE_IPFS_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub ipfs_timeout_ms: u64,
    /// Bound on connecting to the node and its first byte of a blob, in ms.
    #[arg(
        long = "ipfs-first-byte-timeout-ms",
        env = "MODELHUB_STORAGE_IPFS_FIRST_BYTE_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub ipfs_first_byte_timeout_ms: u64,
    /// Folder of the mutual-TLS files made by `modelhub certs`: `ca.pem`, `storage.pem`,
    /// `storage.key`. The storage speaks only TLS and serves only callers with a certificate from
    /// that CA, each only the methods its identity may call.
    #[arg(
        long,
        env = "MODELHUB_STORAGE_MTLS_DIR",
        default_value = "./modelhub-data/tls"
    )]
    pub mtls_dir: PathBuf,
}

impl Settings {
    /// Settings for tests (and `modelhub up`): everything under `data_dir`, the default limits;
    /// set `mtls_dir` to a test PKI (`modelhub_testkit::tls`).
    pub fn for_test(data_dir: &Path) -> Settings {
        Settings {
            data_dir: data_dir.to_path_buf(),
            kek_file: None,
            max_model_bytes: 1 << 30,
            ipfs_api: None,
            ipfs_timeout_ms: 30_000,
            ipfs_first_byte_timeout_ms: 5_000,
            mtls_dir: PathBuf::from("./modelhub-data/tls"),
        }
    }

    /// The IPFS client's timeouts.
    pub fn ipfs_options(&self) -> IpfsOptions {
        IpfsOptions {
            timeout: std::time::Duration::from_millis(self.ipfs_timeout_ms),
            first_byte_timeout: std::time::Duration::from_millis(self.ipfs_first_byte_timeout_ms),
        }
    }

    /// The IPFS store when `ipfs_api` is set.
    pub fn ipfs_store(&self) -> anyhow::Result<Option<IpfsBlobStore>> {
        self.ipfs_api
            .as_deref()
            .map(|api| IpfsBlobStore::new(api, self.ipfs_options()))
            .transpose()
            .context("MODELHUB_STORAGE_IPFS_API")
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
        anyhow::ensure!(
            self.ipfs_timeout_ms > 0 && self.ipfs_first_byte_timeout_ms > 0,
            "the IPFS timeouts must be positive"
        );
        Ok(())
    }
}

/// Opens the blob store and the KEK and builds the service.
pub fn build(settings: &Settings) -> anyhow::Result<StorageService> {
    settings.validate()?;
    modelhub_onnx::init().context("storage validates models with ONNX Runtime")?;
    let blobs: Arc<dyn BlobStore> = match settings.ipfs_store()? {
        Some(ipfs) => Arc::new(ipfs),
        None => Arc::new(LocalBlobStore::open(&settings.data_dir)?),
    };
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("creating {}", settings.data_dir.display()))?;
    let kek = Kek::load_or_generate(&settings.kek_path()).context("loading the KEK")?;
    Ok(StorageService::new(blobs, kek, settings.max_model_bytes))
}

/// Serves the storage service (and `grpc.health.v1`) on `listener` until `shutdown` resolves
/// and in-flight requests have finished.
pub async fn run(
    settings: Settings,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tls = TlsDir::load(&settings.mtls_dir, Identity::Storage)?;
    let service = build(&settings)?;
    let addr = listener.local_addr()?;
    if let Some(ipfs) = settings.ipfs_store()? {
        // Serve anyway: reads of cached models elsewhere don't need the node, and uploads
        // answer 503 until it is back.
        match ipfs.check().await {
            Ok(version) => tracing::info!(api = ipfs.api(), %version, "blobs on IPFS"),
            Err(e) => {
                tracing::warn!(api = ipfs.api(), error = %e, "IPFS node unavailable at start")
            }
        }
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<StorageServer<StorageService>>().await;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tracing::info!(%addr, data_dir = %settings.data_dir.display(), "storage listening");
    tls.server(&policy::STORAGE)?
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

modelhub_core::serve_args!("storage", "MODELHUB_STORAGE_LISTEN", "127.0.0.1:50052");
