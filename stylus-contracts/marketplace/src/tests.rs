//! TestVM tests: every function, access rule and error of the Marketplace; settlement that
//! debits exactly what was charged off chain, record by record, and skips bad records without
//! blocking the others; bounded operators (own models, daily caps counted per day label and
//! lowered only after a delay, delayed two-step roles, pause); day labels; model keys bound to
//! their owner; refunds after their lock; atomicity of failed calls; and the hand-kept event
//! list.

use alloc::vec;
use core::cell::Cell;

use alloy_primitives::{address, keccak256, B256};
use alloy_sol_types::{SolError, SolEvent, SolValue};
use stylus_sdk::testing::TestVM;

use super::*;

const DEPLOYER: Address = address!("00000000000000000000000000000000000000d0");
const ADMIN: Address = address!("00000000000000000000000000000000000000a1");
const ADMIN2: Address = address!("00000000000000000000000000000000000000a2");
const OPERATOR: Address = address!("00000000000000000000000000000000000000b1");
const OPERATOR2: Address = address!("00000000000000000000000000000000000000b2");
const CREATOR: Address = address!("00000000000000000000000000000000000000c1");
const CREATOR2: Address = address!("00000000000000000000000000000000000000c2");
const ALICE: Address = address!("0000000000000000000000000000000000000a11");
const BOB: Address = address!("0000000000000000000000000000000000000b0b");
const STRANGER: Address = address!("0000000000000000000000000000000000000bad");

/// Price of a credit in the default deployment: the least the constructor accepts.
const RATE: u64 = MIN_WEI_PER_CREDIT;
/// The block time the tests start at (22:13 UTC).
const T0: u64 = 1_700_000_000;

std::thread_local! {
    /// The UTC day of the block time the test's `Env` is at (each test runs on its own
    /// thread): the day label [`rec`] gives its records.
    static TODAY: Cell<u64> = const { Cell::new(T0 / DAY) };
}

/// The UTC day of the block time the current test's `Env` is at.
fn today() -> u64 {
    TODAY.with(Cell::get)
}

fn id(n: u8) -> FixedBytes<32> {
    FixedBytes::repeat_byte(n)
}

fn u(n: u64) -> U256 {
    U256::from(n)
}

/// `keccak256(abi.encode(owner, localId))`, computed here independently of the contract.
fn key_of(owner: Address, n: u8) -> FixedBytes<32> {
    keccak256((owner, id(n)).abi_encode())
}

struct Env {
    vm: TestVM,
    c: Marketplace,
}

impl Env {
    /// Deployed with `RATE` and OPERATOR as first operator, at `T0`, logs cleared.
    fn new() -> Env {
        let env = Env::deployed(u(RATE), OPERATOR);
        env.vm.clear_mocks();
        env
    }

    fn deployed(rate: U256, operator: Address) -> Env {
        let vm = TestVM::default();
        vm.set_block_timestamp(T0);
        TODAY.with(|d| d.set(T0 / DAY));
        let mut c = Marketplace::from(&vm);
        vm.set_sender(DEPLOYER);
        c.constructor(ADMIN, rate, operator).unwrap();
        Env { vm, c }
    }

    /// The next call comes from `who` with no value.
    fn as_(&mut self, who: Address) -> &mut Self {
        self.vm.set_sender(who);
        self.vm.set_value(U256::ZERO);
        self
    }

    fn pay(&mut self, who: Address, wei: U256) -> &mut Self {
        self.vm.set_sender(who);
        self.vm.set_value(wei);
        self
    }

    fn at(&mut self, t: u64) -> &mut Self {
        self.vm.set_block_timestamp(t);
        TODAY.with(|d| d.set(t / DAY));
        self
    }

    /// `owner` registers its model `n` at `price` credits per call; returns its key.
    fn register(&mut self, n: u8, owner: Address, price: u64) -> FixedBytes<32> {
        let key = self
            .as_(owner)
            .c
            .register_model(id(n), id(0xc0 + n), id(0xe0 + n), u(price))
            .unwrap();
        assert_eq!(key, key_of(owner, n));
        key
    }

    fn buy(&mut self, who: Address, credits: u64) {
        let got = self.pay(who, u(credits * RATE)).c.buy_credits().unwrap();
        assert_eq!(got, u(credits));
    }

    fn settle(&mut self, batch: u8, records: Vec<UsageRecord>) -> Result<()> {
        self.as_(OPERATOR).c.consume_credits(id(batch), records)
    }

    /// Raw logs emitted since the last call, then forgotten.
    fn take_logs(&self) -> Vec<(Vec<B256>, Vec<u8>)> {
        let logs = self.vm.get_emitted_logs();
        self.vm.clear_mocks();
        logs
    }

    fn credits(&self, who: Address) -> U256 {
        self.c.credits_of(who).unwrap()
    }

    fn earnings(&self, who: Address) -> U256 {
        self.c.earnings_of(who).unwrap()
    }
}

/// `calls` calls by `user` to `model`, charged `credits` off chain today (the day of the
/// block time the test is at).
fn rec(user: Address, model: FixedBytes<32>, calls: u64, credits: u64) -> UsageRecord {
    rec_on(user, model, calls, credits, today())
}

/// `calls` calls by `user` to `model`, charged `credits` off chain on the UTC day `day`.
fn rec_on(user: Address, model: FixedBytes<32>, calls: u64, credits: u64, day: u64) -> UsageRecord {
    UsageRecord {
        user,
        modelId: model,
        calls,
        credits: u(credits),
        day,
        receiptBatchHash: keccak256(model),
    }
}

/// Decodes every log as `E`, failing on any other kind.
fn decode<E: SolEvent>(logs: &[(Vec<B256>, Vec<u8>)]) -> Vec<E> {
    logs.iter()
        .map(|(topics, data)| {
            assert_eq!(topics[0], E::SIGNATURE_HASH, "expected {}", E::SIGNATURE);
            E::decode_raw_log(topics.iter().copied(), data).unwrap()
        })
        .collect()
}

fn one<E: SolEvent>(logs: &[(Vec<B256>, Vec<u8>)]) -> E {
    let mut all = decode::<E>(logs);
    assert_eq!(all.len(), 1, "expected exactly one {}", E::SIGNATURE);
    all.remove(0)
}

/// The logs of kind `E` among `logs`.
fn only<E: SolEvent>(logs: &[(Vec<B256>, Vec<u8>)]) -> Vec<E> {
    let of_kind: Vec<_> = logs
        .iter()
        .filter(|(t, _)| t[0] == E::SIGNATURE_HASH)
        .cloned()
        .collect();
    decode(&of_kind)
}

fn unauthorized_err(who: Address) -> MarketplaceError {
    MarketplaceError::Unauthorized(Unauthorized { caller: who })
}

fn too_early_err(t: u64) -> MarketplaceError {
    MarketplaceError::TooEarly(TooEarly { notBefore: u(t) })
}

/// The records hash as documented: a chain of `keccak256(abi.encode(h, record fields))`.
fn records_hash(records: &[UsageRecord]) -> B256 {
    records.iter().fold(B256::ZERO, |h, r| {
        keccak256(
            (
                h,
                r.user,
                r.modelId,
                U256::from(r.calls),
                r.credits,
                U256::from(r.day),
                r.receiptBatchHash,
            )
                .abi_encode(),
        )
    })
}

