//! [`Marketplace`]: typed reads and writes of one deployed Marketplace contract over HTTP
//! JSON-RPC, with a deadline on every node call and decoded reverts.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::contract::{CallBuilder, CallDecoder};
use alloy::eips::BlockNumberOrTag;
use alloy::primitives::{Address, B256, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::{Filter, TransactionReceipt};
use alloy::sol_types::SolEvent;
use alloy::transports::http::reqwest;
use tokio::sync::{Mutex, OnceCell};
use tracing::debug;

use crate::Signer;
use crate::bindings::Marketplace::UsageRecord;
use crate::bindings::Marketplace::{self as Contract, MarketplaceInstance};
use crate::error::{self, ChainError, Result, Revert};

/// Default deadline of one node call.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Default deadline for a sent transaction's receipt.
const RECEIPT_TIMEOUT: Duration = Duration::from_secs(120);
/// Default of the most blocks asked for in one `eth_getLogs` (nodes limit the range).
const LOG_RANGE: u64 = 10_000;
/// Receipt polling interval: at most this, less when the client polls faster (loopback).
const MAX_RECEIPT_POLL: Duration = Duration::from_millis(500);

/// A model as the contract holds it (`getModel`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnChainModel {
    pub owner: Address,
    pub cid_hash: B256,
    pub commitment: B256,
    pub price_per_call: U256,
    pub active: bool,
}

/// One `CreditsBought` event: `buyer` paid `amount_wei` for `credits`; `at` says where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deposit {
    pub buyer: Address,
    pub credits: U256,
    pub amount_wei: U256,
    pub at: LogPosition,
}

/// One `RefundRequested` event: `user` asked for `credits` back (replacing any earlier request),
/// claimable from `not_before`; located as a [`Deposit`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequest {
    pub user: Address,
    pub credits: U256,
    pub not_before: U256,
    pub at: LogPosition,
}

/// One `DailyCapSet` event: `user` set the daily cap `cap`, in force from `effective_at` (the
/// block time of the call for a raise; `CAP_DELAY` later for a lowering, which until then is
/// pending and replaces any earlier pending one); located as a [`Deposit`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyCapChange {
    pub user: Address,
    pub cap: U256,
    pub effective_at: U256,
    pub at: LogPosition,
}

/// One `Refunded` event: `user`'s refund request was paid, `credits` of it; located as a
/// [`Deposit`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundPaid {
    pub user: Address,
    pub credits: U256,
    pub amount_wei: U256,
    pub at: LogPosition,
}

/// Where an event's log is: in transaction `tx_hash` of block `block`, as log `log_index` of
/// that block and the `position`-th event of its kind from this contract in its transaction
/// (from 0). `(tx_hash, position)` names an event for good: unlike the log index, it does not
/// change when a reorg puts the transaction in another block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogPosition {
    pub block: u64,
    pub tx_hash: B256,
    pub log_index: u64,
    pub position: u32,
}

/// Why the contract skipped a usage record (`UsageRejected.reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    UnknownModel,
    ModelInactive,
    OperatorOwnsModel,
    PriceMismatch,
    InsufficientCredits,
    OverDailyCap,
    Overflow,
    /// The record's day label is neither the chain's today nor yesterday (UTC days of the block
    /// time).
    StaleDay,
    /// A reason code this client does not know.
    Other(u8),
}

impl Rejection {
    pub fn from_code(code: u8) -> Rejection {
        match code {
            1 => Rejection::UnknownModel,
            2 => Rejection::ModelInactive,
            3 => Rejection::OperatorOwnsModel,
            4 => Rejection::PriceMismatch,
            5 => Rejection::InsufficientCredits,
            6 => Rejection::OverDailyCap,
            7 => Rejection::Overflow,
            8 => Rejection::StaleDay,
            other => Rejection::Other(other),
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Other(code) => write!(f, "reason {code}"),
            known => write!(f, "{known:?}"),
        }
    }
}

/// One record of a settled batch, as the contract logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettledRecord {
    pub user: Address,
    pub model: B256,
    pub calls: u64,
    pub credits: U256,
    pub receipt_batch_hash: B256,
    /// `None`: settled (`UsageSettled`); else why it was skipped (`UsageRejected`).
    pub rejected: Option<Rejection>,
}

