//! The `/v1` routes and the helpers they share (bounded body reading, JSON parsing, signing).

mod accounts;
mod models;
mod predict;
mod proofs;
mod upload;

use actix_web::{HttpRequest, HttpResponse, web};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use modelhub_core::{ApiError, ErrorCode};
use serde::de::DeserializeOwned;

use std::time::{Duration, Instant};

use crate::auth::Caller;
use crate::error::GatewayError;
use crate::{AppState, Limits};

/// Registers every route of the public API.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/health", web::get().to(health))
        .route("/v1/accounts", web::post().to(accounts::create_account))
        .route("/v1/keys", web::post().to(accounts::create_key))
        .route("/v1/keys/{key_id}", web::delete().to(accounts::revoke_key))
        .route(
            "/v1/keys/{key_id}/rotate",
            web::post().to(accounts::rotate_key),
        )
        .route("/v1/account", web::get().to(accounts::get_account))
        .route("/v1/credits/grant", web::post().to(accounts::grant_credits))
        .route("/v1/ledger", web::get().to(accounts::get_ledger))
        .route("/v1/ledger/settle", web::post().to(accounts::settle))
        .service(
            web::resource("/v1/models")
                .route(web::get().to(models::list))
                .route(web::post().to(upload::upload)),
        )
        .service(
            web::resource("/v1/models/{model_id}")
                .route(web::get().to(models::get))
                .route(web::delete().to(models::delete)),
        )
        .route(
            "/v1/models/{model_id}/predict",
            web::post().to(predict::predict),
        )
        .route("/v1/proofs/{job_id}", web::get().to(proofs::get));
}

/// The answer of routes that don't exist.
pub async fn not_found(req: HttpRequest) -> Result<HttpResponse, GatewayError> {
    Err(ApiError::not_found(format!("no route for {} {}", req.method(), req.path())).into())
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

fn payload_too_large(limit: u64) -> GatewayError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!("request body is larger than {limit} bytes"),
    )
    .into()
}

/// The declared `content-length`, when there is one that parses.
fn content_length(req: &HttpRequest) -> Option<u64> {
    req.headers()
        .get(actix_web::http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Longest gap between two pieces of a request body.
const BODY_IDLE: Duration = Duration::from_secs(10);
/// How long a body may take before the minimum rate applies.
const BODY_GRACE: Duration = Duration::from_secs(5);

/// A request body read against the clock: no gap between chunks longer than [`BODY_IDLE`],
/// on average at least the minimum rate once [`BODY_GRACE`] has passed, and (JSON bodies) the
/// whole within the body deadline. Too slow is a 408 `request_timeout`; the connection is then
/// closed, so a slow client holds nothing for long.
pub(crate) struct PacedBody {
    payload: web::Payload,
    start: Instant,
    received: u64,
    min_rate: u64,
    deadline: Option<Instant>,
}

impl PacedBody {
    /// `whole`: the body must be complete within the body deadline (JSON); otherwise only the
    /// idle limit and the rate apply (uploads).
    pub fn new(payload: web::Payload, limits: &Limits, whole: bool) -> PacedBody {
        let start = Instant::now();
        PacedBody {
            payload,
            start,
            received: 0,
            min_rate: limits.min_body_rate.max(1),
            deadline: whole.then(|| start + limits.body_timeout),
        }
    }

    /// The next chunk, `None` at the end.
    pub async fn next(&mut self) -> Option<Result<Bytes, GatewayError>> {
        let now = Instant::now();
        // When the average would fall below the minimum rate.
        let rate_due = self.start
            + BODY_GRACE
            + Duration::from_secs_f64(self.received as f64 / self.min_rate as f64);
        let mut due = (now + BODY_IDLE).min(rate_due.max(now));
        if let Some(deadline) = self.deadline {
            due = due.min(deadline);
        }
        match tokio::time::timeout_at(due.into(), self.payload.next()).await {
            Ok(Some(Ok(chunk))) => {
                self.received += chunk.len() as u64;
                Some(Ok(chunk))
            }
            Ok(Some(Err(e))) => Some(Err(ApiError::bad_request(format!(
                "reading the request body failed: {e}"
            ))
            .into())),
            Ok(None) => None,
            Err(_) => Some(Err(ApiError::new(
                ErrorCode::RequestTimeout,
                "the request body arrived too slowly",
            )
            .into())),
        }
    }
}

/// Reads a whole body of at most `limit` bytes (413 beyond), paced by [`PacedBody`].
async fn read_body(
    req: &HttpRequest,
    payload: web::Payload,
    limits: &Limits,
) -> Result<Bytes, GatewayError> {
    let limit = limits.max_json_bytes;
    if content_length(req).is_some_and(|n| n > limit as u64) {
        return Err(payload_too_large(limit as u64));
    }
    let mut body = BytesMut::new();
    let mut paced = PacedBody::new(payload, limits, true);
    while let Some(chunk) = paced.next().await {
        let chunk = chunk?;
        if body.len() + chunk.len() > limit {
            return Err(payload_too_large(limit as u64));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Verifies the request's signature from its headers (so an unsigned or forged request is
/// refused before its body is read), then reads the body and checks it against the signed
/// hash.
async fn signed(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<(Caller, Bytes), GatewayError> {
    let verified = state.auth.verify_headers(req).await?;
    let body = read_body(req, payload, &state.limits).await?;
    if modelhub_core::signing::sha256_hex(&body) != verified.content_sha256 {
        return Err(ApiError::new(
            ErrorCode::Unauthenticated,
            "body does not match x-mh-content-sha256",
        )
        .into());
    }
    Ok((verified.caller, body))
}

/// The optional `idempotency-key` header: a retried write with the same key (from the same
/// account) takes effect once. 1 to 128 characters of `[A-Za-z0-9_.:-]`; signed whenever
/// it is sent.
pub use crate::auth::IDEMPOTENCY_KEY;

fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, GatewayError> {
    let Some(value) = req.headers().get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value.to_str().unwrap_or_default().trim();
    let ok = (1..=128).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b));
    if !ok {
        return Err(ApiError::bad_request(
            "idempotency-key must be 1 to 128 characters of A-Z a-z 0-9 _ . : -",
        )
        .into());
    }
    Ok(Some(key.to_owned()))
}

/// Parses a JSON body; a parse error is a 400 with serde's message.
fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, GatewayError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")).into())
}