// ---------------------------------------------------------------- deploy and roles

#[test]
fn constructor_sets_admin_rate_and_first_operator() {
    let env = Env::deployed(u(RATE), OPERATOR);
    assert_eq!(env.c.admin().unwrap(), ADMIN);
    assert_eq!(env.c.wei_per_credit().unwrap(), u(RATE));
    assert!(env.c.is_operator(OPERATOR).unwrap());
    let logs = env.take_logs();
    assert_eq!(
        one::<AdminChanged>(&logs[..1]),
        AdminChanged {
            previousAdmin: Address::ZERO,
            newAdmin: ADMIN
        }
    );
    assert_eq!(
        one::<OperatorSet>(&logs[1..]),
        OperatorSet {
            operator: OPERATOR,
            enabled: true
        }
    );
    // Without a first operator, nobody is one.
    let env = Env::deployed(u(RATE), Address::ZERO);
    assert!(!env.c.is_operator(Address::ZERO).unwrap());
    assert_eq!(env.take_logs().len(), 1);
}

#[test]
fn constructor_rejects_zero_admin_and_a_rate_below_one_gwei_or_over_128_bits() {
    let vm = TestVM::default();
    let mut c = Marketplace::from(&vm);
    assert_eq!(
        c.constructor(Address::ZERO, u(RATE), OPERATOR),
        Err(MarketplaceError::ZeroAddress(ZeroAddress {}))
    );
    for low in [U256::ZERO, u(1), u(MIN_WEI_PER_CREDIT - 1)] {
        assert_eq!(
            c.constructor(ADMIN, low, OPERATOR),
            Err(MarketplaceError::InvalidRate(InvalidRate {}))
        );
    }
    // Purchases are counted in 128 bits: a rate beyond that is refused too.
    assert_eq!(
        c.constructor(ADMIN, U256::from(u128::MAX) + u(1), OPERATOR),
        Err(MarketplaceError::InvalidRate(InvalidRate {}))
    );
    assert!(vm.get_emitted_logs().is_empty());
    assert_eq!(c.admin().unwrap(), Address::ZERO);
    // The floor itself is accepted: 1 gwei.
    assert_eq!(MIN_WEI_PER_CREDIT, 1_000_000_000);
    c.constructor(ADMIN, u(MIN_WEI_PER_CREDIT), OPERATOR)
        .unwrap();
    assert_eq!(c.wei_per_credit().unwrap(), u(MIN_WEI_PER_CREDIT));
}

#[test]
fn the_rate_floor_keeps_every_credit_count_within_i64() {
    // All the ether there is (about 1.2e26 wei; 1e27 to be safe) buys fewer credits than the
    // registry's i64 can count.
    let all_ether = U256::from(10).pow(u(27));
    assert!(all_ether / u(MIN_WEI_PER_CREDIT) < U256::from(i64::MAX as u64));
}

#[test]
fn operators_are_named_by_the_admin_and_accept_after_the_delay() {
    let mut env = Env::new();
    assert_eq!(
        env.as_(STRANGER).c.set_operator(OPERATOR2, true),
        Err(unauthorized_err(STRANGER))
    );
    assert_eq!(
        env.as_(ADMIN).c.set_operator(Address::ZERO, true),
        Err(MarketplaceError::ZeroAddress(ZeroAddress {}))
    );
    // Not named: can't accept.
    assert_eq!(
        env.as_(OPERATOR2).c.accept_operator(),
        Err(unauthorized_err(OPERATOR2))
    );
    env.take_logs();
    env.as_(ADMIN).c.set_operator(OPERATOR2, true).unwrap();
    let ready = T0 + OPERATOR_DELAY;
    assert_eq!(
        one::<OperatorProposed>(&env.take_logs()),
        OperatorProposed {
            operator: OPERATOR2,
            notBefore: u(ready)
        }
    );
    assert!(!env.c.is_operator(OPERATOR2).unwrap());
    assert_eq!(env.c.operator_not_before(OPERATOR2).unwrap(), u(ready));
    // Named, but not yet: not an operator, can't settle.
    assert_eq!(
        env.at(ready - 1).as_(OPERATOR2).c.accept_operator(),
        Err(too_early_err(ready))
    );
    assert_eq!(
        env.as_(OPERATOR2).c.consume_credits(id(1), vec![]),
        Err(unauthorized_err(OPERATOR2))
    );
    env.at(ready).as_(OPERATOR2).c.accept_operator().unwrap();
    assert!(env.c.is_operator(OPERATOR2).unwrap());
    assert_eq!(
        one::<OperatorSet>(&env.take_logs()),
        OperatorSet {
            operator: OPERATOR2,
            enabled: true
        }
    );
    // Accepting twice is refused (the nomination is used up).
    assert_eq!(
        env.as_(OPERATOR2).c.accept_operator(),
        Err(unauthorized_err(OPERATOR2))
    );
    // Revocation is immediate and also cancels a pending nomination.
    env.as_(ADMIN).c.set_operator(OPERATOR2, false).unwrap();
    assert!(!env.c.is_operator(OPERATOR2).unwrap());
    env.as_(ADMIN).c.set_operator(STRANGER, true).unwrap();
    env.as_(ADMIN).c.set_operator(STRANGER, false).unwrap();
    assert_eq!(
        env.at(ready + OPERATOR_DELAY)
            .as_(STRANGER)
            .c
            .accept_operator(),
        Err(unauthorized_err(STRANGER))
    );
}

#[test]
fn the_admin_hands_over_in_two_steps_after_the_delay() {
    let mut env = Env::new();
    assert_eq!(
        env.as_(STRANGER).c.propose_admin(ADMIN2),
        Err(unauthorized_err(STRANGER))
    );
    assert_eq!(
        env.as_(ADMIN).c.propose_admin(Address::ZERO),
        Err(MarketplaceError::ZeroAddress(ZeroAddress {}))
    );
    // Nothing proposed: nobody can accept.
    assert_eq!(
        env.as_(ADMIN2).c.accept_admin(),
        Err(unauthorized_err(ADMIN2))
    );
    env.as_(ADMIN).c.propose_admin(ADMIN2).unwrap();
    let ready = T0 + ADMIN_DELAY;
    assert_eq!(env.c.pending_admin().unwrap(), (ADMIN2, u(ready)));
    assert_eq!(
        env.as_(STRANGER).c.accept_admin(),
        Err(unauthorized_err(STRANGER))
    );
    assert_eq!(
        env.at(ready - 1).as_(ADMIN2).c.accept_admin(),
        Err(too_early_err(ready))
    );
    // Until the hand-over the old admin keeps the role.
    assert_eq!(env.c.admin().unwrap(), ADMIN);
    env.take_logs();
    env.at(ready).as_(ADMIN2).c.accept_admin().unwrap();
    assert_eq!(env.c.admin().unwrap(), ADMIN2);
    assert_eq!(env.c.pending_admin().unwrap(), (Address::ZERO, U256::ZERO));
    assert_eq!(
        one::<AdminChanged>(&env.take_logs()),
        AdminChanged {
            previousAdmin: ADMIN,
            newAdmin: ADMIN2
        }
    );
    assert_eq!(
        env.as_(ADMIN).c.set_paused(true),
        Err(unauthorized_err(ADMIN))
    );
    env.as_(ADMIN2).c.set_paused(true).unwrap();
}

