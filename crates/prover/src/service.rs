//! The `modelhub.prover.v1.Prover` gRPC service.

use std::sync::Arc;
use std::time::Duration;

use modelhub_core::pool::ComputePool;
use modelhub_core::{ApiError, InputRange, Tensor, TensorSpec};
use modelhub_proto::prover::v1 as pb;
use modelhub_zk::{ModelDigest, ProofBundle};
use tonic::{Request, Response, Status};

use crate::error::ProverError;
use crate::jobs::{Job, JobQueue, JobStatus, valid_job_id};
use crate::models::{Models, Outcome};

/// Longest a `GetProof` may wait.
pub const MAX_WAIT: Duration = Duration::from_secs(120);

/// The prover; cheap to clone.
#[derive(Debug, Clone)]
pub struct ProverService {
    models: Arc<Models>,
    jobs: Arc<dyn JobQueue>,
    pool: ComputePool,
}

impl ProverService {
    pub fn new(models: Arc<Models>, jobs: Arc<dyn JobQueue>, pool: ComputePool) -> ProverService {
        ProverService { models, jobs, pool }
    }

    /// Starts `n` workers, each proving the oldest queued job until the queue is empty, then
    /// waiting for the next. Abort the handles to stop them (a job cut short stays pending and
    /// is proved again after a restart).
    pub fn start_workers(&self, n: usize) -> Vec<tokio::task::JoinHandle<()>> {
        (0..n.max(1))
            .map(|_| {
                let this = self.clone();
                tokio::spawn(async move { this.work().await })
            })
            .collect()
    }

