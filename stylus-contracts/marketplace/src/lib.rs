//! The Model Hub Marketplace contract for Arbitrum Stylus: model ownership and prices, prepaid
//! credits, batched settlement of usage by operators, refunds, and creators' earnings.
//!
//! Units: prices, credits and earnings are counted in credits; one credit costs `weiPerCredit` wei,
//! fixed at deploy. `buyCredits` takes exact multiples of that rate, and `withdraw` and
//! `claimRefund` pay back at the same rate, so the contract always holds
//! `(credits + earnings) * weiPerCredit` wei.
//!
//! Money rules (see stylus-contracts/README.md for the whole list):
//! - A usage record carries the credits the off-chain ledger charged; it settles only if they
//!   equal `calls` times the model's price, or its previous price within `PRICE_WINDOW` of a
//!   change (prices change at most once per window), so a raise never applies retroactively.
//! - A bad record is skipped with `UsageRejected(reason)`; it never blocks the rest of its batch.
//! - A record names the UTC day (`day`, unix seconds / 86400) on which the off-chain ledger
//!   charged it, and settles only on that day or the next (else `StaleDay`).
//! - Operators can't settle usage of models they own, are bounded by each user's daily cap, are
//!   named by the admin and must accept after `OPERATOR_DELAY`; the admin hands over in two
//!   steps after `ADMIN_DELAY`; the admin can pause settlement and purchases (never withdrawals
//!   or refunds).
//! - The daily cap counts what settled under each record's own day label (not the day of
//!   settlement), and a lower cap takes effect only after `CAP_DELAY`, so usage charged under
//!   the old cap still settles: a user can't void their own usage by lowering the cap.
//! - A model's key is `keccak256(abi.encode(owner, localId))`: nobody can take another's id.
//! - Batches are keyed by `(operator, batchId)` and remember the hash of their records.
//!
//! The ABI (functions, events, errors) is mirrored exactly by `solidity/Marketplace.sol`, and
//! `scripts/contracts abi-check` proves it; `tests/twin.rs` runs both on the same calls and
//! compares the bytes they return, revert with and log. Every failing call leaves storage and
//! logs untouched even without a revert (all checks come before the first write), so the
//! TestVM tests see the same state a chain would after a revert. One difference no test here
//! covers: Stylus refuses reentrant calls by default, the twin allows them (withdraw and
//! claimRefund are checks-effects-interactions on both).

#![cfg_attr(not(any(test, feature = "export-abi")), no_main)]

extern crate alloc;

use alloc::vec::Vec;

use alloy_primitives::{Address, FixedBytes, U256};
use alloy_sol_types::sol;
use stylus_sdk::{
    call::transfer::transfer_eth,
    prelude::*,
    storage::{StorageAddress, StorageBool, StorageFixedBytes, StorageMap, StorageU256},
};

sol! {
    #![sol(all_derives)]

    /// One line of a settlement batch: `calls` calls by `user` to the model keyed `modelId`,
    /// for which the off-chain ledger charged `credits` on the UTC day `day` (unix seconds /
    /// 86400), covered by the off-chain receipts whose hash is `receiptBatchHash`.
    #[derive(AbiType)]
    struct UsageRecord {
        address user;
        bytes32 modelId;
        uint64 calls;
        uint256 credits;
        uint64 day;
        bytes32 receiptBatchHash;
    }

    // Events: keep in step with abi/MarketplaceEvents.sol (a test checks it).
    event ModelRegistered(bytes32 indexed modelId, address indexed owner, bytes32 localId, bytes32 cidHash, bytes32 commitment, uint256 pricePerCall);
    event PriceUpdated(bytes32 indexed modelId, uint256 oldPrice, uint256 newPrice);
    event ModelDeactivated(bytes32 indexed modelId, address indexed owner);
    event CreditsBought(address indexed buyer, uint256 amountWei, uint256 credits);
    event UsageSettled(bytes32 indexed batchId, address indexed user, bytes32 indexed modelId, uint64 calls, uint256 credits, bytes32 receiptBatchHash);
    event UsageRejected(bytes32 indexed batchId, address indexed user, bytes32 indexed modelId, uint64 calls, uint256 credits, bytes32 receiptBatchHash, uint8 reason);
    event BatchSettled(bytes32 indexed batchId, address indexed operator, uint256 settled, uint256 rejected, uint256 totalCredits, bytes32 recordsHash);
    event Withdrawn(address indexed owner, uint256 credits, uint256 amountWei);
    event OperatorProposed(address indexed operator, uint256 notBefore);
    event OperatorSet(address indexed operator, bool enabled);
    event AdminProposed(address indexed newAdmin, uint256 notBefore);
    event AdminChanged(address indexed previousAdmin, address indexed newAdmin);
    event PauseSet(bool paused);
    event DailyCapSet(address indexed user, uint256 cap, uint256 effectiveAt);
    event RefundRequested(address indexed user, uint256 credits, uint256 notBefore);
    event Refunded(address indexed user, uint256 credits, uint256 amountWei);

    error Unauthorized(address caller);
    error ZeroAddress();
    error InvalidRate();
    error ModelAlreadyRegistered(bytes32 modelId);
    error UnknownModel(bytes32 modelId);
    error ModelInactive(bytes32 modelId);
    error InvalidPayment(uint256 value);
    error EmptyBatch();
    error BatchAlreadySettled(bytes32 batchId);
    error InsufficientCredits(address user, uint256 needed, uint256 available);
    error NothingToWithdraw(address owner);
    error TransferFailed(address to, uint256 amount);
    error ArithmeticOverflow();
    error TooEarly(uint256 notBefore);
    error ContractPaused();
    error NothingToRefund(address user);
}