#[test]
fn pause_stops_settlement_and_purchases_but_not_withdrawals_or_refunds() {
    let mut env = Env::new();
    let m = env.register(1, CREATOR, 2);
    env.buy(ALICE, 10);
    env.settle(1, vec![rec(ALICE, m, 1, 2)]).unwrap();
    env.as_(ALICE).c.request_refund(u(3)).unwrap();
    assert_eq!(
        env.as_(STRANGER).c.set_paused(true),
        Err(unauthorized_err(STRANGER))
    );
    env.take_logs();
    env.as_(ADMIN).c.set_paused(true).unwrap();
    assert!(env.c.paused().unwrap());
    assert_eq!(one::<PauseSet>(&env.take_logs()), PauseSet { paused: true });
    let paused = Err(MarketplaceError::ContractPaused(ContractPaused {}));
    assert_eq!(env.settle(2, vec![rec(ALICE, m, 1, 2)]), paused);
    assert_eq!(env.pay(BOB, u(RATE)).c.buy_credits().map(|_| ()), paused);
    assert_eq!(env.credits(ALICE), u(8));
    // Users and creators can still leave.
    assert_eq!(env.as_(CREATOR).c.withdraw().unwrap(), u(2 * RATE));
    env.at(T0 + REFUND_DELAY);
    assert_eq!(env.as_(ALICE).c.claim_refund().unwrap(), u(3 * RATE));
    env.as_(ADMIN).c.set_paused(false).unwrap();
    env.settle(2, vec![rec(ALICE, m, 1, 2)]).unwrap();
    assert_eq!(env.credits(ALICE), u(3));
}

// ---------------------------------------------------------------- models

#[test]
fn model_keys_bind_the_owner_so_ids_cannot_be_taken() {
    let mut env = Env::new();
    let mine = env.register(1, CREATOR, 3);
    assert_eq!(env.c.model_key(CREATOR, id(1)).unwrap(), mine);
    let logs = env.take_logs();
    assert_eq!(
        one::<ModelRegistered>(&logs),
        ModelRegistered {
            modelId: mine,
            owner: CREATOR,
            localId: id(1),
            cidHash: id(0xc1),
            commitment: id(0xe1),
            pricePerCall: u(3)
        }
    );
    // A stranger registering the same id gets its own key; the creator's model is untouched.
    let theirs = env.register(1, STRANGER, 100);
    assert_ne!(theirs, mine);
    assert_eq!(
        env.c.get_model(mine).unwrap(),
        (CREATOR, id(0xc1), id(0xe1), u(3), true)
    );
    // The owner can't register the same id twice.
    assert_eq!(
        env.as_(CREATOR).c.register_model(id(1), id(0), id(0), u(1)),
        Err(MarketplaceError::ModelAlreadyRegistered(
            ModelAlreadyRegistered { modelId: mine }
        ))
    );
    assert_eq!(
        env.c.get_model(id(9)),
        Err(MarketplaceError::UnknownModel(UnknownModel {
            modelId: id(9)
        }))
    );
}

#[test]
fn prices_change_at_most_once_per_window_and_owner_only() {
    let mut env = Env::new();
    let m = env.register(1, CREATOR, 3);
    assert_eq!(env.c.get_prices(m).unwrap(), (u(3), U256::ZERO, U256::ZERO));
    assert_eq!(
        env.as_(STRANGER).c.update_price(m, u(5)),
        Err(unauthorized_err(STRANGER))
    );
    assert_eq!(
        env.as_(CREATOR).c.update_price(id(9), u(5)),
        Err(MarketplaceError::UnknownModel(UnknownModel {
            modelId: id(9)
        }))
    );
    env.take_logs();
    env.at(T0 + 10)
        .as_(CREATOR)
        .c
        .update_price(m, u(5))
        .unwrap();
    assert_eq!(
        one::<PriceUpdated>(&env.take_logs()),
        PriceUpdated {
            modelId: m,
            oldPrice: u(3),
            newPrice: u(5)
        }
    );
    assert_eq!(env.c.get_prices(m).unwrap(), (u(5), u(3), u(T0 + 10)));
    let next = T0 + 10 + PRICE_WINDOW;
    assert_eq!(
        env.at(next - 1).as_(CREATOR).c.update_price(m, u(7)),
        Err(too_early_err(next))
    );
    env.at(next).as_(CREATOR).c.update_price(m, u(7)).unwrap();
    assert_eq!(env.c.get_prices(m).unwrap(), (u(7), u(5), u(next)));
    env.as_(CREATOR).c.deactivate(m).unwrap();
    assert_eq!(
        env.at(next + PRICE_WINDOW)
            .as_(CREATOR)
            .c
            .update_price(m, u(1)),
        Err(MarketplaceError::ModelInactive(ModelInactive {
            modelId: m
        }))
    );
    assert_eq!(
        env.as_(CREATOR).c.deactivate(m),
        Err(MarketplaceError::ModelInactive(ModelInactive {
            modelId: m
        }))
    );
    assert!(!env.c.get_model(m).unwrap().4);
}

// ---------------------------------------------------------------- credits

#[test]
fn buy_credits_at_the_deploy_rate_accumulates_and_refuses_bad_amounts() {
    let mut env = Env::new();
    env.buy(ALICE, 2);
    env.buy(ALICE, 3);
    assert_eq!(env.credits(ALICE), u(5));
    // The last: a multiple of the rate over the 128-bit bound on payments (about 2^87 wei
    // exist).
    let over_u128 = (U256::from(1) << 128) * u(RATE);
    for bad in [U256::ZERO, u(RATE - 1), u(RATE + 1), over_u128] {
        assert_eq!(
            env.pay(BOB, bad).c.buy_credits(),
            Err(MarketplaceError::InvalidPayment(InvalidPayment {
                value: bad
            }))
        );
    }
    assert_eq!(env.credits(BOB), U256::ZERO);
}

/// The storage slot of `accounts[who].credits`: `accounts` is the contract's 9th slot (8),
/// and `credits` the first field of `Account`, as in Solidity's layout.
fn credits_slot(who: Address) -> U256 {
    U256::from_be_bytes(keccak256((who, u(8)).abi_encode()).0)
}

#[test]
fn buy_credits_overflow_is_a_custom_error() {
    // With the rate floor no one holds enough ether to overflow a balance, so the balance is
    // set in storage (at the slot a real purchase writes) to just under the maximum.
    let mut env = Env::new();
    env.buy(ALICE, 7);
    assert_eq!(
        env.vm.get_storage(credits_slot(ALICE)),
        B256::from(u(7).to_be_bytes::<32>())
    );
    env.vm.set_storage(
        credits_slot(ALICE),
        B256::from((U256::MAX - u(1)).to_be_bytes::<32>()),
    );
    env.buy(ALICE, 1);
    env.take_logs();
    assert_eq!(
        env.pay(ALICE, u(RATE)).c.buy_credits(),
        Err(MarketplaceError::ArithmeticOverflow(ArithmeticOverflow {}))
    );
    assert_eq!(env.credits(ALICE), U256::MAX);
    assert!(env.take_logs().is_empty());
}

