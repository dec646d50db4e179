//! The client side of `GetModel`, shared by the services that open models (inference, prover):
//! streams the plaintext into memory and checks it against the model reference.

use modelhub_core::ApiError;
use modelhub_core::secret::SecretBytes;
use modelhub_mtls::{Identity, TlsDir};
use modelhub_proto::common::v1::ModelRef;
use modelhub_proto::storage::v1::GetModelRequest;
use modelhub_proto::storage::v1::storage_client::StorageClient;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

/// Largest model fetched, whatever the reference claims.
pub const MAX_FETCH_BYTES: u64 = 4 << 30;

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Storage answered with an error, or could not be reached.
    #[error("fetching the model from storage: {0}")]
    Storage(ApiError),
    /// The bytes are not the ones the reference names.
    #[error("model bytes from storage do not match the model reference: {0}")]
    Integrity(String),
}

/// A lazily connected storage client over mutual TLS with `tls`'s certificate (`endpoint` is
/// `https://HOST:PORT`; TCP_NODELAY, 5 s connect timeout).
pub fn connect_lazy(tls: &TlsDir, endpoint: &str) -> Result<StorageClient<Channel>, String> {
    let channel = modelhub_mtls::lazy_channel(
        &tls.endpoint(Identity::Storage, endpoint)
            .map_err(|e| e.to_string())?,
    );
    Ok(StorageClient::new(channel).max_decoding_message_size(crate::MAX_MESSAGE_BYTES))
}

/// Streams the decrypted model into memory and checks its SHA-256 against `model.sha256`.
/// The bytes are zeroized when freed, also the allocations left behind as they grow.
pub async fn fetch_model(
    storage: &mut StorageClient<Channel>,
    model: ModelRef,
) -> Result<SecretBytes, FetchError> {
    let want = model.sha256.clone();
    let capacity = usize::try_from(model.size.min(64 << 20)).unwrap_or(0);
    let storage_err = |s: tonic::Status| FetchError::Storage(ApiError::from_status(&s));
    let mut stream = storage
        .get_model(GetModelRequest { model: Some(model) })
        .await
        .map_err(storage_err)?
        .into_inner();
    let mut bytes = SecretBytes::with_capacity(capacity);
    let mut hasher = Sha256::new();
    while let Some(chunk) = stream.message().await.map_err(storage_err)? {
        if (bytes.len() + chunk.data.len()) as u64 > MAX_FETCH_BYTES {
            return Err(FetchError::Integrity(
                "model is larger than the fetch limit".into(),
            ));
        }
        hasher.update(&chunk.data);
        bytes.extend_from_vec(chunk.data);
    }
    let got = hex::encode(hasher.finalize());
    if !got.eq_ignore_ascii_case(&want) {
        return Err(FetchError::Integrity(format!("sha256 {got}")));
    }
    Ok(bytes)
}
