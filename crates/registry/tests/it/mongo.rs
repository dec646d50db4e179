//! [`MongoStore`] against a real MongoDB-wire server (nx-27017, started by `scripts/mongo`):
//! the same conformance suite as the embedded store, restarts of the server, connection loss,
//! recovery of interrupted operations, and the gRPC service on MongoDB.
//!
//! When the server can't be started the tests fail under `CI=true` and are skipped (with a
//! notice) elsewhere.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use modelhub_core::ErrorCode;
use modelhub_registry::conformance::{self, Store};
use modelhub_registry::model::ReservationState;
use modelhub_registry::store::mongo::Recovery;
use modelhub_registry::store::reservation_id_for;
use modelhub_registry::{MetadataStore, MongoStore};
use mongodb::bson::{Document, doc};

const TIMEOUT: Duration = Duration::from_millis(1500);

/// A nx-27017 server in a temporary folder, stopped on drop.
struct MongoServer {
    dir: tempfile::TempDir,
    uri: String,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/mongo")
}

fn run_script(cmd: &str, dir: &std::path::Path) -> Result<String, String> {
    let out = Command::new("bash")
        .arg(script())
        .arg(cmd)
        .arg(dir)
        .output()
        .map_err(|e| format!("running scripts/mongo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "scripts/mongo {cmd} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl MongoServer {
    /// Starts a server, or says why not: `None` means skip (outside CI).
    fn start_or_skip(test: &str) -> Option<MongoServer> {
        let dir = tempfile::tempdir().expect("tempdir");
        match run_script("start", dir.path()) {
            Ok(uri) => {
                assert!(uri.starts_with("mongodb://127.0.0.1:"), "{uri}");
                Some(MongoServer { dir, uri })
            }
            Err(e) if modelhub_testkit::is_ci() => {
                panic!("the MongoDB-wire server is required under CI: {e}")
            }
            Err(e) => {
                eprintln!("SKIPPED {test}: no MongoDB-wire server ({e})");
                None
            }
        }
    }

    /// URI of database `db` on this server.
    fn db_uri(&self, db: &str) -> String {
        format!("{}/{db}", self.uri)
    }

    fn stop(&self) {
        run_script("stop", self.dir.path()).expect("stop the server");
    }

    /// Starts it again on the same data (and port).
    fn start_again(&self) {
        let uri = run_script("start", self.dir.path()).expect("restart the server");
        assert_eq!(uri, self.uri, "the restarted server must keep its port");
    }
}

impl Drop for MongoServer {
    fn drop(&mut self) {
        if let Err(e) = run_script("stop", self.dir.path()) {
            eprintln!("{e}");
        }
    }
}

async fn connect(uri: &str) -> MongoStore {
    MongoStore::connect(uri, TIMEOUT)
        .await
        .expect("connect to the MongoDB-wire server")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongo_store_passes_the_conformance_suite() {
    let Some(server) = MongoServer::start_or_skip("mongo_store_passes_the_conformance_suite")
    else {
        return;
    };
    let uri = server.db_uri("conformance");
    let opened = AtomicUsize::new(0);
    // Every open after the first restarts the server on the same data folder: the durability
    // check drops the store, and the reopened one must find everything.
    let open = || {
        if opened.fetch_add(1, Ordering::SeqCst) > 0 {
            server.stop();
            server.start_again();
        }
        let uri = uri.clone();
        async move { Arc::new(connect(&uri).await) as Store }
    };
    conformance::run_all(open).await;
    assert_eq!(opened.load(Ordering::SeqCst), 3);
}

/// A database from before owned names has a unique index on (name, version) alone: opening it
/// drops that index, so a second owner may publish the same name and version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_from_before_owned_names_lets_two_owners_share_a_name() {
    let Some(server) = MongoServer::start_or_skip(
        "a_database_from_before_owned_names_lets_two_owners_share_a_name",
    ) else {
        return;
    };
    let client = mongodb::Client::with_uri_str(&server.uri).await.unwrap();
    let models = client.database("old").collection::<Document>("models");
    models
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! { "name": 1, "version": 1 })
                .options(
                    mongodb::options::IndexOptions::builder()
                        .unique(true)
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
    let store: Store = Arc::new(connect(&server.db_uri("old")).await);
    let names = models.list_index_names().await.unwrap();
    assert_eq!(names.len(), 2, "_id and (owner, name, version): {names:?}");
    let a = store
        .create_account(conformance::new_account("a", 0))
        .await
        .unwrap();
    let b = store
        .create_account(conformance::new_account("b", 0))
        .await
        .unwrap();
    let first = store
        .create_model(conformance::new_model(&a.account_id, 1))
        .await
        .unwrap();
    let second = conformance::new_model(&b.account_id, 1);
    let second = modelhub_registry::model::Model {
        name: first.name.clone(),
        ..second
    };
    store.create_model(second).await.unwrap();
    // Reopening (indexes made again) keeps working.
    drop(store);
    let _again = connect(&server.db_uri("old")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reserve_on_a_fresh_database() {
    let Some(server) = MongoServer::start_or_skip("concurrent_reserve_on_a_fresh_database") else {
        return;
    };
    let store: Store = Arc::new(connect(&server.db_uri("race")).await);
    conformance::concurrent_reserve(store.clone()).await;
    // The database named in the URI holds the data; the default one is untouched.
    let client = mongodb::Client::with_uri_str(&server.uri).await.unwrap();
    let names = client.list_database_names().await.unwrap();
    assert!(names.iter().any(|n| n == "race"), "{names:?}");
    assert!(!names.iter().any(|n| n == "modelhub"), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_down_gives_unavailable_and_the_store_recovers() {
    let Some(server) =
        MongoServer::start_or_skip("server_down_gives_unavailable_and_the_store_recovers")
    else {
        return;
    };
    let store = connect(&server.db_uri("outage")).await;
    let buyer = store
        .create_account(conformance::new_account("buyer", 5))
        .await
        .unwrap();
    let owner = store
        .create_account(conformance::new_account("owner", 0))
        .await
        .unwrap();
    let model = store
        .create_model(conformance::new_model(&owner.account_id, 2))
        .await
        .unwrap();

    server.stop();
    let err = store.get_account(&buyer.account_id).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err:?}");
    let err = store
        .reserve(&buyer.account_id, &model.model_id, Some("during-outage"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err:?}");
    assert_eq!(
        store.list_models().await.unwrap_err().code(),
        ErrorCode::Unavailable
    );
    // Clients see a safe message.
    assert!(!err.to_api().message.contains("127.0.0.1"));
    // A store can't even be opened while the server is down, and says so.
    let err = MongoStore::connect(&server.db_uri("outage"), TIMEOUT)
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err:?}");

    server.start_again();
    let again = modelhub_testkit::eventually_async(
        "the same store works again",
        Duration::from_secs(30),
        || {
            let store = store.clone();
            let id = buyer.account_id.clone();
            async move { store.get_account(&id).await.ok() }
        },
    )
    .await;
    assert_eq!(again, buyer);
    let r = store
        .reserve(&buyer.account_id, &model.model_id, Some("after-outage"))
        .await
        .unwrap();
    store.commit(&r.reservation_id).await.unwrap();
    assert_eq!(
        store.get_account(&buyer.account_id).await.unwrap().credits,
        3
    );
    assert_eq!(
        store.get_account(&owner.account_id).await.unwrap().earnings,
        2
    );
}

/// Interrupted operations (a registry that died between two writes) are finished or undone
/// by recovery, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_finishes_interrupted_operations() {
    let Some(server) = MongoServer::start_or_skip("recovery_finishes_interrupted_operations")
    else {
        return;
    };
    let uri = server.db_uri("recovery");
    let store = connect(&uri).await;
    let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
    let db = client.database("recovery");
    let accounts = db.collection::<Document>("accounts");
    let reservations = db.collection::<Document>("reservations");

    let buyer = store
        .create_account(conformance::new_account("buyer", 20))
        .await
        .unwrap();
    let owner = store
        .create_account(conformance::new_account("owner", 0))
        .await
        .unwrap();
    let model = store
        .create_model(conformance::new_model(&owner.account_id, 5))
        .await
        .unwrap();
    let balance = |id: String| {
        let store = store.clone();
        async move {
            let a = store.get_account(&id).await.unwrap();
            (a.credits, a.earnings)
        }
    };

    // 1. Died after the debit, before writing the reservation.
    let orphan = modelhub_core::id::new_id(modelhub_core::id::RESERVATION);
    accounts
        .update_one(
            doc! { "_id": &buyer.account_id },
            doc! {
                "$inc": { "credits": -5_i64 },
                "$set": { format!("pending.{orphan}_debit"): {
                    "amount": 5_i64, "at": 0_i64, "token": "dbt_crashed",
                } },
            },
        )
        .await
        .unwrap();
    // 2. Died after winning the commit, before crediting the owner.
    let to_commit = store
        .reserve(&buyer.account_id, &model.model_id, None)
        .await
        .unwrap();
    // 3. Died after winning the release, before refunding.
    let to_release = store
        .reserve(&buyer.account_id, &model.model_id, None)
        .await
        .unwrap();
    assert_eq!(balance(buyer.account_id.clone()).await, (5, 0));
    let receipt_id = format!(
        "rcpt_{}",
        to_commit.reservation_id.trim_start_matches("rsv_")
    );
    reservations
        .update_one(
            doc! { "_id": &to_commit.reservation_id },
            doc! { "$set": { "state": "committing", "settled_at": 0_i64, "receipt_id": &receipt_id } },
        )
        .await
        .unwrap();
    reservations
        .update_one(
            doc! { "_id": &to_release.reservation_id },
            doc! { "$set": { "state": "releasing", "settled_at": 0_i64 } },
        )
        .await
        .unwrap();
    // Already final to readers.
    assert_eq!(
        store
            .get_reservation(&to_commit.reservation_id)
            .await
            .unwrap()
            .state,
        ReservationState::Committed
    );
    // A retried commit returns the receipt without paying the owner a second time.
    let receipt = store.commit(&to_commit.reservation_id).await.unwrap();
    assert_eq!(receipt.receipt_id, receipt_id);
    assert_eq!(
        store
            .commit(&to_release.reservation_id)
            .await
            .unwrap_err()
            .code(),
        ErrorCode::Conflict
    );

    assert_eq!(
        store
            .recover_stale(Duration::from_secs(3600))
            .await
            .unwrap(),
        Recovery {
            refunded_debits: 1,
            finished: 2,
            cleared: 0
        },
        "markers and settlements at time 0 are older than an hour"
    );
    assert_eq!(balance(buyer.account_id.clone()).await, (15, 0));
    assert_eq!(balance(owner.account_id.clone()).await, (0, 5));
    assert_eq!(
        store
            .get_receipt(&receipt_id)
            .await
            .unwrap()
            .credits_charged,
        5
    );
    // The abandoned reserve reads as released: nothing charged, its idempotency key free.
    assert_eq!(
        store.get_reservation(&orphan).await.unwrap().state,
        ReservationState::Released
    );
    for (id, state) in [
        (&to_commit.reservation_id, "committed"),
        (&to_release.reservation_id, "released"),
    ] {
        let d = reservations
            .find_one(doc! { "_id": id })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.get_str("state").unwrap(), state);
    }
    let pending = accounts
        .find_one(doc! { "_id": &buyer.account_id })
        .await
        .unwrap()
        .unwrap();
    assert!(
        pending
            .get_document("pending")
            .map_or(true, |p| p.is_empty()),
        "{pending:?}"
    );

    // Exactly once: a second pass (or a late original) changes nothing.
    assert_eq!(
        store.recover_stale(Duration::ZERO).await.unwrap(),
        Recovery::default()
    );

    // A recent marker may belong to an operation in flight: left alone inside the grace
    // period, refunded after it.
    let recent = modelhub_core::id::new_id(modelhub_core::id::RESERVATION);
    accounts
        .update_one(
            doc! { "_id": &buyer.account_id },
            doc! {
                "$inc": { "credits": -5_i64 },
                "$set": { format!("pending.{recent}_debit"): {
                    "amount": 5_i64, "at": modelhub_core::id::unix_now(), "token": "dbt_slow",
                } },
            },
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .recover_stale(Duration::from_secs(3600))
            .await
            .unwrap(),
        Recovery::default()
    );
    assert_eq!(balance(buyer.account_id.clone()).await, (10, 0));
    assert_eq!(
        store.recover_stale(Duration::ZERO).await.unwrap(),
        Recovery {
            refunded_debits: 1,
            ..Recovery::default()
        }
    );
    assert_eq!(
        store.recover_stale(Duration::ZERO).await.unwrap(),
        Recovery::default()
    );
    assert_eq!(balance(buyer.account_id.clone()).await, (15, 0));
    assert_eq!(balance(owner.account_id.clone()).await, (0, 5));
    // A slow original that now writes its reservation under the voided id fails.
    let late = doc! {
        "_id": &orphan, "account_id": &buyer.account_id, "model_id": &model.model_id,
        "owner": &owner.account_id, "amount": 5_i64, "state": "held", "created_at": 0_i64,
    };
    assert!(reservations.insert_one(late).await.is_err());
}

/// A retry that arrives while the first attempt is between its debit and its insert writes
/// the reservation for that debit: one reservation, one charge, and recovery keeps the debit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_completes_an_attempt_in_flight() {
    let Some(server) = MongoServer::start_or_skip("a_retry_completes_an_attempt_in_flight") else {
        return;
    };
    let uri = server.db_uri("inflight");
    let store = connect(&uri).await;
    let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
    let accounts = client
        .database("inflight")
        .collection::<Document>("accounts");
    let buyer = store
        .create_account(conformance::new_account("buyer", 4))
        .await
        .unwrap();
    let owner = store
        .create_account(conformance::new_account("owner", 0))
        .await
        .unwrap();
    let model = store
        .create_model(conformance::new_model(&owner.account_id, 3))
        .await
        .unwrap();
    // The first attempt debited (leaving 1 credit, too few for another hold) and stalled.
    let rid = reservation_id_for(&buyer.account_id, "req-9");
    accounts
        .update_one(
            doc! { "_id": &buyer.account_id },
            doc! {
                "$inc": { "credits": -3_i64 },
                "$set": { format!("pending.{rid}_debit"): {
                    "amount": 3_i64, "at": 0_i64, "token": "dbt_first",
                } },
            },
        )
        .await
        .unwrap();
    let r = store
        .reserve(&buyer.account_id, &model.model_id, Some("req-9"))
        .await
        .unwrap();
    assert_eq!(r.reservation_id, rid);
    assert_eq!(r.state, ReservationState::Held);
    assert_eq!(
        store.get_account(&buyer.account_id).await.unwrap().credits,
        1
    );
    // The stalled attempt's debit paid for this reservation: recovery keeps it.
    assert_eq!(
        store.recover_stale(Duration::ZERO).await.unwrap(),
        Recovery {
            cleared: 1,
            ..Recovery::default()
        }
    );
    assert_eq!(
        store.get_account(&buyer.account_id).await.unwrap().credits,
        1
    );
    store.release(&rid).await.unwrap();
    assert_eq!(
        store.get_account(&buyer.account_id).await.unwrap().credits,
        4
    );
}

/// The gRPC service started by `run` with `mongodb_uri` keeps its records in MongoDB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_service_runs_on_mongodb() {
    use modelhub_proto::registry::v1 as pb;
    use modelhub_proto::registry::v1::registry_client::RegistryClient;

    let Some(server) = MongoServer::start_or_skip("registry_service_runs_on_mongodb") else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let uri = server.db_uri("service");
    let pki = modelhub_testkit::tls::TestPki::shared();
    let settings = modelhub_registry::Settings {
        mtls_dir: pki.dir().to_path_buf(),
        ..modelhub_registry::Settings::for_test_mongodb(data.path(), uri.clone())
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(modelhub_registry::run(settings, listener, async {
        let _ = stopped.await;
    }));
    let endpoint = pki
        .identity(modelhub_mtls::Identity::Gateway)
        .endpoint(
            modelhub_mtls::Identity::Registry,
            &format!("https://{addr}"),
        )
        .unwrap();
    let mut client = modelhub_testkit::eventually_async(
        "registry accepts connections",
        Duration::from_secs(20),
        || {
            let endpoint = endpoint.clone();
            async move { endpoint.connect().await.ok().map(RegistryClient::new) }
        },
    )
    .await;
    let created = client
        .create_account(pb::CreateAccountRequest {
            name: "mongo-user".into(),
            admin: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let account_id = created.account_id;

    // The record is in MongoDB, not in the embedded database.
    let store = connect(&uri).await;
    assert_eq!(
        store.get_account(&account_id).await.unwrap().name,
        "mongo-user"
    );
    assert!(!data.path().join("registry.redb").exists());

    // Server down: the gRPC status is `unavailable`.
    server.stop();
    let status = client
        .get_account(pb::GetAccountRequest {
            account_id: account_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    server.start_again();

    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// A malformed URI stops the registry at start-up, before it serves anything, and the error
/// does not echo the URI (it may hold a password).
#[tokio::test]
async fn a_bad_mongodb_uri_fails_at_start() {
    let data = tempfile::tempdir().unwrap();
    let settings = modelhub_registry::Settings {
        mtls_dir: modelhub_testkit::tls::TestPki::shared().dir().to_path_buf(),
        ..modelhub_registry::Settings::for_test_mongodb(
            data.path(),
            "http://user:s3cret@127.0.0.1:1/db",
        )
    };
    assert!(!format!("{settings:?}").contains("s3cret"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = modelhub_registry::run(settings, listener, std::future::pending())
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("MongoDB"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
    let err = MongoStore::connect("mongodb://127.0.0.1:1/?bogusOption=1&w=banana", TIMEOUT)
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::BadRequest, "{err:?}");
}

/// A batch creation interrupted after its document was written stays invisible until a retry
/// or recovery finishes it; recovery undoes it instead when one of its receipts went to another
/// batch meanwhile. Receipts written before the chain ledger (no `batch_id`) are unsettled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_batches_are_finished_or_undone() {
    use modelhub_registry::model::SettlementBatch;

    let Some(server) = MongoServer::start_or_skip("interrupted_batches_are_finished_or_undone")
    else {
        return;
    };
    let uri = server.db_uri("batches");
    let store = connect(&uri).await;
    let shared: Store = Arc::new(store.clone());
    let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
    let db = client.database("batches");
    let receipts = db.collection::<Document>("receipts");
    let batches = db.collection::<Document>("batches");
    // A batch document as `create_batch` writes it before claiming its receipts.
    let interrupted = |b: &SettlementBatch, opened_at: i64| {
        doc! {
            "_id": &b.batch_id, "receipt_ids": &b.receipt_ids, "credits": b.credits as i64,
            "state": "pending", "tx_hash": null, "error": null, "attempts": 0_i64,
            "created_at": b.created_at, "updated_at": b.updated_at,
            "complete": false, "opened_at": opened_at,
        }
    };
    let batch_of = |id: String| {
        let store = store.clone();
        async move { store.get_receipt(&id).await.unwrap().batch_id }
    };

    let made = conformance::committed_receipts(&shared, 4).await;
    // A receipt from before the chain ledger.
    receipts
        .update_one(
            doc! { "_id": &made[3].receipt_id },
            doc! { "$unset": { "batch_id": "" } },
        )
        .await
        .unwrap();
    assert_eq!(store.count_unsettled_receipts().await.unwrap(), 4);
    assert!(
        store
            .unsettled_receipts(10)
            .await
            .unwrap()
            .contains(&made[3])
    );

    // Interrupted after claiming the first receipt: invisible, its receipt out of the
    // unsettled ones, the other still in.
    let b1 = conformance::new_batch(&made[..2]);
    batches.insert_one(interrupted(&b1, 0)).await.unwrap();
    receipts
        .update_one(
            doc! { "_id": &made[0].receipt_id },
            doc! { "$set": { "batch_id": &b1.batch_id } },
        )
        .await
        .unwrap();
    assert_eq!(
        store.get_batch(&b1.batch_id).await.unwrap_err().code(),
        ErrorCode::NotFound
    );
    assert!(store.pending_batches().await.unwrap().is_empty());
    assert!(store.recent_batches(10).await.unwrap().is_empty());
    assert_eq!(
        store.update_batch(&b1).await.unwrap_err().code(),
        ErrorCode::NotFound
    );
    assert_eq!(store.count_unsettled_receipts().await.unwrap(), 3);
    // A retry finishes it.
    assert_eq!(store.create_batch(b1.clone()).await.unwrap(), b1);
    assert_eq!(store.get_batch(&b1.batch_id).await.unwrap(), b1);
    assert_eq!(store.pending_batches().await.unwrap(), vec![b1.clone()]);
    assert_eq!(
        batch_of(made[1].receipt_id.clone()).await.as_deref(),
        Some(b1.batch_id.as_str())
    );
    assert_eq!(store.count_unsettled_receipts().await.unwrap(), 2);

    // Interrupted before claiming anything: recovery finishes it.
    let b2 = conformance::new_batch(&made[2..3]);
    batches.insert_one(interrupted(&b2, 0)).await.unwrap();
    // Inside the grace period it is left alone.
    let b_recent = conformance::new_batch(&made[3..4]);
    batches
        .insert_one(interrupted(&b_recent, modelhub_core::id::unix_now()))
        .await
        .unwrap();
    assert_eq!(
        store
            .recover_stale(Duration::from_secs(3600))
            .await
            .unwrap(),
        Recovery {
            finished: 1,
            ..Recovery::default()
        }
    );
    assert_eq!(store.get_batch(&b2.batch_id).await.unwrap(), b2);
    assert_eq!(
        batch_of(made[2].receipt_id.clone()).await.as_deref(),
        Some(b2.batch_id.as_str())
    );
    assert_eq!(
        store
            .get_batch(&b_recent.batch_id)
            .await
            .unwrap_err()
            .code(),
        ErrorCode::NotFound
    );

    // Meanwhile its receipt went to another batch: recovery undoes it.
    let b4 = conformance::new_batch(&made[3..4]);
    assert_eq!(store.create_batch(b4.clone()).await.unwrap(), b4);
    assert_eq!(
        store.recover_stale(Duration::ZERO).await.unwrap(),
        Recovery {
            finished: 1,
            ..Recovery::default()
        }
    );
    assert!(
        batches
            .find_one(doc! { "_id": &b_recent.batch_id })
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        batch_of(made[3].receipt_id.clone()).await.as_deref(),
        Some(b4.batch_id.as_str())
    );
    assert_eq!(store.count_unsettled_receipts().await.unwrap(), 0);
    let mut pending = vec![b1, b2, b4];
    pending.sort_by(|a, b| (a.created_at, &a.batch_id).cmp(&(b.created_at, &b.batch_id)));
    assert_eq!(store.pending_batches().await.unwrap(), pending);
    assert_eq!(
        store.recover_stale(Duration::ZERO).await.unwrap(),
        Recovery::default()
    );
}