// ---------------------------------------------------------------- settlement

#[test]
fn settlement_debits_exactly_the_credits_charged_off_chain() {
    let mut env = Env::new();
    let m1 = env.register(1, CREATOR, 3);
    let m2 = env.register(2, CREATOR2, 1);
    env.buy(ALICE, 10);
    env.buy(BOB, 5);
    env.take_logs();
    let records = vec![
        rec(ALICE, m1, 2, 6),
        rec(BOB, m2, 4, 4),
        rec(ALICE, m2, 1, 1),
    ];
    env.settle(1, records.clone()).unwrap();
    assert_eq!(env.credits(ALICE), u(3));
    assert_eq!(env.credits(BOB), u(1));
    assert_eq!(env.earnings(CREATOR), u(6));
    assert_eq!(env.earnings(CREATOR2), u(5));
    let logs = env.take_logs();
    let settled: Vec<UsageSettled> = only(&logs);
    assert_eq!(settled.len(), 3);
    assert_eq!(
        settled[0],
        UsageSettled {
            batchId: id(1),
            user: ALICE,
            modelId: m1,
            calls: 2,
            credits: u(6),
            receiptBatchHash: keccak256(m1)
        }
    );
    let batch: BatchSettled = one(&logs[3..]);
    assert_eq!(
        batch,
        BatchSettled {
            batchId: id(1),
            operator: OPERATOR,
            settled: u(3),
            rejected: U256::ZERO,
            totalCredits: u(11),
            recordsHash: records_hash(&records)
        }
    );
    assert_eq!(
        env.c.batch_records_hash(OPERATOR, id(1)).unwrap(),
        records_hash(&records)
    );
}

/// The bug this contract fixes: a raise between the calls and their settlement is not applied
/// to them; the previous price is accepted within the window, and only within it.
#[test]
fn a_price_raise_never_applies_retroactively() {
    let mut env = Env::new();
    let m = env.register(1, CREATOR, 1);
    env.buy(ALICE, 200);
    // Two calls at price 1, charged 2 off chain; then the owner raises the price to 50.
    env.at(T0 + 5)
        .as_(CREATOR)
        .c
        .update_price(m, u(50))
        .unwrap();
    env.take_logs();
    env.settle(1, vec![rec(ALICE, m, 2, 2)]).unwrap();
    assert_eq!(env.credits(ALICE), u(198));
    assert_eq!(env.earnings(CREATOR), u(2));
    // A record claiming the new price for those calls is as good: both prices are in force
    // during the window.
    env.settle(2, vec![rec(ALICE, m, 1, 50)]).unwrap();
    assert_eq!(env.credits(ALICE), u(148));
    // Neither anything else...
    env.take_logs();
    env.settle(3, vec![rec(ALICE, m, 2, 100 + 1)]).unwrap();
    assert_eq!(
        one::<UsageRejected>(&env.take_logs()[..1]).reason,
        Rejection::PriceMismatch as u8
    );
    // ...nor the old price after the window.
    env.at(T0 + 5 + PRICE_WINDOW);
    env.settle(4, vec![rec(ALICE, m, 2, 2)]).unwrap();
    assert_eq!(
        one::<UsageRejected>(&env.take_logs()[..1]).reason,
        Rejection::PriceMismatch as u8
    );
    assert_eq!(env.credits(ALICE), u(148));
}

/// One poisoned record among many good ones: the good ones settle, each bad one is reported
/// with its reason, and the batch is done.
#[test]
fn bad_records_are_skipped_with_their_reason_and_never_block_the_batch() {
    let mut env = Env::new();
    let good = env.register(1, CREATOR, 2);
    let dead = env.register(2, CREATOR2, 2);
    let own = env.register(3, OPERATOR, 2);
    let huge = env.register(4, CREATOR2, 0);
    env.as_(CREATOR2).c.deactivate(dead).unwrap();
    env.buy(ALICE, 100);
    env.buy(BOB, 3);
    env.as_(BOB).c.set_daily_cap(u(100)).unwrap();
    env.take_logs();
    let mut records = Vec::new();
    for _ in 0..10 {
        records.push(rec(ALICE, good, 1, 2));
    }
    let bad = [
        (rec(ALICE, id(9), 1, 2), Rejection::UnknownModel),
        (rec(ALICE, dead, 1, 2), Rejection::ModelInactive),
        (rec(ALICE, own, 1, 2), Rejection::OperatorOwnsModel),
        (rec(ALICE, good, 1, 3), Rejection::PriceMismatch),
        (rec(ALICE, good, 0, 0), Rejection::PriceMismatch),
        (rec(ALICE, huge, u64::MAX, 1), Rejection::PriceMismatch),
        (rec(BOB, good, 2, 4), Rejection::InsufficientCredits),
        (rec_on(ALICE, good, 1, 2, today() - 2), Rejection::StaleDay),
    ];
    for (i, (r, _)) in bad.iter().enumerate() {
        records.insert(i * 2 + 1, r.clone());
    }
    env.settle(1, records.clone()).unwrap();
    assert_eq!(env.credits(ALICE), u(80));
    assert_eq!(env.credits(BOB), u(3));
    assert_eq!(env.earnings(CREATOR), u(20));
    assert_eq!(env.earnings(OPERATOR), U256::ZERO);
    assert_eq!(env.earnings(CREATOR2), U256::ZERO);
    let logs = env.take_logs();
    let rejected: Vec<UsageRejected> = only(&logs);
    assert_eq!(
        rejected.iter().map(|r| r.reason).collect::<Vec<_>>(),
        bad.iter().map(|(_, why)| *why as u8).collect::<Vec<_>>()
    );
    assert_eq!(rejected[1].modelId, dead);
    assert_eq!(rejected[6].user, BOB);
    assert_eq!(only::<UsageSettled>(&logs).len(), 10);
    let batch = one::<BatchSettled>(&logs[logs.len() - 1..]);
    assert_eq!((batch.settled, batch.rejected), (u(10), u(8)));
    assert_eq!(batch.totalCredits, u(20));
    assert_eq!(batch.recordsHash, records_hash(&records));
    // A batch of bad records only still settles (nothing), so it can't be replayed.
    env.settle(2, vec![rec(ALICE, dead, 1, 2)]).unwrap();
    assert_eq!(
        env.settle(2, vec![rec(ALICE, good, 1, 2)]),
        Err(MarketplaceError::BatchAlreadySettled(BatchAlreadySettled {
            batchId: id(2)
        }))
    );
}

