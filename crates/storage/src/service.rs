//! The `modelhub.storage.v1.Storage` gRPC service: envelope encryption on the way in,
//! authenticated decryption and a plaintext hash check on the way out.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use modelhub_core::crypto::{self, Kek, SecretKey, SegmentDecryptor, SegmentEncryptor};
use modelhub_core::secret::SecretBytes;
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

/// An upload that passed the checks, not yet encrypted.
struct Checked {
    plaintext: SecretBytes,
    sha256: String,
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
        // Zeroized when freed, also the allocations it leaves behind as it grows.
        let mut plaintext = SecretBytes::new();
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
                    plaintext.extend_from_vec(chunk);
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
        let checked = tokio::task::spawn_blocking(move || check(plaintext))
            .await
            .map_err(task_failed)??;
        let dek = SecretKey::generate();
        let wrapped_dek = self.kek.wrap_dek(&dek, &header.model_id, &header.version);
        let aad = crypto::model_aad(&header.model_id, &header.version);
        // The ciphertext streams into the blob store as it is made: memory holds the
        // plaintext and a few pieces, never a second copy of the model.
        let (tx, rx) = mpsc::channel::<Result<Bytes>>(4);
        let plaintext = checked.plaintext;
        let encrypting =
            tokio::task::spawn_blocking(move || encrypt_into(&dek, aad, plaintext, &tx));
        let stored = self.blobs.put_stream(ReceiverStream::new(rx).boxed()).await;
        let encrypted = encrypting.await.map_err(task_failed)?;
        let cid = stored?;
        encrypted?;
        tracing::info!(
            model_id = %header.model_id,
            version = %header.version,
            cid = %cid,
            size,
            "model stored"
        );
        Ok(pb::PutModelResponse {
            cid,
            sha256: checked.sha256,
            size,
            wrapped_dek,
            inputs: checked.inputs.iter().map(|s| s.to_proto()).collect(),
            outputs: checked.outputs.iter().map(|s| s.to_proto()).collect(),
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

/// Hashes and validates one uploaded model (runs on a blocking thread).
fn check(plaintext: SecretBytes) -> Result<Checked> {
    let sha256 = hex::encode(Sha256::digest(&plaintext));
    // On an error the plaintext is dropped here, zeroized.
    let (inputs, outputs) = modelhub_onnx::inspect(&plaintext)?;
    Ok(Checked {
        plaintext,
        sha256,
        inputs,
        outputs,
    })
}

/// Bytes of ciphertext per piece handed to the blob store.
const PUT_PIECE: usize = 1024 * 1024;

/// Encrypts `plaintext` into pieces sent to `tx` (runs on a blocking thread); the plaintext is
/// zeroized as it is dropped at the end.
/// A failure is also sent, so the blob store aborts the put; a closed channel (the store gave
/// up) just stops.
fn encrypt_into(
    dek: &SecretKey,
    aad: Vec<u8>,
    plaintext: SecretBytes,
    tx: &mpsc::Sender<Result<Bytes>>,
) -> Result<()> {
    let result = (|| {
        let (mut enc, mut out) = SegmentEncryptor::new(dek, aad);
        let crypto_err = |source| StorageError::Crypto { source };
        for piece in plaintext.chunks(PUT_PIECE) {
            enc.update(piece, &mut out).map_err(crypto_err)?;
            if out.len() >= PUT_PIECE {
                let full = std::mem::replace(&mut out, Vec::with_capacity(PUT_PIECE + 4096));
                if tx.blocking_send(Ok(Bytes::from(full))).is_err() {
                    return Ok(());
                }
            }
        }
        enc.finish(&mut out).map_err(crypto_err)?;
        let _ = tx.blocking_send(Ok(Bytes::from(out)));
        Ok(())
    })();
    drop(plaintext);
    if result.is_err() {
        // The store only needs to know the put must not complete.
        let _ = tx.blocking_send(Err(StorageError::Crypto {
            source: crypto::CryptoError::Encrypt,
        }));
    }
    result
}

fn task_failed(e: tokio::task::JoinError) -> StorageError {
    StorageError::Task {
        reason: e.to_string(),
    }
}

/// Overwrites a plaintext buffer before it is freed.
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

    async fn delete_model(
        &self,
        request: Request<pb::DeleteModelRequest>,
    ) -> Result<Response<pb::DeleteModelResponse>, Status> {
        let cid = request.into_inner().cid;
        let removed = self
            .blobs
            .remove(&cid)
            .await
            .map_err(|e| e.into_status("delete_model"))?;
        tracing::info!(cid = %cid, removed, "blob deleted");
        Ok(Response::new(pb::DeleteModelResponse { removed }))
    }
}
