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
