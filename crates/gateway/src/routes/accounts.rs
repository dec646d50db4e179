//! Accounts, API keys and credits.

use actix_web::{HttpRequest, HttpResponse, web};
use modelhub_core::{ApiError, ErrorCode};
use modelhub_proto::registry::v1 as pb;
use serde::Deserialize;
use serde_json::json;

use super::{parse_json, signed};
use crate::AppState;
use crate::error::GatewayError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAccount {
    name: String,
    /// EVM address whose confirmed purchases credit the account (chain ledger).
    #[serde(default)]
    wallet: Option<String>,
    /// The public handle, the namespace of the account's models (`handle/name@version`).
    #[serde(default)]
    handle: Option<String>,
}

/// `POST /v1/accounts` (admin): `{"name", "wallet"?, "handle"?}` → 201
/// `{"account_id", "wallet", "handle"}`.
pub async fn create_account(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, GatewayError> {
    let (caller, body) = signed(&state, &req, payload).await?;
    caller.require_admin()?;
    let CreateAccount {
        name,
        wallet,
        handle,
    } = parse_json(&body)?;
    let request = keyed(
        &req,
        &caller,
        pb::CreateAccountRequest {
            name,
            admin: false,
            wallet: wallet.unwrap_or_default(),
            handle: handle.unwrap_or_default(),
        },
    )?;
    let account = state
        .registry()
        .create_account(request)
        .await
        .map_err(GatewayError::upstream("registry", "CreateAccount"))?
        .into_inner();
    tracing::info!(account_id = %account.account_id, by = %caller.account_id, "account created");
    Ok(HttpResponse::Created().json(json!({
        "account_id": account.account_id,
        "wallet": optional_json(&account.wallet),
        "handle": optional_json(&account.handle),
    })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    account_id: Option<String>,
}

/// `POST /v1/keys`: an account for itself (empty body or `{}`), an admin for any account
/// (`{"account_id"}`) → 201 `{"key_id","secret","account_id"}`.
pub async fn create_key(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, GatewayError> {
    let (caller, body) = signed(&state, &req, payload).await?;
    let asked: CreateKey = if body.iter().all(u8::is_ascii_whitespace) {
        CreateKey::default()
    } else {
        parse_json(&body)?
    };
    let account_id = match asked.account_id {
        Some(id) if id != caller.account_id && !caller.admin => {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "an account may only create keys for itself",
            )
            .into());
        }
        Some(id) => id,
        None => caller.account_id.clone(),
    };
    let request = keyed(&req, &caller, pb::CreateKeyRequest { account_id })?;
    let key = state
        .registry()
        .create_key(request)
        .await
        .map_err(GatewayError::upstream("registry", "CreateKey"))?
        .into_inner();
    tracing::info!(key_id = %key.key_id, account_id = %key.account_id, by = %caller.key_id, "key created");
    Ok(HttpResponse::Created().json(json!({
        "key_id": key.key_id,
        "secret": key.secret,
        "account_id": key.account_id,
    })))
}

/// `DELETE /v1/keys/{key_id}` (its account or an admin) → 204.
/// 404 unless `key_id` belongs to the caller's account (or the caller is an admin). "No such
/// key" and "not yours" answer alike, so key ids of others can't be probed.
async fn own_key(
    state: &AppState,
    caller: &crate::auth::Caller,
    key_id: &str,
) -> Result<(), GatewayError> {
    let not_yours = || {
        GatewayError::from(ApiError::not_found(
            "no key with this id belongs to the caller",
        ))
    };
    let key = match state
        .registry()
        .lookup_key(pb::LookupKeyRequest {
            key_id: key_id.to_owned(),
        })
        .await
    {
        Ok(key) => key.into_inner(),
        Err(status) if status.code() == tonic::Code::NotFound => return Err(not_yours()),
        Err(status) => return Err(GatewayError::upstream("registry", "LookupKey")(status)),
    };
    if key.account_id != caller.account_id && !caller.admin {
        return Err(not_yours());
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateKey {
    /// Seconds the current secret stays accepted beside the new one.
    #[serde(default = "default_grace")]
    grace_secs: u64,
}

/// A day: time for every client of a key to switch to its new secret.
fn default_grace() -> u64 {
    86_400
}

/// `POST /v1/keys/{key_id}/rotate` (the key's account, or admin): `{"grace_secs"?}` (default a
/// day, at most 7) → `{"key_id", "secret", "account_id", "previous_valid_until"}`. The key gets
/// a new secret; the current one stays accepted until `previous_valid_until`, so clients switch
/// without downtime. A revoked key can't be rotated (409).
pub async fn rotate_key(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
    path: web::Path<String>,
) -> Result<HttpResponse, GatewayError> {
    let (caller, body) = signed(&state, &req, payload).await?;
    let asked: RotateKey = if body.iter().all(u8::is_ascii_whitespace) {
        RotateKey {
            grace_secs: default_grace(),
        }
    } else {
        parse_json(&body)?
    };
    let key_id = path.into_inner();
    own_key(&state, &caller, &key_id).await?;
    let rotated = state
        .registry()
        .rotate_key(pb::RotateKeyRequest {
            key_id: key_id.clone(),
            grace_secs: asked.grace_secs,
        })
        .await
        .map_err(GatewayError::upstream("registry", "RotateKey"))?
        .into_inner();
    state.auth.keys().invalidate(&key_id).await;
    tracing::info!(key_id = %key_id, by = %caller.key_id, previous_valid_until = rotated.previous_valid_until, "key rotated");
    Ok(HttpResponse::Ok().json(json!({
        "key_id": rotated.key_id,
        "secret": rotated.secret,
        "account_id": rotated.account_id,
        "previous_valid_until": rotated.previous_valid_until,
    })))
}

pub async fn revoke_key(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
    path: web::Path<String>,
) -> Result<HttpResponse, GatewayError> {
    let (caller, _) = signed(&state, &req, payload).await?;
    let key_id = path.into_inner();
    own_key(&state, &caller, &key_id).await?;
    state
        .registry()
        .revoke_key(pb::RevokeKeyRequest {
            key_id: key_id.clone(),
        })
        .await
        .map_err(GatewayError::upstream("registry", "RevokeKey"))?;
    state.auth.keys().invalidate(&key_id).await;
    tracing::info!(key_id = %key_id, by = %caller.key_id, "key revoked");
    Ok(HttpResponse::NoContent().finish())
}

/// An optional field of an account (wallet, handle) in JSON: `null` when empty.
fn optional_json(value: &str) -> serde_json::Value {
    match value {
        "" => serde_json::Value::Null,
        w => w.into(),
    }
}

/// `GET /v1/account` → `{"account_id","handle","credits","held","earnings","wallet",
/// "daily_cap","charged_today","refund_owed"}` of the caller; `held` are credits of predictions
/// in flight (charged or given back when they end); `daily_cap` is the cap the wallet set on
/// chain (`null`: none), `charged_today` what was reserved on the current UTC day, and
/// `refund_owed` what a refund request on chain still claims of the credits that come in.
pub async fn get_account(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, GatewayError> {
    let (caller, _) = signed(&state, &req, payload).await?;
    let account = state
        .registry()
        .get_account(pb::GetAccountRequest {
            account_id: caller.account_id,
        })
        .await
        .map_err(GatewayError::upstream("registry", "GetAccount"))?
        .into_inner();
    Ok(HttpResponse::Ok().json(json!({
        "account_id": account.account_id,
        "handle": optional_json(&account.handle),
        "credits": account.credits,
        "held": account.held,
        "earnings": account.earnings,
        "wallet": optional_json(&account.wallet),
        "daily_cap": account.daily_cap,
        "charged_today": account.charged_today,
        "refund_owed": account.refund_owed,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Grant {
    account_id: String,
    amount: u64,
}

/// `POST /v1/credits/grant` (admin): `{"account_id","amount"}` → `{"credits"}`.
pub async fn grant_credits(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, GatewayError> {
    let (caller, body) = signed(&state, &req, payload).await?;
    caller.require_admin()?;
    let Grant { account_id, amount } = parse_json(&body)?;
    let request = keyed(
        &req,
        &caller,
        pb::GrantCreditsRequest { account_id, amount },
    )?;
    let account = state
        .registry()
        .grant_credits(request)
        .await
        .map_err(GatewayError::upstream("registry", "GrantCredits"))?
        .into_inner();
    tracing::info!(account_id = %account.account_id, amount, by = %caller.account_id, "credits granted");
    Ok(HttpResponse::Ok().json(json!({ "credits": account.credits })))
}

/// A registry request carrying the HTTP request's `idempotency-key` (scoped by the caller's
/// account), so that a retried write takes effect once.
fn keyed<T>(
    req: &HttpRequest,
    caller: &crate::auth::Caller,
    message: T,
) -> Result<tonic::Request<T>, GatewayError> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = super::idempotency_key(req)? {
        let scoped = format!("{}:{key}", caller.account_id);
        let value = tonic::metadata::MetadataValue::try_from(scoped.as_str())
            .map_err(|_| ApiError::bad_request("idempotency-key is not a valid header value"))?;
        request.metadata_mut().insert("mh-idempotency-key", value);
    }
    Ok(request)
}

fn ledger_json(l: pb::LedgerInfo) -> serde_json::Value {
    if l.kind != "chain" {
        return json!({ "kind": l.kind });
    }
    let batches: Vec<_> = l
        .batches
        .into_iter()
        .map(|b| {
            json!({
                "batch_id": b.batch_id,
                "state": b.state,
                "receipts": b.receipts,
                "credits": b.credits,
                "tx_hash": Some(b.tx_hash).filter(|t| !t.is_empty()),
                "error": Some(b.error).filter(|e| !e.is_empty()),
                "attempts": b.attempts,
                "created_at": b.created_at,
            })
        })
        .collect();
    json!({
        "kind": l.kind,
        "chain_id": l.chain_id,
        "marketplace": l.marketplace,
        "operator": l.operator,
        "wei_per_credit": l.wei_per_credit,
        "followed_block": l.followed_block,
        "confirmations": l.confirmations,
        "unsettled_receipts": l.unsettled_receipts,
        "batches": batches,
    })
}

/// `GET /v1/ledger` → which ledger holds the credits; for the chain ledger the contract, the
/// operator, the followed block and the recent settlement batches.
pub async fn get_ledger(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, GatewayError> {
    signed(&state, &req, payload).await?;
    let ledger = state
        .registry()
        .get_ledger(pb::GetLedgerRequest {})
        .await
        .map_err(GatewayError::upstream("registry", "GetLedger"))?
        .into_inner();
    Ok(HttpResponse::Ok().json(ledger_json(ledger)))
}

/// `POST /v1/ledger/settle` (admin): counts confirmed deposits and settles committed usage now
/// → the ledger as `GET /v1/ledger` shows it.
pub async fn settle(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, GatewayError> {
    let (caller, _) = signed(&state, &req, payload).await?;
    caller.require_admin()?;
    let ledger = state
        .registry_slow()
        .settle_now(pb::SettleNowRequest {})
        .await
        .map_err(GatewayError::upstream("registry", "SettleNow"))?
        .into_inner();
    tracing::info!(by = %caller.account_id, "settlement run on request");
    Ok(HttpResponse::Ok().json(ledger_json(ledger)))
}
