//! Model Hub inference service: `Predict` checks the inputs against the model's signature,
//! takes an ONNX Runtime session from a cache bounded by model bytes (or streams the model
//! from storage, decrypted there, into memory and opens it), and runs it on a dedicated pool
//! of compute threads, never on the async reactor.
//!
//! Every run is bounded: a deadline, a share of the process's memory budget for model runs, a
//! bound on output bytes (module `modelhub_onnx`), and a fair turn on the compute threads with
//! a cap on each account's predictions in flight ([`fair`]).
//!
//! Modules: [`service`] (the gRPC service and session cache), [`sessions`] (a model's small
//! pool of sessions), [`fair`] (compute threads shared fairly between accounts), [`error`].

pub mod error;
pub mod fair;
pub mod proofs;
pub mod service;
pub mod sessions;

use std::path::PathBuf;

use anyhow::Context;
use modelhub_proto::inference::v1::inference_server::InferenceServer;

pub use error::InferenceError;
pub use service::{CacheSnapshot, InferenceService};

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Settings of the inference service.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// gRPC endpoint of the storage service (`https://`: mutual TLS).
    #[arg(
        long = "storage",
        env = "MODELHUB_INFERENCE_STORAGE",
        default_value = "https://127.0.0.1:50052"
    )]
    pub storage: String,
    /// Threads that run models (default: the number of CPUs).
    #[arg(
        long = "compute-threads",
        env = "MODELHUB_INFERENCE_COMPUTE_THREADS",
        default_value_t = default_threads()
    )]
    pub compute_threads: usize,
    /// ONNX Runtime threads inside one operator of one run.
    #[arg(
        long = "intra-op-threads",
        env = "MODELHUB_INFERENCE_INTRA_OP_THREADS",
        default_value_t = 1
    )]
    pub intra_op_threads: usize,
    /// ONNX Runtime sessions one model may hold open for overlapping runs (at most the
    /// compute threads); above 1 the plaintext model stays in memory to open more.
    #[arg(
        long = "sessions-per-model",
        env = "MODELHUB_INFERENCE_SESSIONS_PER_MODEL",
        default_value_t = 2
    )]
    pub sessions_per_model: usize,
    /// Bound of the session cache, in model bytes.
    #[arg(
        long = "session-cache-bytes",
        env = "MODELHUB_INFERENCE_SESSION_CACHE_BYTES",
        default_value_t = 1 << 30
    )]
    pub session_cache_bytes: u64,
    /// gRPC endpoint of the prover (`https://`); without it, predictions that ask for a proof
    /// are refused.
    #[arg(long = "prover", env = "MODELHUB_INFERENCE_PROVER")]
    pub prover: Option<String>,
    /// Deadline of one model run, in ms; the runtime stops at the next operator after it.
    #[arg(
        long = "run-timeout-ms",
        env = "MODELHUB_INFERENCE_RUN_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub run_timeout_ms: u64,
    /// Bytes all outputs of one prediction may take together.
    #[arg(
        long = "max-output-bytes",
        env = "MODELHUB_INFERENCE_MAX_OUTPUT_BYTES",
        default_value_t = 32 << 20
    )]
    pub max_output_bytes: u64,
    /// Bytes ONNX Runtime may hold for the tensors of all runs in flight together (the
    /// process's memory budget for model runs; weights are bounded by the session cache).
    #[arg(
        long = "memory-budget-bytes",
        env = "MODELHUB_INFERENCE_MEMORY_BUDGET_BYTES",
        default_value_t = modelhub_onnx::DEFAULT_MEMORY_BUDGET
    )]
    pub memory_budget_bytes: u64,
    /// Predictions one account may have queued or running on this worker at once; more are
    /// refused with `RESOURCE_EXHAUSTED` (HTTP 429).
    #[arg(
        long = "max-in-flight-per-account",
        env = "MODELHUB_INFERENCE_MAX_IN_FLIGHT_PER_ACCOUNT",
        default_value_t = 32
    )]
    pub max_in_flight_per_account: usize,
    /// Folder of the mutual-TLS files made by `modelhub certs`: `ca.pem`, `inference.pem`,
    /// `inference.key`. The inference speaks only TLS and serves only callers with a certificate from
    /// that CA, each only the methods its identity may call; it calls storage and the prover with its own.
    #[arg(
        long,
        env = "MODELHUB_INFERENCE_MTLS_DIR",
        default_value = "./modelhub-data/tls"
    )]
    pub mtls_dir: PathBuf,
}

impl Settings {
    /// Settings for tests (and `modelhub up`): the given storage endpoint, two compute
    /// threads, one intra-op thread, a 1 GiB session cache, the default run limits; set
    /// `mtls_dir` to a test PKI (`modelhub_testkit::tls`).
    pub fn for_test(storage: impl Into<String>) -> Settings {
        Settings {
            storage: storage.into(),
            compute_threads: 2,
            intra_op_threads: 1,
            sessions_per_model: 2,
            session_cache_bytes: 1 << 30,
            prover: None,
            run_timeout_ms: 10_000,
            max_output_bytes: 32 << 20,
            memory_budget_bytes: modelhub_onnx::DEFAULT_MEMORY_BUDGET,
            max_in_flight_per_account: 32,
            mtls_dir: PathBuf::from("./modelhub-data/tls"),
        }
    }

    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.compute_threads > 0,
            "MODELHUB_INFERENCE_COMPUTE_THREADS must be at least 1"
        );
        anyhow::ensure!(
            self.run_timeout_ms > 0 && self.max_output_bytes > 0 && self.memory_budget_bytes > 0,
            "the run timeout, output and memory limits must be positive"
        );
        anyhow::ensure!(
            self.max_in_flight_per_account > 0,
            "MODELHUB_INFERENCE_MAX_IN_FLIGHT_PER_ACCOUNT must be at least 1"
        );
        anyhow::ensure!(
            self.session_cache_bytes > 0,
            "MODELHUB_INFERENCE_SESSION_CACHE_BYTES must be positive"
        );
        anyhow::ensure!(
            self.storage.starts_with("https://"),
            "MODELHUB_INFERENCE_STORAGE must be an https:// URL (internal services speak mutual TLS)"
        );
        Ok(())
    }
}

/// Serves the inference service (and `grpc.health.v1`) on `listener` until `shutdown`
/// resolves and in-flight requests have finished.
pub async fn run(
    settings: Settings,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let service = InferenceService::new(&settings)?;
    serve(service, listener, shutdown).await
}

/// Serves an already built service; tests keep a clone of it to read its cache counters.
pub async fn serve(
    service: InferenceService,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let mut server = service.tls().server(&modelhub_mtls::policy::INFERENCE)?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<InferenceServer<InferenceService>>()
        .await;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tracing::info!(%addr, "inference listening");
    server
        .add_service(health_service)
        .add_service(
            InferenceServer::new(service)
                .max_decoding_message_size(64 * 1024 * 1024)
                .max_encoding_message_size(64 * 1024 * 1024),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("inference server")?;
    tracing::info!("inference stopped");
    Ok(())
}

modelhub_core::serve_args!("inference", "MODELHUB_INFERENCE_LISTEN", "127.0.0.1:50053");
