//! The storage service's errors, each mapped to a public [`ErrorCode`].

use modelhub_core::{ApiError, ErrorCode};

/// Everything that can go wrong in the storage service.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{message}")]
    InvalidArgument { message: String },
    #[error("model is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error(transparent)]
    Onnx(#[from] modelhub_onnx::OnnxError),
    #[error("blob {cid} not found")]
    NotFound { cid: String },
    #[error("model key could not be unwrapped")]
    KeyUnwrap {
        #[source]
        source: modelhub_core::crypto::CryptoError,
    },
    #[error("stored model failed its integrity check: {reason}")]
    Integrity { reason: String },
    #[error("encryption failed: {source}")]
    Crypto {
        #[source]
        source: modelhub_core::crypto::CryptoError,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("background task failed: {reason}")]
    Task { reason: String },
    /// The IPFS node could not be reached, failed, or did not answer in time.
    #[error("IPFS node unavailable: {reason}")]
    Unavailable { reason: String },
}

impl StorageError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StorageError {
        let context = context.into();
        move |source| StorageError::Io { context, source }
    }

    pub fn invalid(message: impl Into<String>) -> StorageError {
        StorageError::InvalidArgument {
            message: message.into(),
        }
    }

    /// An IPFS node problem; `reason` is logged, never shown to clients.
    pub fn unavailable(reason: impl Into<String>) -> StorageError {
        StorageError::Unavailable {
            reason: reason.into(),
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            StorageError::InvalidArgument { .. } => ErrorCode::BadRequest,
            StorageError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            StorageError::Onnx(e) => e.code(),
            StorageError::NotFound { .. } => ErrorCode::NotFound,
            StorageError::Unavailable { .. } => ErrorCode::Unavailable,
            StorageError::KeyUnwrap { .. }
            | StorageError::Integrity { .. }
            | StorageError::Crypto { .. }
            | StorageError::Io { .. }
            | StorageError::Task { .. } => ErrorCode::Internal,
        }
    }

    /// The error as a client may see it: never a path or a key.
    pub fn to_api(&self) -> ApiError {
        match self {
            StorageError::Onnx(e) => e.to_api(),
            StorageError::KeyUnwrap { .. } => {
                ApiError::new(ErrorCode::Internal, "model key could not be unwrapped")
            }
            StorageError::Integrity { .. } => ApiError::new(
                ErrorCode::Internal,
                "stored model failed its integrity check",
            ),
            StorageError::Unavailable { .. } => {
                ApiError::new(ErrorCode::Unavailable, "IPFS node unavailable")
            }
            _ if self.code() == ErrorCode::Internal => ApiError::internal(),
            _ => ApiError::new(self.code(), self.to_string()),
        }
    }

    /// Logs the error (internal ones loudly) and turns it into the status a client receives.
    pub fn into_status(self, op: &'static str) -> tonic::Status {
        if matches!(self.code(), ErrorCode::Internal | ErrorCode::Unavailable) {
            tracing::error!(op, error = %self, "request failed");
        } else {
            tracing::info!(op, error = %self, "request rejected");
        }
        self.to_api().to_status()
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_details_stay_inside() {
        let e = StorageError::Io {
            context: "writing /var/lib/secret".into(),
            source: std::io::Error::other("disk full"),
        };
        assert_eq!(e.to_api(), ApiError::internal());
        let e = StorageError::KeyUnwrap {
            source: modelhub_core::crypto::CryptoError::Unwrap,
        };
        assert_eq!(e.to_api().message, "model key could not be unwrapped");
        let e = StorageError::PayloadTooLarge { limit: 10 };
        assert_eq!(e.to_api().code, ErrorCode::PayloadTooLarge);
        let e = StorageError::unavailable("connecting to http://10.0.0.7:5001: refused");
        assert_eq!(
            e.to_api(),
            ApiError::new(ErrorCode::Unavailable, "IPFS node unavailable")
        );
    }
}
