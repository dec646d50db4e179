//! `POST /v1/models/{model_id}/predict`: validate, reserve the price, predict, then commit the
//! charge on success or release it on any failure.
//!
//! With an `idempotency-key` (signed), the registry binds the key to the request's fingerprint
//! (SHA-256 of method, path and body hash) and keeps the answer with the commit: a retry of a
//! charged request gets the same bytes without running the model again; a retry while the
//! first attempt is in flight gets 409 with `retry-after`; the same key with another request
//! gets 409; a retry after a failed attempt (nothing charged) runs anew. Every 5xx answer is
//! uncharged: when a commit's outcome is unknown the charge is released, and if the release
//! finds it committed after all, the prediction is answered.

use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use modelhub_core::id;
use modelhub_core::tensor::{JsonTensor, Tensor, batch_rows, validate_inputs};
use modelhub_core::{ApiError, ErrorCode};
use modelhub_proto::common::v1 as common;
use modelhub_proto::inference::v1 as inference;
use modelhub_proto::inference::v1::inference_client::InferenceClient;
use modelhub_proto::registry::v1 as pb;
use modelhub_proto::registry::v1::registry_client::RegistryClient;
use serde::Deserialize;
use serde_json::json;
use tonic::transport::Channel;

use super::{parse_json, signed};
use crate::AppState;
use crate::error::GatewayError;
use crate::rates::OverRate;
use crate::records;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictBody {
    inputs: Vec<JsonTensor>,
    #[serde(default)]
    proof: bool,
    /// The most the caller agrees to pay per prediction; a dearer model is refused uncharged.
    #[serde(default)]
    max_price: Option<u64>,
}

pub async fn predict(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
    path: web::Path<String>,
) -> Result<HttpResponse, GatewayError> {
    let (caller, body) = signed(&state, &req, payload).await?;
    let idempotency_key = super::idempotency_key(&req)?;
    let fingerprint = idempotency_key
        .as_ref()
        .map(|_| fingerprint(&req, &modelhub_core::signing::sha256_hex(&body)));
    let asked: PredictBody = parse_json(&body)?;
    drop(body);
    let prove = asked.proof;
    let max_price = asked.max_price;
    if prove && state.prover().is_none() {
        return Err(ApiError::bad_request("proofs are not enabled on this gateway").into());
    }
    let inputs = asked
        .inputs
        .iter()
        .map(Tensor::from_json)
        .collect::<Result<Vec<_>, _>>()?;
    drop(asked);

    let model = state.model(&path.into_inner()).await?;
    // A model version's price never changes (a new price is a new version), so the cached
    // record's price is the one the registry charges.
    if let Some(max) = max_price
        && model.price > max
    {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "model {} costs {} credits per prediction, above max_price {max}",
                model.model_id, model.price
            ),
        )
        .into());
    }
    let specs = records::specs(&model.model_id, &model.inputs)?;
    validate_inputs(&specs, &inputs)?;
    // Each row of the batch is a prediction, charged (and metered) as one.
    let rows = batch_rows(&specs, &inputs);
    let max_rows = state.limits.max_rows_per_request;
    let too_many = |limit: u32, what: &str| -> GatewayError {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("this batch has {rows} rows; {what} at most {limit} rows per request"),
        )
        .into()
    };
    if rows > u64::from(max_rows) {
        return Err(too_many(max_rows, "this gateway takes"));
    }
    // The owner's cap for this model, checked before anything is charged or run.
    if model.max_rows > 0 && rows > u64::from(model.max_rows) {
        return Err(too_many(model.max_rows, "this model takes"));
    }
    let rows = u32::try_from(rows).unwrap_or(max_rows);
    // The free-model policy: a free model is metered by a per-account quota instead of credits.
    let free = state.free_quota.burst();
    if model.price == 0 && rows > free {
        return Err(too_many(free, "free models take"));
    }
    if model.price == 0
        && let Err(wait) = state.free_quota.check(&caller.account_id, rows)
    {
        return Err(GatewayError::over_rate(OverRate {
            what: format!("account used its {free} predictions of free models per minute"),
            retry_after: wait,
        }));
    }
    // The owner's quota per account, before anything is charged or run.
    state
        .model_quotas
        .check(
            &model.model_id,
            model.calls_per_minute,
            &caller.account_id,
            rows,
        )
        .map_err(GatewayError::over_rate)?;
    if prove && rows > 1 {
        return Err(ApiError::bad_request(format!(
            "a proof covers one row; this batch has {rows} (ask for proofs one row at a time)"
        ))
        .into());
    }
    if prove && model.commitment.is_none() {
        return Err(ApiError::bad_request(format!(
            "model {} has no circuit, so its predictions can't be proved",
            model.model_id
        ))
        .into());
    }

    let charge = Charge {
        idempotency_key,
        fingerprint,
        registry: state.registry(),
        inference: state.inference(),
        account_id: caller.account_id,
        rows,
        prove,
        model_ref: common::ModelRef {
            model_id: model.model_id.clone(),
            version: model.version.clone(),
            cid: model.cid.clone(),
            wrapped_dek: model.wrapped_dek.clone(),
            sha256: model.sha256.clone(),
            size: model.size,
        },
        inputs: inputs.into_iter().map(Tensor::into_proto).collect(),
        job_id: id::new_id(id::JOB),
    };
    // A task of its own: if the client goes away, the handler is dropped but the charge still
    // ends in a commit or a release.
    let answer = actix_web::rt::spawn(charge.run())
        .await
        .map_err(|e| GatewayError::internal(format!("predict task failed: {e}")))??;
    Ok(match answer {
        Answer::Body(bytes) => HttpResponse::Ok()
            .content_type("application/json")
            .body(bytes),
        Answer::InProgress => {
            let mut res = crate::error::error_response(&ApiError::new(
                ErrorCode::Conflict,
                "a request with this idempotency key is still in progress; retry later",
            ));
            res.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            res
        }
    })
}