/// Why `consumeCredits` skipped a record: the `reason` of `UsageRejected`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Rejection {
    /// No model has this key.
    UnknownModel = 1,
    /// The model was deactivated.
    ModelInactive = 2,
    /// The settling operator owns the model.
    OperatorOwnsModel = 3,
    /// `credits` is not `calls` times a price in force (or `calls` is zero).
    PriceMismatch = 4,
    /// The user holds fewer credits than the record charges.
    InsufficientCredits = 5,
    /// The record would take what settled from the user under its day label past the cap in
    /// force.
    OverDailyCap = 6,
    /// The owner's earnings or the batch total would overflow.
    Overflow = 7,
    /// The record's `day` is neither today nor yesterday (a future day included).
    StaleDay = 8,
}

/// How long after a price change the previous price is still accepted; also the least time
/// between two price changes of a model. Usage must be settled within it.
pub const PRICE_WINDOW: u64 = 86_400;
/// How long after the admin names an operator it can accept the role.
pub const OPERATOR_DELAY: u64 = 86_400;
/// How long after the admin proposes a successor it can accept the role.
pub const ADMIN_DELAY: u64 = 2 * 86_400;
/// How long after a refund request it can be claimed: covers usage not yet settled.
pub const REFUND_DELAY: u64 = 2 * 86_400;
/// The length of the day a daily cap counts over, and of a record's day label.
pub const DAY: u64 = 86_400;
/// How long after a user lowers (or first sets) their daily cap it takes effect: covers the
/// longest time usage may wait for settlement (a record settles on its day or the next), so
/// usage charged under the old cap still settles.
pub const CAP_DELAY: u64 = 2 * 86_400;
/// The least `weiPerCredit` the constructor accepts (1 gwei; below it, `InvalidRate`; the most
/// is `type(uint128).max`, as purchases are counted in 128 bits). The
/// off-chain registry counts credits as u64 (stored as i64 in MongoDB); with this floor all the
/// ether in existence (about 1.2e26 wei) buys at most about 1.2e17 credits, far under i64::MAX
/// (about 9.2e18), so no balance, earnings or batch total the registry mirrors can overflow it.
pub const MIN_WEI_PER_CREDIT: u64 = 1_000_000_000;

/// Every way a Marketplace call can revert; each is a Solidity custom error.
#[derive(SolidityError, Debug, Clone, PartialEq)]
pub enum MarketplaceError {
    /// The caller lacks the role (admin, operator, model owner, pending admin) the call needs.
    Unauthorized(Unauthorized),
    /// The zero address was given where an account is needed.
    ZeroAddress(ZeroAddress),
    /// The deploy-time rate `weiPerCredit` was below `MIN_WEI_PER_CREDIT` (1 gwei).
    InvalidRate(InvalidRate),
    /// A model with this key is already registered.
    ModelAlreadyRegistered(ModelAlreadyRegistered),
    /// No model with this key is registered.
    UnknownModel(UnknownModel),
    /// The model was deactivated by its owner.
    ModelInactive(ModelInactive),
    /// `buyCredits` got zero wei or an amount that is not a multiple of `weiPerCredit`.
    InvalidPayment(InvalidPayment),
    /// A settlement batch without records.
    EmptyBatch(EmptyBatch),
    /// This operator settled this batch id before.
    BatchAlreadySettled(BatchAlreadySettled),
    /// A refund asks for more credits than the caller holds.
    InsufficientCredits(InsufficientCredits),
    /// The caller has no earnings.
    NothingToWithdraw(NothingToWithdraw),
    /// Paying out failed.
    TransferFailed(TransferFailed),
    /// A sum or product does not fit in 256 bits.
    ArithmeticOverflow(ArithmeticOverflow),
    /// A delay (price window, operator or admin hand-over, refund lock) has not passed yet.
    TooEarly(TooEarly),
    /// Settlement and purchases are paused by the admin.
    ContractPaused(ContractPaused),
    /// No refund to request or claim.
    NothingToRefund(NothingToRefund),
}

/// Result of every public method.
pub type Result<T, E = MarketplaceError> = core::result::Result<T, E>;

fn overflow() -> MarketplaceError {
    MarketplaceError::ArithmeticOverflow(ArithmeticOverflow {})
}

