//! The chain ledger: the marketplace contract on an EVM JSON-RPC node, through
//! [`modelhub_chain::Marketplace`].
//!
//! **Deposits.** Every poll reads the `CreditsBought` logs from the block after the stored
//! cursor up to the node's `finalized` block (and at least `confirmations` below the head), and
//! credits each buyer's account with `grant_once(.., "chain:<tx hash>:<position in tx>")`, then
//! moves the cursor. Counting it again after a crash between the grant and the cursor is a
//! no-op, and the key does not depend on the block. A deposit that can't be counted (more than
//! `u64::MAX` credits, or one that would overflow the account) is reported (a warning and a
//! `<cursor>:skipped:<tx>:<position>` cursor holding its block) and skipped: it never stalls the
//! cursor. A deposit from a wallet no account has yet creates an account for that wallet (id
//! derived from the address), so nothing bought is lost; an admin then gives it keys.
//!
//! **Refund requests.** The same poll reads the `RefundRequested` logs of the same blocks and
//! applies them in chain order with the deposits: each takes the credits asked for from the
//! user's off-chain balance, at most what it holds (`debit_once(.., "chain-refund:<tx
//! hash>:<position in tx>")`), so what the contract will pay back can't be spent off chain too.
//! The contract pays at most the credits left on chain when the refund is claimed, after a lock
//! that covers unsettled usage, so the off-chain balance never exceeds the chain's. A request
//! that replaces an earlier one takes again from what is left: credits taken for the replaced
//! one stay on chain, and a later request gets them back in ETH. What a request asks beyond
//! the balance (credits held by predictions in flight, usage not settled yet) becomes the
//! account's refund lien (`Account::refund_owed`): the claim will take that much of whatever
//! the chain holds then, so credits that come in before it (a failed prediction's hold given
//! back, a deposit) pay the lien first. The `Refunded` log of the claim ends the lien.
//!
//! **Daily caps.** The same poll reads the `DailyCapSet` logs; for each, and before counting
//! each deposit (so an account created after its wallet set a cap knows it before it can spend),
//! the ledger reads the wallet's cap in force and any announced lower one (`dailyCapOf`,
//! `pendingDailyCapOf`) and stores the lower of the two on the account
//! (`MetadataStore::set_daily_cap`). Reservations then refuse a charge that would take the
//! credits reserved on the current UTC day past it. On chain a lower cap takes effect
//! `CAP_DELAY` (two days) after it is set, and records carry the UTC day they were charged on
//! (the contract counts the cap per day label and accepts today's and yesterday's labels), so
//! every charge the registry accepted fits the cap the contract applies when it settles.
//!
//! **Settlement.** Committed receipts are gathered, oldest first, into batches of at most
//! `settle_batch_size`; each batch is written to the store (its receipts marked) *before* it is
//! sent. Its id is a hash of the operator and its receipt ids (and a round number, bumped when
//! the same receipts come back from a failed batch). Each batch carries one `UsageRecord` per
//! (user, product, price, day charged): the calls and the credits charged off chain. A model is two
//! products on chain, each registered by its owner: its predictions under the model id, and
//! the delivery of its proofs under `<model id>/proof` at the proof price
//! ([`modelhub_chain::proof_model_id`]); a charge is refused (409) until its product is
//! registered. Before sending, the ledger
//! compares each record with the prices the contract holds; after, it checks the transaction's
//! `BatchSettled` log (the records hash) and reads which records were skipped (`UsageRejected`).
//! A skipped record is reported in the batch's `error`; when its user shouldn't pay (unknown or
//! deactivated model, the operator's own model, a price mismatch) its credits go back to the
//! user off chain (`grant_once`, keyed by batch and record). A send that fails for a transient
//! reason (node down, timeout, operator not yet authorised, contract paused) leaves the batch
//! pending and is retried with the same id; the contract refuses a batch id twice per operator
//! (`BatchAlreadySettled`), which the ledger takes as "settled" only if the contract's records
//! hash for it is the one it sent. A batch the contract refuses for good is marked failed and
//! its receipts are released for re-batching.
//!
//! **Receipts of accounts without a wallet** (credits granted before the chain ledger was
//! configured, or models of owners without one) are not sent on chain: the batch's `error`
//! counts them, and their creators are paid off chain from the registry's `earnings` figure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use modelhub_chain::{
    Address, B256, ChainError, DailyCapChange, Deposit, Marketplace, RefundPaid, RefundRequest,
    Rejection, Revert, U256, UsageRecord,
};
use modelhub_core::{ErrorCode, id};
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::{Ledger, LedgerStatus};
use crate::error::{RegistryError, Result};
use crate::model::{Account, BatchState, Charge, Model, Receipt, SettlementBatch};
use crate::store::MetadataStore;

/// The id a model's product `charge` is registered and settled under on chain: the model id
/// for its predictions, [`modelhub_chain::proof_model_id`] for its proofs.
fn on_chain_id(model_id: &str, charge: Charge) -> String {
    match charge {
        Charge::Prediction => model_id.to_owned(),
        Charge::Proof => modelhub_chain::proof_model_id(model_id),
    }
}

/// What the ledger follows on chain.
enum Followed {
    Deposit(Deposit),
    Refund(RefundRequest),
    RefundPaid(RefundPaid),
    Cap(DailyCapChange),
}

impl Followed {
    /// Where it is in the chain: (block, log index).
    fn at(&self) -> (u64, u64) {
        let at = match self {
            Followed::Deposit(d) => d.at,
            Followed::Refund(r) => r.at,
            Followed::RefundPaid(r) => r.at,
            Followed::Cap(c) => c.at,
        };
        (at.block, at.log_index)
    }
}

