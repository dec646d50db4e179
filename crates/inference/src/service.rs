//! The `modelhub.inference.v1.Inference` gRPC service: sessions from a byte-bounded cache (or
//! fetched from storage and opened in memory), runs on the compute pool.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use modelhub_core::tensor::validate_inputs;
use modelhub_core::{ApiError, Tensor};
use modelhub_proto::common::v1::ModelRef;
use modelhub_proto::inference::v1 as pb;
use modelhub_proto::prover::v1::ProofJob;
use modelhub_proto::storage::v1::storage_client::StorageClient;
use modelhub_storage::client::{FetchError, fetch_model};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::Settings;
use crate::error::InferenceError;
use crate::fair::FairPool;
use crate::proofs::ProofSink;
use crate::sessions::Loaded;
use modelhub_mtls::{Identity, TlsDir};

/// Counters of the session cache.
#[derive(Debug, Default)]
pub struct CacheStats {
    hits: AtomicU64,
    loads: AtomicU64,
}

/// A snapshot of [`CacheStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSnapshot {
    /// Predicts answered by a session already in the cache.
    pub hits: u64,
    /// Models fetched from storage and opened.
    pub loads: u64,
    /// Sessions in the cache now.
    pub entries: u64,
    /// Model bytes held by the cache now.
    pub weighted_bytes: u64,
}

struct Inner {
    storage: StorageClient<Channel>,
    cache: moka::future::Cache<String, Arc<Loaded>>,
    pool: FairPool,
    limits: modelhub_onnx::RunLimits,
    intra_op_threads: usize,
    sessions_per_model: usize,
    stats: CacheStats,
    proofs: Option<ProofSink>,
    /// This service's certificate: its server and its clients use it.
    tls: TlsDir,
}

/// The inference service; cheap to clone (tests keep a clone to read the cache counters).
#[derive(Clone)]
pub struct InferenceService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for InferenceService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InferenceService")
            .field("compute_threads", &self.inner.pool.threads())
            .field("intra_op_threads", &self.inner.intra_op_threads)
            .finish_non_exhaustive()
    }
}

impl InferenceService {
    /// Builds the service: starts the compute pool and a lazily connected storage channel.
    pub fn new(settings: &Settings) -> anyhow::Result<InferenceService> {
        settings.validate()?;
        modelhub_onnx::init_with(settings.memory_budget_bytes)?;
        let tls = TlsDir::load(&settings.mtls_dir, Identity::Inference)?;
        let storage = modelhub_storage::client::connect_lazy(&tls, &settings.storage)
            .map_err(|e| anyhow::anyhow!("MODELHUB_INFERENCE_STORAGE: {e}"))?;
        let cache = moka::future::Cache::builder()
            .max_capacity(settings.session_cache_bytes)
            .weigher(|_key: &String, loaded: &Arc<Loaded>| {
                u32::try_from(loaded.bytes().max(1)).unwrap_or(u32::MAX)
            })
            .build();
        Ok(InferenceService {
            inner: Arc::new(Inner {
                storage,
                cache,
                pool: FairPool::new(
                    "modelhub-compute",
                    settings.compute_threads,
                    settings.max_in_flight_per_account,
                )?,
                limits: modelhub_onnx::RunLimits {
                    timeout: std::time::Duration::from_millis(settings.run_timeout_ms),
                    max_output_bytes: settings.max_output_bytes,
                },
                intra_op_threads: settings.intra_op_threads,
                sessions_per_model: settings.sessions_per_model.min(settings.compute_threads),
                stats: CacheStats::default(),
                proofs: match &settings.prover {
                    Some(endpoint) => Some(
                        ProofSink::connect(&tls, endpoint)
                            .map_err(|e| anyhow::anyhow!("MODELHUB_INFERENCE_PROVER: {e}"))?,
                    ),
                    None => None,
                },
                tls,
            }),
        })
    }

    /// The mutual-TLS files this service serves and calls with.
    pub fn tls(&self) -> &TlsDir {
        &self.inner.tls
    }

    /// The session cache's counters.
    pub async fn cache_stats(&self) -> CacheSnapshot {
        self.inner.cache.run_pending_tasks().await;
        CacheSnapshot {
            hits: self.inner.stats.hits.load(Ordering::Relaxed),
            loads: self.inner.stats.loads.load(Ordering::Relaxed),
            entries: self.inner.cache.entry_count(),
            weighted_bytes: self.inner.cache.weighted_size(),
        }
    }

    /// Jobs waiting for a compute thread, all accounts together.
    pub fn queued(&self) -> usize {
        self.inner.pool.queued()
    }

