//! The Model Hub Marketplace contract for Arbitrum Stylus: model ownership and prices, prepaid
//! credits, batched settlement of usage by operators, and creators' earnings.
//!
//! Units: prices, credits and earnings are counted in credits; one credit costs `weiPerCredit` wei,
//! fixed at deploy. `buyCredits` takes exact multiples of that rate, and `withdraw` pays earnings
//! back at the same rate, so the contract always holds `(credits + earnings) * weiPerCredit` wei.
//!
//! The ABI (functions, events, errors) is mirrored exactly by `solidity/Marketplace.sol`, and
//! `scripts/contracts abi-check` proves it; `tests/twin.rs` runs both on the same calls and
//! compares the bytes they return, revert with and log. Every failing call leaves storage and logs untouched
//! even without a revert (settlement validates the whole batch before writing anything), so the
//! TestVM tests see the same state a chain would after a revert. One difference no test here
//! covers: Stylus refuses reentrant calls by default, the twin allows them (withdraw is
//! checks-effects-interactions on both).

#![cfg_attr(not(any(test, feature = "export-abi")), no_main)]

extern crate alloc;

use alloc::{vec, vec::Vec};

use alloy_primitives::{Address, FixedBytes, U256};
use alloy_sol_types::sol;
use stylus_sdk::{
    call::transfer::transfer_eth,
    prelude::*,
    storage::{StorageAddress, StorageBool, StorageFixedBytes, StorageMap, StorageU256},
};

sol! {
    #![sol(all_derives)]

    /// One line of a settlement batch: `calls` calls by `user` to `modelId`, covered by the
    /// off-chain receipt batch whose hash is `receiptBatchHash`.
    #[derive(AbiType)]
    struct UsageRecord {
        address user;
        bytes32 modelId;
        uint64 calls;
        bytes32 receiptBatchHash;
    }

    // Events: keep in step with abi/MarketplaceEvents.sol (a test checks it).
    event ModelRegistered(bytes32 indexed modelId, address indexed owner, bytes32 cidHash, bytes32 commitment, uint256 pricePerCall);
    event PriceUpdated(bytes32 indexed modelId, uint256 oldPrice, uint256 newPrice);
    event ModelDeactivated(bytes32 indexed modelId, address indexed owner);
    event CreditsBought(address indexed buyer, uint256 amountWei, uint256 credits);
    event UsageSettled(bytes32 indexed batchId, address indexed user, bytes32 indexed modelId, uint64 calls, uint256 credits, bytes32 receiptBatchHash);
    event BatchSettled(bytes32 indexed batchId, address indexed operator, uint256 records, uint256 totalCredits);
    event Withdrawn(address indexed owner, uint256 credits, uint256 amountWei);
    event OperatorSet(address indexed operator, bool enabled);
    event AdminChanged(address indexed previousAdmin, address indexed newAdmin);

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
}

/// Every way a Marketplace call can revert; each is a Solidity custom error.
#[derive(SolidityError, Debug, Clone, PartialEq)]
pub enum MarketplaceError {
    /// The caller lacks the role (admin, operator, model owner) the call needs.
    Unauthorized(Unauthorized),
    /// The zero address was given where an account is needed.
    ZeroAddress(ZeroAddress),
    /// The deploy-time rate `weiPerCredit` was zero.
    InvalidRate(InvalidRate),
    /// A model with this id is already registered.
    ModelAlreadyRegistered(ModelAlreadyRegistered),
    /// No model with this id is registered.
    UnknownModel(UnknownModel),
    /// The model was deactivated by its owner.
    ModelInactive(ModelInactive),
    /// `buyCredits` got zero wei or an amount that is not a multiple of `weiPerCredit`.
    InvalidPayment(InvalidPayment),
    /// A settlement batch without records.
    EmptyBatch(EmptyBatch),
    /// This batch id was settled before.
    BatchAlreadySettled(BatchAlreadySettled),
    /// A user in the batch has fewer credits than their usage costs.
    InsufficientCredits(InsufficientCredits),
    /// The caller has no earnings.
    NothingToWithdraw(NothingToWithdraw),
    /// Paying out earnings failed.
    TransferFailed(TransferFailed),
    /// A sum or product does not fit in 256 bits.
    ArithmeticOverflow(ArithmeticOverflow),
}

/// Result of every public method.
pub type Result<T, E = MarketplaceError> = core::result::Result<T, E>;

fn overflow() -> MarketplaceError {
    MarketplaceError::ArithmeticOverflow(ArithmeticOverflow {})
}

fn unauthorized(caller: Address) -> MarketplaceError {
    MarketplaceError::Unauthorized(Unauthorized { caller })
}

/// A registered model. Registered iff `owner` is not zero.
#[storage]
pub struct Model {
    owner: StorageAddress,
    cid_hash: StorageFixedBytes<32>,
    commitment: StorageFixedBytes<32>,
    price_per_call: StorageU256,
    active: StorageBool,
}

