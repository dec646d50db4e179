//! Domain records of the registry: plain serde structs, independent of protobuf and of the
//! metadata store that keeps them.

use modelhub_core::TensorSpec;
use serde::{Deserialize, Serialize};

/// An account. `credits` are the credits available to spend (held credits are already taken
/// out); `earnings` are what the account's models have earned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub account_id: String,
    pub name: String,
    pub admin: bool,
    pub credits: u64,
    pub earnings: u64,
    pub created_at: i64,
    /// The account's EVM address (`0x` + 40 lowercase hex), unique across accounts: with the
    /// chain ledger, confirmed `CreditsBought` deposits from it credit this account and its
    /// usage is settled against it.
    #[serde(default)]
    pub wallet: Option<String>,
    /// The account's public handle (`[a-z0-9-]`, unique, immutable), the namespace of its
    /// models: `handle/name@version`. Accounts without one are named by their id.
    #[serde(default)]
    pub handle: Option<String>,
    /// The most the chain's operators may settle from the account's wallet per UTC day: the
    /// lower of the cap in force on chain and an announced lower one (followed by the chain
    /// ledger). `None`: no cap. Charges past it are refused, so every charge can settle.
    #[serde(default)]
    pub daily_cap: Option<u64>,
    /// The credits reserved on one UTC day (`(day, credits)`, day = unix seconds / 86,400): what
    /// the chain counts against the cap under that day's label. Held credits a failed
    /// prediction gives back still count (the count only grows, so it never under-counts).
    #[serde(default)]
    pub charged_today: (i64, u64),
    /// Credits a refund request on chain still claims (the chain ledger): what the request
    /// asked beyond the balance when it was counted. Credits that come in later (deposits,
    /// grants, holds given back) pay it first, until the refund is paid on chain or replaced.
    #[serde(default)]
    pub refund_owed: u64,
}

/// The UTC day of a unix time: the label a charge carries on chain.
pub fn utc_day(unix_secs: i64) -> i64 {
    unix_secs.div_euclid(86_400)
}

impl Account {
    /// Adds `amount` incoming credits: the refund lien first, the rest to the balance;
    /// `BadRequest` when the balance would overflow.
    pub fn take_in(&mut self, amount: u64) -> Result<(), crate::error::RegistryError> {
        let lien = amount.min(self.refund_owed);
        self.credits = self.credits.checked_add(amount - lien).ok_or_else(|| {
            crate::error::RegistryError::bad_request(format!(
                "granting {amount} credits would overflow the balance of {}",
                self.credits
            ))
        })?;
        self.refund_owed -= lien;
        Ok(())
    }

    /// The credits reserved on `day` (0 when the count is of another day).
    pub fn charged_on(&self, day: i64) -> u64 {
        if self.charged_today.0 == day {
            self.charged_today.1
        } else {
            0
        }
    }

    /// Refuses a charge of `price` on `day` that would take the account past its daily cap.
    pub fn check_daily_cap(&self, day: i64, price: u64) -> Result<(), crate::error::RegistryError> {
        let Some(cap) = self.daily_cap else {
            return Ok(());
        };
        let charged = self.charged_on(day);
        match charged.checked_add(price) {
            Some(total) if total <= cap => Ok(()),
            _ => Err(crate::error::RegistryError::OverDailyCap {
                cap,
                charged,
                price,
            }),
        }
    }

    /// Counts a charge of `price` on `day` (after `check_daily_cap`).
    pub fn count_charge(&mut self, day: i64, price: u64) {
        self.charged_today = (day, self.charged_on(day).saturating_add(price));
    }

    /// The namespace of the account's models: its handle, or its id when it has none.
    pub fn namespace(&self) -> &str {
        self.handle.as_deref().unwrap_or(&self.account_id)
    }
}

/// An API key; the secret is sealed by the KEK (AAD = key id) and never stored in the clear.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub key_id: String,
    pub account_id: String,
    pub sealed_secret: Vec<u8>,
    pub revoked: bool,
    pub created_at: i64,
    /// The secret before the last rotation (sealed the same way), accepted until
    /// `previous_valid_until` (Unix seconds): a rotation without downtime.
    #[serde(default)]
    pub previous_sealed_secret: Option<Vec<u8>>,
    #[serde(default)]
    pub previous_valid_until: i64,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("key_id", &self.key_id)
            .field("account_id", &self.account_id)
            .field("revoked", &self.revoked)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

/// A model version as the registry records it. A version is immutable: its (owner, name,
/// version) names it for good, and stays taken after the version is deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    pub model_id: String,
    pub owner: String,
    /// The owner's handle when the version was published (handles never change); `None` for
    /// an owner without one.
    #[serde(default)]
    pub owner_handle: Option<String>,
    pub name: String,
    pub version: String,
    pub price: u64,
    pub cid: String,
    pub sha256: String,
    pub size: u64,
    pub wrapped_dek: Vec<u8>,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub commitment: Option<String>,
    /// The public circuit spec (JSON) of the commitment.
    #[serde(default)]
    pub circuit_spec: Option<String>,
    /// Why there is no circuit, when the prover could not compile the graph.
    #[serde(default)]
    pub zk_note: Option<String>,
    /// The model digest (hex) over the circuit spec and the commitment (docs/ZK.md); records
    /// from before it existed read as `None`.
    #[serde(default)]
    pub digest: Option<String>,
    /// Credits charged when a proof of one of its predictions is delivered; 0 without a
    /// circuit. Fixed with the version, like `price`.
    #[serde(default)]
    pub proof_price: u64,
    /// The most rows (batch size) one predict may hold; 0: no cap of its own (the gateway's
    /// applies either way). Fixed with the version, like `price`.
    #[serde(default)]
    pub max_rows: u32,
    /// The most predictions (rows) one account may make per minute on a gateway; 0: no quota
    /// of its own. Fixed with the version, like `price`.
    #[serde(default)]
    pub calls_per_minute: u32,
    pub created_at: i64,
}