fn unauthorized(caller: Address) -> MarketplaceError {
    MarketplaceError::Unauthorized(Unauthorized { caller })
}

fn too_early(not_before: U256) -> MarketplaceError {
    MarketplaceError::TooEarly(TooEarly {
        notBefore: not_before,
    })
}

/// `a * b == c`, false when the product overflows.
fn is_product(a: U256, b: U256, c: U256) -> bool {
    a.checked_mul(b) == Some(c)
}

/// A word of `abi.encode`: an address, left-padded.
fn address_word(a: Address) -> [u8; 32] {
    let mut w = [0u8; 32];
    w[12..].copy_from_slice(a.as_slice());
    w
}

/// A registered model. Registered iff `owner` is not zero.
#[storage]
pub struct Model {
    owner: StorageAddress,
    cid_hash: StorageFixedBytes<32>,
    commitment: StorageFixedBytes<32>,
    price_per_call: StorageU256,
    active: StorageBool,
    previous_price: StorageU256,
    price_changed_at: StorageU256,
}

/// What the contract holds for one address, as user and as model owner.
#[storage]
pub struct Account {
    credits: StorageU256,
    earnings: StorageU256,
    /// Whether `daily_cap` holds a cap (else none: `type(uint256).max`).
    cap_set: StorageBool,
    daily_cap: StorageU256,
    /// A lowered cap and when it takes effect (0: none). Once that time has come it is the cap
    /// in force, even before a later `setDailyCap` moves it into `daily_cap`.
    pending_cap: StorageU256,
    pending_cap_at: StorageU256,
    /// Credits settled from this user under a day label, in two slots (`day % 2`), each tagged
    /// with its day; a slot tagged with another day counts as 0.
    spent_day_even: StorageU256,
    spent_even: StorageU256,
    spent_day_odd: StorageU256,
    spent_odd: StorageU256,
    refund_credits: StorageU256,
    refund_not_before: StorageU256,
}

impl Account {
    /// The cap in force at `now`: a pending cap whose time has come, else the set cap, else
    /// `U256::MAX`.
    fn cap_in_force(&self, now: U256) -> U256 {
        let at = self.pending_cap_at.get();
        if !at.is_zero() && now >= at {
            self.pending_cap.get()
        } else if self.cap_set.get() {
            self.daily_cap.get()
        } else {
            U256::MAX
        }
    }

    /// The credits settled under the day label `day` (0 when its slot holds another day).
    fn spent_on(&self, day: u64) -> U256 {
        let (tag, spent) = if day.is_multiple_of(2) {
            (&self.spent_day_even, &self.spent_even)
        } else {
            (&self.spent_day_odd, &self.spent_odd)
        };
        if tag.get() == U256::from(day) {
            spent.get()
        } else {
            U256::ZERO
        }
    }

    /// Records `spent` as the credits settled under `day`, in its slot.
    fn set_spent(&mut self, day: u64, spent: U256) {
        if day.is_multiple_of(2) {
            self.spent_day_even.set(U256::from(day));
            self.spent_even.set(spent);
        } else {
            self.spent_day_odd.set(U256::from(day));
            self.spent_odd.set(spent);
        }
    }
}

/// The contract's storage.
#[storage]
#[entrypoint]
pub struct Marketplace {
    admin: StorageAddress,
    pending_admin: StorageAddress,
    pending_admin_not_before: StorageU256,
    wei_per_credit: StorageU256,
    paused: StorageBool,
    operators: StorageMap<Address, StorageBool>,
    operator_not_before: StorageMap<Address, StorageU256>,
    models: StorageMap<FixedBytes<32>, Model>,
    accounts: StorageMap<Address, Account>,
    /// keccak256(abi.encode(operator, batchId)) → the hash of the batch's records.
    settled_batches: StorageMap<FixedBytes<32>, StorageFixedBytes<32>>,
}

impl Marketplace {
    fn now(&self) -> U256 {
        U256::from(self.vm().block_timestamp())
    }

    fn keccak(&self, bytes: &[u8]) -> FixedBytes<32> {
        self.vm().native_keccak256(bytes)
    }

    fn only_admin(&self) -> Result<Address> {
        let caller = self.vm().msg_sender();
        if caller != self.admin.get() {
            return Err(unauthorized(caller));
        }
        Ok(caller)
    }

    /// The owner of a registered model, else `UnknownModel`.
    fn registered_owner(&self, model_id: FixedBytes<32>) -> Result<Address> {
        let owner = self.models.get(model_id).owner.get();
        if owner.is_zero() {
            return Err(MarketplaceError::UnknownModel(UnknownModel {
                modelId: model_id,
            }));
        }
        Ok(owner)
    }

