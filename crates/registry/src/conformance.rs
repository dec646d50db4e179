//! The [`MetadataStore`] conformance suite: generic async checks that every store
//! implementation must pass (the embedded [`RedbStore`](crate::RedbStore) runs them in this
//! crate's tests; a MongoDB store runs the very same functions).
//!
//! Each check creates its own accounts and uniquely named models, so the checks can share one
//! database. They panic (assert) on failure.

use std::future::Future;
use std::sync::Arc;

use modelhub_core::{DataType, ErrorCode, TensorSpec, id};

use crate::error::RegistryError;
use crate::model::{
    Account, ApiKey, BatchState, Charge, Model, Receipt, ReservationState, SettlementBatch,
};
use crate::store::MetadataStore;

/// The store under test, shared by tasks.
pub type Store = Arc<dyn MetadataStore>;

fn code<T: std::fmt::Debug>(r: Result<T, RegistryError>) -> ErrorCode {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code(),
    }
}

/// A fresh account record with `credits`.
pub fn new_account(name: &str, credits: u64) -> Account {
    Account {
        account_id: id::new_id(id::ACCOUNT),
        name: name.to_owned(),
        admin: false,
        credits,
        earnings: 0,
        created_at: id::unix_now(),
        wallet: None,
        handle: None,
        daily_cap: None,
        charged_today: (0, 0),
        refund_owed: 0,
    }
}

/// A fresh random wallet address (`0x` + 40 lowercase hex).
/// A new key of `account_id` whose sealed secret is 61 bytes of `byte`.
pub fn new_key(account_id: &str, byte: u8) -> ApiKey {
    ApiKey {
        key_id: id::new_id(id::KEY),
        account_id: account_id.to_owned(),
        sealed_secret: vec![byte; 61],
        revoked: false,
        created_at: id::unix_now(),
        previous_sealed_secret: None,
        previous_valid_until: 0,
    }
}

pub fn new_wallet() -> String {
    format!("0x{}", hex::encode(id::random_bytes::<20>()))
}

