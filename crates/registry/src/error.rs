//! The registry's error type: every variant maps to an [`ErrorCode`], and the message a client
//! sees never carries internal details (paths, key material, database errors).

use modelhub_core::{ApiError, ErrorCode};

/// Result of every registry operation.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("bad request: {message}")]
    BadRequest { message: String },
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    #[error("conflict: {message}")]
    Conflict { message: String },
    #[error("insufficient credits: balance {balance}, price {price}")]
    PaymentRequired { balance: u64, price: u64 },
    /// The charge would take the account past the daily cap its wallet set on chain.
    #[error(
        "daily cap reached: your wallet caps what is settled on chain at {cap} credits per UTC \
         day; {charged} charged today, price {price}"
    )]
    OverDailyCap { cap: u64, charged: u64, price: u64 },
    /// A bound on what one caller may keep in the store was reached; retry later.
    #[error("too many {what}; retry later")]
    TooManyRequests { what: String },
    /// The metadata store failed (I/O, corruption, driver error). Details stay in the log.
    #[error("metadata store: {source}")]
    Store {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The metadata store can't be reached right now (server down, connection lost, no
    /// primary); the request may be retried.
    #[error("metadata store unavailable: {source}")]
    Unavailable {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The chain ledger's JSON-RPC node can't be reached or answered badly; retry later.
    #[error("chain node unavailable: {message}")]
    ChainUnavailable { message: String },
    /// A sealed secret could not be opened (wrong KEK or tampered record).
    #[error("sealed secret of key {key_id:?} could not be opened")]
    Unseal { key_id: String },
}

impl RegistryError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        RegistryError::BadRequest {
            message: message.into(),
        }
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        RegistryError::Conflict {
            message: message.into(),
        }
    }

    /// The owner already published `name` at `version` (versions are immutable, also after a
    /// delete).
    pub fn version_taken(name: &str, version: &str) -> Self {
        RegistryError::conflict(format!(
            "model {name} version {version} was already published by this owner; versions are \
             immutable, publish a new version"
        ))
    }

    pub fn not_found(what: &'static str, id: impl Into<String>) -> Self {
        RegistryError::NotFound {
            what,
            id: id.into(),
        }
    }

    /// Wraps any back-end error (redb, MongoDB, serialization) as an internal store error.
    pub fn store(source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        RegistryError::Store {
            source: source.into(),
        }
    }

    /// Wraps a back-end error that means the store is unreachable (503 `unavailable`).
    pub fn unavailable(
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        RegistryError::Unavailable {
            source: source.into(),
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            RegistryError::BadRequest { .. } => ErrorCode::BadRequest,
            RegistryError::NotFound { .. } => ErrorCode::NotFound,
            RegistryError::Conflict { .. } => ErrorCode::Conflict,
            RegistryError::PaymentRequired { .. } | RegistryError::OverDailyCap { .. } => {
                ErrorCode::PaymentRequired
            }
            RegistryError::TooManyRequests { .. } => ErrorCode::TooManyRequests,
            RegistryError::Unavailable { .. } | RegistryError::ChainUnavailable { .. } => {
                ErrorCode::Unavailable
            }
            RegistryError::Store { .. } | RegistryError::Unseal { .. } => ErrorCode::Internal,
        }
    }

    /// The error as a client may see it.
    pub fn to_api(&self) -> ApiError {
        match self {
            RegistryError::BadRequest { message } | RegistryError::Conflict { message } => {
                ApiError::new(self.code(), message.clone())
            }
            RegistryError::NotFound { .. }
            | RegistryError::PaymentRequired { .. }
            | RegistryError::OverDailyCap { .. }
            | RegistryError::TooManyRequests { .. } => ApiError::new(self.code(), self.to_string()),
            RegistryError::Unavailable { .. } => ApiError::new(
                ErrorCode::Unavailable,
                "the metadata store is unavailable; retry later",
            ),
            RegistryError::ChainUnavailable { .. } => ApiError::new(
                ErrorCode::Unavailable,
                "the chain node is unavailable; retry later",
            ),
            RegistryError::Store { .. } | RegistryError::Unseal { .. } => ApiError::internal(),
        }
    }
}

impl From<RegistryError> for tonic::Status {
    fn from(e: RegistryError) -> Self {
        e.to_api().to_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_codes() {
        let e = RegistryError::PaymentRequired {
            balance: 3,
            price: 5,
        };
        let api = e.to_api();
        assert_eq!(api.code, ErrorCode::PaymentRequired);
        assert_eq!(api.message, "insufficient credits: balance 3, price 5");

        let e = RegistryError::store(std::io::Error::other("/secret/path is broken"));
        let api = e.to_api();
        assert_eq!(api.code, ErrorCode::Internal);
        assert!(!api.message.contains("/secret"));

        let api = RegistryError::not_found("model", "mdl_1").to_api();
        assert_eq!(api.code, ErrorCode::NotFound);
        assert_eq!(api.message, "model \"mdl_1\" not found");
        let api = RegistryError::unavailable("connection to 10.0.0.1:27017 refused").to_api();
        assert_eq!(api.code, ErrorCode::Unavailable);
        assert!(!api.message.contains("10.0.0.1"));
        assert_eq!(
            RegistryError::conflict("taken").to_api().code,
            ErrorCode::Conflict
        );
    }
}