#[test]
fn a_user_overspending_across_records_of_one_batch_is_caught_record_by_record() {
    let mut env = Env::new();
    let m = env.register(1, CREATOR, 2);
    env.buy(ALICE, 5);
    env.take_logs();
    env.settle(
        1,
        vec![
            rec(ALICE, m, 1, 2),
            rec(ALICE, m, 1, 2),
            rec(ALICE, m, 1, 2),
        ],
    )
    .unwrap();
    assert_eq!(env.credits(ALICE), u(1));
    let logs = env.take_logs();
    assert_eq!(only::<UsageSettled>(&logs).len(), 2);
    assert_eq!(
        one::<UsageRejected>(&logs[2..3]).reason,
        Rejection::InsufficientCredits as u8
    );
}

/// `user` sets `cap` (a lowering: pending until `CAP_DELAY` has passed), then the test waits
/// for it; returns the time it took effect.
fn cap_in_force_from(env: &mut Env, user: Address, cap: u64, at: u64) -> u64 {
    env.at(at).as_(user).c.set_daily_cap(u(cap)).unwrap();
    env.at(at + CAP_DELAY);
    assert_eq!(env.c.daily_cap_of(user).unwrap(), u(cap));
    env.take_logs();
    at + CAP_DELAY
}

#[test]
fn daily_caps_bound_what_operators_take_from_a_user() {
    let mut env = Env::new();
    let m = env.register(1, CREATOR, 1);
    env.buy(ALICE, 100);
    assert_eq!(env.c.daily_cap_of(ALICE).unwrap(), U256::MAX);
    let t = cap_in_force_from(&mut env, ALICE, 5, T0);
    let day = t / DAY;
    env.settle(1, vec![rec(ALICE, m, 3, 3), rec(ALICE, m, 3, 3)])
        .unwrap();
    assert_eq!(env.credits(ALICE), u(97));
    assert_eq!(
        one::<UsageRejected>(&env.take_logs()[1..2]).reason,
        Rejection::OverDailyCap as u8
    );
    env.settle(2, vec![rec(ALICE, m, 2, 2)]).unwrap();
    assert_eq!(env.credits(ALICE), u(95));
    assert_eq!(env.c.spent_of(ALICE, day).unwrap(), u(5));
    // A new day, a new allowance; the old label keeps its count (two labels are kept).
    env.at((day + 1) * DAY + 10);
    env.settle(3, vec![rec(ALICE, m, 3, 3)]).unwrap();
    assert_eq!(env.credits(ALICE), u(92));
    assert_eq!(env.c.spent_of(ALICE, day + 1).unwrap(), u(3));
    assert_eq!(env.c.spent_of(ALICE, day).unwrap(), u(5));
    // Labels no slot holds count 0: the day before yesterday, tomorrow.
    assert_eq!(env.c.spent_of(ALICE, day - 1).unwrap(), U256::ZERO);
    assert_eq!(env.c.spent_of(ALICE, day + 2).unwrap(), U256::ZERO);
    // Cap 0, once in force: nothing can be taken.
    cap_in_force_from(&mut env, ALICE, 0, (day + 1) * DAY + 20);
    env.settle(4, vec![rec(ALICE, m, 1, 1)]).unwrap();
    assert_eq!(env.credits(ALICE), u(92));
    assert_eq!(
        one::<UsageRejected>(&env.take_logs()[..1]).reason,
        Rejection::OverDailyCap as u8
    );
}

#[test]
fn a_first_cap_and_a_lowered_cap_take_effect_only_after_the_delay() {
    let mut env = Env::new();
    let m = env.register(1, CREATOR, 1);
    env.buy(ALICE, 100);
    assert_eq!(
        env.c.pending_daily_cap_of(ALICE).unwrap(),
        (U256::ZERO, U256::ZERO)
    );
    env.take_logs();
    // A first cap is a lowering (from none): pending until T0 + CAP_DELAY.
    env.as_(ALICE).c.set_daily_cap(u(5)).unwrap();
    let ready = T0 + CAP_DELAY;
    assert_eq!(
        one::<DailyCapSet>(&env.take_logs()),
        DailyCapSet {
            user: ALICE,
            cap: u(5),
            effectiveAt: u(ready)
        }
    );
    assert_eq!(env.c.daily_cap_of(ALICE).unwrap(), U256::MAX);
    assert_eq!(env.c.pending_daily_cap_of(ALICE).unwrap(), (u(5), u(ready)));
    env.settle(1, vec![rec(ALICE, m, 9, 9)]).unwrap();
    assert_eq!(env.credits(ALICE), u(91));
    env.at(ready - 1);
    assert_eq!(env.c.daily_cap_of(ALICE).unwrap(), U256::MAX);
    assert_eq!(env.c.pending_daily_cap_of(ALICE).unwrap(), (u(5), u(ready)));
    // In force from `ready` on: no longer pending.
    env.at(ready);
    assert_eq!(env.c.daily_cap_of(ALICE).unwrap(), u(5));
    assert_eq!(
        env.c.pending_daily_cap_of(ALICE).unwrap(),
        (U256::ZERO, U256::ZERO)
    );
    env.take_logs();
    env.settle(2, vec![rec(ALICE, m, 6, 6)]).unwrap();
    assert_eq!(
        one::<UsageRejected>(&env.take_logs()[..1]).reason,
        Rejection::OverDailyCap as u8
    );
    // Lowering again: the cap in force (5, still only pending in storage) stays until the new
    // one's time has come, and a later lowering replaces an earlier pending one.
    let t1 = ready + 100;
    env.at(t1).as_(ALICE).c.set_daily_cap(u(3)).unwrap();
    assert_eq!(env.c.daily_cap_of(ALICE).unwrap(), u(5));
    assert_eq!(
        env.c.pending_daily_cap_of(ALICE).unwrap(),
        (u(3), u(t1 + CAP_DELAY))
    );
    let t2 = t1 + 50;
    env.at(t2).as_(ALICE).c.set_daily_cap(u(2)).unwrap();
    assert_eq!(env.c.daily_cap_of(ALICE).unwrap(), u(5));
    assert_eq!(
        env.c.pending_daily_cap_of(ALICE).unwrap(),
        (u(2), u(t2 + CAP_DELAY))
    );
    env.at(t1 + CAP_DELAY);
    assert_eq!(env.c.daily_cap_of(ALICE).unwrap(), u(5));
    env.at(t2 + CAP_DELAY);
    assert_eq!(env.c.daily_cap_of(ALICE).unwrap(), u(2));
}