/// A fresh model record owned by `owner`, with a unique name.
pub fn new_model(owner: &str, price: u64) -> Model {
    Model {
        model_id: id::new_id(id::MODEL),
        owner: owner.to_owned(),
        owner_handle: None,
        name: format!("conf-{}", id::new_id("m")),
        version: "1.0.0".to_owned(),
        price,
        cid: "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi".to_owned(),
        sha256: "ab".repeat(32),
        size: 1234,
        wrapped_dek: vec![1, 2, 3, 4, 5],
        inputs: vec![TensorSpec {
            name: "X".to_owned(),
            datatype: DataType::Fp32,
            shape: vec![-1, 64],
        }],
        outputs: vec![TensorSpec {
            name: "label".to_owned(),
            datatype: DataType::Int64,
            shape: vec![-1],
        }],
        commitment: Some("0x1234".to_owned()),
        circuit_spec: Some(r#"{"version":1}"#.to_owned()),
        zk_note: None,
        digest: Some("cd".repeat(32)),
        proof_price: 0,
        max_rows: 0,
        calls_per_minute: 0,
        created_at: id::unix_now(),
    }
}

/// A grant with an id takes effect once, whatever the retries; another amount under the same
/// id is a conflict.
pub async fn grant_once(store: Store) {
    let a = store
        .create_account(new_account("granted", 0))
        .await
        .unwrap();
    let grant_id = id::new_id("grant");
    assert_eq!(
        store
            .grant_once(&a.account_id, 30, &grant_id)
            .await
            .unwrap()
            .credits,
        30
    );
    assert_eq!(
        store
            .grant_once(&a.account_id, 30, &grant_id)
            .await
            .unwrap()
            .credits,
        30
    );
    assert_eq!(
        code(store.grant_once(&a.account_id, 31, &grant_id).await),
        ErrorCode::Conflict
    );
    assert_eq!(
        store
            .grant_once(&a.account_id, 5, "another")
            .await
            .unwrap()
            .credits,
        35
    );
    assert_eq!(
        code(store.grant_once("acct_missing", 1, "x").await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(store.grant_once(&a.account_id, u64::MAX, "big").await),
        ErrorCode::BadRequest
    );
    let racing = (0..20).map(|_| {
        let store = store.clone();
        let (account, gid) = (a.account_id.clone(), grant_id.clone() + "-race");
        tokio::spawn(async move { store.grant_once(&account, 7, &gid).await })
    });
    for r in futures::future::join_all(racing).await {
        r.unwrap().unwrap();
    }
    assert_eq!(
        store.get_account(&a.account_id).await.unwrap().credits,
        42,
        "racing retries grant once"
    );
}

/// A proof's delivery is charged the model's proof price, once per key, on a receipt of its
/// own; a model without a circuit has no proofs to charge for.
pub async fn proof_charges(store: Store) {
    let owner = store
        .create_account(new_account("prover-owner", 0))
        .await
        .unwrap();
    let buyer = store
        .create_account(new_account("proof-buyer", 7))
        .await
        .unwrap();
    let model = store
        .create_model(Model {
            proof_price: 5,
            max_rows: 3,
            calls_per_minute: 40,
            ..new_model(&owner.account_id, 1)
        })
        .await
        .unwrap();
    let stored = store.get_model(&model.model_id).await.unwrap();
    assert_eq!(
        (stored.proof_price, stored.max_rows, stored.calls_per_minute),
        (5, 3, 40)
    );
    let reserve = |charge, key: &'static str| {
        let (store, buyer, model) = (
            store.clone(),
            buyer.account_id.clone(),
            model.model_id.clone(),
        );
        async move {
            store
                .reserve_with(&buyer, &model, charge, 1, Some(key), Some("job"))
                .await
        }
    };
    let held = reserve(Charge::Proof, "proof/job-1").await.unwrap();
    assert_eq!((held.amount, held.charge), (5, Charge::Proof));
    // A retry names the same reservation; the key can't be reused for the prediction.
    assert_eq!(
        reserve(Charge::Proof, "proof/job-1")
            .await
            .unwrap()
            .reservation_id,
        held.reservation_id
    );
    assert_eq!(
        code(reserve(Charge::Prediction, "proof/job-1").await),
        ErrorCode::Conflict
    );
    let receipt = store.commit(&held.reservation_id).await.unwrap();
    assert_eq!(
        (receipt.credits_charged, receipt.charge),
        (5, Charge::Proof)
    );
    assert_eq!(
        store.get_account(&buyer.account_id).await.unwrap().credits,
        2
    );
    assert_eq!(
        store.get_account(&owner.account_id).await.unwrap().earnings,
        5
    );
    let unsettled = store.unsettled_receipts(1000).await.unwrap();
    let stored = unsettled
        .iter()
        .find(|r| r.receipt_id == receipt.receipt_id)
        .expect("the proof receipt waits to be settled");
    assert_eq!(stored.charge, Charge::Proof);
    // Short of the proof price.
    match reserve(Charge::Proof, "proof/job-2").await {
        Err(RegistryError::PaymentRequired {
            balance: 2,
            price: 5,
        }) => {}
        other => panic!("expected 402, got {other:?}"),
    }
    // The prediction itself is charged the price.
    let predicted = reserve(Charge::Prediction, "predict-1").await.unwrap();
    assert_eq!(
        (predicted.amount, predicted.charge),
        (1, Charge::Prediction)
    );
    // No circuit, no proofs.
    let plain = store
        .create_model(Model {
            circuit_spec: None,
            commitment: None,
            digest: None,
            ..new_model(&owner.account_id, 1)
        })
        .await
        .unwrap();
    assert_eq!(
        code(
            store
                .reserve_with(
                    &buyer.account_id,
                    &plain.model_id,
                    Charge::Proof,
                    1,
                    None,
                    None
                )
                .await
        ),
        ErrorCode::BadRequest
    );
}

/// A batch is charged per row: the amount is the price times the units, on one receipt that
/// says how many; an amount beyond `u64` is refused.
pub async fn batches_are_charged_per_row(store: Store) {
    let owner = store
        .create_account(new_account("batch-owner", 0))
        .await
        .unwrap();
    let buyer = store
        .create_account(new_account("batch-buyer", 20))
        .await
        .unwrap();
    let model = store
        .create_model(new_model(&owner.account_id, 3))
        .await
        .unwrap();
    let held = store
        .reserve_with(
            &buyer.account_id,
            &model.model_id,
            Charge::Prediction,
            5,
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!((held.amount, held.units), (15, 5));
    let receipt = store.commit(&held.reservation_id).await.unwrap();
    assert_eq!((receipt.credits_charged, receipt.units), (15, 5));
    let unsettled = store.unsettled_receipts(1000).await.unwrap();
    let stored = unsettled
        .iter()
        .find(|r| r.receipt_id == receipt.receipt_id)
        .expect("the batch's receipt waits to be settled");
    assert_eq!(stored.units, 5);
    assert_eq!(
        store.get_account(&owner.account_id).await.unwrap().earnings,
        15
    );
    // 2 rows more than the 5 credits left.
    match store
        .reserve_with(
            &buyer.account_id,
            &model.model_id,
            Charge::Prediction,
            2,
            None,
            None,
        )
        .await
    {
        Err(RegistryError::PaymentRequired {
            balance: 5,
            price: 6,
        }) => {}
        other => panic!("expected 402, got {other:?}"),
    }
    let dear = store
        .create_model(new_model(&owner.account_id, u64::MAX / 2))
        .await
        .unwrap();
    assert_eq!(
        code(
            store
                .reserve_with(
                    &buyer.account_id,
                    &dear.model_id,
                    Charge::Prediction,
                    3,
                    None,
                    None
                )
                .await
        ),
        ErrorCode::BadRequest
    );
}

/// A debit with an id takes at most the balance, once, whatever the retries and races.
pub async fn debit_once(store: Store) {
    let a = store
        .create_account(new_account("refunding", 10))
        .await
        .unwrap();
    assert_eq!(store.debit_once(&a.account_id, 4, "r1").await.unwrap(), 4);
    assert_eq!(store.debit_once(&a.account_id, 4, "r1").await.unwrap(), 4);
    // A retry is answered with what the first call took, whatever it asks.
    assert_eq!(store.debit_once(&a.account_id, 9, "r1").await.unwrap(), 4);
    assert_eq!(store.get_account(&a.account_id).await.unwrap().credits, 6);
    // More than the balance takes the balance.
    assert_eq!(store.debit_once(&a.account_id, 100, "r2").await.unwrap(), 6);
    assert_eq!(store.debit_once(&a.account_id, 5, "r3").await.unwrap(), 0);
    assert_eq!(store.get_account(&a.account_id).await.unwrap().credits, 0);
    assert_eq!(
        code(store.debit_once("acct_missing", 1, "x").await),
        ErrorCode::NotFound
    );
    // Racing debits under distinct ids never take more than there is; racing retries of one
    // id take once.
    // (What r3 could not take is a lien on what comes in: see `refund_lien`.)
    assert_eq!(
        store.get_account(&a.account_id).await.unwrap().refund_owed,
        5
    );
    store.clear_refund_owed(&a.account_id).await.unwrap();
    store.grant_once(&a.account_id, 45, "refill").await.unwrap();
    let racing = (0..12).map(|i| {
        let store = store.clone();
        let account = a.account_id.clone();
        let id = if i % 2 == 0 {
            "same".to_owned()
        } else {
            format!("d{i}")
        };
        tokio::spawn(async move { (id.clone(), store.debit_once(&account, 7, &id).await) })
    });
    let mut taken = std::collections::HashMap::new();
    for r in futures::future::join_all(racing).await {
        let (id, t) = r.unwrap();
        let t = t.unwrap();
        assert_eq!(*taken.entry(id).or_insert(t), t, "one id, one amount");
    }
    let total: u64 = taken.values().sum();
    assert_eq!(total, 45, "{taken:?}");
    assert_eq!(store.get_account(&a.account_id).await.unwrap().credits, 0);
}

/// What a refund debit could not take is a lien: credits that come in later (grants, holds
/// given back) pay it first, until it is cleared (the refund was paid) or replaced.
pub async fn refund_lien(store: Store) {
    let owner = store
        .create_account(new_account("lien-owner", 0))
        .await
        .unwrap();
    let model = store
        .create_model(new_model(&owner.account_id, 2))
        .await
        .unwrap();
    let a = store.create_account(new_account("lien", 6)).await.unwrap();
    // A prediction in flight holds 2 of the 6 when a refund of all 6 is counted.
    let hold = store
        .reserve(&a.account_id, &model.model_id, None)
        .await
        .unwrap();
    assert_eq!(
        store
            .debit_once(&a.account_id, 6, "refund-1")
            .await
            .unwrap(),
        4
    );
    let account = store.get_account(&a.account_id).await.unwrap();
    assert_eq!((account.credits, account.refund_owed), (0, 2));
    // The prediction fails: its credits pay the lien, not the balance.
    store.release(&hold.reservation_id).await.unwrap();
    let account = store.get_account(&a.account_id).await.unwrap();
    assert_eq!((account.credits, account.refund_owed), (0, 0));
    // A new request replaces the lien; a deposit pays it first, the rest is spendable.
    assert_eq!(
        store
            .debit_once(&a.account_id, 5, "refund-2")
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store.get_account(&a.account_id).await.unwrap().refund_owed,
        5
    );
    let account = store
        .grant_once(&a.account_id, 3, "deposit-1")
        .await
        .unwrap();
    assert_eq!((account.credits, account.refund_owed), (0, 2));
    let account = store
        .grant_once(&a.account_id, 3, "deposit-1")
        .await
        .unwrap();
    assert_eq!(
        (account.credits, account.refund_owed),
        (0, 2),
        "a retry pays nothing twice"
    );
    let account = store.grant(&a.account_id, 7).await.unwrap();
    assert_eq!((account.credits, account.refund_owed), (5, 0));
    // A debit that takes all it asks leaves no lien; clearing one frees what comes next.
    assert_eq!(
        store
            .debit_once(&a.account_id, 1, "refund-3")
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store.get_account(&a.account_id).await.unwrap().refund_owed,
        0
    );
    assert_eq!(
        store
            .debit_once(&a.account_id, 10, "refund-4")
            .await
            .unwrap(),
        4
    );
    assert_eq!(
        store.get_account(&a.account_id).await.unwrap().refund_owed,
        6
    );
    let cleared = store.clear_refund_owed(&a.account_id).await.unwrap();
    assert_eq!((cleared.credits, cleared.refund_owed), (0, 0));
    let account = store
        .grant_once(&a.account_id, 3, "deposit-2")
        .await
        .unwrap();
    assert_eq!((account.credits, account.refund_owed), (3, 0));
    assert_eq!(
        code(store.clear_refund_owed("acct_missing").await),
        ErrorCode::NotFound
    );
    // Racing grants pay a lien exactly once in all.
    assert_eq!(
        store
            .debit_once(&a.account_id, 13, "refund-5")
            .await
            .unwrap(),
        3
    );
    let racing = (0..8).map(|i| {
        let (store, account) = (store.clone(), a.account_id.clone());
        tokio::spawn(async move { store.grant_once(&account, 2, &format!("race-{i}")).await })
    });
    for r in futures::future::join_all(racing).await {
        r.unwrap().unwrap();
    }
    let account = store.get_account(&a.account_id).await.unwrap();
    assert_eq!((account.credits, account.refund_owed), (6, 0));
}

/// A daily cap followed from the chain bounds what reservations take per UTC day, counted in
/// the same atomic step as the debit, whatever the races; released credits still count.
pub async fn daily_cap(store: Store) {
    let owner = store
        .create_account(new_account("cap-owner", 0))
        .await
        .unwrap();
    let model = store
        .create_model(new_model(&owner.account_id, 3))
        .await
        .unwrap();
    let a = store
        .create_account(new_account("capped", 100))
        .await
        .unwrap();
    let day = crate::model::utc_day(id::unix_now());
    // Uncapped accounts are counted too, so a cap that arrives mid-day knows the day.
    let first = store
        .reserve(&a.account_id, &model.model_id, None)
        .await
        .unwrap();
    let receipt = store.commit(&first.reservation_id).await.unwrap();
    assert_eq!(receipt.charged_at, first.created_at);
    assert_eq!(
        receipt.charge_day(),
        crate::model::utc_day(first.created_at)
    );
    assert_eq!(
        store
            .get_account(&a.account_id)
            .await
            .unwrap()
            .charged_on(day),
        3
    );
    let capped = store.set_daily_cap(&a.account_id, Some(7)).await.unwrap();
    assert_eq!(capped.daily_cap, Some(7));
    let second = store
        .reserve(&a.account_id, &model.model_id, None)
        .await
        .unwrap();
    let refused = store.reserve(&a.account_id, &model.model_id, None).await;
    match refused {
        Err(RegistryError::OverDailyCap {
            cap,
            charged,
            price,
        }) => {
            assert_eq!((cap, charged, price), (7, 6, 3));
        }
        other => panic!("expected OverDailyCap, got {other:?}"),
    }
    // A released hold still counts (the count never under-counts what may settle).
    store.release(&second.reservation_id).await.unwrap();
    assert_eq!(
        code(store.reserve(&a.account_id, &model.model_id, None).await),
        ErrorCode::PaymentRequired
    );
    let account = store.get_account(&a.account_id).await.unwrap();
    assert_eq!((account.credits, account.charged_on(day)), (97, 6));
    // A raise lets the next charge through; no cap, no limit.
    store.set_daily_cap(&a.account_id, Some(9)).await.unwrap();
    store
        .reserve(&a.account_id, &model.model_id, None)
        .await
        .unwrap();
    assert_eq!(
        code(store.reserve(&a.account_id, &model.model_id, None).await),
        ErrorCode::PaymentRequired
    );
    let uncapped = store.set_daily_cap(&a.account_id, None).await.unwrap();
    assert_eq!(uncapped.daily_cap, None);
    store
        .reserve(&a.account_id, &model.model_id, None)
        .await
        .unwrap();
    let account = store.get_account(&a.account_id).await.unwrap();
    assert_eq!((account.credits, account.charged_on(day)), (91, 12));
    // Short of credits is still told apart from the cap.
    let poor = store
        .create_account(new_account("capped-poor", 2))
        .await
        .unwrap();
    store
        .set_daily_cap(&poor.account_id, Some(50))
        .await
        .unwrap();
    assert!(matches!(
        store.reserve(&poor.account_id, &model.model_id, None).await,
        Err(RegistryError::PaymentRequired {
            balance: 2,
            price: 3
        })
    ));
    assert_eq!(
        code(store.set_daily_cap("acct_missing", Some(1)).await),
        ErrorCode::NotFound
    );
    // Racing reservations under a cap of 10 at price 3: exactly three get through.
    let racer = store
        .create_account(new_account("cap-racer", 100))
        .await
        .unwrap();
    store
        .set_daily_cap(&racer.account_id, Some(10))
        .await
        .unwrap();
    let racing = (0..12).map(|_| {
        let (store, account, model) = (
            store.clone(),
            racer.account_id.clone(),
            model.model_id.clone(),
        );
        tokio::spawn(async move { store.reserve(&account, &model, None).await })
    });
    let mut ok = 0;
    for r in futures::future::join_all(racing).await {
        match r.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert!(
                matches!(
                    e,
                    RegistryError::OverDailyCap { .. } | RegistryError::Unavailable { .. }
                ),
                "{e:?}"
            ),
        }
    }
    assert_eq!(ok, 3);
    let racer = store.get_account(&racer.account_id).await.unwrap();
    assert_eq!((racer.credits, racer.charged_on(day)), (91, 9));
}

/// Deleting a model frees its name and version; a second delete finds nothing.
pub async fn delete_model(store: Store) {
    let owner = store.create_account(new_account("owner", 0)).await.unwrap();
    let model = store
        .create_model(new_model(&owner.account_id, 2))
        .await
        .unwrap();
    let removed = store.delete_model(&model.model_id).await.unwrap();
    assert_eq!(removed, model);
    assert_eq!(
        code(store.get_model(&model.model_id).await),
        ErrorCode::NotFound
    );
    assert!(
        store
            .model_version_taken(&model.owner, &model.name, &model.version)
            .await
            .unwrap(),
        "a deleted version stays taken"
    );
    assert!(
        !store
            .list_models()
            .await
            .unwrap()
            .iter()
            .any(|m| m.model_id == model.model_id)
    );
    assert_eq!(
        code(store.delete_model(&model.model_id).await),
        ErrorCode::NotFound
    );
    // Versions are immutable: the owner can't publish the deleted version again (at another
    // price, say), only a new one.
    let again = Model {
        model_id: id::new_id(id::MODEL),
        price: 500,
        ..model.clone()
    };
    assert_eq!(
        code(store.create_model(again.clone()).await),
        ErrorCode::Conflict
    );
    assert_eq!(
        code(store.get_model(&again.model_id).await),
        ErrorCode::NotFound
    );
    store
        .create_model(Model {
            version: "1.0.1".to_owned(),
            ..again
        })
        .await
        .expect("a new version is fine");
}

/// Handles are unique; model names are per owner: two owners may each publish `name@version`.
pub async fn handles_and_namespaces(store: Store) {
    let handle = format!("h{}", &id::new_id("x")[2..14]).to_ascii_lowercase();
    let alice = store
        .create_account(Account {
            handle: Some(handle.clone()),
            daily_cap: None,
            charged_today: (0, 0),
            refund_owed: 0,
            ..new_account("alice", 0)
        })
        .await
        .unwrap();
    assert_eq!(
        store.find_account_by_handle(&handle).await.unwrap(),
        Some(alice.clone())
    );
    assert_eq!(
        store
            .find_account_by_handle("nobody-has-this")
            .await
            .unwrap(),
        None
    );
    let thief = Account {
        handle: Some(handle.clone()),
        daily_cap: None,
        charged_today: (0, 0),
        refund_owed: 0,
        ..new_account("mallory", 0)
    };
    assert_eq!(
        code(store.create_account(thief.clone()).await),
        ErrorCode::Conflict
    );
    assert_eq!(
        code(store.get_account(&thief.account_id).await),
        ErrorCode::NotFound,
        "a refused account is not written"
    );
    let mallory = store
        .create_account(new_account("mallory", 0))
        .await
        .unwrap();

    let mine = store
        .create_model(Model {
            owner_handle: Some(handle.clone()),
            ..new_model(&alice.account_id, 2)
        })
        .await
        .unwrap();
    // The same name and version under another owner is another model, not a clash.
    let theirs = store
        .create_model(Model {
            name: mine.name.clone(),
            price: 500,
            ..new_model(&mallory.account_id, 2)
        })
        .await
        .unwrap();
    assert_eq!((&theirs.name, &theirs.version), (&mine.name, &mine.version));
    assert_eq!(store.get_model(&mine.model_id).await.unwrap(), mine);
    for (owner, taken) in [(&alice, true), (&mallory, true)] {
        assert_eq!(
            store
                .model_version_taken(&owner.account_id, &mine.name, &mine.version)
                .await
                .unwrap(),
            taken
        );
    }
    assert!(
        !store
            .model_version_taken(&alice.account_id, &mine.name, "9.9")
            .await
            .unwrap()
    );
    // One owner can't publish one version twice.
    assert_eq!(
        code(
            store
                .create_model(Model {
                    model_id: id::new_id(id::MODEL),
                    ..mine.clone()
                })
                .await
        ),
        ErrorCode::Conflict
    );
}

/// Runs every check: `open` must return a store over the same data each time it is called
/// (the durability check drops the store and opens it again).
pub async fn run_all<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Store>,
{
    let store = open().await;
    accounts(store.clone()).await;
    keys(store.clone()).await;
    models(store.clone()).await;
    ledger(store.clone()).await;
    idempotency(store.clone()).await;
    concurrent_idempotent_reserve(store.clone()).await;
    receipts_are_unique(store.clone()).await;
    delete_model(store.clone()).await;
    handles_and_namespaces(store.clone()).await;
    grant_once(store.clone()).await;
    debit_once(store.clone()).await;
    daily_cap(store.clone()).await;
    refund_lien(store.clone()).await;
    proof_charges(store.clone()).await;
    batches_are_charged_per_row(store.clone()).await;
    concurrent_reserve(store.clone()).await;
    wallets(store.clone()).await;
    unsettled_receipts(store.clone()).await;
    batches(store.clone()).await;
    batch_order(store.clone()).await;
    racing_batches(store.clone()).await;
    cursors(store.clone()).await;
    release_batch(store.clone()).await;
    held_and_stale(store.clone()).await;
    nonces(store.clone()).await;
    reseal(store.clone()).await;
    drop(store);
    restart_durability(open).await;
}

/// A KEK rotation's re-wrap: `reseal` replaces a model's wrapped data key and a key's
/// current and previous sealed secrets only while they are what the caller read; every key
/// is listed, revoked ones too.
pub async fn reseal(store: Store) {
    use crate::store::Sealed;
    let owner = store
        .create_account(new_account("resealer", 0))
        .await
        .unwrap();
    let model = store
        .create_model(new_model(&owner.account_id, 1))
        .await
        .unwrap();
    let dek = Sealed::ModelDek {
        model_id: model.model_id.clone(),
    };
    assert!(
        !store
            .reseal(dek.clone(), b"not what is stored", vec![7; 61])
            .await
            .unwrap()
    );
    assert!(
        store
            .reseal(dek.clone(), &model.wrapped_dek, vec![7; 61])
            .await
            .unwrap()
    );
    assert_eq!(
        store.get_model(&model.model_id).await.unwrap().wrapped_dek,
        vec![7; 61]
    );
    assert!(
        !store
            .reseal(dek.clone(), &model.wrapped_dek, vec![8; 61])
            .await
            .unwrap(),
        "a second re-wrap from the same read changes nothing"
    );

    let key = store
        .create_key(new_key(&owner.account_id, 1))
        .await
        .unwrap();
    let secret = Sealed::KeySecret {
        key_id: key.key_id.clone(),
    };
    let previous = Sealed::PreviousKeySecret {
        key_id: key.key_id.clone(),
    };
    assert!(
        !store
            .reseal(previous.clone(), &[1; 61], vec![2; 61])
            .await
            .unwrap(),
        "none yet"
    );
    // A key rotation between the read and the re-wrap wins: the re-wrap finds another value.
    store
        .rotate_key(&key.key_id, vec![3; 61], i64::MAX)
        .await
        .unwrap();
    assert!(
        !store
            .reseal(secret.clone(), &[1; 61], vec![4; 61])
            .await
            .unwrap()
    );
    assert!(
        store
            .reseal(secret.clone(), &[3; 61], vec![4; 61])
            .await
            .unwrap()
    );
    assert!(
        store
            .reseal(previous.clone(), &[1; 61], vec![5; 61])
            .await
            .unwrap()
    );
    let stored = store.get_key(&key.key_id).await.unwrap();
    assert_eq!(stored.sealed_secret, vec![4; 61]);
    assert_eq!(stored.previous_sealed_secret, Some(vec![5; 61]));

    store.revoke_key(&key.key_id).await.unwrap();
    let listed = store.list_keys().await.unwrap();
    assert!(
        listed.iter().any(|k| k.key_id == key.key_id && k.revoked),
        "revoked keys are listed"
    );
    assert!(
        listed.windows(2).all(|w| w[0].key_id < w[1].key_id),
        "in key id order"
    );
    let gone = Sealed::KeySecret {
        key_id: "key_unknown".into(),
    };
    assert!(!store.reseal(gone, &[4; 61], vec![6; 61]).await.unwrap());
}

/// Accounts: create, get, duplicate id, unknown id, grant with overflow check.
pub async fn accounts(store: Store) {
    let mut a = new_account("alice", 0);
    a.admin = true;
    assert_eq!(store.create_account(a.clone()).await.unwrap(), a);
    assert_eq!(store.get_account(&a.account_id).await.unwrap(), a);
    assert_eq!(
        code(store.create_account(a.clone()).await),
        ErrorCode::Conflict
    );
    assert_eq!(
        code(store.get_account("acct_missing").await),
        ErrorCode::NotFound
    );

    let granted = store.grant(&a.account_id, 70).await.unwrap();
    assert_eq!(granted.credits, 70);
    let granted = store.grant(&a.account_id, 5).await.unwrap();
    assert_eq!(granted.credits, 75);
    assert_eq!(
        code(store.grant(&a.account_id, u64::MAX).await),
        ErrorCode::BadRequest
    );
    let after = store.get_account(&a.account_id).await.unwrap();
    assert_eq!(after.credits, 75, "a failed grant must change nothing");
    assert!(after.admin);
    assert_eq!(
        code(store.grant("acct_missing", 1).await),
        ErrorCode::NotFound
    );
}

/// Keys: create, get, revoke, duplicate id, unknown account, unknown key.
pub async fn keys(store: Store) {
    let a = store
        .create_account(new_account("key-owner", 0))
        .await
        .unwrap();
    let key = new_key(&a.account_id, 9);
    assert_eq!(store.create_key(key.clone()).await.unwrap(), key);
    assert_eq!(store.get_key(&key.key_id).await.unwrap(), key);

    let mut dup = key.clone();
    dup.sealed_secret = vec![1; 61];
    assert_eq!(code(store.create_key(dup).await), ErrorCode::Conflict);
    assert_eq!(
        store.get_key(&key.key_id).await.unwrap().sealed_secret,
        key.sealed_secret,
        "a duplicate must not overwrite the first key"
    );

    let mut orphan = key.clone();
    orphan.key_id = id::new_id(id::KEY);
    orphan.account_id = "acct_missing".to_owned();
    assert_eq!(
        code(store.create_key(orphan.clone()).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(store.get_key(&orphan.key_id).await),
        ErrorCode::NotFound
    );

    // A rotation keeps the current secret as the previous one, until the given time.
    let rotated = store
        .rotate_key(&key.key_id, vec![2; 61], 1_234)
        .await
        .unwrap();
    assert_eq!(rotated.sealed_secret, vec![2; 61]);
    assert_eq!(
        rotated.previous_sealed_secret.as_deref(),
        Some(&[9u8; 61][..])
    );
    assert_eq!(rotated.previous_valid_until, 1_234);
    assert_eq!(store.get_key(&key.key_id).await.unwrap(), rotated);
    let again = store
        .rotate_key(&key.key_id, vec![3; 61], 99)
        .await
        .unwrap();
    assert_eq!(
        again.previous_sealed_secret.as_deref(),
        Some(&[2u8; 61][..])
    );
    assert_eq!(
        code(store.rotate_key("mhk_missing", vec![1], 0).await),
        ErrorCode::NotFound
    );

    let revoked = store.revoke_key(&key.key_id).await.unwrap();
    assert!(revoked.revoked);
    assert_eq!(
        code(store.rotate_key(&key.key_id, vec![4; 61], 0).await),
        ErrorCode::Conflict,
        "a revoked key can't be rotated"
    );
    assert!(store.get_key(&key.key_id).await.unwrap().revoked);
    assert!(store.revoke_key(&key.key_id).await.unwrap().revoked);
    assert_eq!(
        code(store.revoke_key("mhk_missing").await),
        ErrorCode::NotFound
    );
}

/// Models: create, get, find by name, list sorted, id and (name, version) uniqueness, owner.
pub async fn models(store: Store) {
    let owner = store.create_account(new_account("owner", 0)).await.unwrap();
    let base = format!("conf-{}", id::new_id("list"));
    let mut made = Vec::new();
    for (suffix, version) in [("b", "1.0"), ("a", "2.0"), ("a", "1.0"), ("c", "0.1")] {
        let mut m = new_model(&owner.account_id, 3);
        m.name = format!("{base}-{suffix}");
        m.version = version.to_owned();
        if suffix == "c" {
            m.commitment = None;
            m.inputs.clear();
        }
        assert_eq!(store.create_model(m.clone()).await.unwrap(), m);
        made.push(m);
    }
    for m in &made {
        assert_eq!(&store.get_model(&m.model_id).await.unwrap(), m);
        assert!(
            store
                .model_version_taken(&m.owner, &m.name, &m.version)
                .await
                .unwrap()
        );
    }
    assert!(
        !store
            .model_version_taken(&owner.account_id, &made[0].name, "9.9")
            .await
            .unwrap()
    );
    assert_eq!(
        code(store.get_model("mdl_missing").await),
        ErrorCode::NotFound
    );

    let all = store.list_models().await.unwrap();
    assert!(
        all.windows(2)
            .all(|w| (&w[0].name, &w[0].version) <= (&w[1].name, &w[1].version)),
        "list_models must be sorted by (name, version)"
    );
    let ours: Vec<(&str, &str)> = all
        .iter()
        .filter(|m| m.name.starts_with(&base))
        .map(|m| (m.name.as_str(), m.version.as_str()))
        .collect();
    let a = format!("{base}-a");
    let b = format!("{base}-b");
    let c = format!("{base}-c");
    assert_eq!(
        ours,
        vec![
            (a.as_str(), "1.0"),
            (a.as_str(), "2.0"),
            (b.as_str(), "1.0"),
            (c.as_str(), "0.1")
        ]
    );

    // Same name and version under a new id: conflict, and nothing is written.
    let mut twin = made[0].clone();
    twin.model_id = id::new_id(id::MODEL);
    assert_eq!(
        code(store.create_model(twin.clone()).await),
        ErrorCode::Conflict
    );
    assert_eq!(
        code(store.get_model(&twin.model_id).await),
        ErrorCode::NotFound
    );
    // Same id, another name: conflict.
    let mut same_id = made[0].clone();
    same_id.name = format!("{base}-other");
    assert_eq!(
        code(store.create_model(same_id.clone()).await),
        ErrorCode::Conflict
    );
    assert!(
        !store
            .model_version_taken(&same_id.owner, &same_id.name, &same_id.version)
            .await
            .unwrap()
    );
    // Same name, another version: fine.
    let mut next = made[0].clone();
    next.model_id = id::new_id(id::MODEL);
    next.version = "1.1".to_owned();
    store.create_model(next).await.unwrap();
    // Unknown owner.
    let orphan = new_model("acct_missing", 1);
    assert_eq!(
        code(store.create_model(orphan.clone()).await),
        ErrorCode::NotFound
    );
    assert!(
        !store
            .model_version_taken(&orphan.owner, &orphan.name, &orphan.version)
            .await
            .unwrap()
    );
}

/// Reserve, commit and release with balances checked at every step.
pub async fn ledger(store: Store) {
    let buyer = store
        .create_account(new_account("buyer", 10))
        .await
        .unwrap();
    let owner = store
        .create_account(new_account("seller", 0))
        .await
        .unwrap();
    let model = store
        .create_model(new_model(&owner.account_id, 4))
        .await
        .unwrap();
    let balance = |id: String| {
        let store = store.clone();
        async move {
            let a = store.get_account(&id).await.unwrap();
            (a.credits, a.earnings)
        }
    };

    let r1 = store
        .reserve(&buyer.account_id, &model.model_id, None)
        .await
        .unwrap();
    assert_eq!(r1.amount, 4);
    assert_eq!(r1.state, ReservationState::Held);
    assert_eq!(r1.owner, owner.account_id);
    assert_eq!(r1.account_id, buyer.account_id);
    assert_eq!(store.get_reservation(&r1.reservation_id).await.unwrap(), r1);
    assert_eq!(balance(buyer.account_id.clone()).await, (6, 0));

    let r2 = store
        .reserve(&buyer.account_id, &model.model_id, None)
        .await
        .unwrap();
    assert_ne!(r1.reservation_id, r2.reservation_id);
    assert_eq!(balance(buyer.account_id.clone()).await, (2, 0));

    let short = store
        .reserve(&buyer.account_id, &model.model_id, None)
        .await;
    match short {
        Err(RegistryError::PaymentRequired { balance, price }) => {
            assert_eq!((balance, price), (2, 4));
        }
        other => panic!("expected payment required, got {other:?}"),
    }
    assert_eq!(balance(buyer.account_id.clone()).await, (2, 0));
    assert_eq!(
        code(store.reserve("acct_missing", &model.model_id, None).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(store.reserve(&buyer.account_id, "mdl_missing", None).await),
        ErrorCode::NotFound
    );

    // Commit: the owner earns, a receipt is written; committing again gives the same receipt.
    let receipt = store.commit(&r1.reservation_id).await.unwrap();
    assert_eq!(receipt.reservation_id, r1.reservation_id);
    assert_eq!(receipt.account_id, buyer.account_id);
    assert_eq!(receipt.model_id, model.model_id);
    assert_eq!(receipt.owner, owner.account_id);
    assert_eq!(receipt.credits_charged, 4);
    assert!(receipt.receipt_id.starts_with("rcpt_"));
    assert_eq!(balance(owner.account_id.clone()).await, (0, 4));
    assert_eq!(store.commit(&r1.reservation_id).await.unwrap(), receipt);
    assert_eq!(balance(owner.account_id.clone()).await, (0, 4));
    assert_eq!(
        store.get_receipt(&receipt.receipt_id).await.unwrap(),
        receipt
    );
    let committed = store.get_reservation(&r1.reservation_id).await.unwrap();
    assert_eq!(committed.state, ReservationState::Committed);
    assert_eq!(
        committed.receipt_id.as_deref(),
        Some(receipt.receipt_id.as_str())
    );
    // Release after commit: no-op.
    store.release(&r1.reservation_id).await.unwrap();
    assert_eq!(balance(buyer.account_id.clone()).await, (2, 0));
    assert_eq!(balance(owner.account_id.clone()).await, (0, 4));

    // Release: credits come back; again is a no-op; commit afterwards is a conflict.
    let released = store.release(&r2.reservation_id).await.unwrap();
    assert_eq!(released.state, ReservationState::Released);
    assert_eq!(balance(buyer.account_id.clone()).await, (6, 0));
    store.release(&r2.reservation_id).await.unwrap();
    assert_eq!(balance(buyer.account_id.clone()).await, (6, 0));
    assert_eq!(
        code(store.commit(&r2.reservation_id).await),
        ErrorCode::Conflict
    );
    assert_eq!(balance(owner.account_id.clone()).await, (0, 4));
    assert_eq!(
        store
            .get_reservation(&r2.reservation_id)
            .await
            .unwrap()
            .state,
        ReservationState::Released
    );

    assert_eq!(code(store.commit("rsv_missing").await), ErrorCode::NotFound);
    assert_eq!(
        code(store.release("rsv_missing").await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(store.get_receipt("rcpt_missing").await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(store.get_reservation("rsv_missing").await),
        ErrorCode::NotFound
    );

    // A free model reserves nothing but still commits with a receipt.
    let free = store
        .create_model(new_model(&owner.account_id, 0))
        .await
        .unwrap();
    let poor = store.create_account(new_account("poor", 0)).await.unwrap();
    let r = store
        .reserve(&poor.account_id, &free.model_id, None)
        .await
        .unwrap();
    assert_eq!(
        store
            .commit(&r.reservation_id)
            .await
            .unwrap()
            .credits_charged,
        0
    );

    // The owner buying their own model: credits move to earnings.
    let mine = store.grant(&owner.account_id, 4).await.unwrap();
    assert_eq!(mine.credits, 4);
    let r = store
        .reserve(&owner.account_id, &model.model_id, None)
        .await
        .unwrap();
    store.commit(&r.reservation_id).await.unwrap();
    assert_eq!(balance(owner.account_id.clone()).await, (0, 8));
}

/// Reserve with an idempotency key returns the first reservation (per account).
pub async fn idempotency(store: Store) {
    let owner = store
        .create_account(new_account("seller", 0))
        .await
        .unwrap();
    let model = store
        .create_model(new_model(&owner.account_id, 2))
        .await
        .unwrap();
    let other_model = store
        .create_model(new_model(&owner.account_id, 2))
        .await
        .unwrap();
    let a = store.create_account(new_account("a", 10)).await.unwrap();
    let b = store.create_account(new_account("b", 10)).await.unwrap();

    let first = store
        .reserve(&a.account_id, &model.model_id, Some("req-1"))
        .await
        .unwrap();
    assert_eq!(first.idempotency_key.as_deref(), Some("req-1"));
    let again = store
        .reserve(&a.account_id, &model.model_id, Some("req-1"))
        .await
        .unwrap();
    assert_eq!(again, first);
    assert_eq!(store.get_account(&a.account_id).await.unwrap().credits, 8);

    // Another account may use the same key.
    let theirs = store
        .reserve(&b.account_id, &model.model_id, Some("req-1"))
        .await
        .unwrap();
    assert_ne!(theirs.reservation_id, first.reservation_id);
    assert_eq!(store.get_account(&b.account_id).await.unwrap().credits, 8);

    // The same key for another model is refused.
    assert_eq!(
        code(
            store
                .reserve(&a.account_id, &other_model.model_id, Some("req-1"))
                .await
        ),
        ErrorCode::Conflict
    );
    // Without a key (or with an empty one) every call is a new reservation.
    let n1 = store
        .reserve(&a.account_id, &model.model_id, None)
        .await
        .unwrap();
    let n2 = store
        .reserve(&a.account_id, &model.model_id, Some(""))
        .await
        .unwrap();
    assert_ne!(n1.reservation_id, n2.reservation_id);
    assert_eq!(store.get_account(&a.account_id).await.unwrap().credits, 4);

    // Still the first reservation after it was committed; no second charge.
    let receipt = store.commit(&first.reservation_id).await.unwrap();
    let after = store
        .reserve(&a.account_id, &model.model_id, Some("req-1"))
        .await
        .unwrap();
    assert_eq!(after.reservation_id, first.reservation_id);
    assert_eq!(after.state, ReservationState::Committed);
    assert_eq!(store.commit(&after.reservation_id).await.unwrap(), receipt);
    assert_eq!(store.get_account(&a.account_id).await.unwrap().credits, 4);
}

/// Retries of one request racing each other (same idempotency key): one reservation, one
/// charge; racing commits of it give one receipt and pay the owner once.
pub async fn concurrent_idempotent_reserve(store: Store) {
    let owner = store
        .create_account(new_account("seller", 0))
        .await
        .unwrap();
    let buyer = store
        .create_account(new_account("buyer", 10))
        .await
        .unwrap();
    let model = store
        .create_model(new_model(&owner.account_id, 3))
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let store = store.clone();
        let (a, m) = (buyer.account_id.clone(), model.model_id.clone());
        tasks.spawn(async move { store.reserve(&a, &m, Some("same-request")).await });
    }
    let mut ids = std::collections::BTreeSet::new();
    while let Some(joined) = tasks.join_next().await {
        let r = joined.expect("reserve task panicked").unwrap();
        assert_eq!(r.idempotency_key.as_deref(), Some("same-request"));
        ids.insert(r.reservation_id);
    }
    assert_eq!(ids.len(), 1, "one request, one reservation");
    assert_eq!(
        store.get_account(&buyer.account_id).await.unwrap().credits,
        7
    );
    let rid = ids.into_iter().next().unwrap_or_default();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let store = store.clone();
        let id = rid.clone();
        tasks.spawn(async move { store.commit(&id).await });
    }
    let mut receipts = std::collections::BTreeSet::new();
    while let Some(joined) = tasks.join_next().await {
        receipts.insert(joined.expect("commit task panicked").unwrap().receipt_id);
    }
    assert_eq!(receipts.len(), 1, "one commit, one receipt");
    assert_eq!(
        store.get_account(&owner.account_id).await.unwrap().earnings,
        3
    );
    assert_eq!(
        store.get_account(&buyer.account_id).await.unwrap().credits,
        7
    );
}

/// Every commit writes its own receipt under a distinct id.
pub async fn receipts_are_unique(store: Store) {
    let owner = store
        .create_account(new_account("seller", 0))
        .await
        .unwrap();
    let buyer = store
        .create_account(new_account("buyer", 20))
        .await
        .unwrap();
    let model = store
        .create_model(new_model(&owner.account_id, 1))
        .await
        .unwrap();
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let r = store
            .reserve(&buyer.account_id, &model.model_id, None)
            .await
            .unwrap();
        let receipt = store.commit(&r.reservation_id).await.unwrap();
        assert!(ids.insert(receipt.receipt_id.clone()), "receipt id reused");
        assert_eq!(
            store.get_receipt(&receipt.receipt_id).await.unwrap(),
            receipt
        );
    }
    assert_eq!(ids.len(), 20);
    assert_eq!(
        store.get_account(&owner.account_id).await.unwrap().earnings,
        20
    );
    assert_eq!(
        store.get_account(&buyer.account_id).await.unwrap().credits,
        0
    );
}

/// 200 tasks race to reserve price 1 from 50 credits: exactly 50 win, and
/// credits + earnings + held stays 50 while the winners commit or release concurrently.
pub async fn concurrent_reserve(store: Store) {
    let owner = store
        .create_account(new_account("seller", 0))
        .await
        .unwrap();
    let buyer = store
        .create_account(new_account("buyer", 50))
        .await
        .unwrap();
    let model = store
        .create_model(new_model(&owner.account_id, 1))
        .await
        .unwrap();

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let store = store.clone();
        let (a, m) = (buyer.account_id.clone(), model.model_id.clone());
        tasks.spawn(async move { store.reserve(&a, &m, None).await });
    }
    let mut won = Vec::new();
    let mut refused = 0;
    while let Some(joined) = tasks.join_next().await {
        match joined.expect("reserve task panicked") {
            Ok(r) => won.push(r),
            Err(RegistryError::PaymentRequired {
                balance: 0,
                price: 1,
            }) => refused += 1,
            Err(e) => panic!("unexpected reserve error: {e:?}"),
        }
    }
    assert_eq!(won.len(), 50);
    assert_eq!(refused, 150);
    let distinct: std::collections::BTreeSet<_> =
        won.iter().map(|r| r.reservation_id.clone()).collect();
    assert_eq!(distinct.len(), 50);

    let totals = || {
        let store = store.clone();
        let (b, o) = (buyer.account_id.clone(), owner.account_id.clone());
        async move {
            let b = store.get_account(&b).await.unwrap();
            let o = store.get_account(&o).await.unwrap();
            (b.credits, o.earnings)
        }
    };
    assert_eq!(totals().await, (0, 0));

    // Commit 30 and release 20, concurrently, each twice.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, r) in won.iter().enumerate() {
        for _ in 0..2 {
            let store = store.clone();
            let id = r.reservation_id.clone();
            if i < 30 {
                tasks.spawn(async move { store.commit(&id).await.map(|_| ()) });
            } else {
                tasks.spawn(async move { store.release(&id).await.map(|_| ()) });
            }
        }
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("task panicked").unwrap();
    }
    let mut held = 0;
    for r in &won {
        let r = store.get_reservation(&r.reservation_id).await.unwrap();
        if r.state == ReservationState::Held {
            held += r.amount;
        }
    }
    let (credits, earnings) = totals().await;
    assert_eq!((credits, earnings, held), (20, 30, 0));
    assert_eq!(credits + earnings + held, 50);

    // Late retries race on every reservation: releasing a committed one and committing a
    // released one (a conflict) must change nothing.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, r) in won.iter().enumerate() {
        let (s1, s2) = (store.clone(), store.clone());
        let (id1, id2) = (r.reservation_id.clone(), r.reservation_id.clone());
        tasks.spawn(async move { s1.release(&id1).await.map(|_| ()) });
        tasks.spawn(async move {
            match s2.commit(&id2).await {
                Err(e) if i >= 30 => assert_eq!(e.code(), ErrorCode::Conflict),
                other => other.map(|_| ()).unwrap(),
            }
            Ok(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("task panicked").unwrap();
    }
    assert_eq!(totals().await, (20, 30));
}

/// `n` committed receipts (price 2 each) of a fresh buyer, seller and model.
pub async fn committed_receipts(store: &Store, n: u64) -> Vec<Receipt> {
    let owner = store
        .create_account(new_account("seller", 0))
        .await
        .unwrap();
    let buyer = store
        .create_account(new_account("buyer", 2 * n))
        .await
        .unwrap();
    let model = store
        .create_model(new_model(&owner.account_id, 2))
        .await
        .unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let r = store
            .reserve(&buyer.account_id, &model.model_id, None)
            .await
            .unwrap();
        out.push(store.commit(&r.reservation_id).await.unwrap());
    }
    out
}

/// A new pending batch of `receipts` (random `0x` + 64 hex id).
pub fn new_batch(receipts: &[Receipt]) -> SettlementBatch {
    let now = id::unix_now();
    SettlementBatch {
        batch_id: format!("0x{}", hex::encode(id::random_bytes::<32>())),
        receipt_ids: receipts.iter().map(|r| r.receipt_id.clone()).collect(),
        credits: receipts.iter().map(|r| r.credits_charged).sum(),
        state: BatchState::Pending,
        tx_hash: None,
        error: None,
        attempts: 0,
        created_at: now,
        updated_at: now,
    }
}

/// Every unsettled receipt, oldest first.
async fn all_unsettled(store: &Store) -> Vec<Receipt> {
    store.unsettled_receipts(1_000_000).await.unwrap()
}

/// Wallets: unique across accounts, found by address; accounts without one are unaffected.
pub async fn wallets(store: Store) {
    let wallet = new_wallet();
    let mut a = new_account("wallet-a", 0);
    a.wallet = Some(wallet.clone());
    assert_eq!(store.create_account(a.clone()).await.unwrap(), a);
    assert_eq!(store.get_account(&a.account_id).await.unwrap(), a);
    assert_eq!(
        store.find_account_by_wallet(&wallet).await.unwrap(),
        Some(a.clone())
    );

    // The same wallet on another account: refused, and nothing is written.
    let mut b = new_account("wallet-b", 0);
    b.wallet = Some(wallet.clone());
    assert_eq!(
        code(store.create_account(b.clone()).await),
        ErrorCode::Conflict
    );
    assert_eq!(
        code(store.get_account(&b.account_id).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        store.find_account_by_wallet(&wallet).await.unwrap(),
        Some(a.clone())
    );
    // With a wallet of its own it is fine.
    let other_wallet = new_wallet();
    b.wallet = Some(other_wallet.clone());
    store.create_account(b.clone()).await.unwrap();
    assert_eq!(
        store.find_account_by_wallet(&other_wallet).await.unwrap(),
        Some(b.clone())
    );

    // An existing account id with a fresh wallet: refused, and the wallet stays free.
    let fresh = new_wallet();
    let mut dup = a.clone();
    dup.wallet = Some(fresh.clone());
    assert_eq!(code(store.create_account(dup).await), ErrorCode::Conflict);
    assert_eq!(store.find_account_by_wallet(&fresh).await.unwrap(), None);
    let mut c = new_account("wallet-c", 0);
    c.wallet = Some(fresh.clone());
    store.create_account(c.clone()).await.unwrap();
    assert_eq!(store.find_account_by_wallet(&fresh).await.unwrap(), Some(c));

    // Many accounts without a wallet.
    for _ in 0..5 {
        let none = store
            .create_account(new_account("no-wallet", 1))
            .await
            .unwrap();
        assert_eq!(
            store.get_account(&none.account_id).await.unwrap().wallet,
            None
        );
    }
    assert_eq!(
        store.find_account_by_wallet(&new_wallet()).await.unwrap(),
        None
    );
    assert_eq!(store.find_account_by_wallet("").await.unwrap(), None);
}

/// Committed receipts in no batch are listed oldest first, limited, and counted.
pub async fn unsettled_receipts(store: Store) {
    let made = committed_receipts(&store, 4).await;
    for r in &made {
        assert_eq!(r.batch_id, None);
        assert_eq!(store.get_receipt(&r.receipt_id).await.unwrap(), *r);
    }
    let all = all_unsettled(&store).await;
    assert!(
        all.windows(2)
            .all(|w| (w[0].created_at, &w[0].receipt_id) < (w[1].created_at, &w[1].receipt_id)),
        "unsettled receipts must be sorted by (created_at, receipt_id)"
    );
    assert!(all.iter().all(|r| r.batch_id.is_none()));
    for r in &made {
        assert!(all.contains(r), "{r:?} is unsettled");
    }
    assert_eq!(
        store.count_unsettled_receipts().await.unwrap(),
        all.len() as u64
    );
    assert_eq!(store.unsettled_receipts(2).await.unwrap(), all[..2]);
    assert_eq!(
        store.unsettled_receipts(all.len()).await.unwrap(),
        all,
        "a limit of exactly the count"
    );
    assert!(store.unsettled_receipts(0).await.unwrap().is_empty());

    // Held and released reservations have no receipt: the count doesn't move.
    let owner = store
        .create_account(new_account("seller", 0))
        .await
        .unwrap();
    let buyer = store.create_account(new_account("buyer", 9)).await.unwrap();
    let model = store
        .create_model(new_model(&owner.account_id, 3))
        .await
        .unwrap();
    let held = store
        .reserve(&buyer.account_id, &model.model_id, None)
        .await
        .unwrap();
    let released = store
        .reserve(&buyer.account_id, &model.model_id, None)
        .await
        .unwrap();
    store.release(&released.reservation_id).await.unwrap();
    assert_eq!(
        store.count_unsettled_receipts().await.unwrap(),
        all.len() as u64
    );
    let receipt = store.commit(&held.reservation_id).await.unwrap();
    assert_eq!(
        store.count_unsettled_receipts().await.unwrap(),
        all.len() as u64 + 1
    );
    assert!(all_unsettled(&store).await.contains(&receipt));
}

/// create_batch assigns receipts once and all at once; update_batch moves a batch out of
/// `Pending` once.
pub async fn batches(store: Store) {
    let made = committed_receipts(&store, 5).await;
    let before = store.count_unsettled_receipts().await.unwrap();
    let count = || {
        let store = store.clone();
        async move { store.count_unsettled_receipts().await.unwrap() }
    };
    let batch_of = |id: String| {
        let store = store.clone();
        async move { store.get_receipt(&id).await.unwrap().batch_id }
    };

    let b1 = new_batch(&made[..2]);
    assert_eq!(b1.credits, 4);
    assert_eq!(store.create_batch(b1.clone()).await.unwrap(), b1);
    assert_eq!(store.get_batch(&b1.batch_id).await.unwrap(), b1);
    for r in &made[..2] {
        assert_eq!(
            batch_of(r.receipt_id.clone()).await.as_deref(),
            Some(b1.batch_id.as_str())
        );
    }
    let unsettled = all_unsettled(&store).await;
    assert!(
        !unsettled
            .iter()
            .any(|u| b1.receipt_ids.contains(&u.receipt_id))
    );
    for r in &made[2..] {
        assert!(unsettled.contains(r));
    }
    assert_eq!(count().await, before - 2);

    // A retry returns the stored batch and changes nothing.
    let mut retry = b1.clone();
    retry.created_at += 5;
    retry.updated_at += 5;
    assert_eq!(store.create_batch(retry).await.unwrap(), b1);
    assert_eq!(store.get_batch(&b1.batch_id).await.unwrap(), b1);
    assert_eq!(count().await, before - 2);

    // The same batch id with other receipts.
    let mut taken = new_batch(&made[2..3]);
    taken.batch_id = b1.batch_id.clone();
    assert_eq!(code(store.create_batch(taken).await), ErrorCode::Conflict);
    assert_eq!(batch_of(made[2].receipt_id.clone()).await, None);

    // A receipt already in another batch: refused, nothing written.
    let b2 = new_batch(&[made[2].clone(), made[1].clone()]);
    assert_eq!(
        code(store.create_batch(b2.clone()).await),
        ErrorCode::Conflict
    );
    assert_eq!(
        code(store.get_batch(&b2.batch_id).await),
        ErrorCode::NotFound
    );
    assert_eq!(batch_of(made[2].receipt_id.clone()).await, None);
    assert_eq!(
        batch_of(made[1].receipt_id.clone()).await.as_deref(),
        Some(b1.batch_id.as_str())
    );

    // An unknown receipt: not found, nothing written.
    let mut b3 = new_batch(&made[2..4]);
    b3.receipt_ids.push("rcpt_missing".to_owned());
    assert_eq!(
        code(store.create_batch(b3.clone()).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(store.get_batch(&b3.batch_id).await),
        ErrorCode::NotFound
    );
    assert_eq!(batch_of(made[2].receipt_id.clone()).await, None);
    assert_eq!(batch_of(made[3].receipt_id.clone()).await, None);

    // A receipt twice, or credits that are not the receipts' sum: bad request.
    let mut twice = new_batch(&made[2..3]);
    twice.receipt_ids.push(made[2].receipt_id.clone());
    twice.credits *= 2;
    assert_eq!(code(store.create_batch(twice).await), ErrorCode::BadRequest);
    let mut wrong = new_batch(&made[2..4]);
    wrong.credits += 1;
    assert_eq!(
        code(store.create_batch(wrong.clone()).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(store.get_batch(&wrong.batch_id).await),
        ErrorCode::NotFound
    );
    assert_eq!(count().await, before - 2);

    // The rest in a second batch.
    let b4 = new_batch(&made[2..]);
    assert_eq!(store.create_batch(b4.clone()).await.unwrap(), b4);
    assert_eq!(count().await, before - 5);

    // update_batch: pending → pending (one more attempt) → settled; then final.
    let mut update = b1.clone();
    update.attempts = 1;
    update.updated_at = b1.updated_at + 1;
    update.tx_hash = Some(format!("0x{}", "ab".repeat(32)));
    update.receipt_ids = Vec::new(); // never replaced
    update.credits = 99;
    let expected = SettlementBatch {
        attempts: 1,
        updated_at: b1.updated_at + 1,
        tx_hash: update.tx_hash.clone(),
        ..b1.clone()
    };
    assert_eq!(store.update_batch(&update).await.unwrap(), expected);
    assert_eq!(store.get_batch(&b1.batch_id).await.unwrap(), expected);
    update.state = BatchState::Settled;
    update.attempts = 2;
    let settled = SettlementBatch {
        state: BatchState::Settled,
        attempts: 2,
        ..expected
    };
    assert_eq!(store.update_batch(&update).await.unwrap(), settled);
    assert_eq!(store.get_batch(&b1.batch_id).await.unwrap(), settled);
    update.state = BatchState::Failed;
    update.error = Some("late".to_owned());
    assert_eq!(code(store.update_batch(&update).await), ErrorCode::Conflict);
    assert_eq!(store.get_batch(&b1.batch_id).await.unwrap(), settled);
    // A settled batch's receipts stay settled; a retry of its creation still returns it.
    assert_eq!(store.create_batch(b1.clone()).await.unwrap(), settled);
    assert_eq!(count().await, before - 5);

    // Failed is final too.
    let mut failed = b4.clone();
    failed.state = BatchState::Failed;
    failed.error = Some("model deactivated".to_owned());
    failed.attempts = 1;
    assert_eq!(store.update_batch(&failed).await.unwrap(), failed);
    failed.state = BatchState::Settled;
    assert_eq!(code(store.update_batch(&failed).await), ErrorCode::Conflict);

    let mut unknown = new_batch(&[]);
    unknown.state = BatchState::Settled;
    assert_eq!(
        code(store.update_batch(&unknown).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(store.get_batch(&unknown.batch_id).await),
        ErrorCode::NotFound
    );
}

/// pending_batches is oldest first, recent_batches newest first, both by (created_at, id).
pub async fn batch_order(store: Store) {
    let made = committed_receipts(&store, 4).await;
    // Later than any other batch of the suite, so these are the most recent ones.
    let base = id::unix_now() + 1_000_000;
    let mut made_batches = Vec::new();
    for (r, at) in made.iter().zip([base + 2, base, base + 2, base + 1]) {
        let mut b = new_batch(std::slice::from_ref(r));
        b.created_at = at;
        b.updated_at = at;
        made_batches.push(store.create_batch(b).await.unwrap());
    }
    let by_key = |b: &SettlementBatch| (b.created_at, b.batch_id.clone());
    // The last one is settled: it leaves the pending list but stays among the recent.
    let mut settled = made_batches[3].clone();
    settled.state = BatchState::Settled;
    store.update_batch(&settled).await.unwrap();
    made_batches[3] = settled;

    let pending = store.pending_batches().await.unwrap();
    assert!(pending.iter().all(|b| b.state == BatchState::Pending));
    assert!(
        pending.windows(2).all(|w| by_key(&w[0]) < by_key(&w[1])),
        "pending batches oldest first"
    );
    let ours: Vec<SettlementBatch> = pending
        .into_iter()
        .filter(|b| made_batches.iter().any(|m| m.batch_id == b.batch_id))
        .collect();
    let mut expected: Vec<SettlementBatch> = made_batches[..3].to_vec();
    expected.sort_by_key(by_key);
    assert_eq!(ours, expected);

    let recent = store.recent_batches(4).await.unwrap();
    let mut expected = made_batches.clone();
    expected.sort_by_key(|b| std::cmp::Reverse(by_key(b)));
    assert_eq!(recent, expected);
    assert_eq!(store.recent_batches(2).await.unwrap(), expected[..2]);
    assert!(store.recent_batches(0).await.unwrap().is_empty());
    let all = store.recent_batches(100_000).await.unwrap();
    assert!(all.len() > 4);
    assert!(
        all.windows(2).all(|w| by_key(&w[0]) > by_key(&w[1])),
        "recent batches newest first"
    );
}

/// Batches racing for the same receipts: exactly one gets them all, the others are refused
/// and leave nothing; racing retries of one batch all get it.
pub async fn racing_batches(store: Store) {
    let made = committed_receipts(&store, 5).await;
    let before = store.count_unsettled_receipts().await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..10 {
        let mut receipts = made.clone();
        receipts.rotate_left(k % made.len());
        let batch = new_batch(&receipts);
        let store = store.clone();
        tasks.spawn(async move { (batch.clone(), store.create_batch(batch).await) });
    }
    let mut winners = Vec::new();
    let mut losers = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined.expect("create_batch task panicked") {
            (b, Ok(stored)) => {
                assert_eq!(stored, b);
                winners.push(b);
            }
            (b, Err(e)) => {
                assert_eq!(e.code(), ErrorCode::Conflict, "{e:?}");
                losers.push(b);
            }
        }
    }
    assert_eq!(winners.len(), 1, "one batch gets the receipts");
    let winner = &winners[0];
    for r in &made {
        assert_eq!(
            store
                .get_receipt(&r.receipt_id)
                .await
                .unwrap()
                .batch_id
                .as_ref(),
            Some(&winner.batch_id)
        );
    }
    for b in &losers {
        assert_eq!(
            code(store.get_batch(&b.batch_id).await),
            ErrorCode::NotFound
        );
    }
    assert_eq!(store.count_unsettled_receipts().await.unwrap(), before - 5);

    let made = committed_receipts(&store, 3).await;
    let batch = new_batch(&made);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let (store, batch) = (store.clone(), batch.clone());
        tasks.spawn(async move { store.create_batch(batch).await });
    }
    while let Some(joined) = tasks.join_next().await {
        assert_eq!(joined.expect("create_batch task panicked").unwrap(), batch);
    }
    assert_eq!(store.get_batch(&batch.batch_id).await.unwrap(), batch);
}

/// Named cursors: unset until set, then the last value set.
pub async fn cursors(store: Store) {
    let name = id::new_id("cursor");
    let other = id::new_id("cursor");
    assert_eq!(store.get_cursor(&name).await.unwrap(), None);
    store.set_cursor(&name, 5).await.unwrap();
    assert_eq!(store.get_cursor(&name).await.unwrap(), Some(5));
    store.set_cursor(&name, 1 << 40).await.unwrap();
    assert_eq!(store.get_cursor(&name).await.unwrap(), Some(1 << 40));
    store.set_cursor(&name, 3).await.unwrap();
    assert_eq!(
        store.get_cursor(&name).await.unwrap(),
        Some(3),
        "may go back"
    );
    assert_eq!(store.get_cursor(&other).await.unwrap(), None);
    store.set_cursor(&other, 0).await.unwrap();
    assert_eq!(store.get_cursor(&other).await.unwrap(), Some(0));
    assert_eq!(store.get_cursor(&name).await.unwrap(), Some(3));
}

/// Drops the store, opens it again and finds every record.
/// Held credits are counted per account, a committed reservation keeps its response (once),
/// the receipt id is known before the commit, and stale holds are swept back to the account
/// (after which a late commit is refused).
pub async fn held_and_stale(store: Store) {
    let owner = store
        .create_account(new_account("held-owner", 0))
        .await
        .unwrap();
    let buyer = store
        .create_account(new_account("held-buyer", 10))
        .await
        .unwrap();
    let model = store
        .create_model(new_model(&owner.account_id, 3))
        .await
        .unwrap();
    let a = store
        .reserve_with(
            &buyer.account_id,
            &model.model_id,
            Charge::Prediction,
            1,
            Some("held-a"),
            Some("fp-a"),
        )
        .await
        .unwrap();
    assert_eq!(a.fingerprint.as_deref(), Some("fp-a"));
    let b = store
        .reserve(&buyer.account_id, &model.model_id, None)
        .await
        .unwrap();
    assert_eq!(store.held_credits(&buyer.account_id).await.unwrap(), 6);
    assert_eq!(store.held_credits(&owner.account_id).await.unwrap(), 0);

    let receipt = store
        .commit_with(&a.reservation_id, Some(b"answer a".to_vec()))
        .await
        .unwrap();
    assert_eq!(
        receipt.receipt_id,
        crate::store::receipt_id_for(&a.reservation_id)
    );
    // A second commit returns the same receipt and never replaces the kept response.
    let again = store
        .commit_with(&a.reservation_id, Some(b"another".to_vec()))
        .await
        .unwrap();
    assert_eq!(again, receipt);
    assert_eq!(
        store
            .get_response(&a.reservation_id)
            .await
            .unwrap()
            .as_deref(),
        Some(b"answer a".as_slice())
    );
    assert_eq!(store.get_response(&b.reservation_id).await.unwrap(), None);
    assert_eq!(store.held_credits(&buyer.account_id).await.unwrap(), 3);

    // Nothing is stale yet at a cutoff before the holds were made.
    store.release_stale(b.created_at - 1000).await.unwrap();
    assert_eq!(
        store
            .get_reservation(&b.reservation_id)
            .await
            .unwrap()
            .state,
        ReservationState::Held
    );
    let released = store.release_stale(id::unix_now() + 1).await.unwrap();
    assert!(released >= 1, "the stale hold was released");
    assert_eq!(
        store
            .get_reservation(&b.reservation_id)
            .await
            .unwrap()
            .state,
        ReservationState::Released
    );
    assert_eq!(
        store
            .get_reservation(&a.reservation_id)
            .await
            .unwrap()
            .state,
        ReservationState::Committed,
        "a committed reservation is not swept"
    );
    let buyer_now = store.get_account(&buyer.account_id).await.unwrap();
    assert_eq!(buyer_now.credits, 7, "the swept hold came back");
    assert_eq!(store.held_credits(&buyer.account_id).await.unwrap(), 0);
    assert_eq!(
        code(store.commit(&b.reservation_id).await),
        ErrorCode::Conflict,
        "a commit after the sweep is refused"
    );
}

/// Nonces: spent once per key, concurrently too; bounded per key; forgotten once expired.
pub async fn nonces(store: Store) {
    let key = id::new_id("mhk");
    let other = id::new_id("mhk");
    let expires = id::unix_now() + 420;
    store
        .use_nonce(&key, "nonce-0000000000001", expires, 5)
        .await
        .unwrap();
    assert_eq!(
        code(
            store
                .use_nonce(&key, "nonce-0000000000001", expires, 5)
                .await
        ),
        ErrorCode::Conflict
    );
    store
        .use_nonce(&other, "nonce-0000000000001", expires, 5)
        .await
        .unwrap();

    let racers: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            let key = key.clone();
            tokio::spawn(async move {
                store
                    .use_nonce(&key, "nonce-raced-0000001", expires, 100)
                    .await
            })
        })
        .collect();
    let mut won = 0;
    for r in racers {
        match r.await.unwrap() {
            Ok(()) => won += 1,
            Err(e) => assert_eq!(e.code(), ErrorCode::Conflict, "{e}"),
        }
    }
    assert_eq!(won, 1, "exactly one of the racers spends the nonce");

    // The bound: `limit` nonces per key and bucket, then TooManyRequests.
    let bounded = id::new_id("mhk");
    for n in 0..3 {
        store
            .use_nonce(&bounded, &format!("bounded-nonce-{n:05}"), expires, 3)
            .await
            .unwrap();
    }
    assert_eq!(
        code(
            store
                .use_nonce(&bounded, "bounded-nonce-99999", expires, 3)
                .await
        ),
        ErrorCode::TooManyRequests
    );

    // Once expired, a nonce is forgotten (its request is refused by its date anyway).
    let pruned = store.prune_nonces(expires + 1).await.unwrap();
    assert!(pruned >= 6, "pruned {pruned}");
    store
        .use_nonce(&key, "nonce-0000000000001", expires + 600, 5)
        .await
        .unwrap();
    store
        .use_nonce(&bounded, "bounded-nonce-99999", expires + 600, 3)
        .await
        .unwrap();
}

pub async fn restart_durability<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Store>,
{
    let store = open().await;
    let buyer = store.create_account(new_account("buyer", 9)).await.unwrap();
    let owner = store
        .create_account(new_account("seller", 0))
        .await
        .unwrap();
    let key = new_key(&buyer.account_id, 7);
    store.create_key(key.clone()).await.unwrap();
    let model = store
        .create_model(new_model(&owner.account_id, 3))
        .await
        .unwrap();
    let committed = store
        .reserve(&buyer.account_id, &model.model_id, Some("k1"))
        .await
        .unwrap();
    let receipt = store.commit(&committed.reservation_id).await.unwrap();
    let held = store
        .reserve(&buyer.account_id, &model.model_id, None)
        .await
        .unwrap();
    // Chain-ledger records: a wallet, a batch holding the receipt, an unsettled receipt, a
    // cursor.
    let mut holder = new_account("holder", 0);
    holder.wallet = Some(new_wallet());
    let holder = store.create_account(holder).await.unwrap();
    let batch = store
        .create_batch(new_batch(std::slice::from_ref(&receipt)))
        .await
        .unwrap();
    let receipt = store.get_receipt(&receipt.receipt_id).await.unwrap();
    assert_eq!(receipt.batch_id.as_ref(), Some(&batch.batch_id));
    let unsettled = committed_receipts(&store, 1).await.remove(0);
    let cursor = id::new_id("cursor");
    store.set_cursor(&cursor, 77).await.unwrap();
    let unsettled_count = store.count_unsettled_receipts().await.unwrap();
    let buyer_now = store.get_account(&buyer.account_id).await.unwrap();
    let owner_now = store.get_account(&owner.account_id).await.unwrap();
    let committed_now = store
        .get_reservation(&committed.reservation_id)
        .await
        .unwrap();
    drop(store);

    let store = open().await;
    assert_eq!(
        store.get_account(&buyer.account_id).await.unwrap(),
        buyer_now
    );
    assert_eq!(buyer_now.credits, 3);
    assert_eq!(
        store.get_account(&owner.account_id).await.unwrap(),
        owner_now
    );
    assert_eq!(owner_now.earnings, 3);
    assert_eq!(store.get_key(&key.key_id).await.unwrap(), key);
    assert_eq!(store.get_model(&model.model_id).await.unwrap(), model);
    assert!(
        store
            .model_version_taken(&model.owner, &model.name, &model.version)
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .get_reservation(&committed.reservation_id)
            .await
            .unwrap(),
        committed_now
    );
    assert_eq!(
        store.get_reservation(&held.reservation_id).await.unwrap(),
        held
    );
    assert_eq!(
        store.get_receipt(&receipt.receipt_id).await.unwrap(),
        receipt
    );
    let wallet = holder.wallet.clone().unwrap_or_default();
    assert_eq!(
        store.find_account_by_wallet(&wallet).await.unwrap(),
        Some(holder)
    );
    assert_eq!(store.get_batch(&batch.batch_id).await.unwrap(), batch);
    assert!(store.pending_batches().await.unwrap().contains(&batch));
    assert!(store.recent_batches(1000).await.unwrap().contains(&batch));
    assert_eq!(
        store.count_unsettled_receipts().await.unwrap(),
        unsettled_count
    );
    let listed = all_unsettled(&store).await;
    assert!(listed.contains(&unsettled));
    assert!(!listed.iter().any(|r| r.receipt_id == receipt.receipt_id));
    assert_eq!(store.get_cursor(&cursor).await.unwrap(), Some(77));
    // The indexes survived too.
    let mut other_holder = new_account("holder-2", 0);
    other_holder.wallet = Some(wallet);
    assert_eq!(
        code(store.create_account(other_holder).await),
        ErrorCode::Conflict
    );
    assert_eq!(
        code(
            store
                .create_batch(new_batch(std::slice::from_ref(&receipt)))
                .await
        ),
        ErrorCode::Conflict
    );
    let mut settled = batch.clone();
    settled.state = BatchState::Settled;
    store.update_batch(&settled).await.unwrap();
    assert_eq!(
        code(store.update_batch(&settled).await),
        ErrorCode::Conflict
    );
    let mut twin = model.clone();
    twin.model_id = id::new_id(id::MODEL);
    assert_eq!(code(store.create_model(twin).await), ErrorCode::Conflict);
    let again = store
        .reserve(&buyer.account_id, &model.model_id, Some("k1"))
        .await
        .unwrap();
    assert_eq!(again.reservation_id, committed.reservation_id);
    // And the held reservation can still be released.
    store.release(&held.reservation_id).await.unwrap();
    assert_eq!(
        store.get_account(&buyer.account_id).await.unwrap().credits,
        6
    );
}

/// Releasing a failed batch: its receipts are unsettled again (and can go into a new batch),
/// the batch stays failed; a batch that is not failed keeps its receipts; unknown is NotFound.
pub async fn release_batch(store: Store) {
    let receipts = committed_receipts(&store, 3).await;
    let ids: Vec<String> = receipts.iter().map(|r| r.receipt_id.clone()).collect();
    let batch = store.create_batch(new_batch(&receipts)).await.unwrap();
    // Pending: refused, nothing released.
    assert_eq!(
        code(store.release_batch(&batch.batch_id).await),
        ErrorCode::Conflict
    );
    assert!(
        !all_unsettled(&store)
            .await
            .iter()
            .any(|r| ids.contains(&r.receipt_id))
    );
    let mut failed = batch.clone();
    failed.state = BatchState::Failed;
    failed.error = Some("refused".into());
    store.update_batch(&failed).await.unwrap();
    let released = store.release_batch(&batch.batch_id).await.unwrap();
    assert_eq!(released.state, BatchState::Failed);
    assert_eq!(released.receipt_ids, ids);
    let unsettled: Vec<String> = all_unsettled(&store)
        .await
        .into_iter()
        .map(|r| r.receipt_id)
        .filter(|id| ids.contains(id))
        .collect();
    assert_eq!(unsettled.len(), 3);
    for id in &ids {
        assert_eq!(store.get_receipt(id).await.unwrap().batch_id, None);
    }
    // Again: a no-op. The batch is still there, failed.
    store.release_batch(&batch.batch_id).await.unwrap();
    assert_eq!(
        store.get_batch(&batch.batch_id).await.unwrap().state,
        BatchState::Failed
    );
    // Two of them go into a new batch; releasing the old one again leaves them there.
    let next = store.create_batch(new_batch(&receipts[..2])).await.unwrap();
    store.release_batch(&batch.batch_id).await.unwrap();
    for r in &receipts[..2] {
        assert_eq!(
            store.get_receipt(&r.receipt_id).await.unwrap().batch_id,
            Some(next.batch_id.clone())
        );
    }
    assert_eq!(
        store
            .get_receipt(&receipts[2].receipt_id)
            .await
            .unwrap()
            .batch_id,
        None
    );
    let mut settled = next.clone();
    settled.state = BatchState::Settled;
    store.update_batch(&settled).await.unwrap();
    assert_eq!(
        code(store.release_batch(&next.batch_id).await),
        ErrorCode::Conflict
    );
    assert_eq!(code(store.release_batch("0x00").await), ErrorCode::NotFound);
}
