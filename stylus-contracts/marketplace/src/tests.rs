//! TestVM tests: every function, access rule and error of the Marketplace, replayed batches,
//! inactive models, overflow, atomicity of failed calls, and the hand-kept event list.

use alloc::vec;

use alloy_primitives::{address, keccak256, B256};
use alloy_sol_types::{SolError, SolEvent};
use stylus_sdk::testing::TestVM;

use super::*;

const DEPLOYER: Address = address!("00000000000000000000000000000000000000d0");
const ADMIN: Address = address!("00000000000000000000000000000000000000a1");
const ADMIN2: Address = address!("00000000000000000000000000000000000000a2");
const OPERATOR: Address = address!("00000000000000000000000000000000000000b1");
const CREATOR: Address = address!("00000000000000000000000000000000000000c1");
const CREATOR2: Address = address!("00000000000000000000000000000000000000c2");
const ALICE: Address = address!("0000000000000000000000000000000000000a11");
const BOB: Address = address!("0000000000000000000000000000000000000b0b");
const STRANGER: Address = address!("0000000000000000000000000000000000000bad");

/// Price of a credit in the default deployment.
const RATE: u64 = 1_000;

fn id(n: u8) -> FixedBytes<32> {
    FixedBytes::repeat_byte(n)
}

fn u(n: u64) -> U256 {
    U256::from(n)
}

struct Env {
    vm: TestVM,
    c: Marketplace,
}

impl Env {
    /// Deployed with `RATE`, OPERATOR enabled, logs cleared.
    fn new() -> Env {
        let mut env = Env::deployed(u(RATE));
        env.as_(ADMIN).c.set_operator(OPERATOR, true).unwrap();
        env.vm.clear_mocks();
        env
    }