    /// Checks, in this order: the model exists, the caller owns it, it is active.
    fn owned_active_model(&self, model_id: FixedBytes<32>) -> Result<Address> {
        let owner = self.registered_owner(model_id)?;
        let caller = self.vm().msg_sender();
        if caller != owner {
            return Err(unauthorized(caller));
        }
        if !self.models.get(model_id).active.get() {
            return Err(MarketplaceError::ModelInactive(ModelInactive {
                modelId: model_id,
            }));
        }
        Ok(owner)
    }

    fn batch_key(&self, operator: Address, batch_id: FixedBytes<32>) -> FixedBytes<32> {
        let mut buf = [0u8; 64];
        buf[..32].copy_from_slice(&address_word(operator));
        buf[32..].copy_from_slice(batch_id.as_slice());
        self.keccak(&buf)
    }

    /// `keccak256(abi.encode(previous, user, modelId, calls, credits, day, receiptBatchHash))`.
    fn chain_hash(&self, previous: FixedBytes<32>, record: &UsageRecord) -> FixedBytes<32> {
        let mut buf = [0u8; 224];
        buf[..32].copy_from_slice(previous.as_slice());
        buf[32..64].copy_from_slice(&address_word(record.user));
        buf[64..96].copy_from_slice(record.modelId.as_slice());
        buf[96..128].copy_from_slice(&U256::from(record.calls).to_be_bytes::<32>());
        buf[128..160].copy_from_slice(&record.credits.to_be_bytes::<32>());
        buf[160..192].copy_from_slice(&U256::from(record.day).to_be_bytes::<32>());
        buf[192..].copy_from_slice(record.receiptBatchHash.as_slice());
        self.keccak(&buf)
    }

    /// Why `record` can't be settled now by `operator`, given the batch's running `total`.
    fn rejection(&self, operator: Address, record: &UsageRecord, total: U256) -> Option<Rejection> {
        let model = self.models.get(record.modelId);
        let owner = model.owner.get();
        if owner.is_zero() {
            return Some(Rejection::UnknownModel);
        }
        if !model.active.get() {
            return Some(Rejection::ModelInactive);
        }
        if owner == operator {
            return Some(Rejection::OperatorOwnsModel);
        }
        let now = self.now();
        // u64 arithmetic: a 256-bit division would add kilobytes to the WASM.
        let today = self.vm().block_timestamp() / DAY;
        if record.day != today && record.day.checked_add(1) != Some(today) {
            return Some(Rejection::StaleDay);
        }
        let calls = U256::from(record.calls);
        let changed_at = model.price_changed_at.get();
        let priced = record.calls != 0
            && (is_product(model.price_per_call.get(), calls, record.credits)
                || (!changed_at.is_zero()
                    && now < changed_at.saturating_add(U256::from(PRICE_WINDOW))
                    && is_product(model.previous_price.get(), calls, record.credits)));
        if !priced {
            return Some(Rejection::PriceMismatch);
        }
        let user = self.accounts.get(record.user);
        if user.credits.get() < record.credits {
            return Some(Rejection::InsufficientCredits);
        }
        // Over the cap in force now, counting what settled under the record's day label; a
        // sum past 2^256 is over any cap (with no cap, the cap is `U256::MAX`).
        match user.spent_on(record.day).checked_add(record.credits) {
            Some(s) if s <= user.cap_in_force(now) => {}
            _ => return Some(Rejection::OverDailyCap),
        }
        let earnings = self.accounts.get(owner).earnings.get();
        if earnings.checked_add(record.credits).is_none()
            || total.checked_add(record.credits).is_none()
        {
            return Some(Rejection::Overflow);
        }
        None
    }

    /// Pays `amount` wei to `to`.
    fn pay(&mut self, to: Address, amount: U256) -> Result<()> {
        transfer_eth(self.vm(), to, amount)
            .map_err(|_| MarketplaceError::TransferFailed(TransferFailed { to, amount }))
    }
}

#[public]
impl Marketplace {
    /// Sets the admin (non-zero), the price of one credit in wei (at least
    /// `MIN_WEI_PER_CREDIT` and at most `type(uint128).max`, else `InvalidRate`) and, unless zero, a first operator (enabled at
    /// once: the deployer chose it). `msg.sender` is the deployer proxy under Stylus, so the
    /// admin is passed explicitly.
    #[constructor]
    pub fn constructor(
        &mut self,
        admin: Address,
        wei_per_credit: U256,
        operator: Address,
    ) -> Result<()> {
        if admin.is_zero() {
            return Err(MarketplaceError::ZeroAddress(ZeroAddress {}));
        }
        if wei_per_credit < U256::from(MIN_WEI_PER_CREDIT) || wei_per_credit > U256::from(u128::MAX)
        {
            return Err(MarketplaceError::InvalidRate(InvalidRate {}));
        }
        self.admin.set(admin);
        self.wei_per_credit.set(wei_per_credit);
        self.vm().log(AdminChanged {
            previousAdmin: Address::ZERO,
            newAdmin: admin,
        });
        if !operator.is_zero() {
            self.operators.setter(operator).set(true);
            self.vm().log(OperatorSet {
                operator,
                enabled: true,
            });
        }
        Ok(())
    }