/// What a `consumeCredits` transaction did, read from its receipt's logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub tx_hash: B256,
    pub batch_id: B256,
    pub operator: Address,
    pub total_credits: U256,
    /// `BatchSettled.recordsHash`: compare with [`crate::records_hash`] of what was sent.
    pub records_hash: B256,
    /// Every record, in order.
    pub records: Vec<SettledRecord>,
}

/// A deployed Marketplace contract, reached through one node. Cheap to clone; clones share the
/// connection and the send lock (one transaction of this sender in flight to the node at a
/// time, so nonces don't collide).
#[derive(Clone)]
pub struct Marketplace {
    contract: MarketplaceInstance<DynProvider>,
    sender: Option<Address>,
    /// Forms of the RPC URL removed from error messages (it may carry an API key).
    redact: Arc<[String]>,
    call_timeout: Duration,
    receipt_timeout: Duration,
    log_range: u64,
    send_lock: Arc<Mutex<()>>,
    wei_per_credit: Arc<OnceCell<U256>>,
}

impl std::fmt::Debug for Marketplace {
    /// The RPC URL may carry an API key: it is not shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Marketplace")
            .field("address", self.contract.address())
            .field("sender", &self.sender)
            .field("call_timeout", &self.call_timeout)
            .field("receipt_timeout", &self.receipt_timeout)
            .field("log_range", &self.log_range)
            .finish_non_exhaustive()
    }
}

/// A provider for `rpc_url`, with a wallet when a signer is given: gas estimation, nonces read
/// from the node for each transaction (`pending` count, robust to failed sends), chain id.
fn provider(
    rpc_url: &str,
    signer: Option<Signer>,
    connect_timeout: Duration,
) -> Result<(DynProvider, Arc<[String]>)> {
    let trimmed = rpc_url.trim();
    let url: reqwest::Url = trimmed
        .parse()
        .map_err(|e| ChainError::Invalid(format!("the RPC URL is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ChainError::Invalid(format!(
            "the RPC URL must be http or https, not {:?}",
            url.scheme()
        )));
    }
    let client = reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .build()
        .map_err(|e| ChainError::Invalid(format!("building the HTTP client: {e}")))?;
    let mut redact: Vec<String> = vec![
        url.as_str().to_owned(),
        url.as_str().trim_end_matches('/').to_owned(),
        trimmed.to_owned(),
    ];
    redact.retain(|s| !s.is_empty());
    redact.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let builder = ProviderBuilder::new()
        .disable_recommended_fillers()
        .with_gas_estimation()
        .with_simple_nonce_management()
        .fetch_chain_id();
    let provider = match signer {
        Some(signer) => builder.wallet(signer).connect_reqwest(client, url).erased(),
        None => builder.connect_reqwest(client, url).erased(),
    };
    Ok((provider, redact.into()))
}

impl Marketplace {
    /// Connects to the contract at `address` through the node at `rpc_url` (http or https).
    /// Checks that the node answers (else [`ChainError::Rpc`]) and that code exists at
    /// `address` (else [`ChainError::Invalid`] "no contract at ..."). Writes need `signer`.
    pub async fn connect(
        rpc_url: &str,
        address: Address,
        signer: Option<Signer>,
    ) -> Result<Marketplace> {
        Marketplace::connect_with_timeouts(rpc_url, address, signer, CALL_TIMEOUT, RECEIPT_TIMEOUT)
            .await
    }

    /// [`Marketplace::connect`] with the deadlines of [`Marketplace::with_timeouts`] applied from
    /// the first call on.
    pub async fn connect_with_timeouts(
        rpc_url: &str,
        address: Address,
        signer: Option<Signer>,
        call_timeout: Duration,
        receipt_timeout: Duration,
    ) -> Result<Marketplace> {
        let sender = signer.as_ref().map(|s| s.address());
        let (provider, redact) = provider(rpc_url, signer, call_timeout)?;
        let market = Marketplace::new(provider, redact, address, sender)
            .with_timeouts(call_timeout, receipt_timeout);
        market.chain_id().await?;
        let code = market
            .timed(
                "eth_getCode",
                market.provider().get_code_at(address).into_future(),
            )
            .await?
            .map_err(|e| market.transport_error(&e))?;
        if code.is_empty() {
            return Err(ChainError::Invalid(format!("no contract at {address}")));
        }
        Ok(market)
    }