    async fn work(self) {
        loop {
            match self.jobs.next().await {
                Ok(job) => self.run_job(job).await,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the proof queue failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Proves one job and records the outcome.
    async fn run_job(&self, job: pb::ProofJob) {
        let job_id = job.job_id.clone();
        let started = std::time::Instant::now();
        let status = match self.prove(job).await {
            Ok((bundle, proved_output)) => match serde_json::to_value(&bundle) {
                Ok(proof) => JobStatus::Done {
                    proof,
                    proved_output,
                },
                Err(e) => JobStatus::Failed {
                    error: ProverError::State(e.to_string()).to_api().message,
                },
            },
            Err(e) => {
                tracing::info!(job_id = %job_id, error = %e, "proof failed");
                JobStatus::Failed {
                    error: e.to_api().message,
                }
            }
        };
        if let Err(e) = self
            .jobs
            .finish(&job_id, status, Some(started.elapsed()))
            .await
        {
            tracing::warn!(job_id = %job_id, error = %e, "recording a proof failed");
        }
    }

    async fn prove(&self, job: pb::ProofJob) -> Result<(ProofBundle, Vec<f32>), ProverError> {
        let model = job
            .model
            .ok_or_else(|| ProverError::BadRequest("a proof job needs a model".into()))?;
        let [input] = <[_; 1]>::try_from(job.inputs).map_err(|v: Vec<_>| {
            ProverError::BadRequest(format!("proofs take one input tensor, got {}", v.len()))
        })?;
        let input = Tensor::try_from(input).map_err(|e| ProverError::BadRequest(e.message))?;
        let values = input.as_f32().ok_or_else(|| {
            ProverError::BadRequest(format!("proofs take an FP32 input, got {}", input.datatype))
        })?;
        let compiled = self.models.get(&model).await?;
        let job_id = job.job_id;
        self.pool
            .run(move || -> Result<(ProofBundle, Vec<f32>), ProverError> {
                let c = &compiled;
                let bundle = modelhub_zk::prove(
                    &c.params,
                    &c.keys,
                    &c.model,
                    &c.commitment,
                    &c.opening,
                    &values,
                    &job_id,
                )?;
                let proved = modelhub_zk::dequantize_output(&bundle.spec, &bundle.public.output);
                Ok((bundle, proved))
            })
            .await?
    }
}

fn proof_state(job: Job) -> pb::ProofState {
    use pb::proof_state::Status as S;
    let mut state = pb::ProofState {
        job_id: job.job_id,
        account_id: job.account_id,
        model_id: job.model_id,
        float_outputs: job.float_outputs.to_string(),
        ..Default::default()
    };
    match job.status {
        JobStatus::Pending => state.status = S::Pending as i32,
        JobStatus::Done {
            proof,
            proved_output,
        } => {
            state.status = S::Done as i32;
            state.proof = proof.to_string().into_bytes();
            state.proved_output = serde_json::Value::from(proved_output).to_string();
        }
        JobStatus::Failed { error } => {
            state.status = S::Failed as i32;
            state.error = error;
        }
    }
    state
}

#[tonic::async_trait]
impl pb::prover_server::Prover for ProverService {
    async fn compile(
        &self,
        request: Request<pb::CompileRequest>,
    ) -> Result<Response<pb::CompileResponse>, Status> {
        let req = request.into_inner();
        let model = req
            .model
            .ok_or_else(|| ApiError::bad_request("Compile needs a model reference").to_status())?;
        let inputs = req
            .inputs
            .into_iter()
            .map(TensorSpec::try_from)
            .collect::<Result<Vec<_>, ApiError>>()
            .map_err(|e| e.to_status())?;
        let input_range = match req.input_range {
            None => InputRange::default(),
            Some(r) => {
                InputRange::new(r.min, r.max).map_err(|e| ApiError::bad_request(e).to_status())?
            }
        };
        let model_id = model.model_id.clone();
        let outcome = self
            .models
            .compile(model, &inputs, input_range)
            .await
            .map_err(ProverError::into_status)?;
        Ok(Response::new(match outcome {
            Outcome::Supported {
                commitment,
                spec,
                digest,
                opening,
            } => {
                tracing::info!(model_id = %model_id, k = spec.k, %digest, "model compiled to a circuit");
                pb::CompileResponse {
                    supported: true,
                    reason: String::new(),
                    commitment: commitment.to_hex(),
                    circuit_spec: serde_json::to_string(&spec)
                        .map_err(|_| ApiError::internal().to_status())?,
                    digest: digest.to_hex(),
                    opening: serde_json::to_string(&opening)
                        .map_err(|_| ApiError::internal().to_status())?,
                    circuit_size: (1u64 << spec.k).saturating_mul(spec.lane_count() as u64),
                }
            }
            Outcome::Unsupported { reason } => {
                tracing::info!(model_id = %model_id, reason = %reason, "model has no circuit");
                pb::CompileResponse {
                    supported: false,
                    reason,
                    ..Default::default()
                }
            }
        }))
    }

    async fn reseal_openings(
        &self,
        _request: Request<pb::ResealOpeningsRequest>,
    ) -> Result<Response<modelhub_proto::common::v1::ResealReport>, Status> {
        self.models
            .reseal()
            .await
            .map(Response::new)
            .map_err(ProverError::into_status)
    }

    async fn forget(
        &self,
        request: Request<pb::ForgetRequest>,
    ) -> Result<Response<pb::ForgetResponse>, Status> {
        let model_id = request.into_inner().model_id;
        if !valid_job_id(&model_id) {
            return Err(ApiError::bad_request("malformed model id").to_status());
        }
        if self
            .models
            .forget(&model_id)
            .await
            .map_err(ProverError::into_status)?
        {
            tracing::info!(model_id = %model_id, "forgot the circuit of an unregistered model");
        }
        Ok(Response::new(pb::ForgetResponse {}))
    }

    async fn enqueue(
        &self,
        request: Request<pb::ProofJob>,
    ) -> Result<Response<pb::EnqueueResponse>, Status> {
        let job = request.into_inner();
        if !valid_job_id(&job.job_id) {
            return Err(ApiError::bad_request("malformed job id").to_status());
        }
        let float_outputs = job
            .outputs
            .iter()
            .cloned()
            .map(|t| Tensor::try_from(t).map(|t| t.to_json()))
            .collect::<Result<Vec<_>, _>>()
            .map(serde_json::Value::from)
            .unwrap_or(serde_json::Value::Null);
        let record = Job {
            job_id: job.job_id.clone(),
            account_id: job.account_id.clone(),
            model_id: job
                .model
                .as_ref()
                .map(|m| m.model_id.clone())
                .unwrap_or_default(),
            float_outputs,
            status: JobStatus::Pending,
        };
        let place = self
            .jobs
            .enqueue(job, record)
            .await
            .map_err(ProverError::into_status)?;
        Ok(Response::new(pb::EnqueueResponse {
            queue_position: u32::try_from(place.ahead).unwrap_or(u32::MAX),
        }))
    }

    async fn get_proof(
        &self,
        request: Request<pb::GetProofRequest>,
    ) -> Result<Response<pb::ProofState>, Status> {
        let req = request.into_inner();
        if !valid_job_id(&req.job_id) {
            return Err(ApiError::bad_request("malformed job id").to_status());
        }
        let wait = Duration::from_millis(req.wait_ms).min(MAX_WAIT);
        match self
            .jobs
            .wait(&req.job_id, wait)
            .await
            .map_err(ProverError::into_status)?
        {
            Some(job) => {
                let mut state = proof_state(job);
                if let Some(place) = self.jobs.place(&req.job_id).await {
                    state.queue_position = u32::try_from(place.ahead).unwrap_or(u32::MAX);
                    state.estimated_wait_ms =
                        u64::try_from(place.estimate.as_millis()).unwrap_or(u64::MAX);
                }
                Ok(Response::new(state))
            }
            None => Err(ProverError::UnknownJob(req.job_id).into_status()),
        }
    }

    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let req = request.into_inner();
        let expected: ModelDigest = req.expected_digest.parse().map_err(|_| {
            ApiError::bad_request(
                "Verify needs expected_digest: the 64-hex-digit digest of the model the proof \
                 must be for",
            )
            .to_status()
        })?;
        let invalid = |reason: String| pb::VerifyResponse {
            valid: false,
            reason,
            ..Default::default()
        };
        let bundle = match ProofBundle::from_json(&req.proof) {
            Ok(b) => b,
            Err(e) => return Ok(Response::new(invalid(e.to_string()))),
        };
        let params = self.models.params.clone();
        let result = self
            .pool
            .run(move || -> Result<Vec<f32>, ProverError> {
                let keys_dir = params.keys_dir();
                let params = params.get(bundle.spec.k)?;
                modelhub_zk::verify_with_prover_keys(&params, &bundle, &expected, &keys_dir)?;
                Ok(modelhub_zk::dequantize_output(
                    &bundle.spec,
                    &bundle.public.output,
                ))
            })
            .await
            .map_err(|e| ProverError::from(e).into_status())?;
        Ok(Response::new(match result {
            Ok(output) => pb::VerifyResponse {
                valid: true,
                reason: String::new(),
                output_dequantized: serde_json::Value::from(output).to_string(),
            },
            Err(e) if e.code() != modelhub_core::ErrorCode::Internal => invalid(e.to_string()),
            Err(e) => return Err(e.into_status()),
        }))
    }
}