    /// Jobs running on a compute thread now.
    pub fn running(&self) -> usize {
        self.inner.pool.running()
    }

    /// Runs one prediction for `account` (its place among the account's predictions in flight
    /// is held from here to the answer; the run takes the account's turn on the pool).
    pub async fn predict(
        &self,
        account: &str,
        model: ModelRef,
        inputs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, InferenceError> {
        if model.model_id.is_empty() || model.sha256.is_empty() {
            return Err(InferenceError::bad_request(
                "the model reference needs a model_id and a sha256",
            ));
        }
        let admission = self.inner.pool.admit(account)?;
        let loaded = self.session(model).await?;
        validate_inputs(loaded.inputs(), &inputs)?;
        let limits = self.inner.limits;
        let outputs = self
            .inner
            .pool
            .run(&admission, move || loaded.run(&inputs, &limits))
            .await??;
        Ok(outputs)
    }

    async fn session(&self, model: ModelRef) -> Result<Arc<Loaded>, InferenceError> {
        let key = format!("{}\0{}", model.model_id, model.sha256);
        let loaded_now = std::sync::atomic::AtomicBool::new(false);
        let result = self
            .inner
            .cache
            .try_get_with(key, async {
                loaded_now.store(true, Ordering::Relaxed);
                self.load(model).await.map(Arc::new)
            })
            .await;
        match result {
            Ok(loaded) => {
                if !loaded_now.load(Ordering::Relaxed) {
                    self.inner.stats.hits.fetch_add(1, Ordering::Relaxed);
                }
                Ok(loaded)
            }
            Err(shared) => Err(match Arc::try_unwrap(shared) {
                Ok(e) => e,
                // Another waiter holds the same error: rebuild an equivalent one.
                Err(shared) => match &*shared {
                    InferenceError::Onnx(e) => InferenceError::Storage { error: e.to_api() },
                    other => InferenceError::Storage {
                        error: other.to_api(),
                    },
                },
            }),
        }
    }

    /// Streams the model from storage into memory (hash checked) and opens it.
    async fn load(&self, model: ModelRef) -> Result<Loaded, InferenceError> {
        let model_id = model.model_id.clone();
        let mut storage = self.inner.storage.clone();
        let started = std::time::Instant::now();
        let bytes = fetch_model(&mut storage, model)
            .await
            .map_err(|e| match e {
                FetchError::Storage(error) => InferenceError::Storage { error },
                FetchError::Integrity(reason) => InferenceError::Integrity { reason },
            })?;
        let intra = self.inner.intra_op_threads;
        let sessions = self.inner.sessions_per_model;
        let loaded = tokio::task::spawn_blocking(move || Loaded::open(bytes, intra, sessions))
            .await
            .map_err(|e| InferenceError::Task {
                reason: e.to_string(),
            })??;
        self.inner.stats.loads.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            model_id = %model_id,
            bytes = loaded.bytes(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "model session loaded"
        );
        Ok(loaded)
    }
}

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceService {
    async fn predict(
        &self,
        request: Request<pb::PredictRequest>,
    ) -> Result<Response<pb::PredictResponse>, Status> {
        let req = request.into_inner();
        let Some(model) = req.model else {
            return Err(ApiError::bad_request("Predict needs a model reference").to_status());
        };
        let model_id = model.model_id.clone();
        let sink = match (req.prove, &self.inner.proofs) {
            (false, _) => None,
            (true, Some(sink)) => Some(sink),
            (true, None) => {
                return Err(
                    ApiError::unavailable("no prover is configured for this worker").to_status(),
                );
            }
        };
        // Kept for the proof job: the input as received.
        let proof_inputs = sink.map(|_| req.inputs.clone());
        let inputs = req
            .inputs
            .into_iter()
            .map(Tensor::try_from)
            .collect::<Result<Vec<_>, ApiError>>()
            .map_err(|e| InferenceError::from(e).into_status(&model_id))?;
        let proof_model = sink.map(|_| model.clone());
        let outputs: Vec<_> = self
            .predict(&req.account_id, model, inputs)
            .await
            .map_err(|e| e.into_status(&model_id))?
            .into_iter()
            .map(Tensor::into_proto)
            .collect();
        if let Some(sink) = sink {
            let job = ProofJob {
                job_id: req.job_id.clone(),
                account_id: req.account_id,
                model: proof_model,
                inputs: proof_inputs.unwrap_or_default(),
                outputs: outputs.clone(),
            };
            sink.enqueue(job).await?;
        }
        tracing::debug!(model_id = %model_id, job_id = %req.job_id, prove = req.prove, "predict done");
        Ok(Response::new(pb::PredictResponse { outputs }))
    }
}