#[test]
fn a_raise_is_immediate_and_drops_a_pending_lowering() {
    let mut env = Env::new();
    let m = env.register(1, CREATOR, 1);
    env.buy(ALICE, 100);
    let t = cap_in_force_from(&mut env, ALICE, 5, T0);
    // Lower to 1 (pending), then raise to 8: at once, and the lowering is gone.
    env.as_(ALICE).c.set_daily_cap(u(1)).unwrap();
    assert_eq!(
        env.c.pending_daily_cap_of(ALICE).unwrap(),
        (u(1), u(t + CAP_DELAY))
    );
    env.take_logs();
    env.at(t + 10).as_(ALICE).c.set_daily_cap(u(8)).unwrap();
    assert_eq!(
        one::<DailyCapSet>(&env.take_logs()),
        DailyCapSet {
            user: ALICE,
            cap: u(8),
            effectiveAt: u(t + 10)
        }
    );
    assert_eq!(env.c.daily_cap_of(ALICE).unwrap(), u(8));
    assert_eq!(
        env.c.pending_daily_cap_of(ALICE).unwrap(),
        (U256::ZERO, U256::ZERO)
    );
    env.settle(1, vec![rec(ALICE, m, 8, 8)]).unwrap();
    assert_eq!(env.credits(ALICE), u(92));
    env.at(t + CAP_DELAY + 10);
    assert_eq!(env.c.daily_cap_of(ALICE).unwrap(), u(8));
    // Setting the cap in force again also drops a pending lowering.
    env.as_(ALICE).c.set_daily_cap(u(2)).unwrap();
    env.as_(ALICE).c.set_daily_cap(u(8)).unwrap();
    assert_eq!(
        env.c.pending_daily_cap_of(ALICE).unwrap(),
        (U256::ZERO, U256::ZERO)
    );
    // A raise from a pending cap already in force: the raise wins at once.
    let t3 = t + CAP_DELAY + 20;
    env.at(t3).as_(ALICE).c.set_daily_cap(u(4)).unwrap();
    env.at(t3 + CAP_DELAY);
    assert_eq!(env.c.daily_cap_of(ALICE).unwrap(), u(4));
    env.as_(ALICE).c.set_daily_cap(u(6)).unwrap();
    assert_eq!(env.c.daily_cap_of(ALICE).unwrap(), u(6));
    // ...and a lowering from it keeps it in force until its own delay.
    env.as_(ALICE).c.set_daily_cap(u(4)).unwrap();
    env.at(t3 + 2 * CAP_DELAY - 1);
    assert_eq!(env.c.daily_cap_of(ALICE).unwrap(), u(6));
    env.as_(ALICE).c.set_daily_cap(U256::MAX).unwrap();
    assert_eq!(env.c.daily_cap_of(ALICE).unwrap(), U256::MAX);
}

/// A pending lowering whose time has come is the cap in force: lowering again keeps it (not
/// the cap set before it) until the new one takes effect.
#[test]
fn a_lowering_after_a_pending_cap_took_effect_keeps_that_cap_meanwhile() {
    let mut env = Env::new();
    env.as_(ALICE).c.set_daily_cap(u(5)).unwrap();
    let t = T0 + CAP_DELAY + 1;
    env.at(t).as_(ALICE).c.set_daily_cap(u(3)).unwrap();
    assert_eq!(env.c.daily_cap_of(ALICE).unwrap(), u(5));
    assert_eq!(
        env.c.pending_daily_cap_of(ALICE).unwrap(),
        (u(3), u(t + CAP_DELAY))
    );
    env.at(t + CAP_DELAY);
    assert_eq!(env.c.daily_cap_of(ALICE).unwrap(), u(3));
}

#[test]
fn records_count_against_their_own_day_label_and_stale_days_are_rejected() {
    let mut env = Env::new();
    let m = env.register(1, CREATOR, 1);
    let own = env.register(3, OPERATOR, 1);
    env.buy(ALICE, 100);
    let t = cap_in_force_from(&mut env, ALICE, 5, T0);
    let day = t / DAY;
    // Yesterday's usage counts against yesterday's label, not today's.
    env.settle(1, vec![rec_on(ALICE, m, 4, 4, day - 1)])
        .unwrap();
    assert_eq!(env.c.spent_of(ALICE, day - 1).unwrap(), u(4));
    assert_eq!(env.c.spent_of(ALICE, day).unwrap(), U256::ZERO);
    env.take_logs();
    env.settle(
        2,
        vec![
            rec_on(ALICE, m, 5, 5, day),
            rec_on(ALICE, m, 2, 2, day - 1),
            rec_on(ALICE, m, 1, 1, day - 1),
        ],
    )
    .unwrap();
    let logs = env.take_logs();
    assert_eq!(only::<UsageSettled>(&logs).len(), 2);
    assert_eq!(
        one::<UsageRejected>(&logs[1..2]).reason,
        Rejection::OverDailyCap as u8
    );
    assert_eq!(env.c.spent_of(ALICE, day).unwrap(), u(5));
    assert_eq!(env.c.spent_of(ALICE, day - 1).unwrap(), u(5));
    assert_eq!(env.credits(ALICE), u(90));
    // Neither the day before yesterday nor a future day settles; the check comes after the
    // owner check and before the price check.
    let stale = [
        (rec_on(ALICE, m, 1, 1, day - 2), Rejection::StaleDay),
        (rec_on(ALICE, m, 1, 1, day + 1), Rejection::StaleDay),
        (rec_on(ALICE, m, 1, 7, day + 1), Rejection::StaleDay),
        (rec_on(ALICE, m, 1, 1, 0), Rejection::StaleDay),
        (rec_on(ALICE, m, 1, 1, u64::MAX), Rejection::StaleDay),
        (
            rec_on(ALICE, own, 1, 1, day - 2),
            Rejection::OperatorOwnsModel,
        ),
        (rec_on(ALICE, id(9), 1, 1, day + 1), Rejection::UnknownModel),
    ];
    env.settle(3, stale.iter().map(|(r, _)| r.clone()).collect())
        .unwrap();
    let rejected: Vec<UsageRejected> = only(&env.take_logs());
    assert_eq!(
        rejected.iter().map(|r| r.reason).collect::<Vec<_>>(),
        stale.iter().map(|(_, why)| *why as u8).collect::<Vec<_>>()
    );
    assert_eq!(env.credits(ALICE), u(90));
    // The next day: a new label with a new allowance, while `day` (now yesterday) is still
    // full; `day - 1` (now stale) gave its slot to `day + 1`.
    env.at((day + 1) * DAY);
    env.settle(4, vec![rec_on(ALICE, m, 5, 5, day + 1)])
        .unwrap();
    env.take_logs();
    env.settle(5, vec![rec_on(ALICE, m, 1, 1, day)]).unwrap();
    assert_eq!(
        one::<UsageRejected>(&env.take_logs()[..1]).reason,
        Rejection::OverDailyCap as u8
    );
    assert_eq!(env.c.spent_of(ALICE, day + 1).unwrap(), u(5));
    assert_eq!(env.c.spent_of(ALICE, day).unwrap(), u(5));
    assert_eq!(env.c.spent_of(ALICE, day - 1).unwrap(), U256::ZERO);
    assert_eq!(env.credits(ALICE), u(85));
}

/// What settles is counted whether or not a cap is set, so a cap taking effect mid-day counts
/// the day's earlier usage.
#[test]
fn spending_is_counted_without_a_cap_so_a_cap_taking_effect_mid_day_counts_it() {
    let mut env = Env::new();
    let m = env.register(1, CREATOR, 1);
    env.buy(BOB, 100);
    let day = T0 / DAY + 1;
    let set_at = day * DAY + 100;
    env.at(set_at).as_(BOB).c.set_daily_cap(u(8)).unwrap();
    let ready = set_at + CAP_DELAY;
    env.at(ready - 1);
    env.settle(1, vec![rec(BOB, m, 7, 7)]).unwrap();
    assert_eq!(env.c.spent_of(BOB, day + 2).unwrap(), u(7));
    env.at(ready);
    env.take_logs();
    env.settle(2, vec![rec(BOB, m, 2, 2), rec(BOB, m, 1, 1)])
        .unwrap();
    let logs = env.take_logs();
    assert_eq!(
        one::<UsageRejected>(&logs[..1]).reason,
        Rejection::OverDailyCap as u8
    );
    assert_eq!(only::<UsageSettled>(&logs).len(), 1);
    assert_eq!(env.c.spent_of(BOB, day + 2).unwrap(), u(8));
}