fn one() -> u32 {
    1
}

/// What a charge pays for.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Charge {
    /// A prediction: the model's `price`.
    #[default]
    Prediction,
    /// The delivery of a prediction's proof: the model's `proof_price`.
    Proof,
}

impl Charge {
    pub fn as_str(self) -> &'static str {
        match self {
            Charge::Prediction => "prediction",
            Charge::Proof => "proof",
        }
    }

    /// What `units` of this charge cost for `model` (price × units); a proof of a model
    /// without a circuit is refused, and so is an amount beyond `u64`.
    pub fn amount(self, model: &Model, units: u32) -> crate::error::Result<u64> {
        self.price_of(model)?
            .checked_mul(u64::from(units.max(1)))
            .ok_or_else(|| {
                crate::error::RegistryError::bad_request(format!(
                    "{units} units of model {} cost more credits than can be counted",
                    model.model_id
                ))
            })
    }

    /// What `model` costs for this charge; a proof of a model without a circuit is refused.
    pub fn price_of(self, model: &Model) -> crate::error::Result<u64> {
        match self {
            Charge::Prediction => Ok(model.price),
            Charge::Proof if model.circuit_spec.is_none() => {
                Err(crate::error::RegistryError::bad_request(format!(
                    "model {} has no circuit: its predictions can't be proved",
                    model.model_id
                )))
            }
            Charge::Proof => Ok(model.proof_price),
        }
    }
}

/// Where a reservation stands. `Held` moves to `Committed` or `Released`, never back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationState {
    Held,
    Committed,
    Released,
}

/// Credits held from an account for one call of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub reservation_id: String,
    pub account_id: String,
    pub model_id: String,
    /// The model's owner, who earns `amount` on commit.
    pub owner: String,
    pub amount: u64,
    /// What the amount pays for.
    #[serde(default)]
    pub charge: Charge,
    /// How many of it: the rows of a prediction's batch (`amount` = price × units).
    #[serde(default = "one")]
    pub units: u32,
    pub state: ReservationState,
    /// Set once committed.
    pub receipt_id: Option<String>,
    pub idempotency_key: Option<String>,
    /// What the keyed request was (hex SHA-256 of its method, path and body hash), compared
    /// when the key is used again.
    #[serde(default)]
    pub fingerprint: Option<String>,
    pub created_at: i64,
}

/// Proof of a committed charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub receipt_id: String,
    pub reservation_id: String,
    pub account_id: String,
    pub model_id: String,
    pub owner: String,
    pub credits_charged: u64,
    /// What it paid for (records from before proofs were priced read as predictions).
    #[serde(default)]
    pub charge: Charge,
    /// How many of it (calls, on chain): the rows of a prediction's batch.
    #[serde(default = "one")]
    pub units: u32,
    pub created_at: i64,
    /// When the credits were reserved; its UTC day labels the usage on chain (the day the
    /// daily cap counted it). 0 in records from before: read `created_at` then.
    #[serde(default)]
    pub charged_at: i64,
    /// The settlement batch the receipt belongs to, once the chain ledger has put it in one
    /// (`None`: not yet settled, or an embedded ledger).
    #[serde(default)]
    pub batch_id: Option<String>,
}

impl Receipt {
    /// The UTC day the usage is labelled with on chain.
    pub fn charge_day(&self) -> i64 {
        utc_day(if self.charged_at > 0 {
            self.charged_at
        } else {
            self.created_at
        })
    }
}

/// Where a settlement batch stands. `Pending` moves to `Settled` or `Failed`, never back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchState {
    /// Written, not yet known to be settled on chain: sent again (same batch id) until it is.
    Pending,
    Settled,
    /// The contract refused it for good (e.g. a deactivated model); `error` says why.
    Failed,
}

impl BatchState {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchState::Pending => "pending",
            BatchState::Settled => "settled",
            BatchState::Failed => "failed",
        }
    }
}

/// Committed receipts settled on chain together by one `consumeCredits(batch_id, records)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementBatch {
    /// `0x` + 64 hex: the contract's batch id (it refuses a batch id twice).
    pub batch_id: String,
    /// The receipts it settles, each in exactly one batch.
    pub receipt_ids: Vec<String>,
    /// Sum of the receipts' `credits_charged`.
    pub credits: u64,
    pub state: BatchState,
    pub tx_hash: Option<String>,
    pub error: Option<String>,
    /// How many times it was sent.
    pub attempts: u32,
    pub created_at: i64,
    pub updated_at: i64,
}
