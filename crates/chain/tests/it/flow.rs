//! The marketplace's life on a real node: deploy, register (keys bound to the owner), buy (read
//! back as deposits), settle (what settled and what was skipped, read back from the receipt),
//! refusals decoded with their arguments, withdraw, refunds after their lock, operators and
//! admin handed over after their delays, pause; daily caps lowered only after their delay and
//! counted per day label.

use alloy::providers::Provider;
use modelhub_chain::{
    B256, ChainError, Marketplace, Rejection, Revert, U256, UsageRecord, cid_hash, digest_word,
    local_id, model_key, records_hash,
};

use crate::{Chain, WEI_PER_CREDIT};

const OPERATOR: usize = 1;
const OWNER: usize = 2;
const BUYER: usize = 3;
const DAY: u64 = 86_400;

/// `calls` calls by `user` to `model`, charged `credits` on the UTC day `day` (unix seconds /
/// 86400; the contract settles only today's and yesterday's).
fn usage(user: usize, model: B256, calls: u64, credits: u64, day: u64) -> UsageRecord {
    UsageRecord {
        user: Chain::address(user),
        modelId: model,
        calls,
        credits: U256::from(credits),
        day,
        receiptBatchHash: B256::repeat_byte(0x42),
    }
}

#[tokio::test]
async fn deploy_register_buy_settle_and_withdraw() {
    let chain = Chain::start().await;
    let admin = &chain.admin;
    let day = chain.today().await;
    assert_eq!(admin.chain_id().await.unwrap(), 31337);
    assert_eq!(admin.admin().await.unwrap(), Chain::address(0));
    assert_eq!(admin.sender(), Some(Chain::address(0)));
    assert_eq!(
        admin.wei_per_credit().await.unwrap(),
        U256::from(WEI_PER_CREDIT)
    );
    // The first operator came with the deployment.
    assert!(admin.is_operator(Chain::address(OPERATOR)).await.unwrap());
    assert!(!admin.paused().await.unwrap());

    // An owner registers a model at 3 credits per call; its key binds the owner.
    let owner = chain.as_account(OWNER).await;
    let model = model_key(Chain::address(OWNER), "acme/digits");
    let commitment = digest_word(&"01".repeat(32)).unwrap();
    owner
        .register_model(
            local_id("acme/digits"),
            cid_hash("bafymodel"),
            commitment,
            U256::from(3),
        )
        .await
        .unwrap();
    let on_chain = owner.get_model(model).await.unwrap().expect("registered");
    assert_eq!(on_chain.owner, Chain::address(OWNER));
    assert_eq!(on_chain.cid_hash, cid_hash("bafymodel"));
    assert_eq!(on_chain.commitment, commitment);
    assert_eq!(on_chain.price_per_call, U256::from(3));
    assert!(on_chain.active);
    assert_eq!(
        owner
            .get_model(model_key(Chain::address(OWNER), "nobody/nothing"))
            .await
            .unwrap(),
        None
    );
    match owner
        .register_model(
            local_id("acme/digits"),
            B256::ZERO,
            B256::ZERO,
            U256::from(1),
        )
        .await
    {
        Err(ChainError::Reverted(Revert::ModelAlreadyRegistered(id))) => assert_eq!(id, model),
        other => panic!("expected ModelAlreadyRegistered, got {other:?}"),
    }
    // Someone else registering the same id gets their own key; the owner's model is untouched.
    let squatter = chain.as_account(BUYER).await;
    squatter
        .register_model(
            local_id("acme/digits"),
            B256::ZERO,
            B256::ZERO,
            U256::from(99),
        )
        .await
        .unwrap();
    assert_eq!(
        owner.get_model(model).await.unwrap().unwrap().owner,
        Chain::address(OWNER)
    );

    // A buyer buys 10 credits; the deposit is read back from the logs.
    let buyer = chain.as_account(BUYER).await;
    let before = buyer.block_number().await.unwrap();
    let tx = buyer.buy_credits(U256::from(10)).await.unwrap();
    assert_eq!(
        buyer.credits_of(Chain::address(BUYER)).await.unwrap(),
        U256::from(10)
    );
    let head = buyer.block_number().await.unwrap();
    let deposits = buyer.deposits(before + 1, head).await.unwrap();
    assert_eq!(deposits.len(), 1, "{deposits:?}");
    let d = &deposits[0];
    assert_eq!(d.buyer, Chain::address(BUYER));
    assert_eq!(d.credits, U256::from(10));
    assert_eq!(d.amount_wei, U256::from(10 * WEI_PER_CREDIT));
    assert_eq!(d.at.tx_hash, tx);
    assert_eq!(d.at.block, head);
    assert_eq!(d.at.position, 0);
    assert!(buyer.deposits(head + 1, head).await.unwrap().is_empty());
    assert!(buyer.deposits(0, before).await.unwrap().is_empty());
    // anvil finalizes as it mines.
    assert!(buyer.finalized_block().await.unwrap() <= head);

    // The operator settles 2 calls charged 6 credits, and a record with a wrong charge that
    // is skipped: the receipt says which.
    let operator = chain.as_account(OPERATOR).await;
    let batch = B256::repeat_byte(1);
    let records = vec![
        usage(BUYER, model, 2, 6, day),
        usage(BUYER, model, 1, 30, day),
    ];
    assert_eq!(
        operator
            .batch_records_hash(Chain::address(OPERATOR), batch)
            .await
            .unwrap(),
        None
    );
    let settled = operator
        .consume_credits(batch, records.clone())
        .await
        .unwrap();
    assert_eq!(settled.batch_id, batch);
    assert_eq!(settled.operator, Chain::address(OPERATOR));
    assert_eq!(settled.total_credits, U256::from(6));
    assert_eq!(settled.records_hash, records_hash(&records));
    assert_eq!(settled.records.len(), 2);
    assert_eq!(settled.records[0].rejected, None);
    assert_eq!(settled.records[0].credits, U256::from(6));
    assert_eq!(settled.records[1].rejected, Some(Rejection::PriceMismatch));
    assert_eq!(
        operator
            .batch_records_hash(Chain::address(OPERATOR), batch)
            .await
            .unwrap(),
        Some(records_hash(&records))
    );
    assert_eq!(
        operator.credits_of(Chain::address(BUYER)).await.unwrap(),
        U256::from(4)
    );
    assert_eq!(
        operator.earnings_of(Chain::address(OWNER)).await.unwrap(),
        U256::from(6)
    );

    // Refusals come back decoded, with their arguments, and change nothing.
    match buyer
        .consume_credits(B256::repeat_byte(2), vec![usage(BUYER, model, 1, 3, day)])
        .await
    {
        Err(ChainError::Reverted(Revert::Unauthorized(who))) => {
            assert_eq!(who, Chain::address(BUYER))
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    match operator
        .consume_credits(batch, vec![usage(BUYER, model, 1, 3, day)])
        .await
    {
        Err(ChainError::Reverted(Revert::BatchAlreadySettled(id))) => assert_eq!(id, batch),
        other => panic!("expected BatchAlreadySettled, got {other:?}"),
    }
    match operator.consume_credits(B256::repeat_byte(4), vec![]).await {
        Err(ChainError::Reverted(Revert::EmptyBatch)) => {}
        other => panic!("expected EmptyBatch, got {other:?}"),
    }
    // Overspending is a skipped record, not a refused batch.
    let over = operator
        .consume_credits(B256::repeat_byte(3), vec![usage(BUYER, model, 5, 15, day)])
        .await
        .unwrap();
    assert_eq!(
        over.records[0].rejected,
        Some(Rejection::InsufficientCredits)
    );
    assert_eq!(
        operator.credits_of(Chain::address(BUYER)).await.unwrap(),
        U256::from(4)
    );

    // The owner withdraws: its balance rises by 6 credits' worth, less the gas it paid.
    let provider =
        alloy::providers::ProviderBuilder::new().connect_http(chain.node.uri.parse().unwrap());
    let owner_addr = Chain::address(OWNER);
    let balance_before = provider.get_balance(owner_addr).await.unwrap();
    let tx = owner.withdraw().await.unwrap();
    let receipt = provider
        .get_transaction_receipt(tx)
        .await
        .unwrap()
        .expect("receipt");
    let gas = U256::from(receipt.gas_used) * U256::from(receipt.effective_gas_price);
    let balance_after = provider.get_balance(owner_addr).await.unwrap();
    assert_eq!(
        balance_after + gas - balance_before,
        U256::from(6 * WEI_PER_CREDIT)
    );
    match owner.withdraw().await {
        Err(ChainError::Reverted(Revert::NothingToWithdraw(who))) => assert_eq!(who, owner_addr),
        other => panic!("expected NothingToWithdraw, got {other:?}"),
    }

    // A price change: at most once a day; the old price settles within the day.
    owner.update_price(model, U256::from(1)).await.unwrap();
    match owner.update_price(model, U256::from(2)).await {
        Err(ChainError::Reverted(Revert::TooEarly(_))) => {}
        other => panic!("expected TooEarly, got {other:?}"),
    }
    let (price, previous, _) = owner.get_prices(model).await.unwrap();
    assert_eq!((price, previous), (U256::from(1), U256::from(3)));
    let both = operator
        .consume_credits(
            B256::repeat_byte(5),
            vec![
                usage(BUYER, model, 1, 3, day),
                usage(BUYER, model, 1, 1, day),
            ],
        )
        .await
        .unwrap();
    assert!(
        both.records.iter().all(|r| r.rejected.is_none()),
        "{both:?}"
    );

    // Deactivation is the owner's; usage of a deactivated model is skipped.
    match buyer.deactivate(model).await {
        Err(ChainError::Reverted(Revert::Unauthorized(who))) => {
            assert_eq!(who, Chain::address(BUYER))
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    owner.deactivate(model).await.unwrap();
    let skipped = operator
        .consume_credits(B256::repeat_byte(6), vec![usage(BUYER, model, 1, 1, day)])
        .await
        .unwrap();
    assert_eq!(skipped.records[0].rejected, Some(Rejection::ModelInactive));
}

/// Operators and the admin hand over in two steps after a delay; the admin pauses; a user
/// gets unspent credits back after the refund lock.
#[tokio::test]
async fn roles_pause_and_refunds() {
    let chain = Chain::start().await;
    let admin = &chain.admin;
    let next = chain.as_account(OWNER).await;
    admin
        .set_operator(Chain::address(OWNER), true)
        .await
        .unwrap();
    assert!(!admin.is_operator(Chain::address(OWNER)).await.unwrap());
    match next.accept_operator().await {
        Err(ChainError::Reverted(Revert::TooEarly(t))) => assert!(t > U256::ZERO),
        other => panic!("expected TooEarly, got {other:?}"),
    }
    admin.propose_admin(Chain::address(OWNER)).await.unwrap();
    match next.accept_admin().await {
        Err(ChainError::Reverted(Revert::TooEarly(_))) => {}
        other => panic!("expected TooEarly, got {other:?}"),
    }
    chain.advance(DAY).await;
    next.accept_operator().await.unwrap();
    assert!(admin.is_operator(Chain::address(OWNER)).await.unwrap());
    match next.accept_admin().await {
        Err(ChainError::Reverted(Revert::TooEarly(_))) => {}
        other => panic!("expected TooEarly, got {other:?}"),
    }
    chain.advance(DAY).await;
    next.accept_admin().await.unwrap();
    assert_eq!(admin.admin().await.unwrap(), Chain::address(OWNER));
    match admin.set_paused(true).await {
        Err(ChainError::Reverted(Revert::Unauthorized(who))) => {
            assert_eq!(who, Chain::address(0))
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }

    // Refunds: requested, locked, claimed; never paused.
    let buyer = chain.as_account(BUYER).await;
    buyer.buy_credits(U256::from(5)).await.unwrap();
    // A first cap waits for its delay.
    buyer.set_daily_cap(U256::from(2)).await.unwrap();
    assert_eq!(
        buyer.daily_cap_of(Chain::address(BUYER)).await.unwrap(),
        U256::MAX
    );
    assert_eq!(
        buyer
            .pending_daily_cap_of(Chain::address(BUYER))
            .await
            .unwrap()
            .0,
        U256::from(2)
    );
    let from = buyer.block_number().await.unwrap() + 1;
    let tx = buyer.request_refund(U256::from(4)).await.unwrap();
    let (requested, not_before) = buyer.refund_of(Chain::address(BUYER)).await.unwrap();
    assert_eq!(requested, U256::from(4));
    // The registry follows the request through its event.
    let head = buyer.block_number().await.unwrap();
    let requests = buyer.refund_requests(from, head).await.unwrap();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let r = &requests[0];
    assert_eq!(
        (r.user, r.credits, r.not_before, r.at.tx_hash, r.at.position),
        (Chain::address(BUYER), U256::from(4), not_before, tx, 0)
    );
    // Another event kind in the range is not a refund request.
    assert!(buyer.refund_requests(0, from - 1).await.unwrap().is_empty());
    next.set_paused(true).await.unwrap();
    assert!(buyer.paused().await.unwrap());
    match buyer.buy_credits(U256::from(1)).await {
        Err(ChainError::Reverted(Revert::ContractPaused)) => {}
        other => panic!("expected ContractPaused, got {other:?}"),
    }
    match buyer.claim_refund().await {
        Err(ChainError::Reverted(Revert::TooEarly(_))) => {}
        other => panic!("expected TooEarly, got {other:?}"),
    }
    chain.advance(2 * DAY).await;
    assert_eq!(
        buyer.daily_cap_of(Chain::address(BUYER)).await.unwrap(),
        U256::from(2)
    );
    buyer.claim_refund().await.unwrap();
    assert_eq!(
        buyer.credits_of(Chain::address(BUYER)).await.unwrap(),
        U256::from(1)
    );
    match buyer.claim_refund().await {
        Err(ChainError::Reverted(Revert::NothingToRefund(who))) => {
            assert_eq!(who, Chain::address(BUYER))
        }
        other => panic!("expected NothingToRefund, got {other:?}"),
    }
}

#[tokio::test]
async fn deposits_come_in_chain_order_whatever_the_log_range() {
    let chain = Chain::start().await;
    let buyer = chain.as_account(BUYER).await;
    let other = chain.as_account(OWNER).await;
    let first = buyer.buy_credits(U256::from(1)).await.unwrap();

    // Some blocks without deposits in between (anvil mines one per transaction).
    for _ in 0..3 {
        chain.admin.set_paused(false).await.unwrap();
    }
    let second = other.buy_credits(U256::from(2)).await.unwrap();
    // Two clones sending at once from the same key don't collide on nonces.
    let a = buyer.clone();
    let b = buyer.clone();
    let (third, fourth) = tokio::join!(a.buy_credits(U256::from(3)), b.buy_credits(U256::from(4)));
    let (third, fourth) = (third.unwrap(), fourth.unwrap());

    let head = buyer.block_number().await.unwrap();
    assert!(head >= 7, "{head}");
    let deposits = buyer.deposits(0, head).await.unwrap();
    // The same, asked for two blocks at a time.
    assert_eq!(
        buyer
            .clone()
            .with_log_range(2)
            .deposits(0, head)
            .await
            .unwrap(),
        deposits
    );
    let got: Vec<_> = deposits
        .iter()
        .map(|d| (d.at.tx_hash, d.credits.to::<u64>()))
        .collect();
    assert_eq!(got.len(), 4, "{deposits:?}");
    assert_eq!(got[0], (first, 1));
    assert_eq!(got[1], (second, 2));
    let mut last_two = vec![got[2], got[3]];
    last_two.sort_by_key(|(_, c)| *c);
    assert_eq!(last_two, vec![(third, 3), (fourth, 4)]);
    assert!(
        deposits
            .windows(2)
            .all(|w| (w[0].at.block, w[0].at.log_index) < (w[1].at.block, w[1].at.log_index))
    );
    // One deposit per transaction here: each is the first of its transaction.
    assert!(deposits.iter().all(|d| d.at.position == 0));
    assert_eq!(deposits[1].buyer, Chain::address(OWNER));
    assert_eq!(
        buyer.credits_of(Chain::address(BUYER)).await.unwrap(),
        U256::from(8)
    );
    // A range in the middle sees only what it covers.
    let middle = buyer
        .deposits(deposits[0].at.block + 1, deposits[1].at.block)
        .await
        .unwrap();
    assert_eq!(middle.len(), 1);
    assert_eq!(middle[0].at.tx_hash, second);
}

#[tokio::test]
async fn reads_work_without_a_signer_and_writes_need_one() {
    let chain = Chain::start().await;
    let reader = Marketplace::connect(&chain.node.uri, chain.admin.address(), None)
        .await
        .unwrap();
    assert_eq!(reader.sender(), None);
    assert_eq!(reader.admin().await.unwrap(), Chain::address(0));
    match reader.buy_credits(U256::from(1)).await {
        Err(ChainError::Invalid(m)) => assert!(m.contains("signing key"), "{m}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    match reader.withdraw().await {
        Err(ChainError::Invalid(_)) => {}
        other => panic!("expected Invalid, got {other:?}"),
    }
    match reader.consume_credits(B256::ZERO, vec![]).await {
        Err(ChainError::Invalid(_)) => {}
        other => panic!("expected Invalid, got {other:?}"),
    }
}

/// A first or lowered daily cap waits `CAP_DELAY` (2 days), so usage charged before still
/// settles; a raise is immediate and drops a pending lowering; the registry follows the changes
/// through their events; records count against their own day label, and a stale day is skipped.
#[tokio::test]
async fn daily_caps_are_lowered_after_a_delay_and_count_per_day_label() {
    let chain = Chain::start().await;
    let owner = chain.as_account(OWNER).await;
    let model = model_key(Chain::address(OWNER), "acme/capped");
    owner
        .register_model(
            local_id("acme/capped"),
            cid_hash("bafycapped"),
            B256::ZERO,
            U256::from(1),
        )
        .await
        .unwrap();
    let buyer = chain.as_account(BUYER).await;
    let operator = chain.as_account(OPERATOR).await;
    let user = Chain::address(BUYER);
    buyer.buy_credits(U256::from(40)).await.unwrap();
    assert_eq!(buyer.daily_cap_of(user).await.unwrap(), U256::MAX);
    assert_eq!(
        buyer.pending_daily_cap_of(user).await.unwrap(),
        (U256::ZERO, U256::ZERO)
    );

    // A first cap is a lowering (from none): pending for two days, the old cap (none) in force.
    let from = buyer.block_number().await.unwrap() + 1;
    let first = buyer.set_daily_cap(U256::from(5)).await.unwrap();
    let set_at = chain.block_time(None).await;
    assert_eq!(buyer.daily_cap_of(user).await.unwrap(), U256::MAX);
    assert_eq!(
        buyer.pending_daily_cap_of(user).await.unwrap(),
        (U256::from(5), U256::from(set_at + 2 * DAY))
    );
    // Usage charged before settles whatever the user does meanwhile.
    let day = chain.today().await;
    let settled = operator
        .consume_credits(B256::repeat_byte(1), vec![usage(BUYER, model, 8, 8, day)])
        .await
        .unwrap();
    assert_eq!(settled.records[0].rejected, None);
    assert_eq!(buyer.spent_of(user, day).await.unwrap(), U256::from(8));
    assert_eq!(buyer.spent_of(user, day + 1).await.unwrap(), U256::ZERO);

    // A raise (here back to no cap) is at once and drops the pending lowering; then a lowering
    // again.
    let raise = buyer.set_daily_cap(U256::MAX).await.unwrap();
    let raised_at = chain.block_time(None).await;
    assert_eq!(
        buyer.pending_daily_cap_of(user).await.unwrap(),
        (U256::ZERO, U256::ZERO)
    );
    let lower = buyer.set_daily_cap(U256::from(5)).await.unwrap();
    let lowered_at = chain.block_time(None).await;
    let head = buyer.block_number().await.unwrap();
    let changes = buyer.daily_cap_changes(from, head).await.unwrap();
    let got: Vec<_> = changes
        .iter()
        .map(|c| (c.user, c.cap, c.effective_at, c.at.tx_hash, c.at.position))
        .collect();
    assert_eq!(
        got,
        vec![
            (user, U256::from(5), U256::from(set_at + 2 * DAY), first, 0),
            (user, U256::MAX, U256::from(raised_at), raise, 0),
            (
                user,
                U256::from(5),
                U256::from(lowered_at + 2 * DAY),
                lower,
                0
            ),
        ]
    );
    assert_eq!(
        chain.block_time(Some(changes[2].at.block)).await,
        lowered_at
    );
    // Another event kind in the range is not a cap change.
    assert!(
        buyer
            .daily_cap_changes(0, from - 1)
            .await
            .unwrap()
            .is_empty()
    );

    // Two days later the cap is in force: it bounds each day label.
    chain.advance(2 * DAY).await;
    assert_eq!(buyer.daily_cap_of(user).await.unwrap(), U256::from(5));
    assert_eq!(
        buyer.pending_daily_cap_of(user).await.unwrap(),
        (U256::ZERO, U256::ZERO)
    );
    let today = chain.today().await;
    let batch = operator
        .consume_credits(
            B256::repeat_byte(2),
            vec![
                usage(BUYER, model, 4, 4, today - 1),
                usage(BUYER, model, 5, 5, today),
                usage(BUYER, model, 2, 2, today - 1),
                usage(BUYER, model, 1, 1, today - 2),
                usage(BUYER, model, 1, 1, today + 1),
            ],
        )
        .await
        .unwrap();
    let why: Vec<_> = batch.records.iter().map(|r| r.rejected).collect();
    assert_eq!(
        why,
        vec![
            None,
            None,
            Some(Rejection::OverDailyCap),
            Some(Rejection::StaleDay),
            Some(Rejection::StaleDay),
        ]
    );
    assert_eq!(Rejection::StaleDay.to_string(), "StaleDay");
    assert_eq!(
        buyer.spent_of(user, today - 1).await.unwrap(),
        U256::from(4)
    );
    assert_eq!(buyer.spent_of(user, today).await.unwrap(), U256::from(5));
    assert_eq!(
        buyer.credits_of(user).await.unwrap(),
        U256::from(40 - 8 - 4 - 5)
    );
}
