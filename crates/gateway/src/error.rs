//! The gateway's error type and the JSON error bodies of the public API.
//!
//! Every error a client sees is `{"error": {"code", "message"}}` with the HTTP status of its
//! [`ErrorCode`]. Handler errors are [`GatewayError`]s; the errors actix produces on its own
//! (unknown routes, wrong methods, malformed query strings) are rewritten into the same shape by
//! [`json_errors`].

use actix_web::body::BoxBody;
use actix_web::dev::ServiceResponse;
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::{ErrorHandlerResponse, ErrorHandlers};
use actix_web::{HttpResponse, ResponseError};
use modelhub_core::{ApiError, ErrorCode};

/// Everything a gateway handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// An error whose message is meant for the client as it is.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// A call to a backing service failed; its status keeps its code across the hop, and
    /// internal details are masked by [`ApiError::from_status`].
    #[error("{service}.{rpc} failed: {status}")]
    Upstream {
        service: &'static str,
        rpc: &'static str,
        status: tonic::Status,
    },
    /// A fault of the gateway itself: logged, shown to the client as `internal error`.
    #[error("{what}")]
    Internal { what: String },
    /// A refusal the client may retry after `secs` seconds (the answer's `retry-after`).
    #[error("{error}")]
    RetryAfter { error: ApiError, secs: u64 },
}

impl GatewayError {
    /// A closure for `map_err` on a gRPC call: `.map_err(upstream("registry", "GetModel"))`.
    pub fn upstream(
        service: &'static str,
        rpc: &'static str,
    ) -> impl FnOnce(tonic::Status) -> GatewayError {
        move |status| GatewayError::Upstream {
            service,
            rpc,
            status,
        }
    }

    /// A 429 for going over a rate, with its `retry-after`.
    pub fn over_rate(over: crate::rates::OverRate) -> GatewayError {
        GatewayError::RetryAfter {
            error: over.error(),
            secs: over.retry_after_secs(),
        }
    }

    pub fn internal(what: impl Into<String>) -> GatewayError {
        GatewayError::Internal { what: what.into() }
    }

    /// What the client is told.
    pub fn to_api(&self) -> ApiError {
        match self {
            GatewayError::Api(e) => e.clone(),
            GatewayError::Upstream { status, .. } => ApiError::from_status(status),
            GatewayError::Internal { .. } => ApiError::internal(),
            GatewayError::RetryAfter { error, .. } => error.clone(),
        }
    }

    /// The public error code of this error.
    pub fn code(&self) -> ErrorCode {
        self.to_api().code
    }
}

/// The JSON response of an [`ApiError`].
/// The JSON response of an [`ApiError`]; `429` and `503` answers carry `retry-after: 1` (the
/// condition is transient: a retry with the same idempotency key is safe).
pub fn error_response(e: &ApiError) -> HttpResponse {
    let status =
        StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut res = HttpResponse::build(status);
    if matches!(e.code, ErrorCode::TooManyRequests | ErrorCode::Unavailable) {
        res.insert_header((header::RETRY_AFTER, "1"));
    }
    res.json(e.to_json())
}

impl ResponseError for GatewayError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.code().http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse<BoxBody> {
        let api = self.to_api();
        // Logged here, where the error is turned into an answer.
        match self {
            GatewayError::Api(_) | GatewayError::RetryAfter { .. } => {
                tracing::debug!(code = %api.code, message = %api.message, "request rejected");
            }
            GatewayError::Upstream {
                service,
                rpc,
                status,
            } => match api.code {
                ErrorCode::Internal | ErrorCode::Unavailable => tracing::warn!(
                    service,
                    rpc,
                    grpc_code = ?status.code(),
                    grpc_message = status.message(),
                    "backing service call failed"
                ),
                _ => tracing::debug!(service, rpc, code = %api.code, "backing service refused"),
            },
            GatewayError::Internal { what } => {
                tracing::error!(error = %what, "internal gateway error");
            }
        }
        let mut res = error_response(&api);
        if let GatewayError::RetryAfter { secs, .. } = self {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*secs));
        }
        res
    }
}

/// Middleware that turns every error answer actix makes by itself (no route, wrong method, bad
/// query string, ...) into the JSON error shape. Answers that already are JSON pass unchanged.
pub fn json_errors<B: 'static>() -> ErrorHandlers<B> {
    ErrorHandlers::new().default_handler(rewrite_error)
}

fn rewrite_error<B>(res: ServiceResponse<B>) -> actix_web::Result<ErrorHandlerResponse<B>> {
    let is_json = res
        .response()
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let status = res.status();
    let method = res.request().method().clone();
    let path = res.request().path().to_owned();
    let detail = res.response().error().map(|e| e.to_string());
    let api = match status {
        StatusCode::NOT_FOUND => ApiError::not_found(format!("no route for {method} {path}")),
        // The API's codes have no "method not allowed": the route is the method and the path.
        StatusCode::METHOD_NOT_ALLOWED => ApiError::not_found(format!(
            "no route for {method} {path} (the path exists with another method)"
        )),
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(ErrorCode::PayloadTooLarge, "request body is too large")
        }
        StatusCode::UNAUTHORIZED => ApiError::new(ErrorCode::Unauthenticated, "unauthenticated"),
        StatusCode::FORBIDDEN => ApiError::new(ErrorCode::Forbidden, "forbidden"),
        StatusCode::SERVICE_UNAVAILABLE => ApiError::unavailable("service unavailable"),
        s if s.is_client_error() => ApiError::bad_request(
            detail.unwrap_or_else(|| s.canonical_reason().unwrap_or("bad request").to_owned()),
        ),
        _ => {
            tracing::error!(status = %status, error = ?detail, "unhandled error answer");
            ApiError::internal()
        }
    };
    let mut new = error_response(&api);
    if status == StatusCode::METHOD_NOT_ALLOWED
        && let Some(allow) = res.response().headers().get(header::ALLOW)
    {
        new.headers_mut().insert(header::ALLOW, allow.clone());
    }
    new.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let (req, _) = res.into_parts();
    Ok(ErrorHandlerResponse::Response(
        ServiceResponse::new(req, new).map_into_right_body::<B>(),
    ))
}