    /// Deploys the Solidity twin's bytecode (from `Marketplace.json`) with constructor
    /// `(admin, wei_per_credit, operator or zero)` (the first operator is enabled at once), paid and signed by `deployer`, and connects to it with the
    /// deployer as sender. A zero admin or rate is refused by the constructor
    /// ([`Revert::ZeroAddress`], [`Revert::InvalidRate`]).
    pub async fn deploy(
        rpc_url: &str,
        deployer: Signer,
        admin: Address,
        wei_per_credit: U256,
        operator: Option<Address>,
    ) -> Result<Marketplace> {
        let sender = deployer.address();
        let (provider, redact) = provider(rpc_url, Some(deployer), CALL_TIMEOUT)?;
        // Not yet at an address: the instance is only used for its error helpers until then.
        let market = Marketplace::new(
            provider.clone(),
            redact.clone(),
            Address::ZERO,
            Some(sender),
        );
        let call = Contract::deploy_builder(
            provider.clone(),
            admin,
            wei_per_credit,
            operator.unwrap_or(Address::ZERO),
        )
        .from(sender);
        let receipt = market.send_and_wait("deploy", &call).await?;
        let address = receipt.contract_address.ok_or_else(|| {
            ChainError::Rpc("the deployment receipt names no contract address".into())
        })?;
        debug!(%address, "marketplace deployed");
        Ok(Marketplace::new(provider, redact, address, Some(sender)))
    }

    fn new(
        provider: DynProvider,
        redact: Arc<[String]>,
        address: Address,
        sender: Option<Address>,
    ) -> Marketplace {
        Marketplace {
            contract: MarketplaceInstance::new(address, provider),
            sender,
            redact,
            call_timeout: CALL_TIMEOUT,
            receipt_timeout: RECEIPT_TIMEOUT,
            log_range: LOG_RANGE,
            send_lock: Arc::new(Mutex::new(())),
            wei_per_credit: Arc::new(OnceCell::new()),
        }
    }

    /// Sets the deadline of one node call (default 15 s) and of waiting for a transaction's
    /// receipt (default 120 s).
    pub fn with_timeouts(mut self, call: Duration, receipt: Duration) -> Marketplace {
        self.call_timeout = call;
        self.receipt_timeout = receipt;
        self
    }

    /// Sets the most blocks [`Marketplace::deposits`] asks the node for in one `eth_getLogs`
    /// (default 10 000; some hosted nodes allow fewer). At least 1.
    pub fn with_log_range(mut self, blocks: u64) -> Marketplace {
        self.log_range = blocks.max(1);
        self
    }

    /// The contract's address.
    pub fn address(&self) -> Address {
        *self.contract.address()
    }

    /// The address that signs writes, when a signer was given.
    pub fn sender(&self) -> Option<Address> {
        self.sender
    }

    fn provider(&self) -> &DynProvider {
        self.contract.provider()
    }

    /// The node's chain id (31337 for anvil).
    pub async fn chain_id(&self) -> Result<u64> {
        self.timed("eth_chainId", self.provider().get_chain_id().into_future())
            .await?
            .map_err(|e| self.transport_error(&e))
    }

    /// The number of the node's `finalized` block (the newest a reorg can't undo).
    pub async fn finalized_block(&self) -> Result<u64> {
        let block = self
            .timed(
                "eth_getBlockByNumber",
                self.provider()
                    .get_block_by_number(BlockNumberOrTag::Finalized)
                    .into_future(),
            )
            .await?
            .map_err(|e| self.transport_error(&e))?
            .ok_or_else(|| ChainError::Rpc("the node has no finalized block".into()))?;
        Ok(block.header.number)
    }

    /// The timestamp (unix seconds) of the node's latest block: the contract's clock.
    pub async fn latest_block_time(&self) -> Result<u64> {
        let block = self
            .timed(
                "eth_getBlockByNumber",
                self.provider()
                    .get_block_by_number(BlockNumberOrTag::Latest)
                    .into_future(),
            )
            .await?
            .map_err(|e| self.transport_error(&e))?
            .ok_or_else(|| ChainError::Rpc("the node has no latest block".into()))?;
        Ok(block.header.timestamp)
    }

