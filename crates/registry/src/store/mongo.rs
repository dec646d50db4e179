//! [`MongoStore`]: the registry's metadata in MongoDB (6 or later; a replica set in
//! production), through the official `mongodb` driver.
//!
//! # Collections
//! - `accounts` `{_id, name, admin, credits, earnings, created_at, wallet?, handle?,
//!   pending?}`, unique indexes `wallet` and `handle`, each restricted to documents that have
//!   one (partial indexes; the fields are absent, not null, on accounts without them)
//! - `keys` `{_id, account_id, sealed_secret: binary, revoked, created_at}`
//! - `models` `{_id, owner, owner_handle?, name, version, price, …, deleted_at?}`, unique index
//!   `(owner, name, version)`. A delete keeps the document as a tombstone (`deleted_at` set, the
//!   wrapped key removed), so the owner's version stays taken: versions are immutable.
//! - `reservations` `{_id, account_id, model_id, owner, amount, state, receipt_id?,
//!   idempotency_key?, created_at, settled_at?}`, unique index `(account_id, idempotency_key)`
//!   restricted to documents that have a key (a partial index)
//! - `receipts` `{_id, reservation_id, …, batch_id}`, index `(batch_id, created_at)` for the
//!   unsettled ones (`batch_id` null, or absent in receipts written before the chain ledger)
//! - `batches` `{_id, receipt_ids, credits, state, tx_hash, error, attempts, created_at,
//!   updated_at, complete, opened_at}`, indexes `(state, created_at)` and `created_at`
//! - `cursors` `{_id: name, value}`
//! - `nonces` `{_id: key id \0 nonce, expires_at}`, index `expires_at`; `nonce_counts`
//!   `{_id: key id \0 bucket, bucket, n}`, index `bucket`: spent request nonces, pruned once
//!   expired
//!
//! Reservations also keep `fingerprint?` (of the keyed request) and `response?` (binary, set
//! in the same update that wins the commit).
//!
//! Ids are the `_id` of their documents, so key, model, reservation and receipt ids are unique
//! by MongoDB's own `_id` index; indexes are created at start (`createIndexes` is idempotent).
//! Money is stored as `Int64`; amounts above `i64::MAX` are refused.
//!
//! # Balances without multi-document transactions
//! Every balance change is one single-document atomic update of an account whose filter holds
//! the condition (`credits >= price` for a hold), so concurrent registries can never overspend.
//! An operation that touches two documents (the account and the reservation) leaves a *marker*
//! in the account in the same atomic update as the `$inc`: `pending.<reservation id>_<op>`
//! (`op` = `debit`, `earn` or `refund`). The `$inc` of `earn`/`refund` is conditional on the
//! marker being absent, so it applies at most once; the marker is removed only once the
//! reservation document shows the operation complete. A crash in between leaves the marker,
//! and recovery ([`MongoStore::recover_stale`], run at start and every minute for markers older
//! than a grace period) finishes or undoes the operation.
//!
//! - **reserve**: with an idempotency key the reservation id is derived from (account, key),
//!   so every retry of one request works on one id; without a key it is random.
//!   (1) An existing reservation under that id is returned (a `Conflict` when it was for
//!   another model). (2) The account is debited: `{_id, credits: {$gte: price},
//!   pending.<rid>_debit: {$exists: false}}` → `$inc credits: -price,
//!   $set pending.<rid>_debit: {amount, at, token}` with a random token naming this debit;
//!   the marker condition lets only one retry at a time debit for the id. (3) The reservation
//!   is inserted as `held` with `debit_token` = the token of the debit that paid for it.
//!   (4) The marker is removed (conditional on the token). When (2) matches nothing: a marker
//!   for the id means a concurrent retry is between (2) and (3), so the reservation is
//!   inserted on its behalf with its token (a duplicate is fine) and returned; otherwise an
//!   existing reservation is returned, else `PaymentRequired` (or `NotFound`). When (3) hits
//!   a duplicate: a stored `debit_token` equal to ours means a retry inserted it for us;
//!   anything else (an earlier retry's reservation whose marker was already gone, a
//!   tombstone) means our debit paid for nothing and is refunded, conditional on our token:
//!   `{_id, pending.<rid>_debit.token: token}` → `$inc credits: +price, $unset marker`, so
//!   at most once. A crash between (2) and (3) leaves the marker: recovery first inserts a
//!   `void` tombstone under the id (so a slow original's late insert fails on `_id`), then
//!   keeps the debit if the stored reservation carries its token and refunds it otherwise.
//!   The unique index on (account, key) guards the same rule once more.
//! - **commit**: the transition `{_id, state: "held"}` → `committing` (with the receipt id,
//!   derived from the reservation id, and the settlement time) is won by exactly one caller;
//!   a retry or a concurrent commit sees `committing`/`committed` and returns the same receipt
//!   (it is a pure function of the reservation), a released reservation is a `Conflict`. Only
//!   the winner goes on: insert the receipt (a duplicate is fine: same id, same content),
//!   credit the owner `{_id, marker absent}` → `$inc earnings, $set marker`, set `committed`,
//!   remove the marker.
//! - **release**: the same with `held` → `releasing` → `released` and a `refund` of the
//!   buyer's credits; releasing anything that is not `held` changes nothing.
//! - **recovery**: a reservation stuck in `committing`/`releasing` longer than the grace
//!   period is claimed by a conditional update of its `settled_at` (a lease: one recoverer per
//!   period) and finished as above; its `$inc` is still guarded by the marker. Markers whose
//!   reservation shows the operation done are removed. The grace period (5 minutes) is far
//!   longer than any operation may run (each is bounded by the operation timeout), so recovery
//!   never races a live operation.
//!
//! - **create_batch**: the receipts are checked first (all exist, none in another batch), then
//!   the batch is inserted with `complete: false` (a retry finds the same one), then each
//!   receipt is claimed by `{_id, batch_id: {$in: [null, <batch>]}}` → `$set batch_id`, then
//!   the batch is marked `complete`. Until then it is invisible (`get_batch`, `pending_batches`
//!   and `recent_batches` read complete batches only, and only those can be updated), so a
//!   batch is never sent on chain while some of its receipts could still go to another one.
//!   A receipt claimed by another batch in between undoes the batch (its document is deleted,
//!   then its claims are cleared) and gives `Conflict`. A call interrupted by a crash is
//!   finished by a retry of the same batch, or by recovery after the grace period (which
//!   undoes it instead when a receipt went to another batch meanwhile).
//!
//! To clients, `committing` already reads as `Committed` (the charge is final) and `releasing`
//! as `Released`; `void` tombstones read as not found. Nothing half-written is visible: a
//! failed operation either left no reservation, or a reservation whose state says what it is.
//!
//! # Failures
//! Server selection is bounded by the configured timeout (2 s by default) and every store call
//! by an operation timeout; an unreachable server, a dropped connection or a stepping-down
//! primary gives [`RegistryError::Unavailable`] (503 `unavailable` at the gateway). The driver
//! reconnects by itself: the same store works again once the server is back.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use modelhub_core::{TensorSpec, id};
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{Binary, Bson, Document, doc};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{ClientOptions, IndexOptions, ReturnDocument};
use mongodb::{Client, Collection, IndexModel};
use sha2::Digest;
use tracing::{debug, info, warn};

use super::redb::{batch_final, batch_taken, check_batch, check_credits, in_other_batch};
use super::{MetadataStore, Sealed};
use crate::error::{RegistryError, Result};
use crate::model::{
    Account, ApiKey, BatchState, Charge, Model, Receipt, Reservation, ReservationState,
    SettlementBatch,
};

/// Database used when the URI names none.
pub const DEFAULT_DATABASE: &str = "modelhub";
/// How long a marker or a settling reservation may stay before recovery takes it over.
pub const RECOVERY_GRACE: Duration = Duration::from_secs(300);
const RECOVERY_EVERY: Duration = Duration::from_secs(60);

const HELD: &str = "held";
const COMMITTING: &str = "committing";
const COMMITTED: &str = "committed";
const RELEASING: &str = "releasing";
const RELEASED: &str = "released";
const VOID: &str = "void";

const DEBIT: &str = "debit";
const EARN: &str = "earn";
const REFUND: &str = "refund";

/// The MongoDB metadata store. Cheap to clone; clones share the connection pool.
#[derive(Clone)]
pub struct MongoStore {
    inner: Arc<Inner>,
}

struct Inner {
    accounts: Collection<Document>,
    keys: Collection<Document>,
    models: Collection<Document>,
    reservations: Collection<Document>,
    receipts: Collection<Document>,
    batches: Collection<Document>,
    cursors: Collection<Document>,
    nonces: Collection<Document>,
    nonce_counts: Collection<Document>,
    op_timeout: Duration,
}

impl std::fmt::Debug for MongoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoStore").finish_non_exhaustive()
    }
}

/// What one recovery pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// Debits whose reservation was never written, refunded.
    pub refunded_debits: usize,
    /// Commits, releases and batch creations finished (a batch creation is undone instead when
    /// one of its receipts went to another batch meanwhile).
    pub finished: usize,
    /// Markers removed whose operation was already complete.
    pub cleared: usize,
}

// ---- errors ---------------------------------------------------------------------------------

/// Server error codes that mean "not reachable or not primary right now".
const UNAVAILABLE_CODES: &[i32] = &[
    6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436,
];

fn error_code(e: &mongodb::error::Error) -> Option<i32> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => Some(w.code),
        _ => None,
    }
}

fn is_duplicate(e: &mongodb::error::Error) -> bool {
    error_code(e) == Some(11000)
}

/// Whether the error means the server could not be reached (as opposed to a refused request).
pub fn is_unavailable(e: &mongodb::error::Error) -> bool {
    matches!(
        e.kind.as_ref(),
        ErrorKind::ServerSelection { .. }
            | ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. }
    ) || e.contains_label("RetryableWriteError")
        || error_code(e).is_some_and(|c| UNAVAILABLE_CODES.contains(&c))
}

impl From<mongodb::error::Error> for RegistryError {
    fn from(e: mongodb::error::Error) -> Self {
        if is_unavailable(&e) {
            RegistryError::unavailable(e)
        } else {
            RegistryError::store(e)
        }
    }
}

fn malformed(what: &str, field: &str) -> RegistryError {
    RegistryError::store(format!("malformed {what} document: field {field}"))
}

fn to_i64(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| RegistryError::bad_request(format!("{what} is too large")))
}

// ---- document field access (lenient about integer widths) ----------------------------------