    /// The key of the model `local_id` of `owner`: `keccak256(abi.encode(owner, localId))`.
    pub fn model_key(&self, owner: Address, local_id: FixedBytes<32>) -> Result<FixedBytes<32>> {
        let mut buf = [0u8; 64];
        buf[..32].copy_from_slice(&address_word(owner));
        buf[32..].copy_from_slice(local_id.as_slice());
        Ok(self.keccak(&buf))
    }

    /// Registers the caller's model `local_id` under the key `modelKey(caller, localId)`, which
    /// it returns; the caller is its owner. A key is registered once.
    pub fn register_model(
        &mut self,
        local_id: FixedBytes<32>,
        cid_hash: FixedBytes<32>,
        commitment: FixedBytes<32>,
        price_per_call: U256,
    ) -> Result<FixedBytes<32>> {
        let caller = self.vm().msg_sender();
        let key = self.model_key(caller, local_id)?;
        let mut model = self.models.setter(key);
        if !model.owner.get().is_zero() {
            return Err(MarketplaceError::ModelAlreadyRegistered(
                ModelAlreadyRegistered { modelId: key },
            ));
        }
        model.owner.set(caller);
        model.cid_hash.set(cid_hash);
        model.commitment.set(commitment);
        model.price_per_call.set(price_per_call);
        model.active.set(true);
        self.vm().log(ModelRegistered {
            modelId: key,
            owner: caller,
            localId: local_id,
            cidHash: cid_hash,
            commitment,
            pricePerCall: price_per_call,
        });
        Ok(key)
    }

    /// Changes the price (in credits per call) of an active model; its owner only, at most
    /// once per `PRICE_WINDOW` (`TooEarly`). The previous price stays accepted for usage
    /// settled within the window.
    pub fn update_price(&mut self, model_id: FixedBytes<32>, new_price: U256) -> Result<()> {
        self.owned_active_model(model_id)?;
        let now = self.now();
        let changed_at = self.models.get(model_id).price_changed_at.get();
        if !changed_at.is_zero() {
            let not_before = changed_at.saturating_add(U256::from(PRICE_WINDOW));
            if now < not_before {
                return Err(too_early(not_before));
            }
        }
        let mut model = self.models.setter(model_id);
        let old_price = model.price_per_call.get();
        model.previous_price.set(old_price);
        model.price_per_call.set(new_price);
        model.price_changed_at.set(now);
        self.vm().log(PriceUpdated {
            modelId: model_id,
            oldPrice: old_price,
            newPrice: new_price,
        });
        Ok(())
    }

    /// Deactivates a model for good: no more price changes, no more usage settled; its owner only.
    pub fn deactivate(&mut self, model_id: FixedBytes<32>) -> Result<()> {
        let owner = self.owned_active_model(model_id)?;
        self.models.setter(model_id).active.set(false);
        self.vm().log(ModelDeactivated {
            modelId: model_id,
            owner,
        });
        Ok(())
    }

    /// A model: (owner, cidHash, commitment, pricePerCall, active); `UnknownModel` if unregistered.
    pub fn get_model(
        &self,
        model_id: FixedBytes<32>,
    ) -> Result<(Address, FixedBytes<32>, FixedBytes<32>, U256, bool)> {
        let owner = self.registered_owner(model_id)?;
        let model = self.models.get(model_id);
        Ok((
            owner,
            model.cid_hash.get(),
            model.commitment.get(),
            model.price_per_call.get(),
            model.active.get(),
        ))
    }

    /// A model's prices: (pricePerCall, previousPrice, priceChangedAt); `UnknownModel` if
    /// unregistered. `priceChangedAt` is 0 before the first change.
    pub fn get_prices(&self, model_id: FixedBytes<32>) -> Result<(U256, U256, U256)> {
        self.registered_owner(model_id)?;
        let model = self.models.get(model_id);
        Ok((
            model.price_per_call.get(),
            model.previous_price.get(),
            model.price_changed_at.get(),
        ))
    }

    /// Buys credits at `weiPerCredit`: the value must be a non-zero multiple of it. Returns the
    /// credits bought. Refused while paused.
    #[payable]
    pub fn buy_credits(&mut self) -> Result<U256> {
        if self.paused.get() {
            return Err(MarketplaceError::ContractPaused(ContractPaused {}));
        }
        let value = self.vm().msg_value();
        // In u128 (a 256-bit division would add kilobytes to the WASM): no payment can exceed
        // it (all the ether in existence is about 2^87 wei); one that does is refused, as in
        // the twin.
        let bought = match (
            u128::try_from(value),
            u128::try_from(self.wei_per_credit.get()),
        ) {
            (Ok(value), Ok(rate)) if value != 0 && value % rate == 0 => U256::from(value / rate),
            _ => return Err(MarketplaceError::InvalidPayment(InvalidPayment { value })),
        };
        let buyer = self.vm().msg_sender();
        let balance = self
            .accounts
            .get(buyer)
            .credits
            .get()
            .checked_add(bought)
            .ok_or_else(overflow)?;
        self.accounts.setter(buyer).credits.set(balance);
        self.vm().log(CreditsBought {
            buyer,
            amountWei: value,
            credits: bought,
        });
        Ok(bought)
    }