    /// The node's latest block number.
    pub async fn block_number(&self) -> Result<u64> {
        self.timed(
            "eth_blockNumber",
            self.provider().get_block_number().into_future(),
        )
        .await?
        .map_err(|e| self.transport_error(&e))
    }

    // ----- reads -----

    /// Prepaid credits of `user`.
    pub async fn credits_of(&self, user: Address) -> Result<U256> {
        self.read("creditsOf", self.contract.creditsOf(user)).await
    }

    /// Unwithdrawn earnings (in credits) of model owner `owner`.
    pub async fn earnings_of(&self, owner: Address) -> Result<U256> {
        self.read("earningsOf", self.contract.earningsOf(owner))
            .await
    }

    /// Wei per credit (fixed at deployment; read once, then remembered).
    pub async fn wei_per_credit(&self) -> Result<U256> {
        self.wei_per_credit
            .get_or_try_init(|| self.read("weiPerCredit", self.contract.weiPerCredit()))
            .await
            .copied()
    }

    /// The admin (who names operators).
    pub async fn admin(&self) -> Result<Address> {
        self.read("admin", self.contract.admin()).await
    }

    /// Whether `account` may settle usage (`consumeCredits`).
    pub async fn is_operator(&self, account: Address) -> Result<bool> {
        self.read("isOperator", self.contract.isOperator(account))
            .await
    }

    /// The records hash of batch `batch_id` as `operator` settled it; `None` when it did not.
    pub async fn batch_records_hash(
        &self,
        operator: Address,
        batch_id: B256,
    ) -> Result<Option<B256>> {
        let hash = self
            .read(
                "batchRecordsHash",
                self.contract.batchRecordsHash(operator, batch_id),
            )
            .await?;
        Ok((hash != B256::ZERO).then_some(hash))
    }

    /// A model's prices: (current, previous, time of the last change or 0).
    pub async fn get_prices(&self, model: B256) -> Result<(U256, U256, U256)> {
        let p = self
            .read("getPrices", self.contract.getPrices(model))
            .await?;
        Ok((p._0, p._1, p._2))
    }

    /// Whether settlement and purchases are paused.
    pub async fn paused(&self) -> Result<bool> {
        self.read("paused", self.contract.paused()).await
    }

    /// The cap in force now: the most credits operators may settle from `user` under one day
    /// label (`U256::MAX`: no cap).
    pub async fn daily_cap_of(&self, user: Address) -> Result<U256> {
        self.read("dailyCapOf", self.contract.dailyCapOf(user))
            .await
    }

    /// A lowered daily cap of `user` not in force yet: (cap, effective at); zeros when there is
    /// none or it has taken effect.
    pub async fn pending_daily_cap_of(&self, user: Address) -> Result<(U256, U256)> {
        let p = self
            .read("pendingDailyCapOf", self.contract.pendingDailyCapOf(user))
            .await?;
        Ok((p._0, p._1))
    }

    /// The credits settled from `user` under the day label `day` (unix seconds / 86400); zero
    /// when the contract no longer keeps that day (it keeps the two latest labels).
    pub async fn spent_of(&self, user: Address, day: u64) -> Result<U256> {
        self.read("spentOf", self.contract.spentOf(user, day)).await
    }

    /// A user's refund request: (credits, not before); zeros when none.
    pub async fn refund_of(&self, user: Address) -> Result<(U256, U256)> {
        let r = self.read("refundOf", self.contract.refundOf(user)).await?;
        Ok((r._0, r._1))
    }