/// The hole this fixes: a user uses the service, lowers the cap to 0 before the usage settles,
/// and hopes for the records to be rejected and the credits refunded. The lowering waits
/// `CAP_DELAY`, longer than usage may wait for settlement, so the records still settle, and
/// usage charged at 23:59 and settled at 00:01 counts against the day it was charged.
#[test]
fn lowering_the_cap_to_zero_cannot_void_usage_already_charged() {
    let mut env = Env::new();
    let m = env.register(1, CREATOR, 1);
    env.buy(ALICE, 100);
    let t = cap_in_force_from(&mut env, ALICE, 10, T0);
    let day = t / DAY;
    // At 23:59 of `day` ALICE uses 10 credits' worth (the whole day's cap) and 3 more the
    // next day; she lowers her cap to 0 and asks for a refund of everything.
    let midnight = (day + 1) * DAY;
    env.at(midnight - 30)
        .as_(ALICE)
        .c
        .set_daily_cap(U256::ZERO)
        .unwrap();
    env.as_(ALICE).c.request_refund(u(100)).unwrap();
    // The operator settles at 00:01: both records settle, each under its own label.
    env.at(midnight + 60);
    env.take_logs();
    env.settle(
        1,
        vec![
            rec_on(ALICE, m, 10, 10, day),
            rec_on(ALICE, m, 3, 3, day + 1),
        ],
    )
    .unwrap();
    let logs = env.take_logs();
    assert_eq!(only::<UsageSettled>(&logs).len(), 2);
    assert!(only::<UsageRejected>(&logs).is_empty());
    assert_eq!(env.earnings(CREATOR), u(13));
    assert_eq!(env.c.spent_of(ALICE, day).unwrap(), u(10));
    assert_eq!(env.c.spent_of(ALICE, day + 1).unwrap(), u(3));
    // The refund pays only what is left.
    env.at(midnight - 30 + REFUND_DELAY);
    assert_eq!(env.as_(ALICE).c.claim_refund().unwrap(), u(87 * RATE));
    // Once the lowering is in force, new usage is bounded by it.
    env.buy(ALICE, 5);
    env.at(midnight - 30 + CAP_DELAY);
    assert_eq!(env.c.daily_cap_of(ALICE).unwrap(), U256::ZERO);
    env.take_logs();
    env.settle(2, vec![rec(ALICE, m, 1, 1)]).unwrap();
    assert_eq!(
        one::<UsageRejected>(&env.take_logs()[..1]).reason,
        Rejection::OverDailyCap as u8
    );
}

#[test]
fn settlement_access_and_batch_level_errors() {
    let mut env = Env::new();
    let m = env.register(1, CREATOR, 1);
    env.buy(ALICE, 10);
    env.take_logs();
    assert_eq!(
        env.as_(STRANGER)
            .c
            .consume_credits(id(1), vec![rec(ALICE, m, 1, 1)]),
        Err(unauthorized_err(STRANGER))
    );
    assert_eq!(
        env.settle(1, vec![]),
        Err(MarketplaceError::EmptyBatch(EmptyBatch {}))
    );
    assert!(env.take_logs().is_empty());
    // An empty batch burns nothing: the id is still free.
    env.settle(1, vec![rec(ALICE, m, 1, 1)]).unwrap();
    assert_eq!(
        env.settle(1, vec![rec(ALICE, m, 1, 1)]),
        Err(MarketplaceError::BatchAlreadySettled(BatchAlreadySettled {
            batchId: id(1)
        }))
    );
    assert_eq!(env.credits(ALICE), u(9));
}

/// Batch ids are per operator: another operator can't spend one first, and each operator's
/// batch records the hash of its own records.
#[test]
fn batch_ids_are_keyed_by_operator() {
    let mut env = Env::new();
    env.as_(ADMIN).c.set_operator(OPERATOR2, true).unwrap();
    env.at(T0 + OPERATOR_DELAY)
        .as_(OPERATOR2)
        .c
        .accept_operator()
        .unwrap();
    let m = env.register(1, CREATOR, 1);
    env.buy(ALICE, 10);
    let theirs = vec![rec(ALICE, m, 1, 1)];
    env.as_(OPERATOR2)
        .c
        .consume_credits(id(7), theirs.clone())
        .unwrap();
    let mine = vec![rec(ALICE, m, 2, 2)];
    env.settle(7, mine.clone()).unwrap();
    assert_eq!(env.credits(ALICE), u(7));
    assert_eq!(
        env.c.batch_records_hash(OPERATOR, id(7)).unwrap(),
        records_hash(&mine)
    );
    assert_eq!(
        env.c.batch_records_hash(OPERATOR2, id(7)).unwrap(),
        records_hash(&theirs)
    );
    assert_eq!(
        env.c.batch_records_hash(STRANGER, id(7)).unwrap(),
        B256::ZERO
    );
}

// ---------------------------------------------------------------- withdraw and refunds

#[test]
fn withdraw_pays_earnings_at_the_rate_and_zeroes_them() {
    let mut env = Env::new();
    let m = env.register(1, CREATOR, 3);
    env.buy(ALICE, 10);
    env.settle(1, vec![rec(ALICE, m, 3, 9)]).unwrap();
    env.take_logs();
    assert_eq!(env.as_(CREATOR).c.withdraw().unwrap(), u(9 * RATE));
    assert_eq!(env.earnings(CREATOR), U256::ZERO);
    assert_eq!(
        one::<Withdrawn>(&env.take_logs()),
        Withdrawn {
            owner: CREATOR,
            credits: u(9),
            amountWei: u(9 * RATE)
        }
    );
    assert_eq!(
        env.as_(CREATOR).c.withdraw(),
        Err(MarketplaceError::NothingToWithdraw(NothingToWithdraw {
            owner: CREATOR
        }))
    );
}

#[test]
fn failed_payout_reverts_with_transfer_failed_and_keeps_earnings() {
    let mut env = Env::new();
    let m = env.register(1, CREATOR, 3);
    env.buy(ALICE, 10);
    env.settle(1, vec![rec(ALICE, m, 1, 3)]).unwrap();
    env.take_logs();
    env.vm
        .mock_call(CREATOR, vec![], u(3 * RATE), Err(b"nope".to_vec()));
    assert_eq!(
        env.as_(CREATOR).c.withdraw(),
        Err(MarketplaceError::TransferFailed(TransferFailed {
            to: CREATOR,
            amount: u(3 * RATE)
        }))
    );
    assert_eq!(env.earnings(CREATOR), u(3));
    assert!(env.take_logs().is_empty());
}