    /// The credits `user` holds.
    pub fn credits_of(&self, user: Address) -> Result<U256> {
        Ok(self.accounts.get(user).credits.get())
    }

    /// The unpaid earnings (in credits) of a model owner.
    pub fn earnings_of(&self, owner: Address) -> Result<U256> {
        Ok(self.accounts.get(owner).earnings.get())
    }

    /// The cap in force now: the most credits operators may settle from `user` under one day
    /// label (`type(uint256).max` when the user set no cap, or none has taken effect yet).
    pub fn daily_cap_of(&self, user: Address) -> Result<U256> {
        Ok(self.accounts.get(user).cap_in_force(self.now()))
    }

    /// A lowered cap of `user` not in force yet: (cap, effectiveAt); (0, 0) when there is none
    /// or it has taken effect.
    pub fn pending_daily_cap_of(&self, user: Address) -> Result<(U256, U256)> {
        let account = self.accounts.get(user);
        let at = account.pending_cap_at.get();
        Ok(if at.is_zero() || self.now() >= at {
            (U256::ZERO, U256::ZERO)
        } else {
            (account.pending_cap.get(), at)
        })
    }

    /// The credits settled from `user` under the day label `day` (0 when no slot holds that
    /// day: only the two latest labels are kept).
    pub fn spent_of(&self, user: Address, day: u64) -> Result<U256> {
        Ok(self.accounts.get(user).spent_on(day))
    }

    /// A user's refund request: (credits, notBefore); (0, 0) when none.
    pub fn refund_of(&self, user: Address) -> Result<(U256, U256)> {
        let account = self.accounts.get(user);
        Ok((
            account.refund_credits.get(),
            account.refund_not_before.get(),
        ))
    }

    /// The price of one credit in wei.
    pub fn wei_per_credit(&self) -> Result<U256> {
        Ok(self.wei_per_credit.get())
    }

    /// The admin account.
    pub fn admin(&self) -> Result<Address> {
        Ok(self.admin.get())
    }

    /// The proposed next admin and when it may accept: (address, notBefore); zeros when none.
    pub fn pending_admin(&self) -> Result<(Address, U256)> {
        Ok((
            self.pending_admin.get(),
            self.pending_admin_not_before.get(),
        ))
    }

    /// Whether `account` may settle batches.
    pub fn is_operator(&self, account: Address) -> Result<bool> {
        Ok(self.operators.get(account))
    }

    /// When a named operator may accept the role (0 when not named).
    pub fn operator_not_before(&self, account: Address) -> Result<U256> {
        Ok(self.operator_not_before.get(account))
    }

    /// Whether settlement and purchases are paused.
    pub fn paused(&self) -> Result<bool> {
        Ok(self.paused.get())
    }

    /// The hash of the records of the batch `batch_id` that `operator` settled (zero when it
    /// did not): `h = keccak256(abi.encode(h, user, modelId, calls, credits, day,
    /// receiptBatchHash))` over the records in order, from zero.
    pub fn batch_records_hash(
        &self,
        operator: Address,
        batch_id: FixedBytes<32>,
    ) -> Result<FixedBytes<32>> {
        Ok(self.settled_batches.get(self.batch_key(operator, batch_id)))
    }

    /// Settles a batch of usage. Operators only, not while paused; a batch id settles once per
    /// operator; an empty batch is refused. Each record moves its `credits` from the user to
    /// the model owner's earnings, or is skipped with `UsageRejected(reason)` (see
    /// [`Rejection`]): a bad record never blocks the others.
    pub fn consume_credits(
        &mut self,
        batch_id: FixedBytes<32>,
        records: Vec<UsageRecord>,
    ) -> Result<()> {
        let operator = self.vm().msg_sender();
        if !self.operators.get(operator) {
            return Err(unauthorized(operator));
        }
        if self.paused.get() {
            return Err(MarketplaceError::ContractPaused(ContractPaused {}));
        }
        let key = self.batch_key(operator, batch_id);
        if !self.settled_batches.get(key).is_zero() {
            return Err(MarketplaceError::BatchAlreadySettled(BatchAlreadySettled {
                batchId: batch_id,
            }));
        }
        if records.is_empty() {
            return Err(MarketplaceError::EmptyBatch(EmptyBatch {}));
        }

        // Nothing below fails: every record either settles or is skipped.
        let mut total = U256::ZERO;
        let mut settled = 0u64;
        let mut hash = FixedBytes::<32>::ZERO;
        for record in &records {
            hash = self.chain_hash(hash, record);
            if let Some(reason) = self.rejection(operator, record, total) {
                self.vm().log(UsageRejected {
                    batchId: batch_id,
                    user: record.user,
                    modelId: record.modelId,
                    calls: record.calls,
                    credits: record.credits,
                    receiptBatchHash: record.receiptBatchHash,
                    reason: reason as u8,
                });
                continue;
            }
            {
                let mut user = self.accounts.setter(record.user);
                let credits = user.credits.get();
                user.credits.set(credits - record.credits);
                // Counted whether or not a cap is set, so a cap taking effect mid-day counts
                // the day's earlier usage.
                let spent = user.spent_on(record.day);
                user.set_spent(record.day, spent + record.credits);
            }
            let owner = self.models.get(record.modelId).owner.get();
            let mut owner = self.accounts.setter(owner);
            let earned = owner.earnings.get();
            owner.earnings.set(earned + record.credits);
            total += record.credits;
            settled += 1;
            self.vm().log(UsageSettled {
                batchId: batch_id,
                user: record.user,
                modelId: record.modelId,
                calls: record.calls,
                credits: record.credits,
                receiptBatchHash: record.receiptBatchHash,
            });
        }
        self.settled_batches.setter(key).set(hash);
        self.vm().log(BatchSettled {
            batchId: batch_id,
            operator,
            settled: U256::from(settled),
            rejected: U256::from(records.len() as u64 - settled),
            totalCredits: total,
            recordsHash: hash,
        });
        Ok(())
    }