/// Chain-ledger settings: given `--chain-rpc`, the registry uses the chain ledger.
#[derive(Clone, clap::Args)]
pub struct ChainArgs {
    /// EVM JSON-RPC endpoint of the chain the marketplace contract lives on (e.g. Arbitrum, or
    /// anvil for a local run). When set, credits come from the chain ledger.
    #[arg(long, env = "MODELHUB_REGISTRY_CHAIN_RPC")]
    pub chain_rpc: Option<String>,
    /// Address of the marketplace contract (`modelhub chain deploy` prints it).
    #[arg(long, env = "MODELHUB_REGISTRY_MARKETPLACE", requires = "chain_rpc")]
    pub marketplace: Option<String>,
    /// File holding the operator account's private key (0x hex), which settles usage with
    /// `consumeCredits`; the marketplace admin must have made it an operator (`setOperator`).
    #[arg(
        long,
        env = "MODELHUB_REGISTRY_OPERATOR_KEY_FILE",
        requires = "chain_rpc"
    )]
    pub operator_key_file: Option<std::path::PathBuf>,
    /// A deposit counts once its block is finalized (the node's `finalized` tag) and at least
    /// this many blocks below the head.
    #[arg(
        long,
        env = "MODELHUB_REGISTRY_CHAIN_CONFIRMATIONS",
        default_value_t = 0
    )]
    pub chain_confirmations: u32,
    /// First block to read deposits from (the contract's deployment block).
    #[arg(long, env = "MODELHUB_REGISTRY_CHAIN_FROM_BLOCK", default_value_t = 0)]
    pub chain_from_block: u64,
    /// How often new deposits are looked for (milliseconds).
    #[arg(long, env = "MODELHUB_REGISTRY_CHAIN_POLL_MS", default_value_t = 2000)]
    pub chain_poll_ms: u64,
    /// Usage is settled at least this often (seconds)...
    #[arg(
        long,
        env = "MODELHUB_REGISTRY_SETTLE_INTERVAL_SECS",
        default_value_t = 60
    )]
    pub settle_interval_secs: u64,
    /// ...or as soon as this many receipts wait; also the most receipts in one batch.
    #[arg(
        long,
        env = "MODELHUB_REGISTRY_SETTLE_BATCH_SIZE",
        default_value_t = 200
    )]
    pub settle_batch_size: usize,
    /// How long what the chain said about a model (registered, active, same price) is trusted
    /// before it is read again (milliseconds).
    #[arg(
        long,
        env = "MODELHUB_REGISTRY_CHAIN_CHECK_TTL_MS",
        default_value_t = 5000
    )]
    pub chain_check_ttl_ms: u64,
}

impl std::fmt::Debug for ChainArgs {
    /// An RPC URL may carry an API key: only whether it is set is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainArgs")
            .field("chain_rpc", &self.chain_rpc.as_ref().map(|_| "<redacted>"))
            .field("marketplace", &self.marketplace)
            .field("operator_key_file", &self.operator_key_file)
            .field("chain_confirmations", &self.chain_confirmations)
            .field("chain_from_block", &self.chain_from_block)
            .field("chain_poll_ms", &self.chain_poll_ms)
            .field("settle_interval_secs", &self.settle_interval_secs)
            .field("settle_batch_size", &self.settle_batch_size)
            .field("chain_check_ttl_ms", &self.chain_check_ttl_ms)
            .finish()
    }
}

impl Default for ChainArgs {
    fn default() -> Self {
        ChainArgs {
            chain_rpc: None,
            marketplace: None,
            operator_key_file: None,
            chain_confirmations: 0,
            chain_from_block: 0,
            chain_poll_ms: 2000,
            settle_interval_secs: 60,
            settle_batch_size: 200,
            chain_check_ttl_ms: 5000,
        }
    }
}

/// Blocks of deposits read per step while catching up.
const FOLLOW_STEP: u64 = 50_000;

/// How long a model the chain accepted stays chargeable while the node can't be reached.
const LAST_GOOD_TTL: Duration = Duration::from_secs(3600);

/// The ledger on the marketplace contract; see the module documentation.
pub struct ChainLedger {
    market: Marketplace,
    store: Arc<dyn MetadataStore>,
    args: ChainArgs,
    chain_id: u64,
    wei_per_credit: U256,
    operator: Address,
    cursor: String,
    /// One sync at a time in this process.
    sync_lock: Mutex<()>,
    /// model id → what the chain said, for `chain_check_ttl_ms`.
    checks: moka::future::Cache<String, Check>,
    /// Models the chain accepted within `LAST_GOOD_TTL`: still charged for while the node is
    /// unreachable.
    chargeable: moka::future::Cache<String, ()>,
}

impl std::fmt::Debug for ChainLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainLedger")
            .field("marketplace", &self.market.address())
            .field("chain_id", &self.chain_id)
            .field("operator", &self.operator)
            .finish_non_exhaustive()
    }
}

fn chain_error(e: ChainError) -> RegistryError {
    match e {
        ChainError::Rpc(message) => RegistryError::ChainUnavailable { message },
        ChainError::Reverted(revert) => {
            RegistryError::conflict(format!("the contract refused: {revert}"))
        }
        ChainError::Invalid(message) => RegistryError::bad_request(message),
    }
}

fn b256_hex(b: B256) -> String {
    format!("{b:#x}")
}

