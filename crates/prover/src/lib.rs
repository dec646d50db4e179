//! The prover service: compiles supported ONNX graphs into halo2 circuits (`modelhub-zk`),
//! commits to their weights at upload, proves predictions streamed to it by the inference
//! workers on a bounded pool, stores the proofs, and verifies proof files.

pub mod error;
pub mod jobs;
pub mod models;
pub mod service;
pub mod shared;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use modelhub_core::crypto::Kek;
use modelhub_core::pool::ComputePool;
use modelhub_mtls::{Identity, TlsDir, policy};
use modelhub_proto::prover::v1::prover_server::ProverServer;
use tokio::net::TcpListener;

pub use error::ProverError;
pub use service::ProverService;

/// Settings of the prover service.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Folder for proofs, compiled-model records and cached proving params and keys.
    #[arg(
        long,
        env = "MODELHUB_PROVER_DATA_DIR",
        default_value = "./modelhub-data/prover"
    )]
    pub data_dir: PathBuf,
    /// Key-encryption key file (seals commitment openings). Default: `<data_dir>/kek`.
    #[arg(long, env = "MODELHUB_PROVER_KEK_FILE")]
    pub kek_file: Option<PathBuf>,
    /// Storage service endpoint (`https://`: mutual TLS; models are fetched to compile them).
    #[arg(
        long,
        env = "MODELHUB_PROVER_STORAGE",
        default_value = "https://127.0.0.1:50052"
    )]
    pub storage: String,
    /// Proving threads.
    #[arg(long, env = "MODELHUB_PROVER_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// Proof jobs pending (queued or being proved) before new ones are refused: a prediction
    /// asking for a proof is then answered 503, uncharged.
    #[arg(long, env = "MODELHUB_PROVER_MAX_QUEUED", default_value_t = jobs::Limits::default().capacity)]
    pub max_queued: usize,
    /// Proof jobs one account may have pending (429 beyond).
    #[arg(long, env = "MODELHUB_PROVER_MAX_PENDING_PER_ACCOUNT", default_value_t = jobs::Limits::default().per_account)]
    pub max_pending_per_account: usize,
    /// Where proving params and keys (`keys/`) are cached. Default: `<data_dir>/params`.
    #[arg(long, env = "MODELHUB_PROVER_PARAMS_DIR")]
    pub params_dir: Option<PathBuf>,
    /// Folder of the mutual-TLS files made by `modelhub certs`: `ca.pem`, `prover.pem`,
    /// `prover.key`. The prover speaks only TLS and serves only callers with a certificate from
    /// that CA, each only the methods its identity may call; it calls storage with its own.
    #[arg(
        long,
        env = "MODELHUB_PROVER_MTLS_DIR",
        default_value = "./modelhub-data/tls"
    )]
    pub mtls_dir: PathBuf,
    /// MongoDB URI of the state every prover replica shares: proof jobs (each leased by one
    /// prover at a time, taken over when its prover dies) and compiled-model records. Without
    /// it the prover keeps them under `data_dir`, for one replica.
    #[arg(long, env = "MODELHUB_PROVER_MONGODB_URI")]
    pub mongodb_uri: Option<String>,
    /// Seconds a taken proof job stays with its prover without a renewal (renewed every third
    /// of it while proving); after that another replica takes it over.
    #[arg(long, env = "MODELHUB_PROVER_LEASE_SECS", default_value_t = shared::DEFAULT_LEASE.as_secs())]
    pub lease_secs: u64,
}

impl Settings {
    /// Settings for tests: everything under `data_dir`, one worker; set `mtls_dir` to a test
    /// PKI (`modelhub_testkit::tls`).
    pub fn for_test(data_dir: &Path, storage: impl Into<String>) -> Settings {
        Settings {
            data_dir: data_dir.to_path_buf(),
            kek_file: None,
            storage: storage.into(),
            workers: 1,
            max_queued: jobs::Limits::default().capacity,
            max_pending_per_account: jobs::Limits::default().per_account,
            params_dir: None,
            mtls_dir: PathBuf::from("./modelhub-data/tls"),
            mongodb_uri: None,
            lease_secs: shared::DEFAULT_LEASE.as_secs(),
        }
    }

    pub fn kek_path(&self) -> PathBuf {
        self.kek_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("kek"))
    }

    pub fn params_path(&self) -> PathBuf {
        self.params_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("params"))
    }
}

/// Builds the service from its settings.
pub async fn build(settings: &Settings) -> anyhow::Result<ProverService> {
    anyhow::ensure!(
        settings.workers >= 1,
        "MODELHUB_PROVER_WORKERS must be at least 1"
    );
    let kek = Kek::load_or_generate(&settings.kek_path()).context("loading the KEK")?;
    let tls = TlsDir::load(&settings.mtls_dir, Identity::Prover)?;
    let storage = modelhub_storage::client::connect_lazy(&tls, &settings.storage)
        .map_err(|e| anyhow::anyhow!("MODELHUB_PROVER_STORAGE: {e}"))?;
    let pool = ComputePool::new("modelhub-prover", settings.workers)?;
    let shared = match &settings.mongodb_uri {
        Some(uri) => Some(
            shared::Shared::connect(uri, std::time::Duration::from_secs(10))
                .await
                .context("MODELHUB_PROVER_MONGODB_URI")?,
        ),
        None => None,
    };
    let records = match &shared {
        Some(s) => models::Records::Shared(s.clone()),
        None => models::Records::Dir(settings.data_dir.join("models")),
    };
    let models = models::Models::new(records, settings.params_path(), kek, storage, pool.clone())?;
    anyhow::ensure!(
        settings.max_queued >= 1 && settings.max_pending_per_account >= 1,
        "the proof queue limits must be at least 1"
    );
    let limits = jobs::Limits {
        capacity: settings.max_queued,
        per_account: settings.max_pending_per_account,
    };
    anyhow::ensure!(settings.lease_secs >= 1, "lease_secs must be at least 1");
    let jobs: Arc<dyn jobs::JobQueue> = match &shared {
        Some(s) => Arc::new(shared::SharedJobs::new(
            s,
            limits,
            settings.workers,
            std::time::Duration::from_secs(settings.lease_secs),
        )),
        None => Arc::new(jobs::Jobs::open(
            &settings.data_dir.join("proofs"),
            limits,
            settings.workers,
        )?),
    };
    Ok(ProverService::new(Arc::new(models), jobs, pool))
}

/// Serves the prover (and `grpc.health.v1`) on `listener` until `shutdown`.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tls = TlsDir::load(&settings.mtls_dir, Identity::Prover)?;
    let service = build(&settings).await?;
    let workers = service.start_workers(settings.workers);
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<ProverServer<ProverService>>().await;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %settings.data_dir.display(), "prover listening");
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let served = tls
        .server(&policy::PROVER)?
        .add_service(health)
        .add_service(
            ProverServer::new(service)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    // A proof cut short stays pending in the job database and is proved after a restart.
    for w in &workers {
        w.abort();
    }
    for w in workers {
        let _ = w.await; // once they are gone, so is their hold on the job database
    }
    served.context("prover server")?;
    tracing::info!("prover stopped");
    Ok(())
}

modelhub_core::serve_args!("prover", "MODELHUB_PROVER_LISTEN", "127.0.0.1:50054");
