//! The inference service's errors, each mapped to a public [`ErrorCode`].

use modelhub_core::pool::PoolError;
use modelhub_core::{ApiError, ErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("{message}")]
    BadRequest { message: String },
    /// Storage answered with an error (or could not be reached).
    #[error("fetching the model from storage: {error}")]
    Storage { error: ApiError },
    #[error(transparent)]
    Onnx(#[from] modelhub_onnx::OnnxError),
    #[error("model bytes from storage do not match the model reference: {reason}")]
    Integrity { reason: String },
    #[error(transparent)]
    Pool(#[from] modelhub_core::pool::PoolError),
    #[error("background task failed: {reason}")]
    Task { reason: String },
    /// The account already has its limit of predictions admitted on this worker.
    #[error(
        "this account already has {limit} predictions in flight on this worker; retry when one has finished"
    )]
    TooManyInFlight { limit: usize },
}

impl InferenceError {
    pub fn bad_request(message: impl Into<String>) -> InferenceError {
        InferenceError::BadRequest {
            message: message.into(),
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            InferenceError::BadRequest { .. } => ErrorCode::BadRequest,
            InferenceError::TooManyInFlight { .. } => ErrorCode::TooManyRequests,
            InferenceError::Storage { error } => error.code,
            InferenceError::Onnx(e) => e.code(),
            InferenceError::Pool(PoolError::Closed) => ErrorCode::Unavailable,
            InferenceError::Pool(PoolError::Panicked)
            | InferenceError::Integrity { .. }
            | InferenceError::Task { .. } => ErrorCode::Internal,
        }
    }

    /// The error as a client may see it.
    pub fn to_api(&self) -> ApiError {
        match self {
            InferenceError::BadRequest { message } => ApiError::bad_request(message.clone()),
            InferenceError::TooManyInFlight { .. } => {
                ApiError::new(ErrorCode::TooManyRequests, self.to_string())
            }
            InferenceError::Storage { error } => match error.code {
                ErrorCode::Internal => ApiError::internal(),
                ErrorCode::Unavailable => ApiError::unavailable("model storage is unavailable"),
                _ => error.clone(),
            },
            InferenceError::Onnx(e) => e.to_api(),
            InferenceError::Pool(PoolError::Closed) => {
                ApiError::unavailable("the inference service is stopping")
            }
            InferenceError::Pool(PoolError::Panicked)
            | InferenceError::Integrity { .. }
            | InferenceError::Task { .. } => ApiError::internal(),
        }
    }

    /// Logs the error where it is handled and turns it into the status a client receives.
    pub fn into_status(self, model_id: &str) -> tonic::Status {
        match self.code() {
            ErrorCode::Internal | ErrorCode::Unavailable => {
                tracing::warn!(model_id, error = %self, "predict failed")
            }
            _ => tracing::debug!(model_id, error = %self, "predict rejected"),
        }
        self.to_api().to_status()
    }
}

impl From<ApiError> for InferenceError {
    fn from(e: ApiError) -> Self {
        match e.code {
            ErrorCode::BadRequest => InferenceError::BadRequest { message: e.message },
            _ => InferenceError::Storage { error: e },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_safe_messages() {
        let e = InferenceError::Storage {
            error: ApiError::unavailable("a backing service is unavailable"),
        };
        assert_eq!(e.to_api().code, ErrorCode::Unavailable);
        let e = InferenceError::Integrity {
            reason: "sha256 abc".into(),
        };
        assert_eq!(e.to_api(), ApiError::internal());
        let e: InferenceError = ApiError::bad_request("input \"x\": bad").into();
        assert_eq!(e.to_api().message, "input \"x\": bad");
    }
}
