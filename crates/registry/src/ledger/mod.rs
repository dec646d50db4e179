//! Where credits come from and where usage goes: the [`Ledger`] beside the metadata store.
//!
//! Both ledgers keep the per-prediction accounting (reserve → commit or release, receipts) in
//! the metadata store, so a prediction never waits on a chain. They differ at the edges:
//! - [`EmbeddedLedger`]: an admin grants credits; earnings stay recorded in the store.
//! - [`ChainLedger`]: credits come only from confirmed `CreditsBought` deposits on the
//!   marketplace contract (followed from its events); a model is chargeable only once its
//!   creator registered it on chain with the same price and commitment; committed receipts are
//!   settled on chain in batches (`consumeCredits`) by the operator account, and creators
//!   `withdraw()` there. A user's balance here is their confirmed deposits minus every
//!   committed or held charge, never more than the chain's `creditsOf`, so the gateway stops
//!   an overspending user before the chain has to.

pub mod chain;

use async_trait::async_trait;

pub use self::chain::{ChainArgs, ChainLedger};
use crate::error::Result;
use crate::model::{Charge, SettlementBatch};

/// What `GetLedger` reports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LedgerStatus {
    /// `"embedded"` or `"chain"`.
    pub kind: &'static str,
    pub chain_id: u64,
    /// The marketplace contract (`0x` + 40 lowercase hex); empty for the embedded ledger.
    pub marketplace: String,
    /// The operator account that settles usage.
    pub operator: String,
    /// Wei per credit, decimal.
    pub wei_per_credit: String,
    /// Deposits up to this block are counted.
    pub followed_block: u64,
    pub confirmations: u32,
    /// Committed receipts not yet in a settlement batch.
    pub unsettled_receipts: u64,
    /// The most recent settlement batches, newest first.
    pub batches: Vec<SettlementBatch>,
}

/// The credits ledger behind the registry; see the module documentation.
#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    /// Whether an admin may grant credits. A chain ledger's credits come only from confirmed
    /// deposits: grants are refused (`Conflict`).
    fn grants_allowed(&self) -> bool;

    /// Refuses to charge for a model (its predictions, or the delivery of its proofs) when the
    /// ledger could not settle it (`Conflict` with the reason): with a chain ledger, a model
    /// its owner's wallet has not registered on chain, a deactivated one, or one whose
    /// on-chain price or digest differs.
    async fn check_chargeable(&self, model_id: &str, charge: Charge) -> Result<()>;

    /// Counts newly confirmed deposits and settles committed usage now, instead of waiting
    /// for the next interval. A no-op for the embedded ledger.
    async fn sync(&self) -> Result<()>;

    async fn status(&self) -> Result<LedgerStatus>;

    /// The ledger's background work (the chain ledger's follow and settle loop), until the
    /// task running it is dropped or aborted; returns at once when there is none. Everything
    /// it does is safe to cut off at any await point.
    async fn run(&self) {}
}

/// Credits granted by an admin and kept in the metadata store.
#[derive(Debug, Default, Clone, Copy)]
pub struct EmbeddedLedger;

#[async_trait]
impl Ledger for EmbeddedLedger {
    fn grants_allowed(&self) -> bool {
        true
    }

    async fn check_chargeable(&self, _model_id: &str, _charge: Charge) -> Result<()> {
        Ok(())
    }

    async fn sync(&self) -> Result<()> {
        Ok(())
    }

    async fn status(&self) -> Result<LedgerStatus> {
        Ok(LedgerStatus {
            kind: "embedded",
            ..LedgerStatus::default()
        })
    }
}
