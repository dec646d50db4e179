//! `POST /v1/models?name=&version=&price=[&proof_price=][&input_min=&input_max=]`: a streamed
//! upload of raw ONNX bytes.
//!
//! The signature is verified on the headers first (it covers the claimed body hash). The body
//! is then streamed to storage's `PutModel` through a bounded channel, never held whole, and
//! hashed on the way; `finish` is sent only when the body stayed within the size limit and its
//! hash equals the claimed one. Otherwise the stream ends without `finish` and storage keeps
//! nothing.

use actix_web::{HttpRequest, HttpResponse, web};
use modelhub_core::{ApiError, ErrorCode, InputRange, id};
use modelhub_proto::registry::v1 as pb;
use modelhub_proto::storage::v1 as storage;
use modelhub_proto::storage::v1::put_model_request::Part;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{content_length, payload_too_large};
use crate::AppState;
use crate::error::GatewayError;
use crate::records::ModelRecord;

/// Bytes gathered into one `chunk` message (well under gRPC's 4 MiB default message limit).
const CHUNK_BYTES: usize = 256 * 1024;
/// Chunks in flight between the HTTP body and the gRPC stream.
const CHANNEL_DEPTH: usize = 4;

#[derive(Deserialize)]
struct UploadQuery {
    name: String,
    version: String,
    price: u64,
    /// Credits charged per delivered proof; default: proportional to the circuit's size
    /// ([`crate::Settings::proof_cells_per_credit`]). Ignored for a model without a circuit.
    proof_price: Option<u64>,
    /// The range the model's input values lie in (both or neither): proofs are calibrated on
    /// it. Default `[0, 1]`.
    input_min: Option<f32>,
    input_max: Option<f32>,
    /// The most rows (batch size) one predict may hold; default: no cap of the model's own.
    max_rows: Option<u32>,
    /// The most predictions (rows) one account may make per minute; default: no quota of
    /// the model's own.
    calls_per_minute: Option<u32>,
}

/// An optional owner's setting that must be at least 1 when given; 0 when left out.
fn positive(name: &str, value: Option<u32>) -> Result<u32, ApiError> {
    match value {
        None => Ok(0),
        Some(0) => Err(ApiError::bad_request(format!(
            "{name} must be at least 1 (leave it out for no limit of the model's own)"
        ))),
        Some(n) => Ok(n),
    }
}

impl UploadQuery {
    /// The model's own cap on rows per predict, checked (before anything is stored); 0 when
    /// none.
    fn max_rows(&self) -> Result<u32, ApiError> {
        positive("max_rows", self.max_rows)
    }

    /// The model's own quota per account and minute, checked; 0 when none.
    fn calls_per_minute(&self) -> Result<u32, ApiError> {
        positive("calls_per_minute", self.calls_per_minute)
    }

    /// The declared input range, checked (before anything is stored).
    fn input_range(&self) -> Result<Option<InputRange>, ApiError> {
        match (self.input_min, self.input_max) {
            (None, None) => Ok(None),
            (Some(min), Some(max)) => InputRange::new(min, max)
                .map(Some)
                .map_err(ApiError::bad_request),
            _ => Err(ApiError::bad_request(
                "input_min and input_max go together (the range the model's inputs lie in)",
            )),
        }
    }
}