    /// Pays the caller's earnings, `earnings * weiPerCredit` wei, and returns that amount.
    /// Checks-effects-interactions: the earnings are zeroed before the transfer.
    pub fn withdraw(&mut self) -> Result<U256> {
        let owner = self.vm().msg_sender();
        let earned = self.accounts.get(owner).earnings.get();
        if earned.is_zero() {
            return Err(MarketplaceError::NothingToWithdraw(NothingToWithdraw {
                owner,
            }));
        }
        let amount = earned
            .checked_mul(self.wei_per_credit.get())
            .ok_or_else(overflow)?;
        self.accounts.setter(owner).earnings.set(U256::ZERO);
        if let Err(e) = self.pay(owner, amount) {
            // The revert undoes this on chain; restoring keeps native tests faithful.
            self.accounts.setter(owner).earnings.set(earned);
            return Err(e);
        }
        self.vm().log(Withdrawn {
            owner,
            credits: earned,
            amountWei: amount,
        });
        Ok(amount)
    }

    /// Sets the most credits operators may settle from the caller under one day label; without
    /// a call there is no cap. A cap at least the one in force takes effect at once (and drops
    /// a pending one); a lower one (a first cap included) becomes the pending cap, in force
    /// from `now + CAP_DELAY` (replacing an earlier pending one), so usage charged under the
    /// old cap still settles. Logs `DailyCapSet(user, cap, effectiveAt)`.
    pub fn set_daily_cap(&mut self, cap: U256) -> Result<()> {
        let user = self.vm().msg_sender();
        let now = self.now();
        let (current, matured, matured_cap) = {
            let account = self.accounts.get(user);
            let pending_at = account.pending_cap_at.get();
            (
                account.cap_in_force(now),
                !pending_at.is_zero() && now >= pending_at,
                account.pending_cap.get(),
            )
        };
        let effective_at = if cap >= current {
            now
        } else {
            now.checked_add(U256::from(CAP_DELAY))
                .ok_or_else(overflow)?
        };
        let mut account = self.accounts.setter(user);
        if cap >= current {
            account.cap_set.set(true);
            account.daily_cap.set(cap);
            account.pending_cap.set(U256::ZERO);
            account.pending_cap_at.set(U256::ZERO);
        } else {
            if matured {
                // The pending cap in force becomes the set one before it is replaced.
                account.cap_set.set(true);
                account.daily_cap.set(matured_cap);
            }
            account.pending_cap.set(cap);
            account.pending_cap_at.set(effective_at);
        }
        self.vm().log(DailyCapSet {
            user,
            cap,
            effectiveAt: effective_at,
        });
        Ok(())
    }

    /// Asks to turn `credits` of the caller's credits back into wei; claimable with
    /// `claimRefund` after `REFUND_DELAY`, which leaves the operators time to settle usage made
    /// before. A new request replaces the previous one (and restarts the lock).
    pub fn request_refund(&mut self, credits: U256) -> Result<()> {
        let user = self.vm().msg_sender();
        if credits.is_zero() {
            return Err(MarketplaceError::NothingToRefund(NothingToRefund { user }));
        }
        let available = self.accounts.get(user).credits.get();
        if credits > available {
            return Err(MarketplaceError::InsufficientCredits(InsufficientCredits {
                user,
                needed: credits,
                available,
            }));
        }
        let not_before = self
            .now()
            .checked_add(U256::from(REFUND_DELAY))
            .ok_or_else(overflow)?;
        let mut account = self.accounts.setter(user);
        account.refund_credits.set(credits);
        account.refund_not_before.set(not_before);
        self.vm().log(RefundRequested {
            user,
            credits,
            notBefore: not_before,
        });
        Ok(())
    }