#[test]
fn withdraw_overflow_reverts() {
    // Each user holds `big` credits (set in storage: no payment can buy that many), so three
    // of them owe the owner more than `U256::MAX / RATE` credits: paying that out overflows.
    let mut env = Env::new();
    let big = U256::MAX / u(RATE);
    let m = env
        .as_(CREATOR)
        .c
        .register_model(id(1), id(1), id(1), big)
        .unwrap();
    let mut records = Vec::new();
    for who in [ALICE, BOB, STRANGER] {
        env.vm
            .set_storage(credits_slot(who), B256::from(big.to_be_bytes::<32>()));
        records.push(UsageRecord {
            user: who,
            modelId: m,
            calls: 1,
            credits: big,
            day: T0 / DAY,
            receiptBatchHash: B256::ZERO,
        });
    }
    env.settle(1, records).unwrap();
    env.take_logs();
    assert_eq!(env.earnings(CREATOR), big * u(3));
    assert_eq!(
        env.as_(CREATOR).c.withdraw(),
        Err(MarketplaceError::ArithmeticOverflow(ArithmeticOverflow {}))
    );
    assert_eq!(env.earnings(CREATOR), big * u(3));
    assert!(env.take_logs().is_empty());
}

#[test]
fn refunds_pay_unspent_credits_after_the_lock_that_covers_unsettled_usage() {
    let mut env = Env::new();
    let m = env.register(1, CREATOR, 2);
    env.buy(ALICE, 10);
    assert_eq!(
        env.as_(ALICE).c.claim_refund(),
        Err(MarketplaceError::NothingToRefund(NothingToRefund {
            user: ALICE
        }))
    );
    assert_eq!(
        env.as_(ALICE).c.request_refund(U256::ZERO),
        Err(MarketplaceError::NothingToRefund(NothingToRefund {
            user: ALICE
        }))
    );
    assert_eq!(
        env.as_(ALICE).c.request_refund(u(11)),
        Err(MarketplaceError::InsufficientCredits(InsufficientCredits {
            user: ALICE,
            needed: u(11),
            available: u(10)
        }))
    );
    env.take_logs();
    env.as_(ALICE).c.request_refund(u(10)).unwrap();
    let ready = T0 + REFUND_DELAY;
    assert_eq!(
        one::<RefundRequested>(&env.take_logs()),
        RefundRequested {
            user: ALICE,
            credits: u(10),
            notBefore: u(ready)
        }
    );
    assert_eq!(env.c.refund_of(ALICE).unwrap(), (u(10), u(ready)));
    assert_eq!(
        env.at(ready - 1).as_(ALICE).c.claim_refund(),
        Err(too_early_err(ready))
    );
    // Usage made before the request is settled during the lock, and comes first.
    env.settle(1, vec![rec(ALICE, m, 2, 4)]).unwrap();
    env.take_logs();
    assert_eq!(
        env.at(ready).as_(ALICE).c.claim_refund().unwrap(),
        u(6 * RATE)
    );
    assert_eq!(
        one::<Refunded>(&env.take_logs()),
        Refunded {
            user: ALICE,
            credits: u(6),
            amountWei: u(6 * RATE)
        }
    );
    assert_eq!(env.credits(ALICE), U256::ZERO);
    assert_eq!(env.c.refund_of(ALICE).unwrap(), (U256::ZERO, U256::ZERO));
    assert_eq!(env.earnings(CREATOR), u(4));
    // A failed payment keeps everything as it was.
    env.buy(BOB, 3);
    env.as_(BOB).c.request_refund(u(3)).unwrap();
    env.take_logs();
    env.vm
        .mock_call(BOB, vec![], u(3 * RATE), Err(b"no".to_vec()));
    env.at(ready + REFUND_DELAY);
    assert_eq!(
        env.as_(BOB).c.claim_refund(),
        Err(MarketplaceError::TransferFailed(TransferFailed {
            to: BOB,
            amount: u(3 * RATE)
        }))
    );
    assert_eq!(env.credits(BOB), u(3));
    assert_eq!(env.c.refund_of(BOB).unwrap().0, u(3));
    assert!(env.take_logs().is_empty());
}

// ---------------------------------------------------------------- ABI details

#[test]
fn errors_encode_as_solidity_custom_errors() {
    let err = MarketplaceError::InsufficientCredits(InsufficientCredits {
        user: BOB,
        needed: u(6),
        available: u(5),
    });
    let bytes: Vec<u8> = err.into();
    assert_eq!(
        bytes[..4],
        keccak256("InsufficientCredits(address,uint256,uint256)")[..4]
    );
    let back = InsufficientCredits::abi_decode(&bytes).unwrap();
    assert_eq!((back.user, back.needed, back.available), (BOB, u(6), u(5)));
    let bytes: Vec<u8> = too_early_err(5).into();
    assert_eq!(bytes[..4], keccak256("TooEarly(uint256)")[..4]);
}

/// Event signature and number of indexed parameters of each event in abi/MarketplaceEvents.sol.
fn events_in_hand_list() -> Vec<(String, usize)> {
    include_str!("../../abi/MarketplaceEvents.sol")
        .lines()
        .map(str::trim)
        .filter_map(|line| line.strip_prefix("event "))
        .map(|decl| {
            let (name, rest) = decl.split_once('(').unwrap();
            let params = rest.rsplit_once(')').unwrap().0;
            let mut indexed = 0;
            let types: Vec<&str> = params
                .split(',')
                .map(|p| {
                    let words: Vec<&str> = p.split_whitespace().collect();
                    indexed += usize::from(words.contains(&"indexed"));
                    words[0]
                })
                .collect();
            (format!("{name}({})", types.join(",")), indexed)
        })
        .collect()
}

fn event_of<E: SolEvent>() -> (String, usize) {
    // topic 0 is the signature hash
    (
        E::SIGNATURE.to_string(),
        <E::TopicList as alloy_sol_types::TopicList>::COUNT - 1,
    )
}

#[test]
fn hand_kept_event_list_matches_the_contract() {
    let code = vec![
        event_of::<ModelRegistered>(),
        event_of::<PriceUpdated>(),
        event_of::<ModelDeactivated>(),
        event_of::<CreditsBought>(),
        event_of::<UsageSettled>(),
        event_of::<UsageRejected>(),
        event_of::<BatchSettled>(),
        event_of::<Withdrawn>(),
        event_of::<OperatorProposed>(),
        event_of::<OperatorSet>(),
        event_of::<AdminProposed>(),
        event_of::<AdminChanged>(),
        event_of::<PauseSet>(),
        event_of::<DailyCapSet>(),
        event_of::<RefundRequested>(),
        event_of::<Refunded>(),
    ];
    assert_eq!(events_in_hand_list(), code);
    let hand = include_str!("../../abi/MarketplaceEvents.sol");
    assert!(hand.contains(
        "struct UsageRecord {\n    address user;\n    bytes32 modelId;\n    uint64 calls;\n    uint256 credits;\n    uint64 day;\n    bytes32 receiptBatchHash;\n}"
    ));
    assert_eq!(
        <UsageRecord as stylus_sdk::abi::AbiType>::SELECTOR_ABI.to_string(),
        "(address,bytes32,uint64,uint256,uint64,bytes32)"
    );
}
