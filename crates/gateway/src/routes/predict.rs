//! `POST /v1/models/{model_id}/predict`: validate, reserve the price, predict, then commit the
//! charge on success or release it on any failure.

use actix_web::{HttpRequest, HttpResponse, web};
use modelhub_core::ApiError;
use modelhub_core::id;
use modelhub_core::tensor::{JsonTensor, Tensor, validate_inputs};
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
use crate::records;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictBody {
    inputs: Vec<JsonTensor>,
    #[serde(default)]
    proof: bool,
}

pub async fn predict(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
    path: web::Path<String>,
) -> Result<HttpResponse, GatewayError> {
    let (caller, body) = signed(&state, &req, payload).await?;
    let idempotency_key = super::idempotency_key(&req)?;
    let asked: PredictBody = parse_json(&body)?;
    drop(body);
    let prove = asked.proof;
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
    let specs = records::specs(&model.model_id, &model.inputs)?;
    validate_inputs(&specs, &inputs)?;
    if prove && model.commitment.is_none() {
        return Err(ApiError::bad_request(format!(
            "model {} has no circuit, so its predictions can't be proved",
            model.model_id
        ))
        .into());
    }

    let job_id = id::new_id(id::JOB);
    // A retried request with the same key reuses the first reservation: it is charged once.
    let reservation_key = match idempotency_key {
        Some(key) => format!("predict:{}:{key}", model.model_id),
        None => job_id.clone(),
    };
    let charge = Charge {
        reservation_key,
        registry: state.registry(),
        inference: state.inference(),
        account_id: caller.account_id,
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
        job_id,
    };
    // A task of its own: if the client goes away, the handler is dropped but the charge still
    // ends in a commit or a release.
    let job_id = charge.job_id.clone();
    let (outputs, receipt) = actix_web::rt::spawn(charge.run())
        .await
        .map_err(|e| GatewayError::internal(format!("predict task failed: {e}")))??;
    Ok(HttpResponse::Ok().json(json!({
        "outputs": outputs.iter().map(Tensor::to_json).collect::<Vec<_>>(),
        "receipt": { "id": receipt.receipt_id, "credits_charged": receipt.credits_charged },
        "proof_job": prove.then_some(job_id),
    })))
}

/// One charged prediction: reserve → predict → commit, or release on any failure.
struct Charge {
    registry: RegistryClient<Channel>,
    inference: InferenceClient<Channel>,
    account_id: String,
    reservation_key: String,
    prove: bool,
    model_ref: common::ModelRef,
    inputs: Vec<common::Tensor>,
    job_id: String,
}

impl Charge {
    async fn run(mut self) -> Result<(Vec<Tensor>, pb::Receipt), GatewayError> {
        let reservation = self
            .registry
            .reserve(pb::ReserveRequest {
                account_id: self.account_id.clone(),
                model_id: self.model_ref.model_id.clone(),
                idempotency_key: self.reservation_key.clone(),
            })
            .await
            .map_err(GatewayError::upstream("registry", "Reserve"))?
            .into_inner();
        let reservation_id = reservation.reservation_id;
        let mut registry = self.registry.clone();
        let result = self.predict_and_commit(&reservation_id).await;
        if let Err(e) = &result {
            tracing::debug!(job_id = %self.job_id, reservation_id = %reservation_id, error = %e, "prediction failed, releasing");
            let release = pb::ReleaseRequest {
                reservation_id: reservation_id.clone(),
            };
            if let Err(status) = registry.release(release).await {
                tracing::warn!(
                    reservation_id = %reservation_id,
                    grpc_code = ?status.code(),
                    grpc_message = status.message(),
                    "releasing a reservation failed"
                );
            }
        }
        result
    }

    async fn predict_and_commit(
        &mut self,
        reservation_id: &str,
    ) -> Result<(Vec<Tensor>, pb::Receipt), GatewayError> {
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
        let outputs = answer
            .outputs
            .into_iter()
            .map(Tensor::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                GatewayError::internal(format!(
                    "inference answered a bad tensor for job {}: {}",
                    self.job_id, e.message
                ))
            })?;
        let receipt = self
            .registry
            .commit(pb::CommitRequest {
                reservation_id: reservation_id.to_owned(),
            })
            .await
            .map_err(GatewayError::upstream("registry", "Commit"))?
            .into_inner();
        Ok((outputs, receipt))
    }
}
