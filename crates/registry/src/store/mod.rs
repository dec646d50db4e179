//! The metadata store behind the registry: one trait, [`MetadataStore`], with every record the
//! service keeps, its embedded implementation [`RedbStore`] and the MongoDB one [`MongoStore`].
//!
//! Every balance change is one atomic operation of the trait (`reserve`, `commit`, `release`,
//! `grant`), so an implementation on a document database can do each with a single atomic
//! update (or one transaction) and never needs isolation between concurrent transactions.

mod group_commit;
pub mod mongo;
mod redb;

pub use self::mongo::MongoStore;
pub use self::redb::RedbStore;

use async_trait::async_trait;

use crate::error::Result;
use crate::model::{Account, ApiKey, Charge, Model, Receipt, Reservation, SettlementBatch};

/// Nonce counts per key are kept per bucket of this many seconds of expiry time.
pub const NONCE_BUCKET_SECS: i64 = 600;

/// The embedded database's default page cache (MiB): the accounts, models, recent
/// reservations and nonces a busy registry reads fit in it; older receipts are read from the
/// file.
pub const DEFAULT_CACHE_MIB: u64 = 64;

/// A value the registry keeps sealed with the KEK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sealed {
    /// A model version's wrapped data key.
    ModelDek { model_id: String },
    /// An API key's current secret.
    KeySecret { key_id: String },
    /// An API key's previous secret (during a key rotation's grace).
    PreviousKeySecret { key_id: String },
}

/// The reservation id of the request with idempotency key `key` of `account_id`: every retry
/// of that request works on this one id.
pub fn reservation_id_for(account_id: &str, key: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(b"modelhub reservation\0")
        .chain_update(account_id.as_bytes())
        .chain_update(b"\0")
        .chain_update(key.as_bytes())
        .finalize();
    format!(
        "{}_{}",
        modelhub_core::id::RESERVATION,
        hex::encode(&digest[..16])
    )
}

/// The receipt id a commit of `reservation_id` writes: known before the commit, so a response
/// that names it can be stored with the commit itself.
pub fn receipt_id_for(reservation_id: &str) -> String {
    let tail = reservation_id
        .strip_prefix(modelhub_core::id::RESERVATION)
        .and_then(|t| t.strip_prefix('_'))
        .unwrap_or(reservation_id);
    format!("{}_{tail}", modelhub_core::id::RECEIPT)
}

/// Releases the holds [`MetadataStore::stale_holds`] lists; returns how many this call
/// released. Each `release` re-checks the state atomically, so a commit that won the race stays.
pub async fn release_holds<S: MetadataStore + ?Sized>(store: &S, cutoff: i64) -> Result<u64> {
    let mut released = 0;
    for rid in store.stale_holds(cutoff).await? {
        if store.release(&rid).await?.state == crate::model::ReservationState::Released {
            released += 1;
        }
    }
    Ok(released)
}

