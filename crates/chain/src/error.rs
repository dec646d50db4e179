//! The crate's error: a contract refusal (decoded into [`Revert`]), a node or transport problem,
//! or bad input; and the decoding of revert data and node answers into it.

use std::fmt;

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::sol_types::SolInterface;
use alloy::transports::{RpcError, TransportError};

use crate::bindings::Marketplace::MarketplaceErrors;

/// Result of this crate.
pub type Result<T> = std::result::Result<T, ChainError>;

/// Why a chain operation failed.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ChainError {
    /// The contract refused the call: the decoded custom error, e.g. `BatchAlreadySettled(0x..)`.
    #[error("the contract refused: {0}")]
    Reverted(Revert),
    /// Transport or node problems (unreachable, timed out, odd answer): retryable.
    #[error("chain node unavailable: {0}")]
    Rpc(String),
    /// Bad configuration or input (bad address, key file, no signer for a write...).
    #[error("{0}")]
    Invalid(String),
}

/// A custom error of the Marketplace contract, with its arguments; `Other` for a revert that
/// is none of them (a reason string, a panic, undecodable data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revert {
    Unauthorized(Address),
    ZeroAddress,
    InvalidRate,
    ModelAlreadyRegistered(B256),
    UnknownModel(B256),
    ModelInactive(B256),
    InvalidPayment(U256),
    EmptyBatch,
    BatchAlreadySettled(B256),
    InsufficientCredits {
        user: Address,
        needed: U256,
        available: U256,
    },
    NothingToWithdraw(Address),
    TransferFailed(Address, U256),
    ArithmeticOverflow,
    /// A delay (price window, operator or admin hand-over, refund lock) runs until this time.
    TooEarly(U256),
    ContractPaused,
    NothingToRefund(Address),
    Other(String),
}

impl fmt::Display for Revert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Revert::Unauthorized(caller) => write!(f, "Unauthorized({caller})"),
            Revert::ZeroAddress => f.write_str("ZeroAddress"),
            Revert::InvalidRate => f.write_str("InvalidRate"),
            Revert::ModelAlreadyRegistered(id) => write!(f, "ModelAlreadyRegistered({id})"),
            Revert::UnknownModel(id) => write!(f, "UnknownModel({id})"),
            Revert::ModelInactive(id) => write!(f, "ModelInactive({id})"),
            Revert::InvalidPayment(value) => write!(f, "InvalidPayment({value} wei)"),
            Revert::EmptyBatch => f.write_str("EmptyBatch"),
            Revert::BatchAlreadySettled(id) => write!(f, "BatchAlreadySettled({id})"),
            Revert::InsufficientCredits {
                user,
                needed,
                available,
            } => write!(
                f,
                "InsufficientCredits(user {user}, needed {needed}, available {available})"
            ),
            Revert::NothingToWithdraw(owner) => write!(f, "NothingToWithdraw({owner})"),
            Revert::TransferFailed(to, amount) => {
                write!(f, "TransferFailed(to {to}, amount {amount} wei)")
            }
            Revert::ArithmeticOverflow => f.write_str("ArithmeticOverflow"),
            Revert::TooEarly(t) => write!(f, "TooEarly(not before {t})"),
            Revert::ContractPaused => f.write_str("ContractPaused"),
            Revert::NothingToRefund(user) => write!(f, "NothingToRefund({user})"),
            Revert::Other(reason) => write!(f, "reverted: {reason}"),
        }
    }
}

impl From<MarketplaceErrors> for Revert {
    fn from(e: MarketplaceErrors) -> Self {
        use MarketplaceErrors as E;
        match e {
            E::Unauthorized(e) => Revert::Unauthorized(e.caller),
            E::ZeroAddress(_) => Revert::ZeroAddress,
            E::InvalidRate(_) => Revert::InvalidRate,
            E::ModelAlreadyRegistered(e) => Revert::ModelAlreadyRegistered(e.modelId),
            E::UnknownModel(e) => Revert::UnknownModel(e.modelId),
            E::ModelInactive(e) => Revert::ModelInactive(e.modelId),
            E::InvalidPayment(e) => Revert::InvalidPayment(e.value),
            E::EmptyBatch(_) => Revert::EmptyBatch,
            E::BatchAlreadySettled(e) => Revert::BatchAlreadySettled(e.batchId),
            E::InsufficientCredits(e) => Revert::InsufficientCredits {
                user: e.user,
                needed: e.needed,
                available: e.available,
            },
            E::NothingToWithdraw(e) => Revert::NothingToWithdraw(e.owner),
            E::TransferFailed(e) => Revert::TransferFailed(e.to, e.amount),
            E::ArithmeticOverflow(_) => Revert::ArithmeticOverflow,
            E::TooEarly(e) => Revert::TooEarly(e.notBefore),
            E::ContractPaused(_) => Revert::ContractPaused,
            E::NothingToRefund(e) => Revert::NothingToRefund(e.user),
        }
    }
}