    /// The model registered under the key `model` (see [`crate::model_key`]), `None` when
    /// unknown.
    pub async fn get_model(&self, model: B256) -> Result<Option<OnChainModel>> {
        match self.read("getModel", self.contract.getModel(model)).await {
            Ok(m) => Ok(Some(OnChainModel {
                owner: m._0,
                cid_hash: m._1,
                commitment: m._2,
                price_per_call: m._3,
                active: m._4,
            })),
            Err(ChainError::Reverted(Revert::UnknownModel(_))) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The `CreditsBought` events of blocks `from_block..=to_block`, in chain order. Asks the
    /// node for at most [`Marketplace::with_log_range`] blocks at a time. An empty range (`from > to`) has none.
    pub async fn deposits(&self, from_block: u64, to_block: u64) -> Result<Vec<Deposit>> {
        let logs = self
            .events::<Contract::CreditsBought>(from_block, to_block)
            .await?;
        Ok(logs
            .into_iter()
            .map(|(e, at)| Deposit {
                buyer: e.buyer,
                credits: e.credits,
                amount_wei: e.amountWei,
                at,
            })
            .collect())
    }

    /// The `RefundRequested` events of blocks `from_block..=to_block`, in chain order (as
    /// [`deposits`](Self::deposits)).
    pub async fn refund_requests(
        &self,
        from_block: u64,
        to_block: u64,
    ) -> Result<Vec<RefundRequest>> {
        let logs = self
            .events::<Contract::RefundRequested>(from_block, to_block)
            .await?;
        Ok(logs
            .into_iter()
            .map(|(e, at)| RefundRequest {
                user: e.user,
                credits: e.credits,
                not_before: e.notBefore,
                at,
            })
            .collect())
    }

    /// The `Refunded` events of blocks `from_block..=to_block`, in chain order (as
    /// [`deposits`](Self::deposits)).
    pub async fn refunds_paid(&self, from_block: u64, to_block: u64) -> Result<Vec<RefundPaid>> {
        let logs = self
            .events::<Contract::Refunded>(from_block, to_block)
            .await?;
        Ok(logs
            .into_iter()
            .map(|(e, at)| RefundPaid {
                user: e.user,
                credits: e.credits,
                amount_wei: e.amountWei,
                at,
            })
            .collect())
    }

    /// The `DailyCapSet` events of blocks `from_block..=to_block`, in chain order (as
    /// [`deposits`](Self::deposits)).
    pub async fn daily_cap_changes(
        &self,
        from_block: u64,
        to_block: u64,
    ) -> Result<Vec<DailyCapChange>> {
        let logs = self
            .events::<Contract::DailyCapSet>(from_block, to_block)
            .await?;
        Ok(logs
            .into_iter()
            .map(|(e, at)| DailyCapChange {
                user: e.user,
                cap: e.cap,
                effective_at: e.effectiveAt,
                at,
            })
            .collect())
    }

    /// The contract's `E` events of blocks `from_block..=to_block`, decoded, in chain order,
    /// each with where it is; `position` counts the `E` events of its transaction from 0.
    async fn events<E: SolEvent>(
        &self,
        from_block: u64,
        to_block: u64,
    ) -> Result<Vec<(E, LogPosition)>> {
        let mut out = Vec::new();
        let mut start = from_block;
        while start <= to_block {
            let end = start.saturating_add(self.log_range - 1).min(to_block);
            let filter = Filter::new()
                .address(self.address())
                .event_signature(E::SIGNATURE_HASH)
                .from_block(start)
                .to_block(end);
            let logs = self
                .timed("eth_getLogs", self.provider().get_logs(&filter))
                .await?
                .map_err(|e| self.transport_error(&e))?;
            for log in logs {
                if log.removed {
                    continue;
                }
                let (Some(block), Some(tx_hash), Some(log_index)) =
                    (log.block_number, log.transaction_hash, log.log_index)
                else {
                    return Err(ChainError::Rpc(format!(
                        "the node returned a {} log without its position",
                        E::SIGNATURE
                    )));
                };
                let event = log.log_decode::<E>().map_err(|e| {
                    ChainError::Rpc(format!("undecodable {} log: {e}", E::SIGNATURE))
                })?;
                let at = LogPosition {
                    block,
                    tx_hash,
                    log_index,
                    position: 0,
                };
                out.push((event.inner.data, at));
            }
            if end == to_block {
                break;
            }
            start = end + 1;
        }
        out.sort_by_key(|(_, at)| (at.block, at.log_index));
        // A transaction's logs are all in one block, so the range holds all of them.
        let mut previous: Option<(B256, u32)> = None;
        for (_, at) in &mut out {
            at.position = match previous {
                Some((tx, n)) if tx == at.tx_hash => n + 1,
                _ => 0,
            };
            previous = Some((at.tx_hash, at.position));
        }
        Ok(out)
    }

    // ----- writes -----

    /// Registers a model owned by the sender: `registerModel(local_id, cid_hash, commitment,
    /// price)` (prices are in credits per call; see [`crate::local_id`]); the contract keeps it
    /// under [`crate::model_key`]`(sender, ..)`. Returns the transaction hash.
    pub async fn register_model(
        &self,
        local_id: B256,
        cid_hash: B256,
        commitment: B256,
        price: U256,
    ) -> Result<B256> {
        let call = self
            .contract
            .registerModel(local_id, cid_hash, commitment, price);
        self.write("registerModel", call).await
    }

    /// Sets a new price for a model of the sender.
    pub async fn update_price(&self, model: B256, price: U256) -> Result<B256> {
        self.write("updatePrice", self.contract.updatePrice(model, price))
            .await
    }

    /// Deactivates a model of the sender, for good.
    pub async fn deactivate(&self, model: B256) -> Result<B256> {
        self.write("deactivate", self.contract.deactivate(model))
            .await
    }

    /// Buys `credits` credits for the sender, paying `credits * weiPerCredit` wei.
    pub async fn buy_credits(&self, credits: U256) -> Result<B256> {
        let rate = self.wei_per_credit().await?;
        let value = credits.checked_mul(rate).ok_or_else(|| {
            ChainError::Invalid(format!("{credits} credits cost more wei than exist"))
        })?;
        self.write("buyCredits", self.contract.buyCredits().value(value))
            .await
    }

    /// Settles a batch of usage (operators only; `batch_id` is accepted once per operator) and
    /// reports, from the transaction's logs, which records settled and which were skipped. A
    /// mined transaction without this contract's `BatchSettled` log is [`ChainError::Rpc`].
    pub async fn consume_credits(
        &self,
        batch_id: B256,
        records: Vec<UsageRecord>,
    ) -> Result<Settlement> {
        let sender = self.sender.ok_or_else(|| {
            ChainError::Invalid("consumeCredits needs a signing key, and none was given".into())
        })?;
        let call = self.contract.consumeCredits(batch_id, records).from(sender);
        let receipt = self.send_and_wait("consumeCredits", &call).await?;
        self.settlement(&receipt)
    }

    /// The [`Settlement`] a `consumeCredits` receipt logged.
    fn settlement(&self, receipt: &TransactionReceipt) -> Result<Settlement> {
        let mut records = Vec::new();
        let mut batch = None;
        for log in receipt.inner.logs() {
            if log.address() != self.address() {
                continue;
            }
            let Some(topic) = log.topics().first() else {
                continue;
            };
            let bad = |e: alloy::sol_types::Error| {
                ChainError::Rpc(format!("undecodable settlement log: {e}"))
            };
            if *topic == Contract::UsageSettled::SIGNATURE_HASH {
                let e = log
                    .log_decode::<Contract::UsageSettled>()
                    .map_err(bad)?
                    .inner
                    .data;
                records.push(SettledRecord {
                    user: e.user,
                    model: e.modelId,
                    calls: e.calls,
                    credits: e.credits,
                    receipt_batch_hash: e.receiptBatchHash,
                    rejected: None,
                });
            } else if *topic == Contract::UsageRejected::SIGNATURE_HASH {
                let e = log
                    .log_decode::<Contract::UsageRejected>()
                    .map_err(bad)?
                    .inner
                    .data;
                records.push(SettledRecord {
                    user: e.user,
                    model: e.modelId,
                    calls: e.calls,
                    credits: e.credits,
                    receipt_batch_hash: e.receiptBatchHash,
                    rejected: Some(Rejection::from_code(e.reason)),
                });
            } else if *topic == Contract::BatchSettled::SIGNATURE_HASH {
                batch = Some(
                    log.log_decode::<Contract::BatchSettled>()
                        .map_err(bad)?
                        .inner
                        .data,
                );
            }
        }
        let batch = batch.ok_or_else(|| {
            ChainError::Rpc(format!(
                "consumeCredits transaction {} logged no BatchSettled",
                receipt.transaction_hash
            ))
        })?;
        Ok(Settlement {
            tx_hash: receipt.transaction_hash,
            batch_id: batch.batchId,
            operator: batch.operator,
            total_credits: batch.totalCredits,
            records_hash: batch.recordsHash,
            records,
        })
    }

    /// Pays the sender's earnings out, in wei.
    pub async fn withdraw(&self) -> Result<B256> {
        self.write("withdraw", self.contract.withdraw()).await
    }

    /// Names `operator` (it accepts after the contract's delay with
    /// [`Marketplace::accept_operator`]), or with `enabled == false` revokes it at once (admin
    /// only).
    pub async fn set_operator(&self, operator: Address, enabled: bool) -> Result<B256> {
        self.write("setOperator", self.contract.setOperator(operator, enabled))
            .await
    }

    /// The sender takes the operator role it was named to, once the delay has passed.
    pub async fn accept_operator(&self) -> Result<B256> {
        self.write("acceptOperator", self.contract.acceptOperator())
            .await
    }

    /// Proposes `admin` as the next admin (admin only); it accepts after the delay.
    pub async fn propose_admin(&self, admin: Address) -> Result<B256> {
        self.write("proposeAdmin", self.contract.proposeAdmin(admin))
            .await
    }

    /// The sender, the proposed admin, takes the role once the delay has passed.
    pub async fn accept_admin(&self) -> Result<B256> {
        self.write("acceptAdmin", self.contract.acceptAdmin()).await
    }

    /// Pauses or resumes settlement and purchases (admin only).
    pub async fn set_paused(&self, paused: bool) -> Result<B256> {
        self.write("setPaused", self.contract.setPaused(paused))
            .await
    }

    /// Sets the most credits operators may settle from the sender under one day label: a raise
    /// (or the cap in force again) takes effect at once and drops a pending lowering; a lower
    /// cap (a first cap included) takes effect after the contract's `CAP_DELAY` (2 days).
    pub async fn set_daily_cap(&self, cap: U256) -> Result<B256> {
        self.write("setDailyCap", self.contract.setDailyCap(cap))
            .await
    }

    /// Asks to turn `credits` of the sender's credits back into wei after the refund lock.
    pub async fn request_refund(&self, credits: U256) -> Result<B256> {
        self.write("requestRefund", self.contract.requestRefund(credits))
            .await
    }

    /// Pays the sender's refund once its lock has passed.
    pub async fn claim_refund(&self) -> Result<B256> {
        self.write("claimRefund", self.contract.claimRefund()).await
    }

    // ----- plumbing -----

    fn redact(&self, mut s: String) -> String {
        for u in self.redact.iter() {
            if s.contains(u.as_str()) {
                s = s.replace(u.as_str(), "<rpc url>");
            }
        }
        s
    }

    fn transport_error(&self, e: &alloy::transports::TransportError) -> ChainError {
        error::from_transport(e, &|s| self.redact(s))
    }

    fn contract_error(&self, e: &alloy::contract::Error) -> ChainError {
        error::from_contract(e, &|s| self.redact(s))
    }

    /// Runs `fut` with the call deadline.
    async fn timed<F: IntoFuture>(&self, what: &str, fut: F) -> Result<F::Output> {
        tokio::time::timeout(self.call_timeout, fut)
            .await
            .map_err(|_| {
                ChainError::Rpc(format!(
                    "{what}: no answer from the node within {:?}",
                    self.call_timeout
                ))
            })
    }

    /// An `eth_call` of a view, decoded.
    async fn read<D: CallDecoder>(
        &self,
        what: &str,
        call: CallBuilder<&DynProvider, D>,
    ) -> Result<D::CallOutput> {
        self.timed(what, call.call())
            .await?
            .map_err(|e| self.contract_error(&e))
    }

    /// Simulates, sends and waits for a call of the sender; returns the transaction hash.
    async fn write<D: CallDecoder>(
        &self,
        what: &str,
        call: CallBuilder<&DynProvider, D>,
    ) -> Result<B256> {
        let sender = self.sender.ok_or_else(|| {
            ChainError::Invalid(format!("{what} needs a signing key, and none was given"))
        })?;
        let receipt = self.send_and_wait(what, &call.from(sender)).await?;
        Ok(receipt.transaction_hash)
    }

    /// Simulates `call` with `eth_call` (so a refusal is decoded), sends it, and waits for a
    /// successful receipt.
    async fn send_and_wait<P: Provider, D: CallDecoder>(
        &self,
        what: &str,
        call: &CallBuilder<P, D>,
    ) -> Result<TransactionReceipt> {
        let tx_hash = {
            let _one_at_a_time = self.send_lock.lock().await;
            self.timed(what, call.call_raw())
                .await?
                .map_err(|e| self.contract_error(&e))?;
            let pending = self
                .timed(what, call.send())
                .await?
                .map_err(|e| self.contract_error(&e))?;
            *pending.tx_hash()
        };
        debug!(call = what, tx = %tx_hash, "transaction sent");
        let receipt = self.wait_receipt(what, tx_hash).await?;
        if !receipt.status() {
            return Err(ChainError::Reverted(Revert::Other(format!(
                "{what} transaction {tx_hash} failed in block {}",
                receipt
                    .block_number
                    .map_or_else(|| "?".to_owned(), |b| b.to_string())
            ))));
        }
        Ok(receipt)
    }

    /// Polls for the receipt of `tx_hash` until the receipt deadline.
    async fn wait_receipt(&self, what: &str, tx_hash: B256) -> Result<TransactionReceipt> {
        let deadline = Instant::now() + self.receipt_timeout;
        let every = self
            .provider()
            .client()
            .poll_interval()
            .min(MAX_RECEIPT_POLL);
        loop {
            let receipt = self
                .timed(
                    "eth_getTransactionReceipt",
                    self.provider()
                        .get_transaction_receipt(tx_hash)
                        .into_future(),
                )
                .await?
                .map_err(|e| self.transport_error(&e))?;
            if let Some(receipt) = receipt {
                return Ok(receipt);
            }
            if Instant::now() >= deadline {
                return Err(ChainError::Rpc(format!(
                    "{what} transaction {tx_hash} was not mined within {:?}",
                    self.receipt_timeout
                )));
            }
            tokio::time::sleep(every).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send<T: Send>(_: T) {}

    /// Callers hold these futures across awaits in `Send` tasks (the registry's ledger runs
    /// under `async_trait`): they must stay `Send`.
    #[allow(dead_code, clippy::let_underscore_future)]
    fn futures_are_send(m: &Marketplace, s: Signer) {
        let (a, b) = (Address::ZERO, B256::ZERO);
        send(Marketplace::connect("", a, None));
        send(Marketplace::deploy("", s, a, U256::ZERO, None));
        send(m.finalized_block());
        send(m.batch_records_hash(a, b));
        send(m.get_prices(b));
        send(m.paused());
        send(m.daily_cap_of(a));
        send(m.pending_daily_cap_of(a));
        send(m.spent_of(a, 0));
        send(m.daily_cap_changes(0, 1));
        send(m.refund_requests(0, 1));
        send(m.refund_of(a));
        send(m.accept_operator());
        send(m.propose_admin(a));
        send(m.accept_admin());
        send(m.set_paused(true));
        send(m.set_daily_cap(U256::ZERO));
        send(m.request_refund(U256::ZERO));
        send(m.claim_refund());
        send(m.chain_id());
        send(m.block_number());
        send(m.credits_of(a));
        send(m.earnings_of(a));
        send(m.wei_per_credit());
        send(m.admin());
        send(m.is_operator(a));
        send(m.get_model(b));
        send(m.deposits(0, 1));
        send(m.register_model(b, b, b, U256::ZERO));
        send(m.update_price(b, U256::ZERO));
        send(m.deactivate(b));
        send(m.buy_credits(U256::ZERO));
        send(m.consume_credits(b, vec![]));
        send(m.withdraw());
        send(m.set_operator(a, true));
    }

    #[test]
    fn rejection_codes_are_the_contracts() {
        let known = [
            (1, Rejection::UnknownModel),
            (2, Rejection::ModelInactive),
            (3, Rejection::OperatorOwnsModel),
            (4, Rejection::PriceMismatch),
            (5, Rejection::InsufficientCredits),
            (6, Rejection::OverDailyCap),
            (7, Rejection::Overflow),
            (8, Rejection::StaleDay),
        ];
        for (code, why) in known {
            assert_eq!(Rejection::from_code(code), why);
        }
        assert_eq!(Rejection::from_code(9), Rejection::Other(9));
        assert_eq!(Rejection::StaleDay.to_string(), "StaleDay");
        assert_eq!(Rejection::Other(9).to_string(), "reason 9");
    }

    #[test]
    fn marketplace_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<Marketplace>();
        check::<ChainError>();
    }
}