/// Where the registry keeps accounts, keys, models, reservations and receipts.
///
/// Errors: unknown ids give [`RegistryError::NotFound`](crate::RegistryError::NotFound),
/// duplicates [`RegistryError::Conflict`](crate::RegistryError::Conflict), a short balance
/// [`RegistryError::PaymentRequired`](crate::RegistryError::PaymentRequired) (or
/// [`RegistryError::OverDailyCap`](crate::RegistryError::OverDailyCap)), back-end
/// failures [`RegistryError::Store`](crate::RegistryError::Store), an unreachable back end
/// [`RegistryError::Unavailable`](crate::RegistryError::Unavailable).
#[async_trait]
pub trait MetadataStore: Send + Sync + 'static {
    /// Inserts a new account; `Conflict` when the id, the wallet or the handle is taken.
    async fn create_account(&self, account: Account) -> Result<Account>;

    /// The account whose `handle` is `handle`, if any.
    async fn find_account_by_handle(&self, handle: &str) -> Result<Option<Account>>;

    async fn get_account(&self, account_id: &str) -> Result<Account>;

    /// Adds `amount` to the account's credits atomically; `BadRequest` on overflow.
    async fn grant(&self, account_id: &str, amount: u64) -> Result<Account>;

    /// [`grant`](Self::grant) at most once per `grant_id`: a retry with the same id (and
    /// amount) changes nothing and returns the account; another amount is a conflict. The
    /// check and the credit are one atomic operation.
    async fn grant_once(&self, account_id: &str, amount: u64, grant_id: &str) -> Result<Account>;

    /// Takes up to `amount` credits from the account (all it has when that is less), at most
    /// once per `debit_id`, and returns the credits taken; a retry with the same id changes
    /// nothing and returns what the first call took. What it could not take becomes the
    /// account's refund lien (`Account::refund_owed`, replacing an earlier one): credits that
    /// come in later pay it first. The check, the debit and the lien are one atomic operation.
    /// `NotFound` when the account is unknown. (The chain ledger's refund requests: credits a
    /// user asks back on chain stop being spendable off chain, and so do the credits the claim
    /// will take from what arrives before it.)
    async fn debit_once(&self, account_id: &str, amount: u64, debit_id: &str) -> Result<u64>;

    /// Ends the account's refund lien (the refund was paid on chain).
    async fn clear_refund_owed(&self, account_id: &str) -> Result<Account>;

    /// Sets the account's daily cap (`Account::daily_cap`, as the chain ledger follows it).
    /// Reservations check it and count what they take per UTC day (`Account::charged_today`),
    /// in the same atomic operation as the debit; past it they fail with `OverDailyCap`.
    async fn set_daily_cap(&self, account_id: &str, cap: Option<u64>) -> Result<Account>;

    /// Inserts a new key; `NotFound` when its account is unknown, `Conflict` when the id exists.
    async fn create_key(&self, key: ApiKey) -> Result<ApiKey>;

    async fn get_key(&self, key_id: &str) -> Result<ApiKey>;

    /// Gives a key a new (sealed) secret, keeping the current one as the previous secret,
    /// accepted until `previous_valid_until`; one atomic update. `NotFound` for an unknown key,
    /// `Conflict` for a revoked one.
    async fn rotate_key(
        &self,
        key_id: &str,
        new_sealed_secret: Vec<u8>,
        previous_valid_until: i64,
    ) -> Result<ApiKey>;

    /// Marks a key revoked (revoking twice is fine).
    async fn revoke_key(&self, key_id: &str) -> Result<ApiKey>;

    /// Every API key, revoked ones too, in key id order (a KEK rotation re-wraps their
    /// sealed secrets).
    async fn list_keys(&self) -> Result<Vec<ApiKey>>;

    /// Replaces one sealed value (a KEK rotation's re-wrap) if it is still `old`, in one
    /// atomic update; `false`, and nothing written, when it changed meanwhile (a key rotated,
    /// a model deleted) or its record is gone.
    async fn reseal(&self, target: Sealed, old: &[u8], new: Vec<u8>) -> Result<bool>;
    /// Whether any API key was ever made (revoked ones count).
    async fn has_keys(&self) -> Result<bool>;

    /// Inserts a new model; `NotFound` when the owner is unknown, `Conflict` when the id is
    /// taken or the owner's (name, version) was ever published, also when since deleted.
    async fn create_model(&self, model: Model) -> Result<Model>;

    async fn get_model(&self, model_id: &str) -> Result<Model>;

    /// Whether `owner` ever published `name` at `version` (a deleted version counts: versions
    /// are immutable, so a deleted one is never published again with other bytes or price).
    async fn model_version_taken(&self, owner: &str, name: &str, version: &str) -> Result<bool>;

    /// Every model, sorted by (name, version, owner).
    async fn list_models(&self) -> Result<Vec<Model>>;

    /// Removes a model version (its owner, name and version stay taken); returns what was
    /// removed. Reservations and receipts that name it stay.
    async fn delete_model(&self, model_id: &str) -> Result<Model>;

    /// [`reserve_with`](Self::reserve_with) without a fingerprint.
    async fn reserve(
        &self,
        account_id: &str,
        model_id: &str,
        idempotency_key: Option<&str>,
    ) -> Result<Reservation> {
        self.reserve_with(
            account_id,
            model_id,
            Charge::Prediction,
            1,
            idempotency_key,
            None,
        )
        .await
    }

    /// Holds `units` of the model's price for `charge` ([`Charge::amount`]) from the account's
    /// credits,
    /// atomically with the balance check (`PaymentRequired` when short). With an idempotency
    /// key the account used before, returns the first reservation, whatever its state
    /// (`Conflict` if that one was for another model or charge); the reservation id is then a
    /// function of (account, key). `fingerprint` is stored with a new reservation, for the
    /// caller to compare on a retry.
    async fn reserve_with(
        &self,
        account_id: &str,
        model_id: &str,
        charge: Charge,
        units: u32,
        idempotency_key: Option<&str>,
        fingerprint: Option<&str>,
    ) -> Result<Reservation>;

    async fn get_reservation(&self, reservation_id: &str) -> Result<Reservation>;

    /// [`commit_with`](Self::commit_with) without a response to keep.
    async fn commit(&self, reservation_id: &str) -> Result<Receipt> {
        self.commit_with(reservation_id, None).await
    }

    /// Moves the held amount to the owner's earnings and writes a receipt, whose id is
    /// [`receipt_id_for`] the reservation. Committing again returns the same receipt;
    /// committing a released reservation is a `Conflict`. `response` (what the caller answers
    /// for this charge) is kept with the commit, atomically, for replays of a keyed request;
    /// a later commit never replaces it.
    async fn commit_with(&self, reservation_id: &str, response: Option<Vec<u8>>)
    -> Result<Receipt>;

    /// The response kept by [`commit_with`](Self::commit_with), if any.
    async fn get_response(&self, reservation_id: &str) -> Result<Option<Vec<u8>>>;

    /// Credits held from the account by reservations that are neither committed nor released.
    async fn held_credits(&self, account_id: &str) -> Result<u64>;

    /// Releases every reservation still held that was made at or before `cutoff` (Unix
    /// seconds): the hold of a caller that died. Returns how many were released. A commit
    /// after that is a `Conflict`, as for any released reservation. A store whose writes are
    /// not atomic (MongoDB) also finishes what a registry that died left half-done before
    /// `cutoff`, refunding a debit whose reservation was never written (counted too).
    async fn release_stale(&self, cutoff: i64) -> Result<u64> {
        release_holds(self, cutoff).await
    }

    /// Ids of the reservations still held that were made at or before `cutoff`.
    async fn stale_holds(&self, cutoff: i64) -> Result<Vec<String>>;

    /// Spends the nonce of a signed request for `key_id`, remembered until `expires_at` (Unix
    /// seconds): `Conflict` when it is already remembered; `TooManyRequests` when the key has
    /// spent more than `per_key_limit` nonces in the [`NONCE_BUCKET_SECS`] bucket of
    /// `expires_at` (so one key can't fill the store). Atomic: of two concurrent calls with
    /// the same key and nonce, exactly one succeeds.
    async fn use_nonce(
        &self,
        key_id: &str,
        nonce: &str,
        expires_at: i64,
        per_key_limit: u64,
    ) -> Result<()>;

    /// Forgets nonces (and their counts) that expired before `now`; returns how many.
    async fn prune_nonces(&self, now: i64) -> Result<u64>;

    /// Returns the held amount to the account. A no-op on a released or committed reservation.
    async fn release(&self, reservation_id: &str) -> Result<Reservation>;

    async fn get_receipt(&self, receipt_id: &str) -> Result<Receipt>;

    // ---- chain ledger: wallets, settlement batches, cursors ----

    /// The account whose `wallet` is `wallet` (lowercase `0x` hex), if any. `create_account`
    /// refuses a wallet another account has (`Conflict`). Addresses are compared exactly, as
    /// stored: callers normalise them (lowercase) before storing and looking up.
    async fn find_account_by_wallet(&self, wallet: &str) -> Result<Option<Account>>;

    /// Up to `limit` committed receipts not in any batch (`batch_id == None`), oldest first
    /// (by `created_at`, then `receipt_id`). A `limit` of 0 gives none.
    async fn unsettled_receipts(&self, limit: usize) -> Result<Vec<Receipt>>;

    /// How many committed receipts are in no batch.
    async fn count_unsettled_receipts(&self) -> Result<u64>;

    /// Records a new batch and sets `batch_id` on each of its receipts. Every receipt must
    /// exist (`NotFound`) and be in no batch or already in this one (`Conflict` otherwise);
    /// calling it again with the same batch finishes a call a crash interrupted and returns the
    /// stored batch. A batch id that exists with other receipts is a `Conflict`. A receipt
    /// listed twice, or `credits` other than the sum of the receipts' `credits_charged`, is a
    /// `BadRequest`. When it fails, no receipt is left in the batch and the batch is not
    /// stored (an implementation without transactions keeps a half-written batch invisible
    /// until it is finished or undone).
    async fn create_batch(&self, batch: SettlementBatch) -> Result<SettlementBatch>;

    async fn get_batch(&self, batch_id: &str) -> Result<SettlementBatch>;

    /// Replaces a batch's `state`, `tx_hash`, `error`, `attempts` and `updated_at` (never its
    /// receipts or credits); `Conflict` when the stored batch is no longer `Pending`.
    async fn update_batch(&self, batch: &SettlementBatch) -> Result<SettlementBatch>;

    /// Batches still `Pending`, oldest first.
    async fn pending_batches(&self) -> Result<Vec<SettlementBatch>>;

    /// The `limit` most recent batches, newest first (by `created_at`, then `batch_id`). A
    /// `limit` of 0 gives none.
    async fn recent_batches(&self, limit: usize) -> Result<Vec<SettlementBatch>>;

    /// A named `u64` cursor (e.g. the last block whose deposits were counted), if set.
    async fn get_cursor(&self, name: &str) -> Result<Option<u64>>;

    /// Sets a named cursor (overwrites it, also with a smaller value). The MongoDB store
    /// refuses values above `i64::MAX` (`BadRequest`).
    async fn set_cursor(&self, name: &str, value: u64) -> Result<()>;

    /// Releases the receipts of a `Failed` batch for re-batching: each receipt that still
    /// names the batch gets `batch_id == None` again (it is unsettled once more); the batch
    /// stays, `Failed`, as a record. Releasing again changes nothing. `NotFound` for an unknown
    /// batch, `Conflict` when the batch is not `Failed`. Returns the batch.
    async fn release_batch(&self, batch_id: &str) -> Result<SettlementBatch>;
}
