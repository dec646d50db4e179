//! Reading model records.

use actix_web::{HttpRequest, HttpResponse, web};
use modelhub_proto::registry::v1 as pb;

use super::signed;
use crate::AppState;
use crate::error::GatewayError;
use crate::records::ModelRecord;

/// `GET /v1/models` → a JSON array of model records.
pub async fn list(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, GatewayError> {
    signed(&state, &req, payload).await?;
    let models = state
        .registry()
        .list_models(pb::ListModelsRequest {})
        .await
        .map_err(GatewayError::upstream("registry", "ListModels"))?
        .into_inner()
        .models;
    let records = models
        .into_iter()
        .map(ModelRecord::try_from)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(HttpResponse::Ok().json(records))
}

/// `GET /v1/models/{model_id}` → one model record.
pub async fn get(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
    path: web::Path<String>,
) -> Result<HttpResponse, GatewayError> {
    signed(&state, &req, payload).await?;
    let model = state
        .registry()
        .get_model(pb::GetModelRequest {
            model_id: path.into_inner(),
        })
        .await
        .map_err(GatewayError::upstream("registry", "GetModel"))?
        .into_inner();
    Ok(HttpResponse::Ok().json(ModelRecord::try_from(model)?))
}

/// `DELETE /v1/models/{model_id}` (its owner or an admin) → 204. The record goes first, so the
/// model stops being sold at once; then storage deletes the blob (on IPFS: unpins it). A blob
/// whose delete fails is only orphaned: `modelhub storage verify` lists it as unexpected.
pub async fn delete(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
    path: web::Path<String>,
) -> Result<HttpResponse, GatewayError> {
    let (caller, _) = signed(&state, &req, payload).await?;
    let model_id = path.into_inner();
    let model = state
        .registry()
        .get_model(pb::GetModelRequest {
            model_id: model_id.clone(),
        })
        .await
        .map_err(GatewayError::upstream("registry", "GetModel"))?
        .into_inner();
    if model.owner != caller.account_id && !caller.admin {
        return Err(modelhub_core::ApiError::new(
            modelhub_core::ErrorCode::Forbidden,
            "only the model's owner or an admin may delete it",
        )
        .into());
    }
    state
        .registry()
        .delete_model(pb::DeleteModelRequest {
            model_id: model_id.clone(),
        })
        .await
        .map_err(GatewayError::upstream("registry", "DeleteModel"))?;
    state.forget_model(&model_id).await;
    let deleted = state
        .storage()
        .delete_model(modelhub_proto::storage::v1::DeleteModelRequest {
            cid: model.cid.clone(),
        })
        .await;
    if let Err(status) = deleted {
        tracing::warn!(model_id = %model_id, cid = %model.cid, code = ?status.code(), "deleting the blob failed; it is orphaned");
    }
    tracing::info!(model_id = %model_id, by = %caller.account_id, "model deleted");
    Ok(HttpResponse::NoContent().finish())
}