/// The contract's storage.
#[storage]
#[entrypoint]
pub struct Marketplace {
    admin: StorageAddress,
    wei_per_credit: StorageU256,
    operators: StorageMap<Address, StorageBool>,
    models: StorageMap<FixedBytes<32>, Model>,
    credits: StorageMap<Address, StorageU256>,
    earnings: StorageMap<Address, StorageU256>,
    settled_batches: StorageMap<FixedBytes<32>, StorageBool>,
}

/// Sets `key`'s running value in a small association list (batches are short).
fn upsert(list: &mut Vec<(Address, U256)>, key: Address, value: U256) {
    match list.iter_mut().find(|(k, _)| *k == key) {
        Some(entry) => entry.1 = value,
        None => list.push((key, value)),
    }
}

fn lookup(list: &[(Address, U256)], key: Address) -> Option<U256> {
    list.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

impl Marketplace {
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
}

#[public]
impl Marketplace {
    /// Sets the admin and the price of one credit in wei (both fixed checks: non-zero).
    /// `msg.sender` is the deployer proxy under Stylus, so the admin is passed explicitly.
    #[constructor]
    pub fn constructor(&mut self, admin: Address, wei_per_credit: U256) -> Result<()> {
        if admin.is_zero() {
            return Err(MarketplaceError::ZeroAddress(ZeroAddress {}));
        }
        if wei_per_credit.is_zero() {
            return Err(MarketplaceError::InvalidRate(InvalidRate {}));
        }
        self.admin.set(admin);
        self.wei_per_credit.set(wei_per_credit);
        self.vm().log(AdminChanged {
            previousAdmin: Address::ZERO,
            newAdmin: admin,
        });
        Ok(())
    }

    /// Registers a model; the caller becomes its owner. An id can be registered once.
    pub fn register_model(
        &mut self,
        model_id: FixedBytes<32>,
        cid_hash: FixedBytes<32>,
        commitment: FixedBytes<32>,
        price_per_call: U256,
    ) -> Result<()> {
        let caller = self.vm().msg_sender();
        let mut model = self.models.setter(model_id);
        if !model.owner.get().is_zero() {
            return Err(MarketplaceError::ModelAlreadyRegistered(
                ModelAlreadyRegistered { modelId: model_id },
            ));
        }
        model.owner.set(caller);
        model.cid_hash.set(cid_hash);
        model.commitment.set(commitment);
        model.price_per_call.set(price_per_call);
        model.active.set(true);
        self.vm().log(ModelRegistered {
            modelId: model_id,
            owner: caller,
            cidHash: cid_hash,
            commitment,
            pricePerCall: price_per_call,
        });
        Ok(())
    }

    /// Changes the price (in credits per call) of an active model; its owner only.
    pub fn update_price(&mut self, model_id: FixedBytes<32>, new_price: U256) -> Result<()> {
        self.owned_active_model(model_id)?;
        let mut model = self.models.setter(model_id);
        let old_price = model.price_per_call.get();
        model.price_per_call.set(new_price);
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

    /// Buys `msg.value / weiPerCredit` credits for the caller; the value must be a non-zero
    /// multiple of `weiPerCredit`. Returns the credits bought.
    #[payable]
    pub fn buy_credits(&mut self) -> Result<U256> {
        let value = self.vm().msg_value();
        let rate = self.wei_per_credit.get();
        if value.is_zero() || !(value % rate).is_zero() {
            return Err(MarketplaceError::InvalidPayment(InvalidPayment { value }));
        }
        let bought = value / rate;
        let buyer = self.vm().msg_sender();
        let balance = self
            .credits
            .get(buyer)
            .checked_add(bought)
            .ok_or_else(overflow)?;
        self.credits.setter(buyer).set(balance);
        self.vm().log(CreditsBought {
            buyer,
            amountWei: value,
            credits: bought,
        });
        Ok(bought)
    }

    /// The credits `user` holds.
    pub fn credits_of(&self, user: Address) -> Result<U256> {
        Ok(self.credits.get(user))
    }

    /// The unpaid earnings (in credits) of a model owner.
    pub fn earnings_of(&self, owner: Address) -> Result<U256> {
        Ok(self.earnings.get(owner))
    }

    /// The price of one credit in wei.
    pub fn wei_per_credit(&self) -> Result<U256> {
        Ok(self.wei_per_credit.get())
    }

    /// The admin account.
    pub fn admin(&self) -> Result<Address> {
        Ok(self.admin.get())
    }

    /// Whether `account` may settle batches.
    pub fn is_operator(&self, account: Address) -> Result<bool> {
        Ok(self.operators.get(account))
    }

    /// Whether the batch id has been settled.
    pub fn is_batch_settled(&self, batch_id: FixedBytes<32>) -> Result<bool> {
        Ok(self.settled_batches.get(batch_id))
    }

    /// Settles a batch of usage: debits each user `pricePerCall * calls` credits of the model's
    /// current price and credits the model owner's earnings. Operators only; a batch id settles
    /// once; the whole batch reverts on the first bad record (unknown or inactive model, overflow,
    /// a user without enough credits, counting their earlier records in the batch).
    pub fn consume_credits(
        &mut self,
        batch_id: FixedBytes<32>,
        records: Vec<UsageRecord>,
    ) -> Result<()> {
        let operator = self.vm().msg_sender();
        if !self.operators.get(operator) {
            return Err(unauthorized(operator));
        }
        if self.settled_batches.get(batch_id) {
            return Err(MarketplaceError::BatchAlreadySettled(BatchAlreadySettled {
                batchId: batch_id,
            }));
        }
        if records.is_empty() {
            return Err(MarketplaceError::EmptyBatch(EmptyBatch {}));
        }

        // Validate everything first, tracking running balances, then write.
        let mut balances: Vec<(Address, U256)> = Vec::new();
        let mut earnings: Vec<(Address, U256)> = Vec::new();
        let mut costs: Vec<U256> = Vec::with_capacity(records.len());
        let mut total = U256::ZERO;
        for record in &records {
            let owner = self.registered_owner(record.modelId)?;
            let model = self.models.get(record.modelId);
            if !model.active.get() {
                return Err(MarketplaceError::ModelInactive(ModelInactive {
                    modelId: record.modelId,
                }));
            }
            let cost = model
                .price_per_call
                .get()
                .checked_mul(U256::from(record.calls))
                .ok_or_else(overflow)?;
            let available =
                lookup(&balances, record.user).unwrap_or_else(|| self.credits.get(record.user));
            if available < cost {
                return Err(MarketplaceError::InsufficientCredits(InsufficientCredits {
                    user: record.user,
                    needed: cost,
                    available,
                }));
            }
            upsert(&mut balances, record.user, available - cost);
            let earned = lookup(&earnings, owner)
                .unwrap_or_else(|| self.earnings.get(owner))
                .checked_add(cost)
                .ok_or_else(overflow)?;
            upsert(&mut earnings, owner, earned);
            total = total.checked_add(cost).ok_or_else(overflow)?;
            costs.push(cost);
        }

        for (user, balance) in balances {
            self.credits.setter(user).set(balance);
        }
        for (owner, earned) in earnings {
            self.earnings.setter(owner).set(earned);
        }
        self.settled_batches.setter(batch_id).set(true);
        for (record, cost) in records.iter().zip(costs) {
            self.vm().log(UsageSettled {
                batchId: batch_id,
                user: record.user,
                modelId: record.modelId,
                calls: record.calls,
                credits: cost,
                receiptBatchHash: record.receiptBatchHash,
            });
        }
        self.vm().log(BatchSettled {
            batchId: batch_id,
            operator,
            records: U256::from(records.len()),
            totalCredits: total,
        });
        Ok(())
    }

    /// Pays the caller's earnings, `earnings * weiPerCredit` wei, and returns that amount.
    /// Checks-effects-interactions: the earnings are zeroed before the transfer.
    pub fn withdraw(&mut self) -> Result<U256> {
        let owner = self.vm().msg_sender();
        let earned = self.earnings.get(owner);
        if earned.is_zero() {
            return Err(MarketplaceError::NothingToWithdraw(NothingToWithdraw {
                owner,
            }));
        }
        let amount = earned
            .checked_mul(self.wei_per_credit.get())
            .ok_or_else(overflow)?;
        self.earnings.setter(owner).set(U256::ZERO);
        if transfer_eth(self.vm(), owner, amount).is_err() {
            // The revert undoes this on chain; restoring keeps native tests faithful.
            self.earnings.setter(owner).set(earned);
            return Err(MarketplaceError::TransferFailed(TransferFailed {
                to: owner,
                amount,
            }));
        }
        self.vm().log(Withdrawn {
            owner,
            credits: earned,
            amountWei: amount,
        });
        Ok(amount)
    }

    /// Grants or revokes the operator role; admin only.
    pub fn set_operator(&mut self, operator: Address, enabled: bool) -> Result<()> {
        self.only_admin()?;
        if operator.is_zero() {
            return Err(MarketplaceError::ZeroAddress(ZeroAddress {}));
        }
        self.operators.setter(operator).set(enabled);
        self.vm().log(OperatorSet { operator, enabled });
        Ok(())
    }

    /// Hands the admin role to `new_admin`; admin only.
    pub fn set_admin(&mut self, new_admin: Address) -> Result<()> {
        let previous = self.only_admin()?;
        if new_admin.is_zero() {
            return Err(MarketplaceError::ZeroAddress(ZeroAddress {}));
        }
        self.admin.set(new_admin);
        self.vm().log(AdminChanged {
            previousAdmin: previous,
            newAdmin: new_admin,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests;