pub async fn upload(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, GatewayError> {
    let verified = state.auth.verify_headers(&req).await?;
    let caller = verified.caller;
    // Held until the upload is answered: one account can't occupy the storage stream, the
    // compiler and the disk with any number of uploads at once.
    let Some(_upload_slot) = state.uploads.try_acquire(caller.account_id.clone()) else {
        return Err(ApiError::new(
            ErrorCode::TooManyRequests,
            format!(
                "this account already has {} uploads in progress; wait for one to finish",
                state.uploads.max()
            ),
        )
        .into());
    };
    let query = web::Query::<UploadQuery>::from_query(req.query_string())
        .map_err(|e| {
            ApiError::bad_request(format!(
                "query must be ?name=&version=&price= with price a whole number of credits: {e}"
            ))
        })?
        .into_inner();
    if query.name.trim().is_empty() || query.version.trim().is_empty() {
        return Err(ApiError::bad_request("name and version must not be empty").into());
    }
    let input_range = query.input_range()?;
    let max_rows = query.max_rows()?;
    let calls_per_minute = query.calls_per_minute()?;
    let limit = state.limits.max_upload_bytes;
    if content_length(&req).is_some_and(|n| n > limit) {
        return Err(payload_too_large(limit));
    }
    let checked = state
        .registry()
        .check_model_name(pb::CheckModelNameRequest {
            name: query.name.clone(),
            version: query.version.clone(),
            owner: caller.account_id.clone(),
        })
        .await;
    if let Err(status) = checked {
        // A retried upload (same owner, same bytes) answers with the model it made the first
        // time instead of a conflict: uploads are idempotent.
        if status.code() == tonic::Code::AlreadyExists
            && let Some(existing) =
                existing_upload(&state, &query, &caller.account_id, &verified.content_sha256)
                    .await?
        {
            return Ok(HttpResponse::Ok().json(ModelRecord::try_from(existing)?));
        }
        return Err(GatewayError::upstream("registry", "CheckModelName")(status));
    }

    let model_id = id::new_id(id::MODEL);
    let stored = put_model(
        &state,
        payload,
        storage::PutHeader {
            model_id: model_id.clone(),
            version: query.version.clone(),
        },
        limit,
        &verified.content_sha256,
    )
    .await?;

    // From here on a failure must not leave the stored ciphertext behind (twenty racing
    // uploads of one name answered one 201 and left twenty blobs): a definite refusal removes
    // it. A registry whose answer was lost may have made the record, so then the blob stays.
    let cid = stored.cid.clone();
    let circuit = match compile(&state, &model_id, &query.version, &stored, input_range).await {
        Ok(c) => c,
        Err(e) => {
            forget_upload(&state, &model_id, &cid, false).await;
            return Err(e);
        }
    };
    let compiled = circuit.commitment.is_some();
    let proof_price = if compiled {
        query.proof_price.unwrap_or_else(|| {
            default_proof_price(circuit.size, state.limits.proof_cells_per_credit)
        })
    } else {
        0
    };
    let created = state
        .registry()
        .create_model(pb::CreateModelRequest {
            model_id: model_id.clone(),
            owner: caller.account_id.clone(),
            name: query.name,
            version: query.version,
            price: query.price,
            cid: stored.cid,
            sha256: stored.sha256,
            size: stored.size,
            wrapped_dek: stored.wrapped_dek,
            inputs: stored.inputs,
            outputs: stored.outputs,
            commitment: circuit.commitment,
            circuit_spec: circuit.spec,
            zk_note: circuit.note,
            digest: circuit.digest,
            proof_price,
            max_rows,
            calls_per_minute,
        })
        .await;
    let model = match created {
        Ok(model) => model.into_inner(),
        Err(status) => {
            if !matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
            ) {
                forget_upload(&state, &model_id, &cid, compiled).await;
            }
            return Err(GatewayError::upstream("registry", "CreateModel")(status));
        }
    };
    tracing::info!(model_id = %model_id, owner = %caller.account_id, size = model.size, "model uploaded");
    let mut answer = serde_json::to_value(ModelRecord::try_from(model)?)
        .map_err(|e| GatewayError::internal(format!("model record: {e}")))?;
    // The commitment's opening, for the owner only and only in this answer (docs/ZK.md).
    if let (Some(opening), Some(a)) = (circuit.opening, answer.as_object_mut()) {
        let opening: serde_json::Value = serde_json::from_str(&opening).unwrap_or_default();
        a.insert("zk_opening".into(), opening);
    }
    Ok(HttpResponse::Created().json(answer))
}

/// Removes what an upload that was not registered left: its ciphertext in storage and, when
/// the prover compiled it, the prover's sealed record of it (best effort: a failure is logged;
/// `modelhub storage verify` lists a blob that is left).
async fn forget_upload(state: &AppState, model_id: &str, cid: &str, compiled: bool) {
    let removed = state
        .storage()
        .delete_model(storage::DeleteModelRequest {
            cid: cid.to_owned(),
        })
        .await;
    match removed {
        Ok(_) => tracing::info!(
            model_id,
            cid,
            "removed the blob of an upload that was refused"
        ),
        Err(status) => {
            tracing::warn!(
                model_id,
                cid,
                grpc_message = status.message(),
                "could not remove the blob of a refused upload"
            )
        }
    }
    if let (true, Some(mut prover)) = (compiled, state.prover()) {
        let forgot = prover
            .forget(modelhub_proto::prover::v1::ForgetRequest {
                model_id: model_id.to_owned(),
            })
            .await;
        if let Err(status) = forgot {
            tracing::warn!(
                model_id,
                grpc_message = status.message(),
                "could not remove the prover's record of a refused upload"
            );
        }
    }
}

/// The model `query` names, when `owner` uploaded it with exactly these bytes.
async fn existing_upload(
    state: &AppState,
    query: &UploadQuery,
    owner: &str,
    sha256: &str,
) -> Result<Option<pb::Model>, GatewayError> {
    let models = state
        .registry()
        .list_models(pb::ListModelsRequest {})
        .await
        .map_err(GatewayError::upstream("registry", "ListModels"))?
        .into_inner()
        .models;
    Ok(models.into_iter().find(|m| {
        m.name == query.name && m.version == query.version && m.owner == owner && m.sha256 == sha256
    }))
}

/// What the prover made of a new model.
#[derive(Debug, Default)]
struct Circuit {
    commitment: Option<String>,
    spec: Option<String>,
    note: Option<String>,
    digest: Option<String>,
    opening: Option<String>,
    /// Rows × lanes (0 without a circuit).
    size: u64,
}