fn get_str(d: &Document, what: &str, field: &str) -> Result<String> {
    match d.get(field) {
        Some(Bson::String(s)) => Ok(s.clone()),
        _ => Err(malformed(what, field)),
    }
}

fn get_opt_str(d: &Document, what: &str, field: &str) -> Result<Option<String>> {
    match d.get(field) {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::String(s)) => Ok(Some(s.clone())),
        _ => Err(malformed(what, field)),
    }
}

fn get_i64(d: &Document, what: &str, field: &str) -> Result<i64> {
    match d.get(field) {
        Some(Bson::Int64(v)) => Ok(*v),
        Some(Bson::Int32(v)) => Ok(i64::from(*v)),
        Some(Bson::Double(v)) if v.fract() == 0.0 && v.abs() < 9.0e15 => Ok(*v as i64),
        _ => Err(malformed(what, field)),
    }
}

fn get_u64(d: &Document, what: &str, field: &str) -> Result<u64> {
    u64::try_from(get_i64(d, what, field)?).map_err(|_| malformed(what, field))
}

/// A `u32` field that records from before it existed lack (read as 0).
fn get_opt_u32(d: &Document, what: &str, field: &str) -> Result<u32> {
    match d.get(field) {
        None | Some(Bson::Null) => Ok(0),
        Some(_) => u32::try_from(get_u64(d, what, field)?).map_err(|_| malformed(what, field)),
    }
}

fn get_bool(d: &Document, what: &str, field: &str) -> Result<bool> {
    match d.get(field) {
        Some(Bson::Boolean(b)) => Ok(*b),
        Some(Bson::Int32(v)) => Ok(*v != 0),
        Some(Bson::Int64(v)) => Ok(*v != 0),
        _ => Err(malformed(what, field)),
    }
}

fn get_bytes(d: &Document, what: &str, field: &str) -> Result<Vec<u8>> {
    match d.get(field) {
        Some(Bson::Binary(b)) => Ok(b.bytes.clone()),
        _ => Err(malformed(what, field)),
    }
}

fn binary(bytes: &[u8]) -> Bson {
    Bson::Binary(Binary {
        subtype: BinarySubtype::Generic,
        bytes: bytes.to_vec(),
    })
}

fn specs_to_bson(specs: &[TensorSpec]) -> Result<Bson> {
    mongodb::bson::serialize_to_bson(specs).map_err(RegistryError::store)
}

fn specs_from(d: &Document, field: &str) -> Result<Vec<TensorSpec>> {
    match d.get(field) {
        None | Some(Bson::Null) => Ok(Vec::new()),
        Some(v) => {
            mongodb::bson::deserialize_from_bson(v.clone()).map_err(|_| malformed("model", field))
        }
    }
}

// ---- records ↔ documents -------------------------------------------------------------------

fn account_doc(a: &Account) -> Result<Document> {
    let mut d = doc! {
        "_id": &a.account_id,
        "name": &a.name,
        "admin": a.admin,
        "credits": to_i64(a.credits, "credits")?,
        "earnings": to_i64(a.earnings, "earnings")?,
        "created_at": a.created_at,
    };
    // Absent (not null) without a wallet or handle, so the partial unique indexes ignore the
    // document.
    if let Some(w) = &a.wallet {
        d.insert("wallet", w);
    }
    if let Some(h) = &a.handle {
        d.insert("handle", h);
    }
    // Absent without a cap: the reserve's first try matches only uncapped accounts.
    if let Some(cap) = a.daily_cap {
        d.insert("daily_cap", to_i64(cap, "daily cap")?);
    }
    // Absent (not 0) without a lien: credits that come in take the one-update path.
    if a.refund_owed > 0 {
        d.insert("refund_owed", to_i64(a.refund_owed, "refund owed")?);
    }
    if a.charged_today.1 > 0 {
        d.insert(
            "charged",
            doc! { format!("d{}", a.charged_today.0): to_i64(a.charged_today.1, "charged")? },
        );
    }
    Ok(d)
}

/// Adds the fields of `fields` to the update operator `op` of `update` (creating it).
fn merge_op(update: &mut Document, op: &str, fields: Document) {
    match update.get_document_mut(op) {
        Ok(existing) => existing.extend(fields),
        Err(_) => {
            update.insert(op, fields);
        }
    }
}

/// The latest day of the account's `charged` map (`{"d<utc day>": credits}`), as
/// `Account::charged_today`.
fn charged_today_from(d: &Document) -> (i64, u64) {
    let Ok(charged) = d.get_document("charged") else {
        return (0, 0);
    };
    charged
        .iter()
        .filter_map(|(day, n)| {
            let n = n.as_i64().or_else(|| n.as_i32().map(i64::from))?;
            let day = day.strip_prefix('d')?.parse::<i64>().ok()?;
            Some((day, u64::try_from(n).ok()?))
        })
        .max()
        .unwrap_or((0, 0))
}

fn account_from(d: &Document) -> Result<Account> {
    const W: &str = "account";
    Ok(Account {
        account_id: get_str(d, W, "_id")?,
        name: get_str(d, W, "name")?,
        admin: get_bool(d, W, "admin")?,
        credits: get_u64(d, W, "credits")?,
        earnings: get_u64(d, W, "earnings")?,
        created_at: get_i64(d, W, "created_at")?,
        wallet: get_opt_str(d, W, "wallet")?,
        handle: get_opt_str(d, W, "handle")?,
        daily_cap: match d.get("daily_cap") {
            None | Some(Bson::Null) => None,
            Some(_) => Some(get_u64(d, W, "daily_cap")?),
        },
        charged_today: charged_today_from(d),
        refund_owed: match d.get("refund_owed") {
            None | Some(Bson::Null) => 0,
            Some(_) => get_u64(d, W, "refund_owed")?,
        },
    })
}

fn key_doc(k: &ApiKey) -> Document {
    doc! {
        "_id": &k.key_id,
        "account_id": &k.account_id,
        "sealed_secret": binary(&k.sealed_secret),
        "revoked": k.revoked,
        "created_at": k.created_at,
        "previous_sealed_secret": k.previous_sealed_secret.as_deref().map_or(Bson::Null, binary),
        "previous_valid_until": k.previous_valid_until,
    }
}

fn key_from(d: &Document) -> Result<ApiKey> {
    const W: &str = "key";
    Ok(ApiKey {
        key_id: get_str(d, W, "_id")?,
        account_id: get_str(d, W, "account_id")?,
        sealed_secret: get_bytes(d, W, "sealed_secret")?,
        revoked: get_bool(d, W, "revoked")?,
        created_at: get_i64(d, W, "created_at")?,
        previous_sealed_secret: match d.get("previous_sealed_secret") {
            None | Some(Bson::Null) => None,
            Some(_) => Some(get_bytes(d, W, "previous_sealed_secret")?),
        },
        previous_valid_until: match d.get("previous_valid_until") {
            None | Some(Bson::Null) => 0,
            Some(_) => get_i64(d, W, "previous_valid_until")?,
        },
    })
}

fn model_doc(m: &Model) -> Result<Document> {
    Ok(doc! {
        "_id": &m.model_id,
        "owner": &m.owner,
        "owner_handle": opt_str(&m.owner_handle),
        "name": &m.name,
        "version": &m.version,
        "price": to_i64(m.price, "price")?,
        "cid": &m.cid,
        "sha256": &m.sha256,
        "size": to_i64(m.size, "size")?,
        "wrapped_dek": binary(&m.wrapped_dek),
        "inputs": specs_to_bson(&m.inputs)?,
        "outputs": specs_to_bson(&m.outputs)?,
        "commitment": opt_str(&m.commitment),
        "circuit_spec": opt_str(&m.circuit_spec),
        "zk_note": opt_str(&m.zk_note),
        "digest": opt_str(&m.digest),
        "proof_price": to_i64(m.proof_price, "proof_price")?,
        "max_rows": i64::from(m.max_rows),
        "calls_per_minute": i64::from(m.calls_per_minute),
        "created_at": m.created_at,
    })
}

/// `filter`, restricted to models that are not deleted.
fn live(mut filter: Document) -> Document {
    filter.insert("deleted_at", doc! { "$exists": false });
    filter
}

fn opt_str(v: &Option<String>) -> Bson {
    v.as_deref()
        .map_or(Bson::Null, |c| Bson::String(c.to_owned()))
}

fn model_from(d: &Document) -> Result<Model> {
    const W: &str = "model";
    Ok(Model {
        model_id: get_str(d, W, "_id")?,
        owner: get_str(d, W, "owner")?,
        owner_handle: get_opt_str(d, W, "owner_handle")?,
        name: get_str(d, W, "name")?,
        version: get_str(d, W, "version")?,
        price: get_u64(d, W, "price")?,
        cid: get_str(d, W, "cid")?,
        sha256: get_str(d, W, "sha256")?,
        size: get_u64(d, W, "size")?,
        wrapped_dek: get_bytes(d, W, "wrapped_dek")?,
        inputs: specs_from(d, "inputs")?,
        outputs: specs_from(d, "outputs")?,
        commitment: get_opt_str(d, W, "commitment")?,
        circuit_spec: get_opt_str(d, W, "circuit_spec")?,
        zk_note: get_opt_str(d, W, "zk_note")?,
        digest: get_opt_str(d, W, "digest")?,
        proof_price: match d.get("proof_price") {
            None | Some(Bson::Null) => 0,
            Some(_) => get_u64(d, W, "proof_price")?,
        },
        max_rows: get_opt_u32(d, W, "max_rows")?,
        calls_per_minute: get_opt_u32(d, W, "calls_per_minute")?,
        created_at: get_i64(d, W, "created_at")?,
    })
}

/// A reservation as stored, with its internal state.
#[derive(Debug, Clone)]
struct StoredReservation {
    r: Reservation,
    state: String,
    settled_at: Option<i64>,
}

/// The stored reservation; `debit_token` names the debit that paid for it.
fn reservation_doc(r: &Reservation, debit_token: &str) -> Result<Document> {
    let mut d = doc! {
        "_id": &r.reservation_id,
        "account_id": &r.account_id,
        "model_id": &r.model_id,
        "owner": &r.owner,
        "amount": to_i64(r.amount, "price")?,
        "charge": r.charge.as_str(),
        "units": i64::from(r.units),
        "state": HELD,
        "created_at": r.created_at,
        "debit_token": debit_token,
    };
    // Absent (not null) without a key, so the partial unique index ignores the document.
    if let Some(k) = &r.idempotency_key {
        d.insert("idempotency_key", k);
    }
    if let Some(f) = &r.fingerprint {
        d.insert("fingerprint", f);
    }
    Ok(d)
}

