//! Proof jobs go to the prover with `Enqueue`, one call per prediction that asked for a proof,
//! awaited before the prediction is answered: the prover has recorded the job durably by then,
//! or refused it (queue full: `UNAVAILABLE`; too many pending for the account:
//! `RESOURCE_EXHAUSTED`), and the prediction fails with that status, so it is not charged.

use modelhub_core::ApiError;
use modelhub_mtls::{Identity, TlsDir};
use modelhub_proto::prover::v1::ProofJob;
use modelhub_proto::prover::v1::prover_client::ProverClient;
use tonic::Status;
use tonic::transport::Channel;

/// Where proof jobs go.
#[derive(Debug, Clone)]
pub struct ProofSink {
    client: ProverClient<Channel>,
}

impl ProofSink {
    /// A lazily connected client of the prover (`https://`, mutual TLS with `tls`).
    pub fn connect(tls: &TlsDir, endpoint: &str) -> Result<ProofSink, String> {
        let channel = modelhub_mtls::lazy_channel(
            &tls.endpoint(Identity::Prover, endpoint)
                .map_err(|e| e.to_string())?,
        );
        let client = ProverClient::new(channel).max_encoding_message_size(64 << 20);
        Ok(ProofSink { client })
    }

    /// Hands a job to the prover; `Ok` once it is recorded. The prover's refusals keep their
    /// status (the gateway answers them 503 or 429); a prover that can't be reached is
    /// `UNAVAILABLE`.
    pub async fn enqueue(&self, job: ProofJob) -> Result<(), Status> {
        let job_id = job.job_id.clone();
        match self.client.clone().enqueue(job).await {
            Ok(_) => Ok(()),
            Err(status)
                if status
                    .metadata()
                    .contains_key(modelhub_core::error::ERROR_CODE_METADATA) =>
            {
                Err(status)
            }
            Err(status) => {
                tracing::warn!(job_id = %job_id, code = ?status.code(), message = status.message(), "the prover did not take a proof job");
                Err(ApiError::unavailable("the prover is unavailable; retry later").to_status())
            }
        }
    }
}