    fn deployed(rate: U256) -> Env {
        let vm = TestVM::default();
        let mut c = Marketplace::from(&vm);
        vm.set_sender(DEPLOYER);
        c.constructor(ADMIN, rate).unwrap();
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

    /// CREATOR registers model `n` at `price` credits per call.
    fn register(&mut self, n: u8, owner: Address, price: u64) {
        self.as_(owner)
            .c
            .register_model(id(n), id(0xc0 + n), id(0xe0 + n), u(price))
            .unwrap();
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

fn rec(user: Address, model: u8, calls: u64) -> UsageRecord {
    UsageRecord {
        user,
        modelId: id(model),
        calls,
        receiptBatchHash: id(0x70 + model),
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

fn unauthorized_err(who: Address) -> MarketplaceError {
    MarketplaceError::Unauthorized(Unauthorized { caller: who })
}

// ---------------------------------------------------------------- deploy and admin

#[test]
fn constructor_sets_admin_and_rate_and_logs_admin_change() {
    let env = Env::deployed(u(RATE));
    assert_eq!(env.c.admin().unwrap(), ADMIN);
    assert_eq!(env.c.wei_per_credit().unwrap(), u(RATE));
    let ev: AdminChanged = one(&env.take_logs());
    assert_eq!(
        ev,
        AdminChanged {
            previousAdmin: Address::ZERO,
            newAdmin: ADMIN
        }
    );
}

#[test]
fn constructor_rejects_zero_admin_and_zero_rate() {
    let vm = TestVM::default();
    let mut c = Marketplace::from(&vm);
    assert_eq!(
        c.constructor(Address::ZERO, u(1)),
        Err(MarketplaceError::ZeroAddress(ZeroAddress {}))
    );
    assert_eq!(
        c.constructor(ADMIN, U256::ZERO),
        Err(MarketplaceError::InvalidRate(InvalidRate {}))
    );
    assert!(vm.get_emitted_logs().is_empty());
    assert_eq!(c.admin().unwrap(), Address::ZERO);
}

#[test]
fn set_operator_grants_and_revokes_with_events() {
    let mut env = Env::deployed(u(RATE));
    env.take_logs();
    assert!(!env.c.is_operator(OPERATOR).unwrap());
    env.as_(ADMIN).c.set_operator(OPERATOR, true).unwrap();
    assert!(env.c.is_operator(OPERATOR).unwrap());
    assert_eq!(
        one::<OperatorSet>(&env.take_logs()),
        OperatorSet {
            operator: OPERATOR,
            enabled: true
        }
    );
    env.as_(ADMIN).c.set_operator(OPERATOR, false).unwrap();
    assert!(!env.c.is_operator(OPERATOR).unwrap());
    assert_eq!(
        one::<OperatorSet>(&env.take_logs()),
        OperatorSet {
            operator: OPERATOR,
            enabled: false
        }
    );
}

#[test]
fn set_operator_is_admin_only_and_refuses_zero() {
    let mut env = Env::new();
    for who in [STRANGER, OPERATOR, CREATOR, DEPLOYER] {
        assert_eq!(
            env.as_(who).c.set_operator(STRANGER, true),
            Err(unauthorized_err(who))
        );
    }
    assert!(!env.c.is_operator(STRANGER).unwrap());
    assert_eq!(
        env.as_(ADMIN).c.set_operator(Address::ZERO, true),
        Err(MarketplaceError::ZeroAddress(ZeroAddress {}))
    );
    assert!(env.take_logs().is_empty());
}

#[test]
fn set_admin_hands_over_the_role() {
    let mut env = Env::new();
    env.as_(ADMIN).c.set_admin(ADMIN2).unwrap();
    assert_eq!(env.c.admin().unwrap(), ADMIN2);
    assert_eq!(
        one::<AdminChanged>(&env.take_logs()),
        AdminChanged {
            previousAdmin: ADMIN,
            newAdmin: ADMIN2
        }
    );
    // The old admin lost its powers, the new one has them.
    assert_eq!(
        env.as_(ADMIN).c.set_operator(BOB, true),
        Err(unauthorized_err(ADMIN))
    );
    assert_eq!(
        env.as_(ADMIN).c.set_admin(ADMIN),
        Err(unauthorized_err(ADMIN))
    );
    env.as_(ADMIN2).c.set_operator(BOB, true).unwrap();
    assert!(env.c.is_operator(BOB).unwrap());
}

#[test]
fn set_admin_is_admin_only_and_refuses_zero() {
    let mut env = Env::new();
    assert_eq!(
        env.as_(STRANGER).c.set_admin(STRANGER),
        Err(unauthorized_err(STRANGER))
    );
    assert_eq!(
        env.as_(OPERATOR).c.set_admin(OPERATOR),
        Err(unauthorized_err(OPERATOR))
    );
    assert_eq!(
        env.as_(ADMIN).c.set_admin(Address::ZERO),
        Err(MarketplaceError::ZeroAddress(ZeroAddress {}))
    );
    assert_eq!(env.c.admin().unwrap(), ADMIN);
    assert!(env.take_logs().is_empty());
}

// ---------------------------------------------------------------- models

#[test]
fn register_model_makes_the_caller_owner() {
    let mut env = Env::new();
    env.as_(CREATOR)
        .c
        .register_model(id(1), id(2), id(3), u(7))
        .unwrap();
    assert_eq!(
        env.c.get_model(id(1)).unwrap(),
        (CREATOR, id(2), id(3), u(7), true)
    );
    assert_eq!(
        one::<ModelRegistered>(&env.take_logs()),
        ModelRegistered {
            modelId: id(1),
            owner: CREATOR,
            cidHash: id(2),
            commitment: id(3),
            pricePerCall: u(7)
        }
    );
}

#[test]
fn register_model_twice_reverts_even_for_the_owner() {
    let mut env = Env::new();
    env.register(1, CREATOR, 7);
    env.take_logs();
    let dup = MarketplaceError::ModelAlreadyRegistered(ModelAlreadyRegistered { modelId: id(1) });
    assert_eq!(
        env.as_(CREATOR2)
            .c
            .register_model(id(1), id(9), id(9), u(1)),
        Err(dup.clone())
    );
    assert_eq!(
        env.as_(CREATOR).c.register_model(id(1), id(9), id(9), u(1)),
        Err(dup)
    );
    assert_eq!(
        env.c.get_model(id(1)).unwrap(),
        (CREATOR, id(0xc1), id(0xe1), u(7), true)
    );
    assert!(env.take_logs().is_empty());
}

#[test]
fn get_model_of_unknown_id_reverts() {
    let env = Env::new();
    assert_eq!(
        env.c.get_model(id(42)),
        Err(MarketplaceError::UnknownModel(UnknownModel {
            modelId: id(42)
        }))
    );
}

#[test]
fn update_price_by_owner() {
    let mut env = Env::new();
    env.register(1, CREATOR, 7);
    env.take_logs();
    env.as_(CREATOR).c.update_price(id(1), u(11)).unwrap();
    assert_eq!(env.c.get_model(id(1)).unwrap().3, u(11));
    assert_eq!(
        one::<PriceUpdated>(&env.take_logs()),
        PriceUpdated {
            modelId: id(1),
            oldPrice: u(7),
            newPrice: u(11)
        }
    );
}

#[test]
fn update_price_access_unknown_and_inactive() {
    let mut env = Env::new();
    env.register(1, CREATOR, 7);
    for who in [CREATOR2, ADMIN, OPERATOR] {
        assert_eq!(
            env.as_(who).c.update_price(id(1), u(1)),
            Err(unauthorized_err(who))
        );
    }
    assert_eq!(
        env.as_(CREATOR).c.update_price(id(2), u(1)),
        Err(MarketplaceError::UnknownModel(UnknownModel {
            modelId: id(2)
        }))
    );
    env.as_(CREATOR).c.deactivate(id(1)).unwrap();
    env.take_logs();
    assert_eq!(
        env.as_(CREATOR).c.update_price(id(1), u(1)),
        Err(MarketplaceError::ModelInactive(ModelInactive {
            modelId: id(1)
        }))
    );
    // Ownership is checked before activity.
    assert_eq!(
        env.as_(CREATOR2).c.update_price(id(1), u(1)),
        Err(unauthorized_err(CREATOR2))
    );
    assert_eq!(env.c.get_model(id(1)).unwrap().3, u(7));
    assert!(env.take_logs().is_empty());
}

#[test]
fn deactivate_by_owner_once() {
    let mut env = Env::new();
    env.register(1, CREATOR, 7);
    env.take_logs();
    assert_eq!(
        env.as_(CREATOR2).c.deactivate(id(1)),
        Err(unauthorized_err(CREATOR2))
    );
    assert_eq!(
        env.as_(ADMIN).c.deactivate(id(1)),
        Err(unauthorized_err(ADMIN))
    );
    assert_eq!(
        env.as_(CREATOR).c.deactivate(id(9)),
        Err(MarketplaceError::UnknownModel(UnknownModel {
            modelId: id(9)
        }))
    );
    assert!(env.take_logs().is_empty());
    env.as_(CREATOR).c.deactivate(id(1)).unwrap();
    assert!(!env.c.get_model(id(1)).unwrap().4);
    assert_eq!(
        one::<ModelDeactivated>(&env.take_logs()),
        ModelDeactivated {
            modelId: id(1),
            owner: CREATOR
        }
    );
    assert_eq!(
        env.as_(CREATOR).c.deactivate(id(1)),
        Err(MarketplaceError::ModelInactive(ModelInactive {
            modelId: id(1)
        }))
    );
    // A deactivated id stays taken.
    assert_eq!(
        env.as_(CREATOR).c.register_model(id(1), id(1), id(1), u(1)),
        Err(MarketplaceError::ModelAlreadyRegistered(
            ModelAlreadyRegistered { modelId: id(1) }
        ))
    );
}

// ---------------------------------------------------------------- credits

#[test]
fn buy_credits_at_the_deploy_rate_accumulates() {
    let mut env = Env::new();
    assert_eq!(env.credits(ALICE), U256::ZERO);
    assert_eq!(env.pay(ALICE, u(5 * RATE)).c.buy_credits().unwrap(), u(5));
    assert_eq!(
        one::<CreditsBought>(&env.take_logs()),
        CreditsBought {
            buyer: ALICE,
            amountWei: u(5 * RATE),
            credits: u(5)
        }
    );
    env.buy(ALICE, 3);
    assert_eq!(env.credits(ALICE), u(8));
    assert_eq!(env.credits(BOB), U256::ZERO);
}

#[test]
fn buy_credits_refuses_zero_and_non_multiples() {
    let mut env = Env::new();
    for wei in [0, 1, RATE - 1, RATE + 1, 7 * RATE + 999] {
        assert_eq!(
            env.pay(ALICE, u(wei)).c.buy_credits(),
            Err(MarketplaceError::InvalidPayment(InvalidPayment {
                value: u(wei)
            }))
        );
    }
    assert_eq!(env.credits(ALICE), U256::ZERO);
    assert!(env.take_logs().is_empty());
}

#[test]
fn buy_credits_overflow_is_a_custom_error() {
    let mut env = Env::deployed(u(1));
    env.pay(ALICE, U256::MAX).c.buy_credits().unwrap();
    assert_eq!(env.credits(ALICE), U256::MAX);
    env.take_logs();
    assert_eq!(
        env.pay(ALICE, u(1)).c.buy_credits(),
        Err(MarketplaceError::ArithmeticOverflow(ArithmeticOverflow {}))
    );
    assert_eq!(env.credits(ALICE), U256::MAX);
    assert!(env.take_logs().is_empty());
}

// ---------------------------------------------------------------- settlement

#[test]
fn consume_credits_debits_users_and_credits_owners() {
    let mut env = Env::new();
    env.register(1, CREATOR, 3);
    env.register(2, CREATOR2, 5);
    env.buy(ALICE, 100);
    env.buy(BOB, 10);
    env.take_logs();
    env.settle(
        7,
        vec![
            rec(ALICE, 1, 4),
            rec(BOB, 2, 2),
            rec(ALICE, 2, 1),
            rec(BOB, 1, 0),
        ],
    )
    .unwrap();
    assert_eq!(env.credits(ALICE), u(100 - 12 - 5));
    assert_eq!(env.credits(BOB), u(10 - 10));
    assert_eq!(env.earnings(CREATOR), u(12));
    assert_eq!(env.earnings(CREATOR2), u(15));
    assert!(env.c.is_batch_settled(id(7)).unwrap());
    assert!(!env.c.is_batch_settled(id(8)).unwrap());

    let logs = env.take_logs();
    assert_eq!(logs.len(), 5);
    let usage = decode::<UsageSettled>(&logs[..4]);
    let want = [
        (ALICE, 1, 4, 12),
        (BOB, 2, 2, 10),
        (ALICE, 2, 1, 5),
        (BOB, 1, 0, 0),
    ];
    for (ev, (user, model, calls, cost)) in usage.iter().zip(want) {
        assert_eq!(
            *ev,
            UsageSettled {
                batchId: id(7),
                user,
                modelId: id(model),
                calls,
                credits: u(cost),
                receiptBatchHash: id(0x70 + model),
            }
        );
    }
    assert_eq!(
        one::<BatchSettled>(&logs[4..]),
        BatchSettled {
            batchId: id(7),
            operator: OPERATOR,
            records: u(4),
            totalCredits: u(27)
        }
    );
}

#[test]
fn consume_credits_is_operator_only() {
    let mut env = Env::new();
    env.register(1, CREATOR, 3);
    env.buy(ALICE, 10);
    for who in [STRANGER, ADMIN, CREATOR, ALICE] {
        assert_eq!(
            env.as_(who)
                .c
                .consume_credits(id(1), vec![rec(ALICE, 1, 1)]),
            Err(unauthorized_err(who))
        );
    }
    // A revoked operator is refused too.
    env.as_(ADMIN).c.set_operator(OPERATOR, false).unwrap();
    env.take_logs();
    assert_eq!(
        env.settle(1, vec![rec(ALICE, 1, 1)]),
        Err(unauthorized_err(OPERATOR))
    );
    assert_eq!(env.credits(ALICE), u(10));
    assert!(!env.c.is_batch_settled(id(1)).unwrap());
    assert!(env.take_logs().is_empty());
}

#[test]
fn replayed_batch_is_refused() {
    let mut env = Env::new();
    env.register(1, CREATOR, 3);
    env.buy(ALICE, 10);
    env.settle(1, vec![rec(ALICE, 1, 1)]).unwrap();
    env.take_logs();
    let replay = MarketplaceError::BatchAlreadySettled(BatchAlreadySettled { batchId: id(1) });
    assert_eq!(env.settle(1, vec![rec(ALICE, 1, 1)]), Err(replay.clone()));
    // Even with different records, and even though it would otherwise fail for another reason.
    assert_eq!(env.settle(1, vec![rec(BOB, 9, 1)]), Err(replay.clone()));
    assert_eq!(env.settle(1, vec![]), Err(replay));
    assert_eq!(env.credits(ALICE), u(7));
    assert_eq!(env.earnings(CREATOR), u(3));
    assert!(env.take_logs().is_empty());
    env.settle(2, vec![rec(ALICE, 1, 1)]).unwrap();
    assert_eq!(env.credits(ALICE), u(4));
}

#[test]
fn empty_batch_is_refused_and_not_burned() {
    let mut env = Env::new();
    assert_eq!(
        env.settle(1, vec![]),
        Err(MarketplaceError::EmptyBatch(EmptyBatch {}))
    );
    assert!(!env.c.is_batch_settled(id(1)).unwrap());
}

#[test]
fn insufficient_credits_reverts_the_whole_batch_naming_the_user() {
    let mut env = Env::new();
    env.register(1, CREATOR, 3);
    env.buy(ALICE, 100);
    env.buy(BOB, 5);
    env.take_logs();
    let err = env.settle(1, vec![rec(ALICE, 1, 2), rec(BOB, 1, 2)]);
    assert_eq!(
        err,
        Err(MarketplaceError::InsufficientCredits(InsufficientCredits {
            user: BOB,
            needed: u(6),
            available: u(5)
        }))
    );
    // Nothing moved, the batch id is still free.
    assert_eq!(env.credits(ALICE), u(100));
    assert_eq!(env.credits(BOB), u(5));
    assert_eq!(env.earnings(CREATOR), U256::ZERO);
    assert!(!env.c.is_batch_settled(id(1)).unwrap());
    assert!(env.take_logs().is_empty());
    // The ledger can settle the same id without the bad record.
    env.settle(1, vec![rec(ALICE, 1, 2)]).unwrap();
    assert_eq!(env.credits(ALICE), u(94));
}

#[test]
fn a_user_overspending_across_records_of_one_batch_is_caught() {
    let mut env = Env::new();
    env.register(1, CREATOR, 3);
    env.buy(ALICE, 10);
    let err = env.settle(
        1,
        vec![rec(ALICE, 1, 2), rec(ALICE, 1, 1), rec(ALICE, 1, 1)],
    );
    assert_eq!(
        err,
        Err(MarketplaceError::InsufficientCredits(InsufficientCredits {
            user: ALICE,
            needed: u(3),
            available: u(1)
        }))
    );
    assert_eq!(env.credits(ALICE), u(10));
    // A user with no credits at all.
    assert_eq!(
        env.settle(2, vec![rec(BOB, 1, 1)]),
        Err(MarketplaceError::InsufficientCredits(InsufficientCredits {
            user: BOB,
            needed: u(3),
            available: U256::ZERO
        }))
    );
}

#[test]
fn unknown_model_in_batch_reverts() {
    let mut env = Env::new();
    env.register(1, CREATOR, 3);
    env.buy(ALICE, 10);
    env.take_logs();
    assert_eq!(
        env.settle(1, vec![rec(ALICE, 1, 1), rec(ALICE, 9, 1)]),
        Err(MarketplaceError::UnknownModel(UnknownModel {
            modelId: id(9)
        }))
    );
    assert_eq!(env.credits(ALICE), u(10));
    assert!(!env.c.is_batch_settled(id(1)).unwrap());
    assert!(env.take_logs().is_empty());
}

#[test]
fn inactive_model_in_batch_reverts() {
    let mut env = Env::new();
    env.register(1, CREATOR, 3);
    env.register(2, CREATOR2, 3);
    env.buy(ALICE, 10);
    env.settle(1, vec![rec(ALICE, 2, 1)]).unwrap();
    env.as_(CREATOR2).c.deactivate(id(2)).unwrap();
    env.take_logs();
    assert_eq!(
        env.settle(2, vec![rec(ALICE, 1, 1), rec(ALICE, 2, 1)]),
        Err(MarketplaceError::ModelInactive(ModelInactive {
            modelId: id(2)
        }))
    );
    assert_eq!(env.credits(ALICE), u(7));
    assert!(env.take_logs().is_empty());
    // Earnings from before the deactivation stay withdrawable.
    assert_eq!(env.as_(CREATOR2).c.withdraw().unwrap(), u(3 * RATE));
}

#[test]
fn errors_are_reported_in_record_order() {
    let mut env = Env::new();
    env.register(1, CREATOR, 3);
    // BOB has no credits (record 0) and model 9 is unknown (record 1): record 0 wins.
    assert_eq!(
        env.settle(1, vec![rec(BOB, 1, 1), rec(BOB, 9, 1)]),
        Err(MarketplaceError::InsufficientCredits(InsufficientCredits {
            user: BOB,
            needed: u(3),
            available: U256::ZERO
        }))
    );
}

#[test]
fn price_times_calls_overflow_reverts() {
    let mut env = Env::new();
    env.as_(CREATOR)
        .c
        .register_model(id(1), id(1), id(1), U256::MAX)
        .unwrap();
    env.buy(ALICE, 10);
    env.take_logs();
    assert_eq!(
        env.settle(1, vec![rec(ALICE, 1, 2)]),
        Err(MarketplaceError::ArithmeticOverflow(ArithmeticOverflow {}))
    );
    assert!(env.take_logs().is_empty());
}

#[test]
fn earnings_and_batch_total_overflow_revert() {
    // Earnings: CREATOR already has MAX - 1; one more credit fits, two do not.
    let mut env = Env::deployed(u(1));
    env.as_(ADMIN).c.set_operator(OPERATOR, true).unwrap();
    env.as_(CREATOR)
        .c
        .register_model(id(1), id(1), id(1), u(1))
        .unwrap();
    env.pay(ALICE, U256::MAX).c.buy_credits().unwrap();
    env.as_(OPERATOR)
        .c
        .consume_credits(
            id(1),
            vec![UsageRecord {
                user: ALICE,
                modelId: id(1),
                calls: u64::MAX,
                receiptBatchHash: id(0),
            }],
        )
        .unwrap();
    env.as_(CREATOR)
        .c
        .update_price(id(1), U256::MAX - u(u64::MAX) - u(1))
        .unwrap();
    env.as_(OPERATOR)
        .c
        .consume_credits(id(2), vec![rec(ALICE, 1, 1)])
        .unwrap();
    assert_eq!(env.earnings(CREATOR), U256::MAX - u(1));
    env.pay(BOB, u(10)).c.buy_credits().unwrap();
    env.as_(CREATOR).c.update_price(id(1), u(1)).unwrap();
    env.take_logs();
    assert_eq!(
        env.as_(OPERATOR)
            .c
            .consume_credits(id(3), vec![rec(BOB, 1, 1), rec(BOB, 1, 1)]),
        Err(MarketplaceError::ArithmeticOverflow(ArithmeticOverflow {}))
    );
    assert_eq!(env.credits(BOB), u(10));
    assert!(env.take_logs().is_empty());

    // Batch total: two owners, each cost fits, the sum does not.
    let mut env = Env::deployed(u(1));
    env.as_(ADMIN).c.set_operator(OPERATOR, true).unwrap();
    let half = U256::MAX / u(2) + u(1);
    env.as_(CREATOR)
        .c
        .register_model(id(1), id(1), id(1), half)
        .unwrap();
    env.as_(CREATOR2)
        .c
        .register_model(id(2), id(2), id(2), half)
        .unwrap();
    env.pay(ALICE, U256::MAX).c.buy_credits().unwrap();
    env.pay(BOB, U256::MAX).c.buy_credits().unwrap();
    assert_eq!(
        env.as_(OPERATOR)
            .c
            .consume_credits(id(1), vec![rec(ALICE, 1, 1), rec(BOB, 2, 1)]),
        Err(MarketplaceError::ArithmeticOverflow(ArithmeticOverflow {}))
    );
    assert_eq!(env.earnings(CREATOR), U256::ZERO);
}

// ---------------------------------------------------------------- withdraw

#[test]
fn withdraw_pays_earnings_at_the_rate_and_zeroes_them() {
    let mut env = Env::new();
    env.register(1, CREATOR, 3);
    env.buy(ALICE, 10);
    env.settle(1, vec![rec(ALICE, 1, 3)]).unwrap();
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
fn withdraw_without_earnings_reverts() {
    let mut env = Env::new();
    assert_eq!(
        env.as_(STRANGER).c.withdraw(),
        Err(MarketplaceError::NothingToWithdraw(NothingToWithdraw {
            owner: STRANGER
        }))
    );
    assert!(env.take_logs().is_empty());
}

#[test]
fn failed_payout_reverts_with_transfer_failed_and_keeps_earnings() {
    let mut env = Env::new();
    env.register(1, CREATOR, 3);
    env.buy(ALICE, 10);
    env.settle(1, vec![rec(ALICE, 1, 1)]).unwrap();
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
    // Credits bought at rate 2 by three users add up to more earnings than MAX / 2.
    let mut env = Env::deployed(u(2));
    env.as_(ADMIN).c.set_operator(OPERATOR, true).unwrap();
    let big = U256::MAX / u(2) - u(1);
    env.as_(CREATOR)
        .c
        .register_model(id(1), id(1), id(1), big / u(2))
        .unwrap();
    for who in [ALICE, BOB, STRANGER] {
        env.pay(who, big).c.buy_credits().unwrap();
    }
    env.as_(OPERATOR)
        .c
        .consume_credits(
            id(1),
            vec![rec(ALICE, 1, 1), rec(BOB, 1, 1), rec(STRANGER, 1, 1)],
        )
        .unwrap();
    env.take_logs();
    assert_eq!(
        env.as_(CREATOR).c.withdraw(),
        Err(MarketplaceError::ArithmeticOverflow(ArithmeticOverflow {}))
    );
    assert_eq!(env.earnings(CREATOR), (big / u(2)) * u(3));
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
    let bytes: Vec<u8> =
        MarketplaceError::BatchAlreadySettled(BatchAlreadySettled { batchId: id(1) }).into();
    assert_eq!(bytes[..4], keccak256("BatchAlreadySettled(bytes32)")[..4]);
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
        event_of::<BatchSettled>(),
        event_of::<Withdrawn>(),
        event_of::<OperatorSet>(),
        event_of::<AdminChanged>(),
    ];
    assert_eq!(events_in_hand_list(), code);
    let hand = include_str!("../../abi/MarketplaceEvents.sol");
    assert!(hand.contains(
        "struct UsageRecord {\n    address user;\n    bytes32 modelId;\n    uint64 calls;\n    bytes32 receiptBatchHash;\n}"
    ));
    assert_eq!(
        <UsageRecord as stylus_sdk::abi::AbiType>::SELECTOR_ABI.to_string(),
        "(address,bytes32,uint64,bytes32)"
    );
}

// ---------------------------------------------------------------- the ledger scenario suite

/// The contract's half of the ledger scenario suite (`crates/cli/tests/it/ledger.rs` tells the
/// same stories through the gateway, on the embedded ledger and on the twin on anvil): a model
/// at 3 credits, a user who buys 10, three calls settled (1 left, 9 earned), the fourth call
/// refused; a settlement sent by a key that isn't an operator, then by the operator; the same
/// batch sent again; the creator withdrawing.
#[test]
fn ledger_scenario_buy_settle_withdraw() {
    let mut env = Env::new();
    env.register(1, CREATOR, 3);
    env.buy(ALICE, 10);

    // An operator key that isn't an operator changes nothing.
    assert_eq!(
        env.as_(STRANGER)
            .c
            .consume_credits(id(1), vec![rec(ALICE, 1, 3)]),
        Err(unauthorized_err(STRANGER))
    );
    assert_eq!(env.credits(ALICE), u(10));

    // Three calls settle: 1 credit left, 9 earned.
    env.settle(1, vec![rec(ALICE, 1, 3)]).unwrap();
    assert_eq!(env.credits(ALICE), u(1));
    assert_eq!(env.earnings(CREATOR), u(9));

    // The same batch again (a retry after a lost answer) is refused and charges nothing.
    assert_eq!(
        env.settle(1, vec![rec(ALICE, 1, 3)]),
        Err(MarketplaceError::BatchAlreadySettled(BatchAlreadySettled {
            batchId: id(1)
        }))
    );
    assert_eq!(env.credits(ALICE), u(1));

    // A fourth call the gateway would have refused can't be settled either.
    assert_eq!(
        env.settle(2, vec![rec(ALICE, 1, 1)]),
        Err(MarketplaceError::InsufficientCredits(InsufficientCredits {
            user: ALICE,
            needed: u(3),
            available: u(1)
        }))
    );

    // The creator is paid 9 credits' worth of wei, once.
    assert_eq!(env.as_(CREATOR).c.withdraw().unwrap(), u(9 * RATE));
    assert_eq!(env.earnings(CREATOR), U256::ZERO);
}
