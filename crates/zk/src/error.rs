//! The crate's error type; every variant maps to a [`modelhub_core::ErrorCode`].

use modelhub_core::ErrorCode;

/// Errors of compiling, committing, proving and verifying.
///
/// The `Display` text of `Unsupported`, `OutOfRange` and `Verification` is safe to show to
/// clients (it names ONNX ops and tensor positions, never paths or keys).
#[derive(Debug, thiserror::Error)]
pub enum ZkError {
    /// The ONNX graph uses an op (or an op setting) that the circuit compiler does not support.
    #[error("unsupported op {op}: {reason}")]
    Unsupported { op: String, reason: String },
    /// A value left the range the circuit was calibrated for.
    #[error("value out of range at {at}: {value} not in [{min}, {max}]")]
    OutOfRange {
        at: String,
        value: i64,
        min: i64,
        max: i64,
    },
    /// A proof, link proof, bundle or commitment did not verify (or was malformed).
    #[error("verification failed: {0}")]
    Verification(String),
    /// Reading or writing cached parameters failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// A bug or an unexpected halo2 failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ZkError {
    /// The public error code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ZkError::Unsupported { .. } => ErrorCode::Unprocessable,
            ZkError::OutOfRange { .. } | ZkError::Verification(_) => ErrorCode::BadRequest,
            ZkError::Io(_) | ZkError::Internal(_) => ErrorCode::Internal,
        }
    }

    pub(crate) fn unsupported(op: impl Into<String>, reason: impl Into<String>) -> ZkError {
        ZkError::Unsupported {
            op: op.into(),
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(
            ZkError::unsupported("Conv", "x").code(),
            ErrorCode::Unprocessable
        );
        let oor = ZkError::OutOfRange {
            at: "input[0]".into(),
            value: 300,
            min: -128,
            max: 127,
        };
        assert_eq!(oor.code(), ErrorCode::BadRequest);
        assert_eq!(
            ZkError::Verification("x".into()).code(),
            ErrorCode::BadRequest
        );
        assert_eq!(ZkError::Internal("x".into()).code(), ErrorCode::Internal);
    }
}
