//! The `modelhub.storage.v1.Storage` gRPC service: envelope encryption on the way in,
//! authenticated decryption and a plaintext hash check on the way out.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use modelhub_core::crypto::{self, Kek, SecretKey, SegmentDecryptor, SegmentEncryptor};
use modelhub_proto::storage::v1 as pb;
use modelhub_proto::storage::v1::put_model_request::Part;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::blob::BlobStore;
use crate::error::{Result, StorageError};

/// Largest plaintext piece sent in one `ModelChunk`.
pub const MAX_CHUNK: usize = 1024 * 1024;

/// The service state shared by every request.
pub struct StorageService {
    blobs: Arc<dyn BlobStore>,
    kek: Kek,
    max_model_bytes: u64,
}

impl std::fmt::Debug for StorageService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageService")
            .field("max_model_bytes", &self.max_model_bytes)
            .finish_non_exhaustive()
    }
}

/// What a finished upload produced.
struct Sealed {
    ciphertext: Vec<u8>,
    sha256: String,
    wrapped_dek: Vec<u8>,
    inputs: Vec<modelhub_core::TensorSpec>,
    outputs: Vec<modelhub_core::TensorSpec>,
}

impl StorageService {
    pub fn new(blobs: Arc<dyn BlobStore>, kek: Kek, max_model_bytes: u64) -> StorageService {
        StorageService {
            blobs,
            kek,
            max_model_bytes,
        }
    }

    async fn put(
        &self,
        mut stream: Streaming<pb::PutModelRequest>,
    ) -> Result<pb::PutModelResponse> {
        let header = match stream.message().await {
            Ok(Some(pb::PutModelRequest {
                part: Some(Part::Header(h)),
            })) => h,
            Ok(_) => {
                return Err(StorageError::invalid(
                    "the first message of PutModel must be a header",
                ));
            }
            Err(status) => return Err(aborted(status)),
        };
        if header.model_id.is_empty() || header.version.is_empty() {
            return Err(StorageError::invalid(
                "the header needs a model_id and a version",
            ));
        }
        let mut plaintext: Vec<u8> = Vec::new();
        let mut finished = false;
        loop {
            let msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(status) => return Err(aborted(status)),
            };
            match msg.part {
                Some(Part::Chunk(chunk)) => {
                    if (plaintext.len() + chunk.len()) as u64 > self.max_model_bytes {
                        return Err(StorageError::PayloadTooLarge {
                            limit: self.max_model_bytes,
                        });
                    }
                    plaintext.extend_from_slice(&chunk);
                }
                Some(Part::Finish(_)) => {
                    finished = true;
                    break;
                }
                Some(Part::Header(_)) => {
                    return Err(StorageError::invalid("PutModel got a second header"));
                }
                None => return Err(StorageError::invalid("PutModel got an empty message")),
            }
        }
        if !finished {
            return Err(StorageError::invalid(
                "the upload ended without finish; nothing was stored",
            ));
        }
        let size = plaintext.len() as u64;
        let kek = self.kek.clone();
        let (model_id, version) = (header.model_id.clone(), header.version.clone());
        let sealed =
            tokio::task::spawn_blocking(move || seal(&kek, &model_id, &version, plaintext))
                .await
                .map_err(|e| StorageError::Task {
                    reason: e.to_string(),
                })??;
        let cid = self.blobs.put(Bytes::from(sealed.ciphertext)).await?;
        tracing::info!(
            model_id = %header.model_id,
            version = %header.version,
            cid = %cid,
            size,
            "model stored"
        );
        Ok(pb::PutModelResponse {
            cid,
            sha256: sealed.sha256,
            size,
            wrapped_dek: sealed.wrapped_dek,
            inputs: sealed.inputs.iter().map(|s| s.to_proto()).collect(),
            outputs: sealed.outputs.iter().map(|s| s.to_proto()).collect(),
        })
    }

    async fn get(
        &self,
        request: pb::GetModelRequest,
    ) -> Result<ReceiverStream<Result<pb::ModelChunk, Status>>> {
        let model = request
            .model
            .ok_or_else(|| StorageError::invalid("GetModel needs a model reference"))?;
        if model.model_id.is_empty() || model.version.is_empty() || model.cid.is_empty() {
            return Err(StorageError::invalid(
                "the model reference needs a model_id, a version and a cid",
            ));
        }
        let want = hex::decode(&model.sha256)
            .ok()
            .filter(|h| h.len() == 32)
            .ok_or_else(|| StorageError::invalid("sha256 must be 64 hex digits"))?;
        let dek = self
            .kek
            .unwrap_dek(&model.wrapped_dek, &model.model_id, &model.version)
            .map_err(|source| StorageError::KeyUnwrap { source })?;
        let blob = self.blobs.get(&model.cid).await?;
        let aad = crypto::model_aad(&model.model_id, &model.version);
        let (tx, rx) = mpsc::channel(4);
        let handle = tokio::runtime::Handle::current();
        let (model_id, version, cid) = (model.model_id, model.version, model.cid);
        // Decryption is CPU work: it runs on a blocking thread, which pulls the ciphertext from
        // the async blob stream and pushes plaintext into the response channel.
        tokio::task::spawn_blocking(move || {
            let result = decrypt_stream(&handle, blob, dek, aad, &want, &tx);
            if let Err(e) = result {
                let status = e.into_status("get_model");
                tracing::warn!(model_id = %model_id, version = %version, cid = %cid, "model read failed");
                let _ = tx.blocking_send(Err(status));
            }
        });
        Ok(ReceiverStream::new(rx))
    }
}