fn reservation_from(d: &Document) -> Result<StoredReservation> {
    const W: &str = "reservation";
    let state = get_str(d, W, "state")?;
    let public = match state.as_str() {
        HELD => ReservationState::Held,
        COMMITTING | COMMITTED => ReservationState::Committed,
        RELEASING | RELEASED => ReservationState::Released,
        VOID => ReservationState::Released,
        _ => return Err(malformed(W, "state")),
    };
    Ok(StoredReservation {
        r: Reservation {
            reservation_id: get_str(d, W, "_id")?,
            account_id: get_str(d, W, "account_id")?,
            model_id: get_opt_str(d, W, "model_id")?.unwrap_or_default(),
            owner: get_opt_str(d, W, "owner")?.unwrap_or_default(),
            amount: get_u64(d, W, "amount")?,
            charge: charge_from(d, W)?,
            units: units_from(d, W)?,
            state: public,
            receipt_id: get_opt_str(d, W, "receipt_id")?,
            idempotency_key: get_opt_str(d, W, "idempotency_key")?,
            fingerprint: get_opt_str(d, W, "fingerprint")?,
            created_at: get_i64(d, W, "created_at")?,
        },
        settled_at: match d.get("settled_at") {
            None | Some(Bson::Null) => None,
            Some(_) => Some(get_i64(d, W, "settled_at")?),
        },
        state,
    })
}

/// The receipt of a reservation: its id is derived from the reservation id, its time is the
/// settlement time, so every caller computes the same receipt.
fn receipt_of(s: &StoredReservation) -> Receipt {
    let r = &s.r;
    Receipt {
        receipt_id: r
            .receipt_id
            .clone()
            .unwrap_or_else(|| receipt_id_for(&r.reservation_id)),
        reservation_id: r.reservation_id.clone(),
        account_id: r.account_id.clone(),
        model_id: r.model_id.clone(),
        owner: r.owner.clone(),
        credits_charged: r.amount,
        charge: r.charge,
        units: r.units,
        created_at: s.settled_at.unwrap_or(r.created_at),
        charged_at: r.created_at,
        batch_id: None,
    }
}

use super::{receipt_id_for, reservation_id_for};

/// How many units a reservation or receipt paid for; documents from before batches were
/// priced per row paid for one.
fn units_from(d: &Document, what: &'static str) -> Result<u32> {
    match d.get("units") {
        None | Some(Bson::Null) => Ok(1),
        Some(_) => u32::try_from(get_u64(d, what, "units")?).map_err(|_| malformed(what, "units")),
    }
}

/// What a reservation or receipt paid for; documents from before proofs were priced have no
/// `charge` and were predictions.
fn charge_from(d: &Document, what: &'static str) -> Result<Charge> {
    match get_opt_str(d, what, "charge")?.as_deref() {
        None | Some("prediction") => Ok(Charge::Prediction),
        Some("proof") => Ok(Charge::Proof),
        Some(_) => Err(malformed(what, "charge")),
    }
}

fn receipt_doc(r: &Receipt) -> Result<Document> {
    Ok(doc! {
        "_id": &r.receipt_id,
        "reservation_id": &r.reservation_id,
        "account_id": &r.account_id,
        "model_id": &r.model_id,
        "owner": &r.owner,
        "credits_charged": to_i64(r.credits_charged, "price")?,
        "charge": r.charge.as_str(),
        "units": i64::from(r.units),
        "created_at": r.created_at,
        "charged_at": r.charged_at,
        "batch_id": opt_str(&r.batch_id),
    })
}

fn receipt_from(d: &Document) -> Result<Receipt> {
    const W: &str = "receipt";
    Ok(Receipt {
        receipt_id: get_str(d, W, "_id")?,
        reservation_id: get_str(d, W, "reservation_id")?,
        account_id: get_str(d, W, "account_id")?,
        model_id: get_str(d, W, "model_id")?,
        owner: get_str(d, W, "owner")?,
        credits_charged: get_u64(d, W, "credits_charged")?,
        charge: charge_from(d, W)?,
        units: units_from(d, W)?,
        created_at: get_i64(d, W, "created_at")?,
        charged_at: match d.get("charged_at") {
            None | Some(Bson::Null) => 0,
            Some(_) => get_i64(d, W, "charged_at")?,
        },
        batch_id: get_opt_str(d, W, "batch_id")?,
    })
}

/// Receipts in no batch: `batch_id` null or absent. (`$in: [null]` rather than `null`: the
/// test server counts `{batch_id: null}` wrongly; on MongoDB both match null and absent.)
fn unsettled_filter() -> Document {
    doc! { "batch_id": { "$in": [Bson::Null] } }
}

/// A batch as stored; `complete` is false until all its receipts carry its id.
fn batch_doc(b: &SettlementBatch) -> Result<Document> {
    Ok(doc! {
        "_id": &b.batch_id,
        "receipt_ids": &b.receipt_ids,
        "credits": to_i64(b.credits, "credits")?,
        "state": b.state.as_str(),
        "tx_hash": opt_str(&b.tx_hash),
        "error": opt_str(&b.error),
        "attempts": i64::from(b.attempts),
        "created_at": b.created_at,
        "updated_at": b.updated_at,
        "complete": false,
        "opened_at": id::unix_now(),
    })
}

fn batch_state(s: &str) -> Result<BatchState> {
    match s {
        "pending" => Ok(BatchState::Pending),
        "settled" => Ok(BatchState::Settled),
        "failed" => Ok(BatchState::Failed),
        _ => Err(malformed("batch", "state")),
    }
}

fn batch_from(d: &Document) -> Result<SettlementBatch> {
    const W: &str = "batch";
    let receipt_ids = match d.get("receipt_ids") {
        Some(Bson::Array(a)) => a
            .iter()
            .map(|v| match v {
                Bson::String(s) => Ok(s.clone()),
                _ => Err(malformed(W, "receipt_ids")),
            })
            .collect::<Result<Vec<_>>>()?,
        _ => return Err(malformed(W, "receipt_ids")),
    };
    Ok(SettlementBatch {
        batch_id: get_str(d, W, "_id")?,
        receipt_ids,
        credits: get_u64(d, W, "credits")?,
        state: batch_state(&get_str(d, W, "state")?)?,
        tx_hash: get_opt_str(d, W, "tx_hash")?,
        error: get_opt_str(d, W, "error")?,
        attempts: u32::try_from(get_i64(d, W, "attempts")?)
            .map_err(|_| malformed(W, "attempts"))?,
        created_at: get_i64(d, W, "created_at")?,
        updated_at: get_i64(d, W, "updated_at")?,
    })
}

fn is_complete(d: &Document) -> bool {
    d.get_bool("complete").unwrap_or(false)
}

/// The account field that marks operation `op` of reservation `rid` as applied but not yet
/// acknowledged. Reservation ids are generated here (`rsv_` + hex), so the path is safe.
fn marker(rid: &str, op: &str) -> String {
    format!("pending.{rid}_{op}")
}

// ---- the store ------------------------------------------------------------------------------

impl MongoStore {
    /// Connects to `uri` (database from the URI, else [`DEFAULT_DATABASE`]), creates the
    /// collections' indexes, runs one recovery pass and starts the periodic one.
    /// `timeout` bounds server selection and connecting; each store call is bounded by five
    /// times that.
    pub async fn connect(uri: &str, timeout: Duration) -> Result<MongoStore> {
        let mut options = ClientOptions::parse(uri)
            .await
            .map_err(|e| RegistryError::bad_request(format!("invalid MongoDB URI: {e}")))?;
        options.server_selection_timeout = Some(timeout);
        options.connect_timeout = Some(timeout);
        options
            .app_name
            .get_or_insert_with(|| "modelhub-registry".to_owned());
        let database = options
            .default_database
            .clone()
            .unwrap_or_else(|| DEFAULT_DATABASE.to_owned());
        let hosts: Vec<String> = options.hosts.iter().map(ToString::to_string).collect();
        let client = Client::with_options(options).map_err(RegistryError::store)?;
        let db = client.database(&database);
        let store = MongoStore {
            inner: Arc::new(Inner {
                accounts: db.collection("accounts"),
                keys: db.collection("keys"),
                models: db.collection("models"),
                reservations: db.collection("reservations"),
                receipts: db.collection("receipts"),
                batches: db.collection("batches"),
                cursors: db.collection("cursors"),
                nonces: db.collection("nonces"),
                nonce_counts: db.collection("nonce_counts"),
                op_timeout: timeout.saturating_mul(5).max(Duration::from_secs(1)),
            }),
        };
        store.timed(store.create_indexes()).await?;
        match store.recover_stale(RECOVERY_GRACE).await {
            Ok(r) if r != Recovery::default() => info!(?r, "recovered interrupted operations"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "recovery pass failed"),
        }
        tokio::spawn(periodic_recovery(Arc::downgrade(&store.inner)));
        info!(?hosts, %database, "metadata store: MongoDB");
        Ok(store)
    }