/// The id of a batch: keccak-256 over the operator, the round and its sorted receipt ids, so
/// the same receipts always make the same batch id for an operator. `round` is 0, and one more
/// each time the same receipts come back from a failed batch.
pub fn batch_id(operator: Address, receipt_ids: &[String], round: u32) -> B256 {
    let mut ids: Vec<&str> = receipt_ids.iter().map(String::as_str).collect();
    ids.sort_unstable();
    modelhub_chain::keccak256(format!(
        "modelhub/settlement/v2\n{}\n{round}\n{}",
        modelhub_chain::wallet_string(operator),
        ids.join("\n")
    ))
}

/// The `receiptBatchHash` of a usage record: keccak-256 over its sorted receipt ids.
pub fn receipts_hash(receipt_ids: &[String]) -> B256 {
    let mut ids: Vec<&str> = receipt_ids.iter().map(String::as_str).collect();
    ids.sort_unstable();
    modelhub_chain::keccak256(format!("modelhub/receipts/v1\n{}", ids.join("\n")))
}

/// A batch's receipts as usage records: `records[i]` covers `groups[i]`; `offchain` are the
/// receipts that can't go on chain (an account without a wallet).
struct Plan<'a> {
    records: Vec<UsageRecord>,
    groups: Vec<Vec<&'a Receipt>>,
    offchain: Vec<&'a Receipt>,
}

/// Whether a skipped record's user gets their credits back off chain: yes when the fault is
/// not theirs (the model, its owner, or the operator, which includes settling too late for the
/// record's day), no when it is (they spent elsewhere what they had, or capped what operators
/// may take).
fn refunds_user(reason: Rejection) -> bool {
    matches!(
        reason,
        Rejection::UnknownModel
            | Rejection::ModelInactive
            | Rejection::OperatorOwnsModel
            | Rejection::PriceMismatch
            | Rejection::StaleDay
    )
}