/// Hashes, validates and encrypts one uploaded model (runs on a blocking thread).
fn seal(kek: &Kek, model_id: &str, version: &str, mut plaintext: Vec<u8>) -> Result<Sealed> {
    let sha256 = hex::encode(Sha256::digest(&plaintext));
    let checked = modelhub_onnx::inspect(&plaintext);
    let (inputs, outputs) = match checked {
        Ok(sig) => sig,
        Err(e) => {
            wipe(&mut plaintext);
            return Err(e.into());
        }
    };
    let dek = SecretKey::generate();
    let (mut enc, mut ciphertext) =
        SegmentEncryptor::new(&dek, crypto::model_aad(model_id, version));
    ciphertext.reserve(plaintext.len() + plaintext.len() / crypto::SEGMENT_SIZE * 16 + 32);
    let encrypted = enc
        .update(&plaintext, &mut ciphertext)
        .and_then(|()| enc.finish(&mut ciphertext));
    wipe(&mut plaintext);
    encrypted.map_err(|source| StorageError::Crypto { source })?;
    Ok(Sealed {
        ciphertext,
        sha256,
        wrapped_dek: kek.wrap_dek(&dek, model_id, version),
        inputs,
        outputs,
    })
}

/// Overwrites a plaintext buffer before it is freed.
fn wipe(buf: &mut [u8]) {
    for b in buf.iter_mut() {
        // A volatile-free wipe is enough here: the buffer is dropped right after.
        *b = 0;
    }
    std::hint::black_box(&buf);
}

fn decrypt_stream(
    handle: &tokio::runtime::Handle,
    mut blob: futures::stream::BoxStream<'static, Result<Bytes>>,
    dek: SecretKey,
    aad: Vec<u8>,
    want: &[u8],
    tx: &mpsc::Sender<Result<pb::ModelChunk, Status>>,
) -> Result<()> {
    let mut dec = SegmentDecryptor::new(dek, aad);
    let mut hasher = Sha256::new();
    let mut out = Vec::new();
    let integrity = |e: crypto::CryptoError| StorageError::Integrity {
        reason: e.to_string(),
    };
    while let Some(chunk) = handle.block_on(blob.next()) {
        let chunk = chunk?;
        out.clear();
        dec.update(&chunk, &mut out).map_err(integrity)?;
        if !send(tx, &mut hasher, &out) {
            return Ok(()); // the client went away
        }
    }
    out.clear();
    dec.finish(&mut out).map_err(integrity)?;
    hasher.update(&out);
    if hasher.finalize().as_slice() != want {
        return Err(StorageError::Integrity {
            reason: "plaintext sha256 differs from the model reference".into(),
        });
    }
    // The last piece goes out only once the whole plaintext has checked out.
    for piece in out.chunks(MAX_CHUNK) {
        if tx
            .blocking_send(Ok(pb::ModelChunk {
                data: piece.to_vec(),
            }))
            .is_err()
        {
            break;
        }
    }
    Ok(())
}

/// Hashes and sends plaintext in pieces of at most [`MAX_CHUNK`]; `false` when the receiver is gone.
fn send(
    tx: &mpsc::Sender<Result<pb::ModelChunk, Status>>,
    hasher: &mut Sha256,
    data: &[u8],
) -> bool {
    hasher.update(data);
    data.chunks(MAX_CHUNK).all(|piece| {
        tx.blocking_send(Ok(pb::ModelChunk {
            data: piece.to_vec(),
        }))
        .is_ok()
    })
}

fn aborted(status: Status) -> StorageError {
    StorageError::invalid(format!(
        "the upload stream failed ({}); nothing was stored",
        status.code()
    ))
}

#[tonic::async_trait]
impl pb::storage_server::Storage for StorageService {
    async fn put_model(
        &self,
        request: Request<Streaming<pb::PutModelRequest>>,
    ) -> Result<Response<pb::PutModelResponse>, Status> {
        self.put(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| e.into_status("put_model"))
    }

    type GetModelStream = ReceiverStream<Result<pb::ModelChunk, Status>>;

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<Self::GetModelStream>, Status> {
        self.get(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| e.into_status("get_model"))
    }
}