/// What a keyed request is: its method, path (with query) and body hash.
fn fingerprint(req: &HttpRequest, body_sha256: &str) -> String {
    let path = req.uri().path_and_query().map_or("", |p| p.as_str());
    modelhub_core::signing::sha256_hex(
        format!("{}\n{path}\n{body_sha256}", req.method()).as_bytes(),
    )
}

/// What a charged prediction answers.
enum Answer {
    /// The response body: fresh, or the one kept for the idempotency key.
    Body(bytes::Bytes),
    /// An earlier attempt with the same key is still running.
    InProgress,
}

/// One charged prediction: reserve → predict → commit, or release on any failure.
struct Charge {
    registry: RegistryClient<Channel>,
    inference: InferenceClient<Channel>,
    account_id: String,
    /// Predictions in the batch: the reservation holds the price for each.
    rows: u32,
    idempotency_key: Option<String>,
    fingerprint: Option<String>,
    prove: bool,
    model_ref: common::ModelRef,
    inputs: Vec<common::Tensor>,
    job_id: String,
}

impl Charge {
    async fn run(mut self) -> Result<Answer, GatewayError> {
        let reservation = self
            .registry
            .reserve(pb::ReserveRequest {
                account_id: self.account_id.clone(),
                model_id: self.model_ref.model_id.clone(),
                idempotency_key: self.idempotency_key.clone().unwrap_or_default(),
                fingerprint: self.fingerprint.clone().unwrap_or_default(),
                charge: pb::Charge::Prediction.into(),
                units: self.rows,
            })
            .await
            .map_err(GatewayError::upstream("registry", "Reserve"))?
            .into_inner();
        if reservation.existing {
            return match reservation.state.as_str() {
                "committed" if !reservation.response.is_empty() => {
                    Ok(Answer::Body(reservation.response.into()))
                }
                "committed" => Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!(
                        "this request was already answered and charged (receipt {}); its \
                         answer was too large to be kept for replays",
                        reservation.receipt_id
                    ),
                )
                .into()),
                _ => Ok(Answer::InProgress),
            };
        }
        let mut registry = self.registry.clone();
        let outputs = match self.predict().await {
            Ok(outputs) => outputs,
            Err(e) => {
                tracing::debug!(job_id = %self.job_id, reservation_id = %reservation.reservation_id, error = %e, "prediction failed, releasing");
                release(&mut registry, &reservation.reservation_id).await;
                return Err(e);
            }
        };
        let body = serde_json::to_vec(&json!({
            "outputs": outputs.iter().map(Tensor::to_json).collect::<Vec<_>>(),
            "receipt": {
                "id": reservation.receipt_id,
                "credits_charged": reservation.amount,
                "charge": "prediction",
                "rows": reservation.units,
            },
            "proof_job": self.prove.then_some(&self.job_id),
        }))
        .map_err(|e| GatewayError::internal(format!("encoding the answer: {e}")))?;
        let commit = pb::CommitRequest {
            reservation_id: reservation.reservation_id.clone(),
            response: if self.idempotency_key.is_some() {
                body.clone()
            } else {
                Vec::new()
            },
        };
        match registry.commit(commit).await {
            Ok(_) => Ok(Answer::Body(body.into())),
            Err(status) => {
                // The outcome is unknown (or the hold was swept): release what is still held.
                // If the commit landed after all, the charge stands and the answer is due.
                let state = release(&mut registry, &reservation.reservation_id).await;
                match state.as_deref() {
                    Some("committed") => return Ok(Answer::Body(body.into())),
                    None => {
                        // The registry stayed unreachable: the commit may have landed. Only a
                        // retry with the same key can tell (it answers the kept response).
                        return Err(ApiError::unavailable(
                            "the registry is unreachable, so whether this prediction was \
                             charged is unknown; retry with the same idempotency key",
                        )
                        .into());
                    }
                    Some(_) => {}
                }
                let e = GatewayError::upstream("registry", "Commit")(status);
                if e.code() == ErrorCode::Conflict {
                    // Released by the hold sweep before the commit: nothing was charged.
                    return Err(ApiError::unavailable(
                        "the charge could not be completed in time; nothing was charged, retry",
                    )
                    .into());
                }
                Err(e)
            }
        }
    }

    async fn predict(&mut self) -> Result<Vec<Tensor>, GatewayError> {
        let answer = self
            .inference
            .predict(inference::PredictRequest {
                model: Some(self.model_ref.clone()),
                inputs: std::mem::take(&mut self.inputs),
                job_id: self.job_id.clone(),
                prove: self.prove,
                account_id: self.account_id.clone(),
            })
            .await
            .map_err(GatewayError::upstream("inference", "Predict"))?
            .into_inner();
        answer
            .outputs
            .into_iter()
            .map(Tensor::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                GatewayError::internal(format!(
                    "inference answered a bad tensor for job {}: {}",
                    self.job_id, e.message
                ))
            })
    }
}

