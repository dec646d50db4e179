//! The one error vocabulary shared by every service.
//!
//! Each crate has its own `thiserror` enum; every variant maps to an [`ErrorCode`], which fixes
//! the HTTP status the gateway answers with and the gRPC code a service answers with. The code
//! also travels in the `mh-error-code` gRPC metadata entry, so that a `payment_required` raised
//! by the registry is still a 402 when the gateway turns it into an HTTP answer.

use std::fmt;

use serde::{Deserialize, Serialize};

/// gRPC metadata key that carries an [`ErrorCode`] across a hop.
pub const ERROR_CODE_METADATA: &str = "mh-error-code";

/// The error codes of the public API (`docs/API.md`, "Errors").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthenticated,
    PaymentRequired,
    Forbidden,
    NotFound,
    Conflict,
    PayloadTooLarge,
    Unprocessable,
    TooManyRequests,
    Unavailable,
    Internal,
    /// The client sent its request body too slowly.
    RequestTimeout,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthenticated,
        ErrorCode::PaymentRequired,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::PayloadTooLarge,
        ErrorCode::Unprocessable,
        ErrorCode::TooManyRequests,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::RequestTimeout,
    ];

    /// The snake_case name used in JSON error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::PaymentRequired => "payment_required",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Unprocessable => "unprocessable",
            ErrorCode::TooManyRequests => "too_many_requests",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::RequestTimeout => "request_timeout",
        }
    }

    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }

    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthenticated => 401,
            ErrorCode::PaymentRequired => 402,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::Unprocessable => 422,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
            ErrorCode::RequestTimeout => 408,
        }
    }

    pub fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorCode::BadRequest | ErrorCode::Unprocessable => tonic::Code::InvalidArgument,
            ErrorCode::Unauthenticated => tonic::Code::Unauthenticated,
            ErrorCode::PaymentRequired => tonic::Code::FailedPrecondition,
            ErrorCode::Forbidden => tonic::Code::PermissionDenied,
            ErrorCode::NotFound => tonic::Code::NotFound,
            ErrorCode::Conflict => tonic::Code::AlreadyExists,
            ErrorCode::PayloadTooLarge => tonic::Code::OutOfRange,
            ErrorCode::TooManyRequests => tonic::Code::ResourceExhausted,
            ErrorCode::Unavailable => tonic::Code::Unavailable,
            ErrorCode::Internal => tonic::Code::Internal,
            ErrorCode::RequestTimeout => tonic::Code::DeadlineExceeded,
        }
    }

    /// The code a plain gRPC status stands for when it carries no `mh-error-code`.
    pub fn from_grpc_code(code: tonic::Code) -> ErrorCode {
        use tonic::Code;
        match code {
            Code::InvalidArgument | Code::FailedPrecondition => ErrorCode::BadRequest,
            Code::Unauthenticated => ErrorCode::Unauthenticated,
            Code::PermissionDenied => ErrorCode::Forbidden,
            Code::NotFound => ErrorCode::NotFound,
            Code::AlreadyExists | Code::Aborted => ErrorCode::Conflict,
            Code::OutOfRange => ErrorCode::PayloadTooLarge,
            Code::ResourceExhausted => ErrorCode::TooManyRequests,
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => ErrorCode::Unavailable,
            _ => ErrorCode::Internal,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as a client may see it: a code and a message that is safe to show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::NotFound, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::Unavailable, message)
    }

    /// An internal error: the details go to the log, never to the client.
    pub fn internal() -> Self {
        ApiError::new(ErrorCode::Internal, "internal error")
    }

    /// Turns a status received from another service back into the error it stands for.
    /// Transport failures (no connection, a connection cut mid-call: a status no service of
    /// ours made, with code `UNAVAILABLE`, `UNKNOWN`, `CANCELLED` or `DEADLINE_EXCEEDED`)
    /// become `unavailable`, which clients may retry; internal details are dropped.
    pub fn from_status(status: &tonic::Status) -> Self {
        let code = status
            .metadata()
            .get(ERROR_CODE_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(ErrorCode::parse)
            .unwrap_or_else(|| match status.code() {
                tonic::Code::Unknown => ErrorCode::Unavailable,
                code => ErrorCode::from_grpc_code(code),
            });
        match code {
            ErrorCode::Internal => ApiError::internal(),
            ErrorCode::Unavailable if status.metadata().get(ERROR_CODE_METADATA).is_none() => {
                ApiError::unavailable("a backing service is unavailable")
            }
            _ => ApiError::new(code, status.message()),
        }
    }

    /// The gRPC status that carries this error to another service.
    pub fn to_status(&self) -> tonic::Status {
        let mut status = tonic::Status::new(self.code.grpc_code(), self.message.clone());
        status.metadata_mut().insert(
            ERROR_CODE_METADATA,
            tonic::metadata::MetadataValue::from_static(self.code.as_str()),
        );
        status
    }

    /// The JSON body of the public API: `{"error": {"code", "message"}}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "error": { "code": self.code, "message": self.message } })
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        e.to_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_a_grpc_status() {
        for code in ErrorCode::ALL {
            let sent = ApiError::new(code, "why");
            let got = ApiError::from_status(&sent.to_status());
            assert_eq!(got.code, code);
            if code != ErrorCode::Internal {
                assert_eq!(got.message, "why");
            }
        }
    }

    #[test]
    fn internal_details_never_cross_a_hop() {
        let status = tonic::Status::internal("open /secret/path: permission denied");
        let got = ApiError::from_status(&status);
        assert_eq!(got, ApiError::internal());
    }

    #[test]
    fn transport_failure_is_unavailable() {
        let status = tonic::Status::unavailable("tcp connect error: 127.0.0.1:1");
        let got = ApiError::from_status(&status);
        assert_eq!(got.code, ErrorCode::Unavailable);
        assert!(!got.message.contains("127.0.0.1"));
    }

    #[test]
    fn a_connection_cut_mid_call_is_unavailable() {
        // What tonic reports when the peer dies with the call in flight.
        let status = tonic::Status::unknown("transport error: connection reset");
        assert_eq!(ApiError::from_status(&status).code, ErrorCode::Unavailable);
        // An UNKNOWN our own service sent keeps its code.
        let ours = ApiError::new(ErrorCode::BadRequest, "no").to_status();
        assert_eq!(ApiError::from_status(&ours).code, ErrorCode::BadRequest);
    }

    #[test]
    fn json_body_has_the_documented_shape() {
        let v = ApiError::new(ErrorCode::PaymentRequired, "not enough credits").to_json();
        assert_eq!(v["error"]["code"], "payment_required");
        assert_eq!(v["error"]["message"], "not enough credits");
        assert_eq!(ErrorCode::PaymentRequired.http_status(), 402);
    }
}