impl ChainLedger {
    /// Connects to the node and the contract named by `args` (which must have `chain_rpc`,
    /// `marketplace` and `operator_key_file`).
    pub async fn connect(
        args: ChainArgs,
        store: Arc<dyn MetadataStore>,
    ) -> anyhow::Result<ChainLedger> {
        use anyhow::Context;
        let rpc = args
            .chain_rpc
            .as_deref()
            .context("--chain-rpc is required")?;
        let address = args
            .marketplace
            .as_deref()
            .context("--marketplace is required with --chain-rpc")?;
        let address = modelhub_chain::parse_address(address).context("--marketplace")?;
        let key_file = args
            .operator_key_file
            .as_deref()
            .context("--operator-key-file is required with --chain-rpc")?;
        let signer = modelhub_chain::load_signer(key_file).context("--operator-key-file")?;
        let market = Marketplace::connect(rpc, address, Some(signer))
            .await
            .context("connecting to the marketplace contract")?;
        let operator = market
            .sender()
            .context("the operator key gave no address")?;
        let chain_id = market.chain_id().await.context("reading the chain id")?;
        let wei_per_credit = market
            .wei_per_credit()
            .await
            .context("reading weiPerCredit")?;
        match market.is_operator(operator).await {
            Ok(true) => {}
            Ok(false) => warn!(
                %operator,
                "the operator key is not an operator of the marketplace yet: usage stays pending \
                 until the admin calls setOperator"
            ),
            Err(e) => warn!(error = %e, "could not check the operator"),
        }
        info!(%address, chain_id, %operator, "chain ledger connected");
        Ok(ChainLedger {
            cursor: format!(
                "chain:{chain_id}:{}:deposits",
                modelhub_chain::wallet_string(address)
            ),
            market,
            store,
            chain_id,
            wei_per_credit,
            operator,
            sync_lock: Mutex::new(()),
            checks: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_millis(args.chain_check_ttl_ms.max(1)))
                .build(),
            chargeable: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(LAST_GOOD_TTL)
                .build(),
            args,
        })
    }

    /// The follow and settle loop, forever.
    async fn run_loop(&self) {
        let poll = Duration::from_millis(self.args.chain_poll_ms.max(10));
        let settle_every = Duration::from_secs(self.args.settle_interval_secs);
        let mut last_settle = Instant::now();
        let mut ticker = tokio::time::interval(poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let _guard = self.sync_lock.lock().await;
            if let Err(e) = self.follow().await {
                warn!(error = %e, "following deposits failed; retrying at the next poll");
            }
            let due = last_settle.elapsed() >= settle_every
                || self
                    .store
                    .count_unsettled_receipts()
                    .await
                    .is_ok_and(|n| n >= self.args.settle_batch_size.max(1) as u64);
            if due {
                last_settle = Instant::now();
                if let Err(e) = self.settle().await {
                    warn!(error = %e, "settlement failed; retrying at the next interval");
                }
            }
        }
    }

    /// Counts the deposits finalized since the cursor.
    async fn follow(&self) -> Result<()> {
        let head = self.market.block_number().await.map_err(chain_error)?;
        let finalized = self.market.finalized_block().await.map_err(chain_error)?;
        let safe = finalized.min(head.saturating_sub(u64::from(self.args.chain_confirmations)));
        let mut from = match self.store.get_cursor(&self.cursor).await? {
            Some(done) => done + 1,
            None => self.args.chain_from_block,
        };
        // In steps, each ending with the cursor, so a long catch-up (a first start far behind
        // the head) keeps its progress.
        while from <= safe {
            let to = safe.min(from.saturating_add(FOLLOW_STEP - 1));
            let deposits = self.market.deposits(from, to).await.map_err(chain_error)?;
            let refunds = self
                .market
                .refund_requests(from, to)
                .await
                .map_err(chain_error)?;
            let paid = self
                .market
                .refunds_paid(from, to)
                .await
                .map_err(chain_error)?;
            let caps = self
                .market
                .daily_cap_changes(from, to)
                .await
                .map_err(chain_error)?;
            // In chain order: a refund request takes from the deposits before it.
            let mut events: Vec<Followed> = deposits.into_iter().map(Followed::Deposit).collect();
            events.extend(refunds.into_iter().map(Followed::Refund));
            events.extend(paid.into_iter().map(Followed::RefundPaid));
            events.extend(caps.into_iter().map(Followed::Cap));
            events.sort_by_key(Followed::at);
            for event in events {
                match event {
                    Followed::Deposit(d) => self.count_deposit(&d).await?,
                    Followed::Refund(r) => self.hold_refund(&r).await?,
                    Followed::RefundPaid(r) => self.end_refund_lien(&r).await?,
                    Followed::Cap(c) => self.follow_cap(&c).await?,
                }
            }
            self.store.set_cursor(&self.cursor, to).await?;
            from = to + 1;
        }
        Ok(())
    }

    /// Credits one deposit once; reports and skips one that can't be counted.
    async fn count_deposit(&self, d: &Deposit) -> Result<()> {
        let wallet = modelhub_chain::wallet_string(d.buyer);
        let Ok(credits) = u64::try_from(d.credits) else {
            return self
                .skip_deposit(d, "more credits than the registry can count (u64)")
                .await;
        };
        let account = self.account_for_wallet(&wallet).await?;
        self.refresh_daily_cap(&account, d.buyer).await?;
        let grant_id = format!("chain:{}:{}", b256_hex(d.at.tx_hash), d.at.position);
        match self
            .store
            .grant_once(&account.account_id, credits, &grant_id)
            .await
        {
            Ok(_) => {
                info!(%wallet, account = %account.account_id, credits, block = d.at.block, "deposit counted");
                Ok(())
            }
            Err(e) if e.code() == ErrorCode::BadRequest => {
                self.skip_deposit(d, "the account's balance would overflow")
                    .await
            }
            Err(e) => Err(e),
        }
    }

    /// Takes the credits a user asked back on chain from their off-chain balance (at most what
    /// it holds), once per request: what the contract will pay back must not be spent here too.
    async fn hold_refund(&self, r: &RefundRequest) -> Result<()> {
        let wallet = modelhub_chain::wallet_string(r.user);
        let Some(account) = self.store.find_account_by_wallet(&wallet).await? else {
            info!(%wallet, credits = %r.credits, "refund requested by a wallet no account has; nothing to hold");
            return Ok(());
        };
        let credits = u64::try_from(r.credits).unwrap_or(u64::MAX);
        let debit_id = format!("chain-refund:{}:{}", b256_hex(r.at.tx_hash), r.at.position);
        let taken = self
            .store
            .debit_once(&account.account_id, credits, &debit_id)
            .await?;
        info!(%wallet, account = %account.account_id, requested = credits, taken, block = r.at.block, "refund request counted");
        Ok(())
    }

    /// A refund was paid on chain: credits that come in from now on are the user's again.
    async fn end_refund_lien(&self, r: &RefundPaid) -> Result<()> {
        let wallet = modelhub_chain::wallet_string(r.user);
        if let Some(account) = self.store.find_account_by_wallet(&wallet).await?
            && account.refund_owed > 0
        {
            self.store.clear_refund_owed(&account.account_id).await?;
            info!(%wallet, account = %account.account_id, credits = %r.credits, lien = account.refund_owed, "refund paid on chain; its lien ends");
        }
        Ok(())
    }

    /// Follows a `DailyCapSet` to the account of its wallet (none: nothing to bound yet; a
    /// later deposit reads the cap).
    async fn follow_cap(&self, c: &DailyCapChange) -> Result<()> {
        let wallet = modelhub_chain::wallet_string(c.user);
        match self.store.find_account_by_wallet(&wallet).await? {
            Some(account) => self.refresh_daily_cap(&account, c.user).await,
            None => Ok(()),
        }
    }

    /// Stores on `account` the lower of `user`'s cap in force and any announced lower one, as
    /// the contract holds them now (`None` when there is no cap the balance could reach).
    async fn refresh_daily_cap(&self, account: &Account, user: Address) -> Result<()> {
        let in_force = self.market.daily_cap_of(user).await.map_err(chain_error)?;
        let (pending, effective_at) = self
            .market
            .pending_daily_cap_of(user)
            .await
            .map_err(chain_error)?;
        let cap = if effective_at.is_zero() {
            in_force
        } else {
            in_force.min(pending)
        };
        // Balances are at most i64::MAX credits (the stores' bound): a larger cap never binds.
        let cap = u64::try_from(cap)
            .ok()
            .filter(|c| i64::try_from(*c).is_ok());
        if account.daily_cap != cap {
            self.store.set_daily_cap(&account.account_id, cap).await?;
            info!(account = %account.account_id, wallet = %modelhub_chain::wallet_string(user), cap = ?cap, "daily cap followed");
        }
        Ok(())
    }

    /// Records a deposit that can't be counted (a cursor named after it, holding its block) and
    /// warns; the follow goes on.
    async fn skip_deposit(&self, d: &Deposit, why: &str) -> Result<()> {
        let name = format!(
            "{}:skipped:{}:{}",
            self.cursor,
            b256_hex(d.at.tx_hash),
            d.at.position
        );
        self.store.set_cursor(&name, d.at.block).await?;
        warn!(
            wallet = %modelhub_chain::wallet_string(d.buyer),
            credits = %d.credits,
            tx = %b256_hex(d.at.tx_hash),
            position = d.at.position,
            block = d.at.block,
            reason = why,
            "deposit not counted; skipped (an operator must settle it by hand)"
        );
        Ok(())
    }

    /// The account of `wallet`, created when a deposit arrives before any account claims it.
    async fn account_for_wallet(&self, wallet: &str) -> Result<Account> {
        if let Some(account) = self.store.find_account_by_wallet(wallet).await? {
            return Ok(account);
        }
        let account = Account {
            account_id: wallet_account_id(wallet),
            name: wallet.to_owned(),
            admin: false,
            credits: 0,
            earnings: 0,
            created_at: id::unix_now(),
            wallet: Some(wallet.to_owned()),
            handle: None,
            daily_cap: None,
            charged_today: (0, 0),
            refund_owed: 0,
        };
        match self.store.create_account(account).await {
            Ok(account) => Ok(account),
            // Created meanwhile (another replica, or a retry): read it back.
            Err(e) if e.code() == modelhub_core::ErrorCode::Conflict => self
                .store
                .find_account_by_wallet(wallet)
                .await?
                .ok_or_else(|| RegistryError::conflict(format!("wallet {wallet} is taken"))),
            Err(e) => Err(e),
        }
    }

    /// Sends pending batches again, then batches and sends new receipts.
    async fn settle(&self) -> Result<()> {
        for batch in self.store.pending_batches().await? {
            let mut receipts = Vec::with_capacity(batch.receipt_ids.len());
            for id in &batch.receipt_ids {
                receipts.push(self.store.get_receipt(id).await?);
            }
            if !self.send(batch, &receipts).await? {
                return Ok(());
            }
        }
        loop {
            let receipts = self
                .store
                .unsettled_receipts(self.args.settle_batch_size.max(1))
                .await?;
            if receipts.is_empty() {
                return Ok(());
            }
            let ids: Vec<String> = receipts.iter().map(|r| r.receipt_id.clone()).collect();
            let batch_id = self.free_batch_id(&ids).await?;
            let now = id::unix_now();
            let batch = self
                .store
                .create_batch(SettlementBatch {
                    batch_id: b256_hex(batch_id),
                    credits: receipts.iter().map(|r| r.credits_charged).sum(),
                    receipt_ids: ids,
                    state: BatchState::Pending,
                    tx_hash: None,
                    error: None,
                    attempts: 0,
                    created_at: now,
                    updated_at: now,
                })
                .await?;
            if !self.send(batch, &receipts).await? {
                return Ok(());
            }
        }
    }

    /// The id for a new batch of `ids`: round 0, or the next round when these receipts were
    /// already in a batch that failed (and released them). An unfinished batch of the same
    /// receipts (a crash between its writes) keeps its id, so the store finishes it.
    async fn free_batch_id(&self, ids: &[String]) -> Result<B256> {
        for round in 0..1_000 {
            let id = batch_id(self.operator, ids, round);
            match self.store.get_batch(&b256_hex(id)).await {
                Ok(stored) if stored.state == BatchState::Failed => continue,
                Ok(_) => return Ok(id),
                Err(e) if e.code() == ErrorCode::NotFound => return Ok(id),
                Err(e) => return Err(e),
            }
        }
        Err(RegistryError::store(
            "the same receipts failed to settle 1000 times",
        ))
    }

    /// The usage records of a batch's receipts: one per (user, model, price charged, UTC day
    /// charged), with the calls, the credits charged, the day and the hash of those receipt
    /// ids.
    async fn plan<'a>(&self, receipts: &'a [Receipt]) -> Result<Plan<'a>> {
        let mut groups: std::collections::BTreeMap<(&str, String, u64, i64), Vec<&Receipt>> =
            Default::default();
        for receipt in receipts {
            groups
                .entry((
                    &receipt.account_id,
                    on_chain_id(&receipt.model_id, receipt.charge),
                    receipt.credits_charged,
                    receipt.charge_day(),
                ))
                .or_default()
                .push(receipt);
        }
        let mut wallets: std::collections::HashMap<&str, Option<Address>> = Default::default();
        let mut plan = Plan {
            records: Vec::new(),
            groups: Vec::new(),
            offchain: Vec::new(),
        };
        for ((account_id, product, _, day), group) in groups {
            let owner_id = group[0].owner.as_str();
            for who in [account_id, owner_id] {
                if !wallets.contains_key(who) {
                    let wallet = match self.store.get_account(who).await?.wallet {
                        Some(w) => Some(
                            modelhub_chain::parse_address(&w)
                                .map_err(|e| RegistryError::store(format!("stored wallet: {e}")))?,
                        ),
                        None => None,
                    };
                    wallets.insert(who, wallet);
                }
            }
            let (Some(Some(user)), Some(Some(owner))) =
                (wallets.get(account_id), wallets.get(owner_id))
            else {
                plan.offchain.extend(group);
                continue;
            };
            let ids: Vec<String> = group.iter().map(|r| r.receipt_id.clone()).collect();
            plan.records.push(UsageRecord {
                user: *user,
                modelId: modelhub_chain::model_key(*owner, &product),
                // A receipt of a batch of n rows is n calls at the price.
                calls: group.iter().map(|r| u64::from(r.units.max(1))).sum(),
                credits: U256::from(group.iter().map(|r| r.credits_charged).sum::<u64>()),
                day: u64::try_from(day).unwrap_or_default(),
                receiptBatchHash: receipts_hash(&ids),
            });
            plan.groups.push(group);
        }
        Ok(plan)
    }

    /// Compares each record with the prices the contract holds before anything is sent: a
    /// record whose credits are not its calls times the current or the previous price is
    /// taken out (the contract would skip it). Returns the indices of the records taken out,
    /// with why.
    async fn precheck(&self, plan: &Plan<'_>) -> Result<Vec<(usize, Rejection)>> {
        let mut prices: std::collections::HashMap<B256, Option<(U256, U256, U256)>> =
            Default::default();
        let mut out = Vec::new();
        for (i, record) in plan.records.iter().enumerate() {
            if let std::collections::hash_map::Entry::Vacant(slot) = prices.entry(record.modelId) {
                let p = match self.market.get_prices(record.modelId).await {
                    Ok(p) => Some(p),
                    Err(ChainError::Reverted(Revert::UnknownModel(_))) => None,
                    Err(e) => return Err(chain_error(e)),
                };
                slot.insert(p);
            }
            let Some(Some((price, previous, changed_at))) = prices.get(&record.modelId) else {
                out.push((i, Rejection::UnknownModel));
                continue;
            };
            let calls = U256::from(record.calls);
            let matches = |p: &U256| p.checked_mul(calls) == Some(record.credits);
            if !(matches(price) || (!changed_at.is_zero() && matches(previous))) {
                warn!(model = %record.modelId, calls = record.calls, credits = %record.credits, price = %price, "usage charged at a price the contract does not hold; not sent");
                out.push((i, Rejection::PriceMismatch));
            }
        }
        Ok(out)
    }

    /// Reports skipped records (and gives their credits back off chain when the user is not at
    /// fault); returns the note for the batch's `error`.
    async fn handle_rejections(
        &self,
        batch_id: &str,
        plan: &Plan<'_>,
        rejected: &[(usize, Rejection, &'static str)],
    ) -> Result<Option<String>> {
        let mut notes = Vec::new();
        for (i, reason, when) in rejected {
            let record = &plan.records[*i];
            let group = &plan.groups[*i];
            let credits: u64 = group.iter().map(|r| r.credits_charged).sum();
            let refunded = refunds_user(*reason);
            if refunded {
                let grant_id = format!("chain-rejected:{batch_id}:{:#x}", record.receiptBatchHash);
                self.store
                    .grant_once(&group[0].account_id, credits, &grant_id)
                    .await?;
            }
            warn!(batch = batch_id, account = %group[0].account_id, model = %group[0].model_id, receipts = group.len(), credits, reason = %reason, refunded, "usage record skipped {when}");
            notes.push(format!(
                "{reason} {when}: {} receipts of account {} for model {} ({credits} credits{})",
                group.len(),
                group[0].account_id,
                group[0].model_id,
                if refunded {
                    ", given back to the user off chain"
                } else {
                    ", not paid on chain"
                }
            ));
        }
        if !plan.offchain.is_empty() {
            let credits: u64 = plan.offchain.iter().map(|r| r.credits_charged).sum();
            warn!(
                batch = batch_id,
                receipts = plan.offchain.len(),
                credits,
                "usage of accounts without a wallet is not settled on chain"
            );
            notes.push(format!(
                "{} receipts ({credits} credits) of accounts without a wallet are not settled on \
                 chain: their creators are paid off chain",
                plan.offchain.len()
            ));
        }
        Ok((!notes.is_empty()).then(|| notes.join("; ")))
    }

    /// Sends one batch (its `receipts`) and records the outcome; `false` when it stays pending
    /// (a transient failure: later batches would fail the same way, so the round stops).
    async fn send(&self, mut batch: SettlementBatch, receipts: &[Receipt]) -> Result<bool> {
        let id: B256 = batch
            .batch_id
            .parse()
            .map_err(|_| RegistryError::store(format!("stored batch id {:?}", batch.batch_id)))?;
        let plan = self.plan(receipts).await?;
        let mut rejected: Vec<(usize, Rejection, &'static str)> = self
            .precheck(&plan)
            .await?
            .into_iter()
            .map(|(i, why)| (i, why, "before sending"))
            .collect();
        let sent: Vec<usize> = (0..plan.records.len())
            .filter(|i| !rejected.iter().any(|(j, _, _)| j == i))
            .collect();
        let records: Vec<UsageRecord> = sent.iter().map(|i| plan.records[*i].clone()).collect();
        let expected = modelhub_chain::records_hash(&records);
        if let Some(latest) = records.iter().map(|r| r.day).max() {
            // Usage labelled with a day the chain's clock has not reached yet (this host's
            // clock runs ahead of it, around midnight) would be skipped as stale: wait for it.
            let chain_day = self.market.latest_block_time().await.map_err(chain_error)? / 86_400;
            if latest > chain_day {
                info!(batch = %batch.batch_id, day = latest, chain_day, "usage of a day the chain has not reached yet; the batch waits");
                return Ok(false);
            }
        }
        batch.attempts += 1;
        batch.updated_at = id::unix_now();
        let outcome = if records.is_empty() {
            Ok(None)
        } else {
            self.market.consume_credits(id, records).await.map(Some)
        };
        match outcome {
            Ok(settlement) => {
                if let Some(s) = &settlement {
                    if s.batch_id != id || s.operator != self.operator || s.records_hash != expected
                    {
                        // The chain recorded something else than what was sent: stop and look.
                        batch.state = BatchState::Failed;
                        batch.tx_hash = Some(b256_hex(s.tx_hash));
                        batch.error = Some(format!(
                            "the BatchSettled log (batch {:#x}, operator {}, records hash {:#x}) \
                             does not match what was sent (records hash {expected:#x})",
                            s.batch_id, s.operator, s.records_hash
                        ));
                        warn!(batch = %batch.batch_id, "settlement log does not match the batch sent");
                        self.store.update_batch(&batch).await?;
                        return Ok(true);
                    }
                    for (k, r) in s.records.iter().enumerate() {
                        if let (Some(reason), Some(i)) = (r.rejected, sent.get(k)) {
                            rejected.push((*i, reason, "by the contract"));
                        }
                    }
                }
                batch.state = BatchState::Settled;
                batch.tx_hash = settlement.map(|s| b256_hex(s.tx_hash));
                batch.error = self
                    .handle_rejections(&batch.batch_id, &plan, &rejected)
                    .await?;
                info!(batch = %batch.batch_id, receipts = batch.receipt_ids.len(), credits = batch.credits, skipped = rejected.len(), "usage settled on chain");
            }
            Err(ChainError::Reverted(Revert::BatchAlreadySettled(_))) => {
                // An earlier attempt (or another replica) got through, with these records?
                match self.market.batch_records_hash(self.operator, id).await {
                    Ok(Some(hash)) if hash == expected => {
                        batch.state = BatchState::Settled;
                        batch.error = self
                            .handle_rejections(&batch.batch_id, &plan, &rejected)
                            .await?;
                        info!(batch = %batch.batch_id, "batch was already settled on chain");
                    }
                    Ok(other) => {
                        batch.state = BatchState::Failed;
                        batch.error = Some(format!(
                            "the chain holds batch {:#x} with other records (hash {}) than \
                             these (hash {expected:#x})",
                            id,
                            other.map_or_else(|| "none".to_owned(), |h| format!("{h:#x}"))
                        ));
                        warn!(batch = %batch.batch_id, "batch id settled on chain with other records");
                    }
                    Err(e) => {
                        batch.error = Some(format!("{e}; will retry"));
                    }
                }
            }
            Err(ChainError::Reverted(revert @ Revert::Unauthorized(_))) => {
                batch.error = Some(format!(
                    "{revert}: the operator account is not an operator of the marketplace \
                     (the admin must call setOperator, then the operator acceptOperator); will \
                     retry"
                ));
                warn!(batch = %batch.batch_id, error = %revert, "settlement refused: operator not authorised");
            }
            Err(ChainError::Reverted(revert @ Revert::ContractPaused)) => {
                batch.error = Some(format!("{revert}: the marketplace is paused; will retry"));
                warn!(batch = %batch.batch_id, "settlement refused: marketplace paused");
            }
            // A transaction that failed without a decoded reason (e.g. mined after another
            // replica's copy of the same batch): settled if the chain says so, else retried.
            Err(ChainError::Reverted(revert @ Revert::Other(_))) => {
                if self.market.batch_records_hash(self.operator, id).await == Ok(Some(expected)) {
                    batch.state = BatchState::Settled;
                    batch.error = self
                        .handle_rejections(&batch.batch_id, &plan, &rejected)
                        .await?;
                } else {
                    batch.error = Some(format!("{revert}; will retry"));
                    warn!(batch = %batch.batch_id, error = %revert, "settlement transaction failed; will retry");
                }
            }
            Err(ChainError::Reverted(revert)) => {
                batch.state = BatchState::Failed;
                batch.error = Some(format!("{revert}; its receipts go into new batches"));
                warn!(batch = %batch.batch_id, error = %revert, "settlement refused by the contract; batch marked failed, receipts released");
            }
            Err(e) => {
                batch.error = Some(e.to_string());
                warn!(batch = %batch.batch_id, error = %e, "settlement not sent; will retry");
            }
        }
        let done = batch.state != BatchState::Pending;
        self.store.update_batch(&batch).await?;
        if batch.state == BatchState::Failed {
            self.store.release_batch(&batch.batch_id).await?;
        }
        Ok(done)
    }

    /// Whether the chain lets `model` be charged for; `Err` only when the node or the store
    /// can't answer.
    /// What the chain holds for `model`'s product `charge` (its predictions, or its proofs
    /// under [`modelhub_chain::proof_model_id`]) compared with the registry's record.
    async fn check_on_chain(&self, model: &Model, charge: Charge) -> Result<Check> {
        let price = charge.price_of(model)?;
        let owner = self.store.get_account(&model.owner).await?;
        let Some(wallet) = owner.wallet else {
            return Ok(Check::Refused(
                "the model's owner has no wallet, so the model can't be registered on chain".into(),
            ));
        };
        let owner_address = modelhub_chain::parse_address(&wallet)
            .map_err(|e| RegistryError::store(format!("stored wallet: {e}")))?;
        if owner_address == self.operator {
            return Ok(Check::Refused(format!(
                "model {id}'s owner wallet is the registry's operator, which may not settle usage \
                 of its own models",
                id = model.model_id
            )));
        }
        let key = modelhub_chain::model_key(owner_address, &on_chain_id(&model.model_id, charge));
        let Some(on_chain) = self.market.get_model(key).await.map_err(chain_error)? else {
            return Ok(Check::Refused(format!(
                "model {id}{what} not registered on chain yet: its owner runs `modelhub chain \
                 register {id}`",
                id = model.model_id,
                what = match charge {
                    Charge::Prediction => " is",
                    Charge::Proof => "'s proofs are",
                },
            )));
        };
        // The chain records the model digest (spec and weight commitment together).
        let digest = match &model.digest {
            Some(d) => modelhub_chain::digest_word(d)
                .map_err(|e| RegistryError::store(format!("stored digest: {e}")))?,
            None => B256::ZERO,
        };
        let id = &model.model_id;
        let refusal = if modelhub_chain::wallet_string(on_chain.owner) != wallet {
            format!(
                "model {id} is registered on chain by {}, not by its owner's wallet {wallet}",
                modelhub_chain::wallet_string(on_chain.owner)
            )
        } else if !on_chain.active {
            format!("model {id} is deactivated on chain")
        } else if on_chain.price_per_call != U256::from(price) {
            format!(
                "model {id}'s on-chain {} price {} differs from its registered one {price}",
                charge.as_str(),
                on_chain.price_per_call,
            )
        } else if on_chain.cid_hash != modelhub_chain::cid_hash(&model.cid) {
            format!("model {id}'s on-chain CID hash differs from its CID")
        } else if on_chain.commitment != digest {
            format!("model {id}'s on-chain digest differs from its model digest")
        } else {
            return Ok(Check::Chargeable);
        };
        Ok(Check::Refused(refusal))
    }
}

/// What the chain says about charging for a model.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Check {
    Chargeable,
    /// Why not, for the client.
    Refused(String),
}

impl Check {
    fn into_result(self) -> Result<()> {
        match self {
            Check::Chargeable => Ok(()),
            Check::Refused(why) => Err(RegistryError::conflict(why)),
        }
    }
}

/// The id of the account a deposit creates for a wallet no account has claimed: the id a
/// keyed create of `wallet\0<address>` gets.
pub fn wallet_account_id(wallet: &str) -> String {
    crate::service::keyed_id(id::ACCOUNT, &format!("wallet\0{wallet}"))
}

#[async_trait]
impl Ledger for ChainLedger {
    fn grants_allowed(&self) -> bool {
        false
    }

    async fn check_chargeable(&self, model_id: &str, charge: Charge) -> Result<()> {
        let product = on_chain_id(model_id, charge);
        if let Some(check) = self.checks.get(&product).await {
            return check.into_result();
        }
        let model = self.store.get_model(model_id).await?;
        match self.check_on_chain(&model, charge).await {
            Ok(check) => {
                if check == Check::Chargeable {
                    self.chargeable.insert(product.clone(), ()).await;
                }
                self.checks.insert(product, check.clone()).await;
                check.into_result()
            }
            // The node is down: a model the chain accepted recently stays chargeable (usage is
            // settled once the node is back); others wait for the node.
            Err(e @ RegistryError::ChainUnavailable { .. }) => {
                if self.chargeable.contains_key(&product) {
                    warn!(model = model_id, error = %e, "chain node unavailable; charging on the last check");
                    Ok(())
                } else {
                    Err(e)
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn sync(&self) -> Result<()> {
        let _guard = self.sync_lock.lock().await;
        self.follow().await?;
        self.settle().await
    }

    async fn run(&self) {
        self.run_loop().await;
    }

    async fn status(&self) -> Result<LedgerStatus> {
        Ok(LedgerStatus {
            kind: "chain",
            chain_id: self.chain_id,
            marketplace: modelhub_chain::wallet_string(self.market.address()),
            operator: modelhub_chain::wallet_string(self.operator),
            wei_per_credit: self.wei_per_credit.to_string(),
            followed_block: self.store.get_cursor(&self.cursor).await?.unwrap_or(0),
            confirmations: self.args.chain_confirmations,
            unsettled_receipts: self.store.count_unsettled_receipts().await?,
            batches: self.store.recent_batches(20).await?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_ids_depend_on_the_operator_the_round_and_the_set_of_receipts() {
        let op = Address::repeat_byte(1);
        let a = batch_id(op, &["rcp_1".into(), "rcp_2".into()], 0);
        assert_eq!(a, batch_id(op, &["rcp_2".into(), "rcp_1".into()], 0));
        assert_ne!(a, batch_id(op, &["rcp_1".into()], 0));
        assert_ne!(a, batch_id(op, &["rcp_1".into(), "rcp_3".into()], 0));
        assert_ne!(a, batch_id(op, &["rcp_1".into(), "rcp_2".into()], 1));
        assert_ne!(
            a,
            batch_id(
                Address::repeat_byte(2),
                &["rcp_1".into(), "rcp_2".into()],
                0
            )
        );
        assert_eq!(
            receipts_hash(&["b".into(), "a".into()]),
            receipts_hash(&["a".into(), "b".into()])
        );
        assert_ne!(receipts_hash(&["a".into()]), receipts_hash(&["b".into()]));
    }

    #[test]
    fn only_faults_not_the_users_refund_them() {
        assert!(refunds_user(Rejection::ModelInactive));
        assert!(refunds_user(Rejection::PriceMismatch));
        assert!(refunds_user(Rejection::OperatorOwnsModel));
        assert!(refunds_user(Rejection::UnknownModel));
        assert!(refunds_user(Rejection::StaleDay));
        assert!(!refunds_user(Rejection::InsufficientCredits));
        assert!(!refunds_user(Rejection::OverDailyCap));
        assert!(!refunds_user(Rejection::Overflow));
        assert!(!refunds_user(Rejection::Other(99)));
    }

    #[test]
    fn wallet_accounts_have_stable_distinct_ids() {
        let w1 = "0x00000000000000000000000000000000000000a1";
        let w2 = "0x00000000000000000000000000000000000000a2";
        assert_eq!(wallet_account_id(w1), wallet_account_id(w1));
        assert_ne!(wallet_account_id(w1), wallet_account_id(w2));
        assert!(wallet_account_id(w1).starts_with("acct_"));
    }
}
