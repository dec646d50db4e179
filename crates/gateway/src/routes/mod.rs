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

use crate::AppState;
use crate::auth::Caller;
use crate::error::GatewayError;

/// Registers every route of the public API.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/health", web::get().to(health))
        .route("/v1/accounts", web::post().to(accounts::create_account))
        .route("/v1/keys", web::post().to(accounts::create_key))
        .route("/v1/keys/{key_id}", web::delete().to(accounts::revoke_key))
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

/// Reads a whole body of at most `limit` bytes (413 beyond).
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Bytes, GatewayError> {
    if content_length(req).is_some_and(|n| n > limit as u64) {
        return Err(payload_too_large(limit as u64));
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::bad_request(format!("reading the request body failed: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(payload_too_large(limit as u64));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Reads the body and verifies the request's signature over it.
async fn signed(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<(Caller, Bytes), GatewayError> {
    let body = read_body(req, payload, state.limits.max_json_bytes).await?;
    let caller = state.auth.verify(req, &body).await?;
    Ok((caller, body))
}

/// The optional `idempotency-key` header: a retried write with the same key (from the same
/// account) takes effect once. 1 to 128 characters of `[A-Za-z0-9_.:-]`.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

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