impl Revert {
    /// Decodes revert data: a Marketplace custom error, else a standard reason (`Error(string)`,
    /// `Panic(uint256)`), else the raw bytes.
    pub fn decode(data: &[u8]) -> Revert {
        if let Ok(e) = MarketplaceErrors::abi_decode(data) {
            return e.into();
        }
        if data.is_empty() {
            return Revert::Other("no reason given".into());
        }
        match alloy::sol_types::GenericContractError::abi_decode(data) {
            Ok(reason) => Revert::Other(reason.to_string()),
            Err(_) => Revert::Other(format!(
                "undecoded revert data {}",
                Bytes::from(data.to_vec())
            )),
        }
    }
}

/// The longest node text kept in an error message.
const MAX_MESSAGE: usize = 300;

/// Turns an error from the node or the transport into a [`ChainError`]: a revert (with data or
/// saying "revert") is [`ChainError::Reverted`]; a refusal the sender can fix (no funds for the
/// gas or the value) is [`ChainError::Invalid`]; everything else is [`ChainError::Rpc`]. `redact`
/// removes the RPC URL (it may carry an API key) from messages.
pub(crate) fn from_transport(e: &TransportError, redact: &dyn Fn(String) -> String) -> ChainError {
    if let RpcError::ErrorResp(payload) = e {
        if let Some(data) = payload.as_revert_data() {
            return ChainError::Reverted(Revert::decode(&data));
        }
        let message = clip(redact(payload.message.to_string()));
        let lower = message.to_ascii_lowercase();
        if lower.contains("revert") {
            return ChainError::Reverted(Revert::Other(message));
        }
        if lower.contains("insufficient funds") {
            return ChainError::Invalid(format!(
                "the sender's balance cannot pay for this transaction: {message}"
            ));
        }
        return ChainError::Rpc(format!("the node refused the request: {message}"));
    }
    ChainError::Rpc(clip(redact(e.to_string())))
}

/// Turns a contract-call error into a [`ChainError`] (see [`from_transport`]).
pub(crate) fn from_contract(
    e: &alloy::contract::Error,
    redact: &dyn Fn(String) -> String,
) -> ChainError {
    use alloy::contract::Error as E;
    match e {
        E::TransportError(t) => from_transport(t, redact),
        E::PendingTransactionError(p) => ChainError::Rpc(clip(redact(p.to_string()))),
        E::ZeroData(..) => ChainError::Rpc(
            "the contract returned no data: is there a Marketplace at this address?".into(),
        ),
        other => ChainError::Rpc(clip(redact(format!(
            "unexpected answer from the node: {other}"
        )))),
    }
}

/// Keeps at most [`MAX_MESSAGE`] characters of a message.
fn clip(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bindings::Marketplace;
    use alloy::sol_types::SolError;

    #[test]
    fn custom_errors_decode_with_their_arguments() {
        let user = Address::repeat_byte(0xab);
        let data = Marketplace::InsufficientCredits {
            user,
            needed: U256::from(5),
            available: U256::from(2),
        }
        .abi_encode();
        let revert = Revert::decode(&data);
        assert_eq!(
            revert,
            Revert::InsufficientCredits {
                user,
                needed: U256::from(5),
                available: U256::from(2)
            }
        );
        assert_eq!(
            revert.to_string(),
            format!("InsufficientCredits(user {user}, needed 5, available 2)")
        );

        let id = B256::repeat_byte(7);
        let data = Marketplace::BatchAlreadySettled { batchId: id }.abi_encode();
        assert_eq!(Revert::decode(&data), Revert::BatchAlreadySettled(id));
        assert_eq!(
            Revert::decode(&Marketplace::ArithmeticOverflow {}.abi_encode()),
            Revert::ArithmeticOverflow
        );
    }

    #[test]
    fn other_reverts_keep_a_readable_reason() {
        let data = alloy::sol_types::Revert::from("nope").abi_encode();
        assert_eq!(Revert::decode(&data), Revert::Other("revert: nope".into()));
        assert_eq!(Revert::decode(&[]), Revert::Other("no reason given".into()));
        assert!(matches!(Revert::decode(&[1, 2, 3]), Revert::Other(m) if m.contains("0x010203")));
    }

    #[test]
    fn long_messages_are_clipped() {
        let s = clip("é".repeat(400));
        assert!(s.len() <= MAX_MESSAGE + '…'.len_utf8());
        assert!(s.ends_with('…'));
        assert_eq!(clip("short".into()), "short");
    }
}
