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
use crate::model::{Account, ApiKey, Model, ReservationState};
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
    }
}

/// A fresh model record owned by `owner`, with a unique name.
pub fn new_model(owner: &str, price: u64) -> Model {
    Model {
        model_id: id::new_id(id::MODEL),
        owner: owner.to_owned(),
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
            .find_model(&model.name, &model.version)
            .await
            .unwrap()
            .is_none()
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
    let again = Model {
        model_id: id::new_id(id::MODEL),
        ..model
    };
    store
        .create_model(again)
        .await
        .expect("the name and version are free again");
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
    grant_once(store.clone()).await;
    concurrent_reserve(store.clone()).await;
    drop(store);
    restart_durability(open).await;
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
    let key = ApiKey {
        key_id: id::new_id(id::KEY),
        account_id: a.account_id.clone(),
        sealed_secret: vec![9; 61],
        revoked: false,
        created_at: id::unix_now(),
    };
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

    let revoked = store.revoke_key(&key.key_id).await.unwrap();
    assert!(revoked.revoked);
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
        assert_eq!(
            store
                .find_model(&m.name, &m.version)
                .await
                .unwrap()
                .as_ref(),
            Some(m)
        );
    }
    assert_eq!(store.find_model(&made[0].name, "9.9").await.unwrap(), None);
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
    assert_eq!(
        store
            .find_model(&same_id.name, &same_id.version)
            .await
            .unwrap(),
        None
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
    assert_eq!(
        store
            .find_model(&orphan.name, &orphan.version)
            .await
            .unwrap(),
        None
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

/// Drops the store, opens it again and finds every record.
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
    let key = ApiKey {
        key_id: id::new_id(id::KEY),
        account_id: buyer.account_id.clone(),
        sealed_secret: vec![7; 61],
        revoked: false,
        created_at: id::unix_now(),
    };
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
    assert_eq!(
        store.find_model(&model.name, &model.version).await.unwrap(),
        Some(model.clone())
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
    // The indexes survived too.
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