/// Releases a reservation; returns its state afterwards (`None` when the registry could not
/// be asked: the hold sweep releases it later).
///
/// A registry that is briefly unreachable (restarting) is asked again for a few seconds with
/// capped backoff: the state decides whether the answer is the charged body or an uncharged
/// 503, so it is worth waiting for rather than answering a charge as a failure.
async fn release(registry: &mut RegistryClient<Channel>, reservation_id: &str) -> Option<String> {
    use backon::{ExponentialBuilder, Retryable};
    let attempt = || {
        let mut registry = registry.clone();
        async move {
            let request = pb::ReleaseRequest {
                reservation_id: reservation_id.to_owned(),
            };
            registry
                .release(request)
                .await
                .map(|answer| answer.into_inner().state)
        }
    };
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(1))
        .with_max_times(RELEASE_RETRIES);
    let transient = |s: &tonic::Status| {
        matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
        )
    };
    match attempt.retry(backoff).when(transient).await {
        Ok(state) => Some(state),
        Err(status) => {
            tracing::warn!(
                reservation_id,
                grpc_code = ?status.code(),
                grpc_message = status.message(),
                "releasing a reservation failed; the hold sweep will return it"
            );
            None
        }
    }
}

/// How many times a release is sent again while the registry is unreachable (about 4 s).
const RELEASE_RETRIES: usize = 6;