/// The proof price of a circuit of `size` cells when its owner sets none: one credit per
/// `cells_per_credit` cells, rounded up, at least 1.
pub fn default_proof_price(size: u64, cells_per_credit: u64) -> u64 {
    size.div_ceil(cells_per_credit.max(1)).max(1)
}

/// Asks the prover (when there is one) to compile the stored model and commit to its weights.
/// An unsupported graph is not an error: the model just has no commitment.
async fn compile(
    state: &AppState,
    model_id: &str,
    version: &str,
    stored: &storage::PutModelResponse,
    input_range: Option<InputRange>,
) -> Result<Circuit, GatewayError> {
    let Some(mut prover) = state.prover() else {
        return Ok(Circuit::default());
    };
    let answer = prover
        .compile(modelhub_proto::prover::v1::CompileRequest {
            model: Some(modelhub_proto::common::v1::ModelRef {
                model_id: model_id.to_owned(),
                version: version.to_owned(),
                cid: stored.cid.clone(),
                wrapped_dek: stored.wrapped_dek.clone(),
                sha256: stored.sha256.clone(),
                size: stored.size,
            }),
            inputs: stored.inputs.clone(),
            input_range: input_range.map(|r| modelhub_proto::prover::v1::InputRange {
                min: r.min,
                max: r.max,
            }),
        })
        .await
        .map_err(GatewayError::upstream("prover", "Compile"))?
        .into_inner();
    if !answer.supported {
        tracing::info!(model_id, reason = %answer.reason, "model has no circuit");
        return Ok(Circuit {
            note: Some(answer.reason),
            ..Circuit::default()
        });
    }
    Ok(Circuit {
        commitment: Some(answer.commitment),
        spec: Some(answer.circuit_spec),
        note: None,
        digest: Some(answer.digest),
        opening: Some(answer.opening),
        size: answer.circuit_size,
    })
}

/// Why feeding the body to storage stopped early.
enum FeedError {
    /// The client's fault (too large, hash mismatch, broken body): answer with this.
    Client(GatewayError),
    /// Storage stopped reading: its own answer says why.
    StorageClosed,
}

/// Streams the body into storage's `PutModel` and returns storage's answer.
async fn put_model(
    state: &AppState,
    payload: web::Payload,
    header: storage::PutHeader,
    limit: u64,
    claimed_sha256: &str,
) -> Result<storage::PutModelResponse, GatewayError> {
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    let mut client = state.storage();
    let call = client.put_model(ReceiverStream::new(rx));
    let feed = feed(
        super::PacedBody::new(payload, &state.limits, false),
        tx,
        header,
        limit,
        claimed_sha256,
    );
    tokio::pin!(call, feed);
    let to_error = GatewayError::upstream("storage", "PutModel");
    tokio::select! {
        answer = &mut call => {
            // Storage answered before the body was complete: only an error can come first.
            match answer {
                Err(status) => Err(to_error(status)),
                Ok(_) => Err(GatewayError::internal("storage answered PutModel before finish")),
            }
        }
        fed = &mut feed => match fed {
            Ok(()) => call.await.map(|a| a.into_inner()).map_err(to_error),
            Err(FeedError::StorageClosed) => match call.await {
                Err(status) => Err(to_error(status)),
                Ok(_) => Err(GatewayError::internal("storage answered PutModel before finish")),
            },
            Err(FeedError::Client(e)) => {
                // The stream ended without `finish`; wait for storage to drop the upload.
                let _ = call.await;
                Err(e)
            }
        },
    }
}

async fn feed(
    mut payload: super::PacedBody,
    tx: mpsc::Sender<storage::PutModelRequest>,
    header: storage::PutHeader,
    limit: u64,
    claimed_sha256: &str,
) -> Result<(), FeedError> {
    let send = |part: Part| {
        let tx = tx.clone();
        async move {
            tx.send(storage::PutModelRequest { part: Some(part) })
                .await
                .map_err(|_| FeedError::StorageClosed)
        }
    };
    send(Part::Header(header)).await?;
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    let mut buf = Vec::with_capacity(CHUNK_BYTES);
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(FeedError::Client)?;
        total += chunk.len() as u64;
        if total > limit {
            return Err(FeedError::Client(payload_too_large(limit)));
        }
        hasher.update(&chunk);
        buf.extend_from_slice(&chunk);
        if buf.len() >= CHUNK_BYTES {
            let full = std::mem::replace(&mut buf, Vec::with_capacity(CHUNK_BYTES));
            send(Part::Chunk(full)).await?;
        }
    }
    if !buf.is_empty() {
        send(Part::Chunk(buf)).await?;
    }
    if hex::encode(hasher.finalize()) != claimed_sha256 {
        return Err(FeedError::Client(
            ApiError::new(
                ErrorCode::Unauthenticated,
                "body does not match x-mh-content-sha256",
            )
            .into(),
        ));
    }
    send(Part::Finish(storage::PutFinish {})).await
}