    async fn create_indexes(&self) -> Result<()> {
        let i = &self.inner;
        let unique = || IndexOptions::builder().unique(true).build();
        // Names were global before they were owned: that index (whatever the server named
        // it) would refuse a second owner's version.
        let old_keys = doc! { "name": 1, "version": 1 };
        let old: Vec<IndexModel> = i.models.list_indexes().await?.try_collect().await?;
        for index in old.iter().filter(|ix| ix.keys == old_keys) {
            if let Some(name) = index.options.as_ref().and_then(|o| o.name.as_deref()) {
                i.models.drop_index(name).await?;
            }
        }
        i.models
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "owner": 1, "name": 1, "version": 1 })
                    .options(unique())
                    .build(),
            )
            .await?;
        i.accounts
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "handle": 1 })
                    .options(
                        IndexOptions::builder()
                            .unique(true)
                            .partial_filter_expression(doc! { "handle": { "$type": "string" } })
                            .build(),
                    )
                    .build(),
            )
            .await?;
        i.reservations
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "account_id": 1, "idempotency_key": 1 })
                    .options(
                        IndexOptions::builder()
                            .unique(true)
                            .partial_filter_expression(
                                doc! { "idempotency_key": { "$type": "string" } },
                            )
                            .build(),
                    )
                    .build(),
            )
            .await?;
        i.reservations
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "state": 1, "settled_at": 1 })
                    .build(),
            )
            .await?;
        i.reservations
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "state": 1, "created_at": 1 })
                    .build(),
            )
            .await?;
        i.nonces
            .create_index(IndexModel::builder().keys(doc! { "expires_at": 1 }).build())
            .await?;
        i.nonce_counts
            .create_index(IndexModel::builder().keys(doc! { "bucket": 1 }).build())
            .await?;
        i.keys
            .create_index(IndexModel::builder().keys(doc! { "account_id": 1 }).build())
            .await?;
        i.receipts
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "reservation_id": 1 })
                    .options(unique())
                    .build(),
            )
            .await?;
        i.accounts
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "wallet": 1 })
                    .options(
                        IndexOptions::builder()
                            .unique(true)
                            .partial_filter_expression(doc! { "wallet": { "$type": "string" } })
                            .build(),
                    )
                    .build(),
            )
            .await?;
        // (No `_id` in compound keys: the test server breaks on them.)
        i.receipts
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "batch_id": 1, "created_at": 1 })
                    .build(),
            )
            .await?;
        i.batches
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "state": 1, "created_at": 1 })
                    .build(),
            )
            .await?;
        i.batches
            .create_index(IndexModel::builder().keys(doc! { "created_at": 1 }).build())
            .await?;
        i.batches
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "complete": 1, "opened_at": 1 })
                    .build(),
            )
            .await?;
        Ok(())
    }

    /// Bounds one store call by the operation timeout (a hung server gives `Unavailable`).
    async fn timed<T>(&self, fut: impl Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.inner.op_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(RegistryError::unavailable(
                "metadata store operation timed out",
            )),
        }
    }

    async fn find_one(coll: &Collection<Document>, filter: Document) -> Result<Option<Document>> {
        Ok(coll.find_one(filter).await?)
    }

    async fn load_reservation(&self, rid: &str) -> Result<StoredReservation> {
        match Self::find_one(&self.inner.reservations, doc! { "_id": rid }).await? {
            Some(d) => {
                let s = reservation_from(&d)?;
                if s.state == VOID {
                    return Err(RegistryError::not_found("reservation", rid));
                }
                Ok(s)
            }
            None => Err(RegistryError::not_found("reservation", rid)),
        }
    }

    /// A reservation as stored, `None` when missing; `Conflict` when it was for another model
    /// or abandoned (a void tombstone).
    async fn existing_reservation(
        &self,
        rid: &str,
        model_id: &str,
        charge: Charge,
    ) -> Result<Option<Reservation>> {
        let Some(d) = Self::find_one(&self.inner.reservations, doc! { "_id": rid }).await? else {
            return Ok(None);
        };
        let s = reservation_from(&d)?;
        if s.state == VOID {
            return Err(RegistryError::conflict(
                "the request with this idempotency key was abandoned; retry with a new key",
            ));
        }
        if s.r.model_id != model_id || s.r.charge != charge {
            return Err(RegistryError::conflict(
                "idempotency key was already used for another model",
            ));
        }
        Ok(Some(s.r))
    }

    /// Undoes the debit of reservation `rid` made with `token` if its marker is still there
    /// (at most once).
    async fn refund_debit(
        &self,
        account_id: &str,
        rid: &str,
        token: &str,
        amount: i64,
    ) -> Result<bool> {
        let m = marker(rid, DEBIT);
        let done = self
            .take_in(
                account_id,
                doc! { format!("{m}.token"): token },
                amount,
                doc! { "$unset": { &m: "" } },
            )
            .await?;
        Ok(done.is_some())
    }

    /// Adds `amount` incoming credits to the account if it also matches `filter`, with the
    /// other operators of `update`, paying its refund lien (`refund_owed`) first; returns the
    /// account afterwards, `None` when it does not match. An account without a lien takes one
    /// update; one with a lien, a compare-and-set on the lien read.
    async fn take_in(
        &self,
        account_id: &str,
        filter: Document,
        amount: i64,
        update: Document,
    ) -> Result<Option<Document>> {
        let mut tries = 0;
        let mut owed: Option<i64> = None;
        loop {
            tries += 1;
            let mut f = doc! { "_id": account_id };
            f.extend(filter.clone());
            let mut u = update.clone();
            let lien = owed.unwrap_or(0).min(amount);
            match owed {
                None => f.insert("refund_owed", doc! { "$exists": false }),
                Some(owed) => f.insert("refund_owed", owed),
            };
            let mut inc = doc! { "credits": amount - lien };
            if let Some(owed) = owed {
                if owed == lien {
                    merge_op(&mut u, "$unset", doc! { "refund_owed": "" });
                } else {
                    inc.insert("refund_owed", -lien);
                }
            }
            merge_op(&mut u, "$inc", inc);
            let done = self
                .inner
                .accounts
                .find_one_and_update(f, u)
                .return_document(ReturnDocument::After)
                .await?;
            if done.is_some() {
                return Ok(done);
            }
            let Some(d) = Self::find_one(&self.inner.accounts, doc! { "_id": account_id }).await?
            else {
                return Ok(None);
            };
            let now_owed = match d.get("refund_owed") {
                None | Some(Bson::Null) => None,
                Some(_) => Some(to_i64(
                    get_u64(&d, "account", "refund_owed")?,
                    "refund owed",
                )?),
            };
            if now_owed == owed || tries >= 16 {
                // The lien is as this try assumed: `filter` is what did not match.
                return Ok(None);
            }
            owed = now_owed;
        }
    }

    /// Removes the debit marker of `rid` if it is the one made with `token`.
    async fn clear_debit(&self, account_id: &str, rid: &str, token: &str) -> Result<()> {
        let m = marker(rid, DEBIT);
        self.inner
            .accounts
            .update_one(
                doc! { "_id": account_id, format!("{m}.token"): token },
                doc! { "$unset": { &m: "" } },
            )
            .await?;
        Ok(())
    }

    async fn clear_marker(&self, account_id: &str, rid: &str, op: &str) -> Result<()> {
        self.inner
            .accounts
            .update_one(
                doc! { "_id": account_id },
                doc! { "$unset": { marker(rid, op): "" } },
            )
            .await?;
        Ok(())
    }

    async fn reserve_inner(
        &self,
        account_id: &str,
        model_id: &str,
        charge: Charge,
        units: u32,
        key: Option<&str>,
        fingerprint: Option<&str>,
    ) -> Result<Reservation> {
        // With a key, every retry of the request works on the same reservation id.
        let rid = match key {
            Some(k) => reservation_id_for(account_id, k),
            None => id::new_id(id::RESERVATION),
        };
        if key.is_some()
            && let Some(first) = self.existing_reservation(&rid, model_id, charge).await?
        {
            return Ok(first);
        }
        let model = self.get_model_inner(model_id).await?;
        let amount = charge.amount(&model, units)?;
        let price = to_i64(amount, "price")?;
        let token = id::new_id("dbt");
        let reservation = Reservation {
            reservation_id: rid.clone(),
            account_id: account_id.to_owned(),
            model_id: model_id.to_owned(),
            owner: model.owner,
            amount,
            charge,
            units: units.max(1),
            state: ReservationState::Held,
            receipt_id: None,
            idempotency_key: key.map(str::to_owned),
            fingerprint: fingerprint.map(str::to_owned),
            created_at: id::unix_now(),
        };
        let debit = marker(&rid, DEBIT);
        let day = crate::model::utc_day(reservation.created_at);
        let charged = format!("charged.d{day}");
        // The debit and the day's count in one update. The first try matches only an account
        // without a daily cap; a capped one (seen on the read after a miss) is tried again with
        // its cap in the filter: the count for the day must leave room for the price.
        // (`$or` is avoided: the test server applies it across documents.)
        let mut cap: Option<(u64, bool)> = None;
        let mut tries = 0;
        loop {
            tries += 1;
            let mut filter = doc! {
                "_id": account_id,
                "credits": { "$gte": price },
                &debit: { "$exists": false },
            };
            match cap {
                None => filter.insert("daily_cap", doc! { "$exists": false }),
                Some((cap, counted)) => {
                    filter.insert("daily_cap", to_i64(cap, "daily cap")?);
                    let room = to_i64(cap.saturating_sub(amount), "daily cap")?;
                    filter.insert(
                        &charged,
                        if counted {
                            doc! { "$lte": room }
                        } else {
                            doc! { "$exists": false }
                        },
                    )
                }
            };
            let debited = self
                .inner
                .accounts
                .find_one_and_update(
                    filter,
                    doc! {
                        "$inc": { "credits": -price, &charged: price },
                        "$set": { &debit: {
                            "amount": price, "at": reservation.created_at, "token": &token,
                        } },
                    },
                )
                .await?;
            if debited.is_some() {
                break;
            }
            // Short of credits, past the cap, a cap this try did not expect, or a retry of the
            // same request is between its debit and its insert: then write the reservation for
            // that debit (same content, its token).
            let Some(account) =
                Self::find_one(&self.inner.accounts, doc! { "_id": account_id }).await?
            else {
                return Err(RegistryError::not_found("account", account_id));
            };
            let in_flight = account
                .get_document("pending")
                .ok()
                .and_then(|p| p.get_document(format!("{rid}_{DEBIT}")).ok())
                .and_then(|m| get_str(m, "marker", "token").ok());
            if let Some(their_token) = in_flight {
                match self
                    .inner
                    .reservations
                    .insert_one(reservation_doc(&reservation, &their_token)?)
                    .await
                {
                    Ok(_) => {}
                    Err(e) if is_duplicate(&e) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if let Some(first) = self.existing_reservation(&rid, model_id, charge).await? {
                return Ok(first);
            }
            let account = account_from(&account)?;
            if account.credits < amount {
                return Err(RegistryError::PaymentRequired {
                    balance: account.credits,
                    price: amount,
                });
            }
            account.check_daily_cap(day, amount)?;
            if tries >= 16 {
                // Each miss was a concurrent change of the account: busy, not refused.
                return Err(RegistryError::unavailable(
                    "the account is changing too fast; retry",
                ));
            }
            let counted = account.charged_today.0 == day;
            cap = account.daily_cap.map(|cap| (cap, counted));
        }
        match self
            .inner
            .reservations
            .insert_one(reservation_doc(&reservation, &token)?)
            .await
        {
            Ok(_) => {}
            Err(e) if is_duplicate(&e) => {
                // Written for this very debit by a concurrent retry: ours. Anything else (an
                // earlier retry's reservation, or a tombstone left by recovery): undo our debit.
                let stored = Self::find_one(&self.inner.reservations, doc! { "_id": &rid }).await?;
                let ours = stored
                    .as_ref()
                    .is_some_and(|d| d.get_str("debit_token").ok() == Some(token.as_str()));
                if !ours {
                    self.refund_debit(account_id, &rid, &token, price).await?;
                }
                if let Some(first) = self.existing_reservation(&rid, model_id, charge).await? {
                    if ours {
                        self.clear_debit(account_id, &rid, &token).await?;
                    }
                    return Ok(first);
                }
                return Err(RegistryError::unavailable(
                    "reservation was abandoned; retry",
                ));
            }
            // The debit stays marked: recovery refunds it unless the insert did land.
            Err(e) => return Err(e.into()),
        }
        if let Err(e) = self.clear_debit(account_id, &rid, &token).await {
            // Harmless: recovery removes it once it sees the reservation.
            debug!(reservation_id = %rid, error = %e, "debit marker left for recovery");
        }
        Ok(reservation)
    }

    async fn get_account_inner(&self, account_id: &str) -> Result<Account> {
        match Self::find_one(&self.inner.accounts, doc! { "_id": account_id }).await? {
            Some(d) => account_from(&d),
            None => Err(RegistryError::not_found("account", account_id)),
        }
    }

    async fn get_model_inner(&self, model_id: &str) -> Result<Model> {
        match Self::find_one(&self.inner.models, live(doc! { "_id": model_id })).await? {
            Some(d) => model_from(&d),
            None => Err(RegistryError::not_found("model", model_id)),
        }
    }

    /// Moves a held reservation to `to` (`committing` or `releasing`); `None` when it was not
    /// held any more.
    /// With `response`, the commit keeps it in the same update that wins the transition.
    async fn settle(
        &self,
        rid: &str,
        to: &str,
        response: Option<Vec<u8>>,
    ) -> Result<Option<StoredReservation>> {
        let mut set = doc! { "state": to, "settled_at": id::unix_now() };
        if to == COMMITTING {
            set.insert("receipt_id", receipt_id_for(rid));
            if let Some(bytes) = response {
                set.insert(
                    "response",
                    Binary {
                        subtype: BinarySubtype::Generic,
                        bytes,
                    },
                );
            }
        }
        let won = self
            .inner
            .reservations
            .find_one_and_update(doc! { "_id": rid, "state": HELD }, doc! { "$set": set })
            .return_document(ReturnDocument::After)
            .await?;
        won.as_ref().map(reservation_from).transpose()
    }

    /// Second half of a commit, run only by whoever moved the reservation to `committing`.
    async fn finish_commit(&self, s: &StoredReservation) -> Result<Receipt> {
        let receipt = receipt_of(s);
        match self.inner.receipts.insert_one(receipt_doc(&receipt)?).await {
            Ok(_) => {}
            Err(e) if is_duplicate(&e) => {}
            Err(e) => return Err(e.into()),
        }
        let r = &s.r;
        let amount = to_i64(r.amount, "price")?;
        let m = marker(&r.reservation_id, EARN);
        self.inner
            .accounts
            .update_one(
                doc! { "_id": &r.owner, &m: { "$exists": false } },
                doc! {
                    "$inc": { "earnings": amount },
                    "$set": { &m: { "amount": amount, "at": id::unix_now() } },
                },
            )
            .await?;
        self.inner
            .reservations
            .update_one(
                doc! { "_id": &r.reservation_id, "state": COMMITTING },
                doc! { "$set": { "state": COMMITTED } },
            )
            .await?;
        self.clear_marker(&r.owner, &r.reservation_id, EARN).await?;
        Ok(receipt)
    }

    /// Second half of a release, run only by whoever moved the reservation to `releasing`.
    async fn finish_release(&self, s: &StoredReservation) -> Result<Reservation> {
        let r = &s.r;
        let amount = to_i64(r.amount, "price")?;
        let m = marker(&r.reservation_id, REFUND);
        self.take_in(
            &r.account_id,
            doc! { &m: { "$exists": false } },
            amount,
            doc! { "$set": { &m: { "amount": amount, "at": id::unix_now() } } },
        )
        .await?;
        self.inner
            .reservations
            .update_one(
                doc! { "_id": &r.reservation_id, "state": RELEASING },
                doc! { "$set": { "state": RELEASED } },
            )
            .await?;
        self.clear_marker(&r.account_id, &r.reservation_id, REFUND)
            .await?;
        Ok(r.clone())
    }

    async fn commit_inner(&self, rid: &str, response: Option<Vec<u8>>) -> Result<Receipt> {
        let current = self.load_reservation(rid).await?;
        let current = match current.state.as_str() {
            HELD => match self.settle(rid, COMMITTING, response).await? {
                Some(won) => return self.finish_commit(&won).await,
                None => self.load_reservation(rid).await?,
            },
            _ => current,
        };
        match current.state.as_str() {
            COMMITTED => {
                let receipt_id = receipt_of(&current).receipt_id;
                match Self::find_one(&self.inner.receipts, doc! { "_id": &receipt_id }).await? {
                    Some(d) => receipt_from(&d),
                    None => Ok(receipt_of(&current)),
                }
            }
            // Another caller is finishing it (or recovery will): the receipt is determined.
            COMMITTING => Ok(receipt_of(&current)),
            _ => Err(RegistryError::conflict(format!(
                "reservation {rid:?} was released and cannot be committed"
            ))),
        }
    }

    async fn release_inner(&self, rid: &str) -> Result<Reservation> {
        let current = self.load_reservation(rid).await?;
        if current.state == HELD {
            if let Some(won) = self.settle(rid, RELEASING, None).await? {
                return self.finish_release(&won).await;
            }
            return Ok(self.load_reservation(rid).await?.r);
        }
        Ok(current.r)
    }

    async fn create_batch_inner(&self, batch: SettlementBatch) -> Result<SettlementBatch> {
        check_batch(&batch)?;
        let i = &self.inner;
        let bid = batch.batch_id.as_str();
        // Check first, so the usual refusals write nothing.
        let found: Vec<Document> = i
            .receipts
            .find(doc! { "_id": { "$in": &batch.receipt_ids } })
            .await?
            .try_collect()
            .await?;
        let found = found
            .iter()
            .map(|d| receipt_from(d).map(|r| (r.receipt_id.clone(), r)))
            .collect::<Result<std::collections::HashMap<_, _>>>()?;
        let mut credits = 0_u64;
        for receipt_id in &batch.receipt_ids {
            let receipt = found
                .get(receipt_id)
                .ok_or_else(|| RegistryError::not_found("receipt", receipt_id))?;
            if let Some(other) = receipt.batch_id.as_deref().filter(|b| *b != bid) {
                return Err(in_other_batch(receipt_id, other));
            }
            credits = credits.saturating_add(receipt.credits_charged);
        }
        let stored = match i.batches.insert_one(batch_doc(&batch)?).await {
            Ok(_) => batch,
            Err(e) if is_duplicate(&e) => {
                let Some(d) = Self::find_one(&i.batches, doc! { "_id": bid }).await? else {
                    return Err(RegistryError::unavailable(
                        "the batch was undone meanwhile; retry",
                    ));
                };
                let stored = batch_from(&d)?;
                if stored.receipt_ids != batch.receipt_ids {
                    return Err(batch_taken(bid));
                }
                if is_complete(&d) {
                    return Ok(stored);
                }
                stored
            }
            Err(e) => return Err(e.into()),
        };
        check_credits(&stored, credits)?;
        self.claim_receipts(&stored).await?;
        Ok(stored)
    }

    /// Sets the batch id on each receipt of an inserted batch and marks it complete; undoes the
    /// batch (`Conflict`) when a receipt is in another batch.
    async fn claim_receipts(&self, batch: &SettlementBatch) -> Result<()> {
        let i = &self.inner;
        let bid = batch.batch_id.as_str();
        // In id order, so of two batches racing for the same receipts one gets them all.
        let mut ids: Vec<&String> = batch.receipt_ids.iter().collect();
        ids.sort();
        for receipt_id in ids {
            let claimed = i
                .receipts
                .update_one(
                    doc! { "_id": receipt_id, "batch_id": { "$in": [Bson::Null, bid] } },
                    doc! { "$set": { "batch_id": bid } },
                )
                .await?;
            if claimed.matched_count == 0 {
                let other = Self::find_one(&i.receipts, doc! { "_id": receipt_id })
                    .await?
                    .and_then(|d| d.get_str("batch_id").ok().map(str::to_owned))
                    .unwrap_or_default();
                self.undo_batch(bid).await?;
                warn!(batch_id = bid, %receipt_id, other_batch = %other, "batch undone: receipt taken");
                return Err(in_other_batch(receipt_id, &other));
            }
        }
        let completed = i
            .batches
            .update_one(doc! { "_id": bid }, doc! { "$set": { "complete": true } })
            .await?;
        if completed.matched_count == 0 {
            // Undone meanwhile by a racing call that lost a receipt: drop our claims too.
            self.undo_batch(bid).await?;
            return Err(RegistryError::unavailable(
                "the batch was undone meanwhile; retry",
            ));
        }
        Ok(())
    }

    /// Removes an incomplete batch, then clears its claims on receipts.
    async fn undo_batch(&self, bid: &str) -> Result<()> {
        let i = &self.inner;
        i.batches
            .delete_one(doc! { "_id": bid, "complete": false })
            .await?;
        if Self::find_one(&i.batches, doc! { "_id": bid })
            .await?
            .is_none()
        {
            i.receipts
                .update_many(
                    doc! { "batch_id": bid },
                    doc! { "$set": { "batch_id": Bson::Null } },
                )
                .await?;
        }
        Ok(())
    }

    /// Finishes (or undoes) batch creations interrupted before `cutoff`.
    async fn recover_batches(&self, cutoff: i64) -> Result<usize> {
        let i = &self.inner;
        let stuck: Vec<Document> = i
            .batches
            .find(doc! { "complete": false, "opened_at": { "$lte": cutoff } })
            .await?
            .try_collect()
            .await?;
        let mut finished = 0;
        for d in stuck {
            let batch = batch_from(&d)?;
            // Claim it: one recoverer per grace period.
            let claimed = i
                .batches
                .find_one_and_update(
                    doc! {
                        "_id": &batch.batch_id,
                        "complete": false,
                        "opened_at": d.get("opened_at").cloned().unwrap_or(Bson::Null),
                    },
                    doc! { "$set": { "opened_at": id::unix_now() } },
                )
                .await?;
            if claimed.is_none() {
                continue;
            }
            match self.claim_receipts(&batch).await {
                Ok(()) => info!(batch_id = %batch.batch_id, "finished an interrupted batch"),
                Err(RegistryError::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
            finished += 1;
        }
        Ok(finished)
    }

    /// Finishes or undoes operations interrupted more than `older_than` ago (a crashed
    /// registry, a lost connection): refunds debits whose reservation was never written,
    /// finishes commits and releases, and removes markers of completed operations. Safe to
    /// run from several registries at once. Runs at start and every minute with
    /// [`RECOVERY_GRACE`]; tests call it with zero.
    pub async fn recover_stale(&self, older_than: Duration) -> Result<Recovery> {
        self.timed(self.recover_inner(older_than)).await
    }

    async fn recover_inner(&self, older_than: Duration) -> Result<Recovery> {
        let cutoff = id::unix_now() - i64::try_from(older_than.as_secs()).unwrap_or(i64::MAX);
        let batches = self.recover_batches(cutoff).await?;
        let mut out = self.recover_reservations(cutoff).await?;
        out.finished += batches;
        Ok(out)
    }

    /// The reservation part of recovery, for operations begun at or before `cutoff`:
    /// commits and releases stuck half-way are finished, debits whose reservation was never
    /// written are refunded. The hold sweep runs it with the hold timeout, so the credits of a
    /// registry that died in the middle of a reserve come back as soon as a held one would.
    async fn recover_reservations(&self, cutoff: i64) -> Result<Recovery> {
        let mut out = Recovery::default();
        let i = &self.inner;

        // Reservations stuck half-way through a commit or a release.
        for state in [COMMITTING, RELEASING] {
            let stuck: Vec<Document> = i
                .reservations
                .find(doc! { "state": state, "settled_at": { "$lte": cutoff } })
                .await?
                .try_collect()
                .await?;
            for d in stuck {
                let s = reservation_from(&d)?;
                // Claim it: one recoverer per grace period.
                let claimed = i
                    .reservations
                    .find_one_and_update(
                        doc! {
                            "_id": &s.r.reservation_id,
                            "state": state,
                            "settled_at": s.settled_at,
                        },
                        doc! { "$set": { "settled_at": id::unix_now() } },
                    )
                    .return_document(ReturnDocument::After)
                    .await?;
                let Some(claimed) = claimed else { continue };
                let claimed = reservation_from(&claimed)?;
                if state == COMMITTING {
                    self.finish_commit(&claimed).await?;
                } else {
                    self.finish_release(&claimed).await?;
                }
                out.finished += 1;
            }
        }

        // Markers left in accounts.
        // (`pending` stays as `{}` once emptied; real MongoDB could also filter with
        // `$ne: {}`, which the test server lacks, so the filter stays portable.)
        let marked: Vec<Document> = i
            .accounts
            .find(doc! { "pending": { "$exists": true } })
            .projection(doc! { "pending": 1 })
            .await?
            .try_collect()
            .await?;
        for account in marked {
            let account_id = get_str(&account, "account", "_id")?;
            let Ok(pending) = account.get_document("pending") else {
                continue;
            };
            for (name, entry) in pending {
                let Some((rid, op)) = name.rsplit_once('_') else {
                    continue;
                };
                let Bson::Document(entry) = entry else {
                    continue;
                };
                let at = get_i64(entry, "marker", "at")?;
                if at > cutoff {
                    continue;
                }
                let amount = get_i64(entry, "marker", "amount")?;
                if op == DEBIT {
                    let token = get_str(entry, "marker", "token")?;
                    // Make sure no slow original can still write the reservation; then the
                    // debit paid for the stored reservation (keep it) or for none (refund it).
                    let tombstone = doc! {
                        "_id": rid, "account_id": &account_id, "amount": amount,
                        "state": VOID, "created_at": at,
                    };
                    let paid = match i.reservations.insert_one(tombstone).await {
                        Ok(_) => false,
                        Err(e) if is_duplicate(&e) => {
                            Self::find_one(&i.reservations, doc! { "_id": rid })
                                .await?
                                .is_some_and(|d| d.get_str("debit_token").ok() == Some(&token))
                        }
                        Err(e) => return Err(e.into()),
                    };
                    if paid {
                        self.clear_debit(&account_id, rid, &token).await?;
                        out.cleared += 1;
                    } else if self.refund_debit(&account_id, rid, &token, amount).await? {
                        warn!(reservation_id = rid, %account_id, amount, "refunded an orphaned debit");
                        out.refunded_debits += 1;
                    }
                } else {
                    let done = match Self::find_one(&i.reservations, doc! { "_id": rid }).await? {
                        Some(d) => {
                            let state = get_str(&d, "reservation", "state")?;
                            state == COMMITTED || state == RELEASED
                        }
                        None => true,
                    };
                    // Not done: the reservation is settling and the pass above finishes it.
                    if done {
                        self.clear_marker(&account_id, rid, op).await?;
                        out.cleared += 1;
                    }
                }
            }
        }
        Ok(out)
    }
}

async fn periodic_recovery(store: Weak<Inner>) {
    let mut tick = tokio::time::interval(RECOVERY_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = store.upgrade() else { return };
        let store = MongoStore { inner };
        match store.recover_stale(RECOVERY_GRACE).await {
            Ok(r) if r != Recovery::default() => info!(?r, "recovered interrupted operations"),
            Ok(_) => {}
            Err(e) => debug!(error = %e, "recovery pass failed"),
        }
    }
}

#[async_trait]
impl MetadataStore for MongoStore {
    async fn create_account(&self, account: Account) -> Result<Account> {
        self.timed(async {
            match self.inner.accounts.insert_one(account_doc(&account)?).await {
                Ok(_) => Ok(account),
                Err(e) if is_duplicate(&e) => {
                    let taken = |filter| Self::find_one(&self.inner.accounts, filter);
                    if taken(doc! { "_id": &account.account_id }).await?.is_some() {
                        return Err(RegistryError::conflict(format!(
                            "account {:?} already exists",
                            account.account_id
                        )));
                    }
                    if let Some(wallet) = &account.wallet
                        && taken(doc! { "wallet": wallet }).await?.is_some()
                    {
                        return Err(RegistryError::conflict(format!(
                            "wallet {wallet} belongs to another account"
                        )));
                    }
                    Err(RegistryError::conflict(format!(
                        "handle {:?} belongs to another account",
                        account.handle.as_deref().unwrap_or_default()
                    )))
                }
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    async fn get_account(&self, account_id: &str) -> Result<Account> {
        self.timed(self.get_account_inner(account_id)).await
    }

    async fn find_account_by_handle(&self, handle: &str) -> Result<Option<Account>> {
        self.timed(async {
            Self::find_one(&self.inner.accounts, doc! { "handle": handle })
                .await?
                .as_ref()
                .map(account_from)
                .transpose()
        })
        .await
    }

    async fn grant(&self, account_id: &str, amount: u64) -> Result<Account> {
        self.timed(async {
            let overflow = || {
                RegistryError::bad_request(format!(
                    "granting {amount} credits would overflow the balance"
                ))
            };
            let amount = i64::try_from(amount).map_err(|_| overflow())?;
            let updated = self
                .take_in(
                    account_id,
                    doc! { "credits": { "$lte": i64::MAX - amount } },
                    amount,
                    doc! {},
                )
                .await?;
            match updated {
                Some(d) => account_from(&d),
                None => {
                    self.get_account_inner(account_id).await?;
                    Err(overflow())
                }
            }
        })
        .await
    }

    async fn grant_once(&self, account_id: &str, amount: u64, grant_id: &str) -> Result<Account> {
        self.timed(async {
            let overflow = || {
                RegistryError::bad_request(format!(
                    "granting {amount} credits would overflow the balance"
                ))
            };
            let amount = i64::try_from(amount).map_err(|_| overflow())?;
            // The grant id becomes a field name: hash it to a safe one.
            let field = format!(
                "grants.g{}",
                hex::encode(sha2::Sha256::digest(grant_id.as_bytes()))
            );
            // One single-document update: credit and remember the grant, only if it was not
            // remembered before.
            let updated = self
                .take_in(
                    account_id,
                    doc! {
                        &field: { "$exists": false },
                        "credits": { "$lte": i64::MAX - amount },
                    },
                    amount,
                    doc! { "$set": { &field: amount } },
                )
                .await?;
            if let Some(d) = updated {
                return account_from(&d);
            }
            let Some(d) = Self::find_one(&self.inner.accounts, doc! { "_id": account_id }).await?
            else {
                return Err(RegistryError::not_found("account", account_id));
            };
            let key = field.trim_start_matches("grants.");
            match d.get_document("grants").ok().and_then(|g| g.get(key)) {
                Some(done)
                    if done.as_i64() == Some(amount)
                        || done.as_i32().map(i64::from) == Some(amount) =>
                {
                    account_from(&d)
                }
                Some(_) => Err(RegistryError::conflict(
                    "this idempotency key was used for another amount",
                )),
                None => Err(overflow()),
            }
        })
        .await
    }

    async fn debit_once(&self, account_id: &str, amount: u64, debit_id: &str) -> Result<u64> {
        self.timed(async {
            let amount = i64::try_from(amount).unwrap_or(i64::MAX);
            let key = format!("d{}", hex::encode(sha2::Sha256::digest(debit_id.as_bytes())));
            let field = format!("debits.{key}");
            // Compare-and-set on the balance read: a single-document update that takes
            // min(amount, balance) only if the balance is still the one read and the debit is
            // not remembered yet; a concurrent change of the balance makes it read again.
            loop {
                let Some(d) = Self::find_one(&self.inner.accounts, doc! { "_id": account_id })
                    .await?
                else {
                    return Err(RegistryError::not_found("account", account_id));
                };
                if let Some(done) = d.get_document("debits").ok().and_then(|g| g.get(&key)) {
                    let taken = done
                        .as_i64()
                        .or_else(|| done.as_i32().map(i64::from))
                        .unwrap_or_default();
                    return Ok(u64::try_from(taken).unwrap_or_default());
                }
                let balance = to_i64(account_from(&d)?.credits, "credits")?;
                let taken = amount.min(balance);
                let updated = self
                    .inner
                    .accounts
                    .find_one_and_update(
                        doc! { "_id": account_id, "credits": balance, &field: { "$exists": false } },
                        if taken < amount {
                            doc! {
                                "$inc": { "credits": -taken },
                                "$set": { &field: taken, "refund_owed": amount - taken },
                            }
                        } else {
                            doc! {
                                "$inc": { "credits": -taken },
                                "$set": { &field: taken },
                                "$unset": { "refund_owed": "" },
                            }
                        },
                    )
                    .await?;
                if updated.is_some() {
                    return Ok(u64::try_from(taken).unwrap_or_default());
                }
            }
        })
        .await
    }

    async fn clear_refund_owed(&self, account_id: &str) -> Result<Account> {
        self.timed(async {
            match self
                .inner
                .accounts
                .find_one_and_update(
                    doc! { "_id": account_id },
                    doc! { "$unset": { "refund_owed": "" } },
                )
                .return_document(ReturnDocument::After)
                .await?
            {
                Some(d) => account_from(&d),
                None => Err(RegistryError::not_found("account", account_id)),
            }
        })
        .await
    }

    async fn set_daily_cap(&self, account_id: &str, cap: Option<u64>) -> Result<Account> {
        self.timed(async {
            let update = match cap {
                Some(cap) => doc! { "$set": { "daily_cap": to_i64(cap, "daily cap")? } },
                None => doc! { "$unset": { "daily_cap": "" } },
            };
            match self
                .inner
                .accounts
                .find_one_and_update(doc! { "_id": account_id }, update)
                .return_document(ReturnDocument::After)
                .await?
            {
                Some(d) => account_from(&d),
                None => Err(RegistryError::not_found("account", account_id)),
            }
        })
        .await
    }

    async fn create_key(&self, key: ApiKey) -> Result<ApiKey> {
        self.timed(async {
            self.get_account_inner(&key.account_id).await?;
            match self.inner.keys.insert_one(key_doc(&key)).await {
                Ok(_) => Ok(key),
                Err(e) if is_duplicate(&e) => Err(RegistryError::conflict(format!(
                    "key {:?} already exists",
                    key.key_id
                ))),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    async fn get_key(&self, key_id: &str) -> Result<ApiKey> {
        self.timed(async {
            match Self::find_one(&self.inner.keys, doc! { "_id": key_id }).await? {
                Some(d) => key_from(&d),
                None => Err(RegistryError::not_found("key", key_id)),
            }
        })
        .await
    }

    async fn has_keys(&self) -> Result<bool> {
        self.timed(async { Ok(Self::find_one(&self.inner.keys, doc! {}).await?.is_some()) })
            .await
    }

    async fn rotate_key(
        &self,
        key_id: &str,
        new_sealed_secret: Vec<u8>,
        previous_valid_until: i64,
    ) -> Result<ApiKey> {
        self.timed(async {
            // Compare-and-set on the rotation count read: a concurrent rotation makes this one
            // fail (the caller retries), so a previous secret is never one nobody was given.
            let Some(d) = Self::find_one(&self.inner.keys, doc! { "_id": key_id }).await? else {
                return Err(RegistryError::not_found("key", key_id));
            };
            let key = key_from(&d)?;
            if key.revoked {
                return Err(RegistryError::conflict("a revoked key can't be rotated"));
            }
            let rotations = match d.get("rotations") {
                None | Some(Bson::Null) => None,
                Some(_) => Some(get_i64(&d, "key", "rotations")?),
            };
            let mut filter = doc! { "_id": key_id, "revoked": false };
            match rotations {
                Some(n) => filter.insert("rotations", n),
                None => filter.insert("rotations", doc! { "$exists": false }),
            };
            let updated = self
                .inner
                .keys
                .find_one_and_update(
                    filter,
                    doc! { "$set": {
                        "sealed_secret": binary(&new_sealed_secret),
                        "previous_sealed_secret": binary(&key.sealed_secret),
                        "previous_valid_until": previous_valid_until,
                        "rotations": rotations.unwrap_or(0) + 1,
                    } },
                )
                .return_document(ReturnDocument::After)
                .await?;
            match updated {
                Some(d) => key_from(&d),
                None => Err(RegistryError::conflict(
                    "the key changed meanwhile (rotated or revoked); try again",
                )),
            }
        })
        .await
    }

    async fn revoke_key(&self, key_id: &str) -> Result<ApiKey> {
        self.timed(async {
            let updated = self
                .inner
                .keys
                .find_one_and_update(doc! { "_id": key_id }, doc! { "$set": { "revoked": true } })
                .return_document(ReturnDocument::After)
                .await?;
            match updated {
                Some(d) => key_from(&d),
                None => Err(RegistryError::not_found("key", key_id)),
            }
        })
        .await
    }

    async fn create_model(&self, model: Model) -> Result<Model> {
        self.timed(async {
            self.get_account_inner(&model.owner).await?;
            match self.inner.models.insert_one(model_doc(&model)?).await {
                Ok(_) => Ok(model),
                Err(e) if is_duplicate(&e) => {
                    if Self::find_one(&self.inner.models, doc! { "_id": &model.model_id })
                        .await?
                        .is_some()
                    {
                        Err(RegistryError::conflict(format!(
                            "model {:?} already exists",
                            model.model_id
                        )))
                    } else {
                        Err(RegistryError::version_taken(&model.name, &model.version))
                    }
                }
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    async fn get_model(&self, model_id: &str) -> Result<Model> {
        self.timed(self.get_model_inner(model_id)).await
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>> {
        self.timed(async {
            let docs: Vec<Document> = self
                .inner
                .keys
                .find(doc! {})
                .sort(doc! { "_id": 1 })
                .await?
                .try_collect()
                .await?;
            docs.iter().map(key_from).collect()
        })
        .await
    }

    async fn reseal(&self, target: Sealed, old: &[u8], new: Vec<u8>) -> Result<bool> {
        self.timed(async {
            // Compared here, not in the filter (MongoDB-wire servers differ on matching binary
            // values); the filter then guards against what can change the value meanwhile: a
            // model's delete, a key's rotation (its rotation count).
            let (collection, id, field) = match &target {
                Sealed::ModelDek { model_id } => (&self.inner.models, model_id, "wrapped_dek"),
                Sealed::KeySecret { key_id } => (&self.inner.keys, key_id, "sealed_secret"),
                Sealed::PreviousKeySecret { key_id } => {
                    (&self.inner.keys, key_id, "previous_sealed_secret")
                }
            };
            let mut filter = match &target {
                Sealed::ModelDek { .. } => live(doc! { "_id": id }),
                _ => doc! { "_id": id },
            };
            let Some(d) = Self::find_one(collection, filter.clone()).await? else {
                return Ok(false);
            };
            let stored = match d.get(field) {
                Some(Bson::Binary(b)) => b.bytes.as_slice(),
                _ => return Ok(false),
            };
            if stored != old {
                return Ok(false);
            }
            if !matches!(target, Sealed::ModelDek { .. }) {
                match d.get("rotations") {
                    None | Some(Bson::Null) => {
                        filter.insert("rotations", doc! { "$exists": false })
                    }
                    Some(n) => filter.insert("rotations", n.clone()),
                };
            }
            let updated = collection
                .update_one(filter, doc! { "$set": { field: binary(&new) } })
                .await?;
            Ok(updated.matched_count == 1)
        })
        .await
    }

    async fn delete_model(&self, model_id: &str) -> Result<Model> {
        self.timed(async {
            // One atomic update: a concurrent second delete finds nothing. The document stays
            // as the tombstone that keeps the owner's version taken.
            match self
                .inner
                .models
                .find_one_and_update(
                    live(doc! { "_id": model_id }),
                    doc! {
                        "$set": { "deleted_at": id::unix_now() },
                        "$unset": { "wrapped_dek": "" },
                    },
                )
                .return_document(ReturnDocument::Before)
                .await?
            {
                Some(d) => model_from(&d),
                None => Err(RegistryError::not_found("model", model_id)),
            }
        })
        .await
    }

    async fn model_version_taken(&self, owner: &str, name: &str, version: &str) -> Result<bool> {
        self.timed(async {
            Ok(Self::find_one(
                &self.inner.models,
                doc! { "owner": owner, "name": name, "version": version },
            )
            .await?
            .is_some())
        })
        .await
    }

    async fn list_models(&self) -> Result<Vec<Model>> {
        self.timed(async {
            let docs: Vec<Document> = self
                .inner
                .models
                .find(live(doc! {}))
                .sort(doc! { "name": 1, "version": 1, "owner": 1 })
                .await?
                .try_collect()
                .await?;
            let mut models = docs.iter().map(model_from).collect::<Result<Vec<_>>>()?;
            // Byte order, whatever the server's collation.
            models.sort_by(|a, b| {
                (&a.name, &a.version, &a.owner).cmp(&(&b.name, &b.version, &b.owner))
            });
            Ok(models)
        })
        .await
    }

    async fn reserve_with(
        &self,
        account_id: &str,
        model_id: &str,
        charge: Charge,
        units: u32,
        idempotency_key: Option<&str>,
        fingerprint: Option<&str>,
    ) -> Result<Reservation> {
        let key = idempotency_key.filter(|k| !k.is_empty());
        self.timed(self.reserve_inner(account_id, model_id, charge, units, key, fingerprint))
            .await
    }

    async fn get_reservation(&self, reservation_id: &str) -> Result<Reservation> {
        // A void tombstone (a reserve that recovery abandoned, its debit refunded) reads as
        // released: nothing was charged, so its idempotency key may be used again.
        self.timed(async {
            match Self::find_one(&self.inner.reservations, doc! { "_id": reservation_id }).await? {
                Some(d) => Ok(reservation_from(&d)?.r),
                None => Err(RegistryError::not_found("reservation", reservation_id)),
            }
        })
        .await
    }

    async fn commit_with(
        &self,
        reservation_id: &str,
        response: Option<Vec<u8>>,
    ) -> Result<Receipt> {
        self.timed(self.commit_inner(reservation_id, response))
            .await
    }

    async fn release(&self, reservation_id: &str) -> Result<Reservation> {
        self.timed(self.release_inner(reservation_id)).await
    }

    async fn get_response(&self, reservation_id: &str) -> Result<Option<Vec<u8>>> {
        self.timed(async {
            let found = self
                .inner
                .reservations
                .find_one(doc! { "_id": reservation_id })
                .projection(doc! { "response": 1 })
                .await?;
            Ok(found.and_then(|d| match d.get("response") {
                Some(Bson::Binary(b)) => Some(b.bytes.clone()),
                _ => None,
            }))
        })
        .await
    }

    async fn held_credits(&self, account_id: &str) -> Result<u64> {
        self.timed(async {
            let held: Vec<Document> = self
                .inner
                .reservations
                .find(doc! { "account_id": account_id, "state": HELD })
                .projection(doc! { "amount": 1 })
                .await?
                .try_collect()
                .await?;
            let mut sum = 0_u64;
            for d in &held {
                sum = sum.saturating_add(get_u64(d, "reservation", "amount")?);
            }
            Ok(sum)
        })
        .await
    }

    async fn stale_holds(&self, cutoff: i64) -> Result<Vec<String>> {
        self.timed(async {
            let stale: Vec<Document> = self
                .inner
                .reservations
                .find(doc! { "state": HELD, "created_at": { "$lte": cutoff } })
                .projection(doc! { "_id": 1 })
                .await?
                .try_collect()
                .await?;
            stale
                .iter()
                .map(|d| get_str(d, "reservation", "_id"))
                .collect()
        })
        .await
    }

    async fn release_stale(&self, cutoff: i64) -> Result<u64> {
        let released = super::release_holds(self, cutoff).await?;
        let recovered = self.timed(self.recover_reservations(cutoff)).await?;
        Ok(released + u64::try_from(recovered.refunded_debits).unwrap_or(0))
    }

    async fn use_nonce(
        &self,
        key_id: &str,
        nonce: &str,
        expires_at: i64,
        per_key_limit: u64,
    ) -> Result<()> {
        self.timed(async {
            let i = &self.inner;
            let bucket = expires_at.div_euclid(super::NONCE_BUCKET_SECS);
            let counted = i
                .nonce_counts
                .find_one_and_update(
                    doc! { "_id": format!("{key_id}\0{bucket}") },
                    doc! { "$inc": { "n": 1_i64 }, "$set": { "bucket": bucket } },
                )
                .upsert(true)
                .return_document(ReturnDocument::After)
                .await?;
            let spent = counted
                .as_ref()
                .and_then(|d| {
                    d.get_i64("n")
                        .ok()
                        .or_else(|| d.get_i32("n").ok().map(i64::from))
                })
                .unwrap_or(1);
            if u64::try_from(spent).unwrap_or(u64::MAX) > per_key_limit {
                return Err(RegistryError::TooManyRequests {
                    what: "nonces for this key in the replay window".into(),
                });
            }
            let entry = doc! { "_id": format!("{key_id}\0{nonce}"), "expires_at": expires_at };
            match i.nonces.insert_one(entry).await {
                Ok(_) => Ok(()),
                Err(e) if is_duplicate(&e) => {
                    Err(RegistryError::conflict("nonce was already used"))
                }
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    async fn prune_nonces(&self, now: i64) -> Result<u64> {
        self.timed(async {
            let i = &self.inner;
            let gone = i
                .nonces
                .delete_many(doc! { "expires_at": { "$lt": now } })
                .await?;
            let live_bucket = now.div_euclid(super::NONCE_BUCKET_SECS);
            i.nonce_counts
                .delete_many(doc! { "bucket": { "$lt": live_bucket } })
                .await?;
            Ok(gone.deleted_count)
        })
        .await
    }

    async fn get_receipt(&self, receipt_id: &str) -> Result<Receipt> {
        self.timed(async {
            match Self::find_one(&self.inner.receipts, doc! { "_id": receipt_id }).await? {
                Some(d) => receipt_from(&d),
                None => Err(RegistryError::not_found("receipt", receipt_id)),
            }
        })
        .await
    }

    async fn find_account_by_wallet(&self, wallet: &str) -> Result<Option<Account>> {
        self.timed(async {
            Self::find_one(&self.inner.accounts, doc! { "wallet": wallet })
                .await?
                .as_ref()
                .map(account_from)
                .transpose()
        })
        .await
    }

    async fn unsettled_receipts(&self, limit: usize) -> Result<Vec<Receipt>> {
        if limit == 0 {
            return Ok(Vec::new()); // A limit of 0 means "no limit" to MongoDB.
        }
        self.timed(async {
            let docs: Vec<Document> = self
                .inner
                .receipts
                .find(unsettled_filter())
                .sort(doc! { "created_at": 1, "_id": 1 })
                .limit(i64::try_from(limit).unwrap_or(i64::MAX))
                .await?
                .try_collect()
                .await?;
            docs.iter().map(receipt_from).collect()
        })
        .await
    }

    async fn count_unsettled_receipts(&self) -> Result<u64> {
        self.timed(async {
            Ok(self
                .inner
                .receipts
                .count_documents(unsettled_filter())
                .await?)
        })
        .await
    }

    async fn create_batch(&self, batch: SettlementBatch) -> Result<SettlementBatch> {
        self.timed(self.create_batch_inner(batch)).await
    }

    async fn get_batch(&self, batch_id: &str) -> Result<SettlementBatch> {
        self.timed(async {
            match Self::find_one(
                &self.inner.batches,
                doc! { "_id": batch_id, "complete": true },
            )
            .await?
            {
                Some(d) => batch_from(&d),
                None => Err(RegistryError::not_found("batch", batch_id)),
            }
        })
        .await
    }

    async fn update_batch(&self, batch: &SettlementBatch) -> Result<SettlementBatch> {
        self.timed(async {
            let bid = batch.batch_id.as_str();
            let updated = self
                .inner
                .batches
                .find_one_and_update(
                    doc! {
                        "_id": bid,
                        "complete": true,
                        "state": BatchState::Pending.as_str(),
                    },
                    doc! { "$set": {
                        "state": batch.state.as_str(),
                        "tx_hash": opt_str(&batch.tx_hash),
                        "error": opt_str(&batch.error),
                        "attempts": i64::from(batch.attempts),
                        "updated_at": batch.updated_at,
                    } },
                )
                .return_document(ReturnDocument::After)
                .await?;
            if let Some(d) = updated {
                return batch_from(&d);
            }
            match Self::find_one(&self.inner.batches, doc! { "_id": bid, "complete": true }).await?
            {
                Some(d) => Err(batch_final(&batch_from(&d)?)),
                None => Err(RegistryError::not_found("batch", bid)),
            }
        })
        .await
    }

    async fn pending_batches(&self) -> Result<Vec<SettlementBatch>> {
        self.timed(async {
            let docs: Vec<Document> = self
                .inner
                .batches
                .find(doc! { "state": BatchState::Pending.as_str(), "complete": true })
                .sort(doc! { "created_at": 1, "_id": 1 })
                .await?
                .try_collect()
                .await?;
            docs.iter().map(batch_from).collect()
        })
        .await
    }

    async fn recent_batches(&self, limit: usize) -> Result<Vec<SettlementBatch>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.timed(async {
            let docs: Vec<Document> = self
                .inner
                .batches
                .find(doc! { "complete": true })
                .sort(doc! { "created_at": -1, "_id": -1 })
                .limit(i64::try_from(limit).unwrap_or(i64::MAX))
                .await?
                .try_collect()
                .await?;
            docs.iter().map(batch_from).collect()
        })
        .await
    }

    async fn get_cursor(&self, name: &str) -> Result<Option<u64>> {
        self.timed(async {
            Self::find_one(&self.inner.cursors, doc! { "_id": name })
                .await?
                .map(|d| get_u64(&d, "cursor", "value"))
                .transpose()
        })
        .await
    }

    async fn set_cursor(&self, name: &str, value: u64) -> Result<()> {
        let value = to_i64(value, "cursor value")?;
        self.timed(async {
            self.inner
                .cursors
                .update_one(doc! { "_id": name }, doc! { "$set": { "value": value } })
                .upsert(true)
                .await?;
            Ok(())
        })
        .await
    }

    async fn release_batch(&self, batch_id: &str) -> Result<SettlementBatch> {
        self.timed(async {
            let i = &self.inner;
            let Some(d) =
                Self::find_one(&i.batches, doc! { "_id": batch_id, "complete": true }).await?
            else {
                return Err(RegistryError::not_found("batch", batch_id));
            };
            let batch = batch_from(&d)?;
            if batch.state != BatchState::Failed {
                return Err(RegistryError::conflict(format!(
                    "batch {batch_id} is {}, not failed: its receipts stay in it",
                    batch.state.as_str()
                )));
            }
            // One atomic update per receipt, only where it still names this batch.
            i.receipts
                .update_many(
                    doc! { "_id": { "$in": &batch.receipt_ids }, "batch_id": batch_id },
                    doc! { "$set": { "batch_id": Bson::Null } },
                )
                .await?;
            Ok(batch)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipt_ids_derive_from_reservation_ids() {
        assert_eq!(receipt_id_for("rsv_00ff"), "rcpt_00ff");
        assert_eq!(marker("rsv_00ff", EARN), "pending.rsv_00ff_earn");
        assert_eq!("rsv_00ff_earn".rsplit_once('_'), Some(("rsv_00ff", "earn")));
        let a = reservation_id_for("acct_1", "req-1");
        assert_eq!(a, reservation_id_for("acct_1", "req-1"));
        assert_ne!(a, reservation_id_for("acct_2", "req-1"));
        assert_ne!(a, reservation_id_for("acct_1", "req-2"));
        assert!(a.starts_with("rsv_") && a.len() == 36, "{a}");
    }

    #[test]
    fn reservation_documents_round_trip() {
        let r = Reservation {
            reservation_id: id::new_id(id::RESERVATION),
            account_id: "acct_1".into(),
            model_id: "mdl_1".into(),
            owner: "acct_2".into(),
            amount: 7,
            charge: Charge::Proof,
            units: 3,
            state: ReservationState::Held,
            receipt_id: None,
            idempotency_key: None,
            fingerprint: Some("ab".into()),
            created_at: 5,
        };
        let d = reservation_doc(&r, "dbt_1").unwrap();
        assert!(!d.contains_key("idempotency_key"));
        assert_eq!(reservation_from(&d).unwrap().r, r);
        let mut big = r.clone();
        big.amount = u64::MAX;
        assert_eq!(
            reservation_doc(&big, "dbt_1").unwrap_err().code(),
            modelhub_core::ErrorCode::BadRequest
        );
    }

    #[test]
    fn settling_states_read_as_final() {
        let mut d = doc! {
            "_id": "rsv_1", "account_id": "a", "model_id": "m", "owner": "o",
            "amount": 3_i64, "state": COMMITTING, "created_at": 1_i64, "settled_at": 2_i64,
            "receipt_id": "rcpt_1",
        };
        let s = reservation_from(&d).unwrap();
        assert_eq!(s.r.state, ReservationState::Committed);
        let receipt = receipt_of(&s);
        assert_eq!(receipt.receipt_id, "rcpt_1");
        assert_eq!(receipt.created_at, 2);
        d.insert("state", RELEASING);
        assert_eq!(
            reservation_from(&d).unwrap().r.state,
            ReservationState::Released
        );
        d.insert("state", "bogus");
        assert!(reservation_from(&d).is_err());
    }
}
