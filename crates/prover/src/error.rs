//! The prover's errors, each mapped to a public [`ErrorCode`].

use modelhub_core::{ApiError, ErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum ProverError {
    #[error("{0}")]
    BadRequest(String),
    #[error("no proof job {0}")]
    UnknownJob(String),
    #[error("model {0} has no circuit (it was not compiled, or its graph is not supported)")]
    NoCircuit(String),
    #[error("fetching the model: {0}")]
    Fetch(#[from] modelhub_storage::client::FetchError),
    #[error(transparent)]
    Zk(#[from] modelhub_zk::ZkError),
    #[error(transparent)]
    Pool(#[from] modelhub_core::pool::PoolError),
    #[error("prover state: {0}")]
    State(String),
    #[error("the proof queue is full; retry later")]
    QueueFull,
    #[error("this account already has {0} proofs pending; fetch them first")]
    TooManyPending(usize),
    /// The error of a load that several callers waited on together.
    #[error(transparent)]
    Shared(std::sync::Arc<ProverError>),
}

impl ProverError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ProverError::BadRequest(_) => ErrorCode::BadRequest,
            ProverError::UnknownJob(_) => ErrorCode::NotFound,
            ProverError::NoCircuit(_) => ErrorCode::BadRequest,
            ProverError::Fetch(modelhub_storage::client::FetchError::Storage(e)) => e.code,
            ProverError::Fetch(_) => ErrorCode::Internal,
            ProverError::Zk(e) => e.code(),
            ProverError::Pool(modelhub_core::pool::PoolError::Closed) => ErrorCode::Unavailable,
            ProverError::Pool(_) | ProverError::State(_) => ErrorCode::Internal,
            ProverError::QueueFull => ErrorCode::Unavailable,
            ProverError::TooManyPending(_) => ErrorCode::TooManyRequests,
            ProverError::Shared(e) => e.code(),
        }
    }

    /// The error as a client may see it: internal details stay in the log.
    pub fn to_api(&self) -> ApiError {
        match self.code() {
            ErrorCode::Internal => ApiError::internal(),
            code => ApiError::new(code, self.to_string()),
        }
    }

    /// Logs server-side failures and turns the error into a status.
    pub fn into_status(self) -> tonic::Status {
        if matches!(self.code(), ErrorCode::Internal)
            || matches!(self, ProverError::Pool(_) | ProverError::Fetch(_))
        {
            tracing::warn!(error = %self, "prover request failed");
        }
        self.to_api().to_status()
    }
}