    /// Pays the requested refund, at most the credits the caller still holds, once its lock
    /// has passed; returns the wei paid.
    pub fn claim_refund(&mut self) -> Result<U256> {
        let user = self.vm().msg_sender();
        let account = self.accounts.get(user);
        let requested = account.refund_credits.get();
        let not_before = account.refund_not_before.get();
        let available = account.credits.get();
        if requested.is_zero() {
            return Err(MarketplaceError::NothingToRefund(NothingToRefund { user }));
        }
        if self.now() < not_before {
            return Err(too_early(not_before));
        }
        let credits = requested.min(available);
        if credits.is_zero() {
            return Err(MarketplaceError::NothingToRefund(NothingToRefund { user }));
        }
        let amount = credits
            .checked_mul(self.wei_per_credit.get())
            .ok_or_else(overflow)?;
        {
            let mut account = self.accounts.setter(user);
            account.credits.set(available - credits);
            account.refund_credits.set(U256::ZERO);
            account.refund_not_before.set(U256::ZERO);
        }
        if let Err(e) = self.pay(user, amount) {
            // The revert undoes this on chain; restoring keeps native tests faithful.
            let mut account = self.accounts.setter(user);
            account.credits.set(available);
            account.refund_credits.set(requested);
            account.refund_not_before.set(not_before);
            return Err(e);
        }
        self.vm().log(Refunded {
            user,
            credits,
            amountWei: amount,
        });
        Ok(amount)
    }

    /// Names `operator` (it may accept after `OPERATOR_DELAY` with `acceptOperator`), or, with
    /// `enabled == false`, revokes it (and any pending nomination) at once; admin only.
    pub fn set_operator(&mut self, operator: Address, enabled: bool) -> Result<()> {
        self.only_admin()?;
        if operator.is_zero() {
            return Err(MarketplaceError::ZeroAddress(ZeroAddress {}));
        }
        if enabled {
            let not_before = self
                .now()
                .checked_add(U256::from(OPERATOR_DELAY))
                .ok_or_else(overflow)?;
            self.operator_not_before.setter(operator).set(not_before);
            self.vm().log(OperatorProposed {
                operator,
                notBefore: not_before,
            });
        } else {
            self.operators.setter(operator).set(false);
            self.operator_not_before.setter(operator).set(U256::ZERO);
            self.vm().log(OperatorSet {
                operator,
                enabled: false,
            });
        }
        Ok(())
    }

    /// A named operator takes the role once its delay has passed.
    pub fn accept_operator(&mut self) -> Result<()> {
        let caller = self.vm().msg_sender();
        let not_before = self.operator_not_before.get(caller);
        if not_before.is_zero() {
            return Err(unauthorized(caller));
        }
        if self.now() < not_before {
            return Err(too_early(not_before));
        }
        self.operator_not_before.setter(caller).set(U256::ZERO);
        self.operators.setter(caller).set(true);
        self.vm().log(OperatorSet {
            operator: caller,
            enabled: true,
        });
        Ok(())
    }

    /// Proposes `new_admin` as the next admin, who may accept after `ADMIN_DELAY`; admin only.
    /// A new proposal replaces the previous one.
    pub fn propose_admin(&mut self, new_admin: Address) -> Result<()> {
        self.only_admin()?;
        if new_admin.is_zero() {
            return Err(MarketplaceError::ZeroAddress(ZeroAddress {}));
        }
        let not_before = self
            .now()
            .checked_add(U256::from(ADMIN_DELAY))
            .ok_or_else(overflow)?;
        self.pending_admin.set(new_admin);
        self.pending_admin_not_before.set(not_before);
        self.vm().log(AdminProposed {
            newAdmin: new_admin,
            notBefore: not_before,
        });
        Ok(())
    }

    /// The proposed admin takes the role once the delay has passed.
    pub fn accept_admin(&mut self) -> Result<()> {
        let caller = self.vm().msg_sender();
        let pending = self.pending_admin.get();
        if pending.is_zero() || caller != pending {
            return Err(unauthorized(caller));
        }
        let not_before = self.pending_admin_not_before.get();
        if self.now() < not_before {
            return Err(too_early(not_before));
        }
        let previous = self.admin.get();
        self.admin.set(caller);
        self.pending_admin.set(Address::ZERO);
        self.pending_admin_not_before.set(U256::ZERO);
        self.vm().log(AdminChanged {
            previousAdmin: previous,
            newAdmin: caller,
        });
        Ok(())
    }

    /// Pauses (or resumes) settlement and purchases; admin only. Withdrawals and refunds are
    /// never paused.
    pub fn set_paused(&mut self, paused: bool) -> Result<()> {
        self.only_admin()?;
        self.paused.set(paused);
        self.vm().log(PauseSet { paused });
        Ok(())
    }
}

#[cfg(test)]
mod tests;
