//! `GET /v1/proofs/{job_id}[?wait=SECONDS]`: the proof of a prediction, for the account that
//! asked for it.
//!
//! A proof is paid for when it is delivered: the first read of a finished proof by the account
//! that asked for it charges the model's proof price (registry `Reserve` with the proof charge
//! and the idempotency key `proof/<job>`, then `Commit`), and the answer carries that receipt.
//! Later reads find the committed charge and show the same receipt; a failed proof is never
//! charged. An account short of the proof price gets 402 and the proof waits for it.

use actix_web::{HttpRequest, HttpResponse, web};
use modelhub_core::ApiError;
use modelhub_proto::prover::v1 as pb;
use modelhub_proto::registry::v1 as registry;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::GatewayError;

/// Said beside the float outputs in every answer.
pub const FLOAT_NOTE: &str = "float_outputs are what ONNX Runtime answered; the proof does not \
     cover them. The proof covers public.output (quantized) for public.model_digest; \
     verify it with `modelhub proofs verify --model`.";

/// Whether the proved output and the first float output pick the same class (`null` when
/// either is missing or empty).
fn argmax_agrees(proved: &Value, floats: &Value) -> Value {
    let argmax = |v: Option<&Vec<Value>>| {
        let v: Vec<f64> = v?.iter().filter_map(Value::as_f64).collect();
        (!v.is_empty())
            .then(|| (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best }))
    };
    let float = floats
        .get(0)
        .and_then(|t| t.get("data"))
        .and_then(Value::as_array);
    match (argmax(proved.as_array()), argmax(float)) {
        (Some(a), Some(b)) => json!(a == b),
        _ => Value::Null,
    }
}

/// Longest `wait` honoured, in seconds.
pub const MAX_WAIT_SECS: u64 = 60;
/// How long past the wait asked for a `GetProof` may take before it answers 503.
const PROVER_SLACK: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProofQuery {
    #[serde(default)]
    wait: Option<u64>,
}

pub async fn get(
    app: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
    path: web::Path<String>,
) -> Result<HttpResponse, GatewayError> {
    let (caller, _) = super::signed(&app, &req, payload).await?;
    let query = web::Query::<ProofQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::bad_request(format!("query must be ?wait=SECONDS: {e}")))?;
    let Some(mut prover) = app.prover() else {
        return Err(ApiError::bad_request("proofs are not enabled on this gateway").into());
    };
    let job_id = path.into_inner();
    let wait_ms = query.wait.unwrap_or(0).min(MAX_WAIT_SECS) * 1000;
    // A missing job and someone else's answer alike, and at once: the owner is checked before
    // any waiting, so nobody can hold a connection on (or time) another account's job.
    let hidden = || GatewayError::from(ApiError::not_found(format!("no proof job {job_id}")));
    let mut fetch = async |wait_ms: u64| -> Result<pb::ProofState, GatewayError> {
        let mut request = tonic::Request::new(pb::GetProofRequest {
            job_id: job_id.clone(),
            wait_ms,
        });
        // A deadline: the wait asked for, and a little more for the answer.
        request.set_timeout(std::time::Duration::from_millis(wait_ms) + PROVER_SLACK);
        match prover.get_proof(request).await {
            Ok(state) => Ok(state.into_inner()),
            Err(status) if status.code() == tonic::Code::NotFound => Err(hidden()),
            Err(status) => Err(GatewayError::upstream("prover", "GetProof")(status)),
        }
    };
    let mut state = fetch(0).await?;
    if state.account_id != caller.account_id && !caller.admin {
        return Err(hidden());
    }
    use pb::proof_state::Status;
    let finished = |s: &pb::ProofState| {
        matches!(
            Status::try_from(s.status),
            Ok(Status::Done | Status::Failed)
        )
    };
    if !finished(&state) && wait_ms > 0 {
        state = fetch(wait_ms).await?;
    }
    let float_outputs: Value = serde_json::from_str(&state.float_outputs).unwrap_or(Value::Null);
    let mut answer = json!({
        "job_id": job_id,
        "float_outputs": float_outputs,
        "float_outputs_note": FLOAT_NOTE,
    });
    match Status::try_from(state.status).unwrap_or(Status::Unspecified) {
        Status::Done => {
            let proof: Value = serde_json::from_slice(&state.proof).map_err(|e| {
                GatewayError::internal(format!("prover sent a bad proof file: {e}"))
            })?;
            // `public` is the proof's public instance exactly: nothing beside it is proved.
            let public = proof.get("public").cloned().unwrap_or(Value::Null);
            let proved: Value = serde_json::from_str(&state.proved_output).unwrap_or(Value::Null);
            // Charged to the account that asked, when it reads it (an admin's read is not).
            if state.account_id == caller.account_id {
                answer["receipt"] =
                    charge_delivery(&app, &state.account_id, &state.model_id, &job_id).await?;
            }
            answer["status"] = json!("done");
            answer["model_digest"] = public.get("model_digest").cloned().unwrap_or(Value::Null);
            answer["public"] = public;
            answer["proved_output_dequantized"] = proved.clone();
            answer["argmax_agrees"] = argmax_agrees(&proved, &answer["float_outputs"]);
            answer["proof"] = proof;
        }
        Status::Failed => {
            answer["status"] = json!("failed");
            answer["error"] = json!(state.error);
        }
        _ => {
            answer["status"] = json!("pending");
            answer["queue_position"] = json!(state.queue_position);
            answer["estimated_wait_ms"] = json!(state.estimated_wait_ms);
        }
    }
    Ok(HttpResponse::Ok().json(answer))
}

/// Charges the delivery of job `job_id`'s proof to `account_id` once: the model's proof price,
/// held and committed under the idempotency key `proof/<job>` (`/` never appears in a client's
/// key). A read after the charge finds it committed and answers its receipt; a hold left by a
/// read that died before its commit is committed by the next one.
async fn charge_delivery(
    app: &AppState,
    account_id: &str,
    model_id: &str,
    job_id: &str,
) -> Result<Value, GatewayError> {
    let mut registry = app.registry();
    let reservation = registry
        .reserve(registry::ReserveRequest {
            account_id: account_id.to_owned(),
            model_id: model_id.to_owned(),
            idempotency_key: format!("proof/{job_id}"),
            fingerprint: format!("proof of {job_id}"),
            charge: registry::Charge::Proof.into(),
            units: 1,
        })
        .await
        .map_err(GatewayError::upstream("registry", "Reserve"))?
        .into_inner();
    if reservation.state != "committed" {
        registry
            .commit(registry::CommitRequest {
                reservation_id: reservation.reservation_id.clone(),
                response: Vec::new(),
            })
            .await
            .map_err(GatewayError::upstream("registry", "Commit"))?;
    }
    Ok(json!({
        "id": reservation.receipt_id,
        "credits_charged": reservation.amount,
        "charge": "proof",
    }))
}
