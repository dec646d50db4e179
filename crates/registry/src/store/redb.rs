//! [`RedbStore`]: the embedded metadata store, one redb file (`<data_dir>/registry.redb`).
//!
//! Records are JSON values keyed by id; index tables map (name, version) to a model id,
//! (account, idempotency key) to a reservation id and a wallet to its account. Receipts in no
//! settlement batch are listed in `unsettled`, keyed by (created_at, receipt id), so the oldest
//! are read without scanning every receipt; batches are ordered by `batches_by_time` and, while
//! pending, by `pending_batches`. Every write is one transaction (redb admits one writer at a
//! time, so a check and the update it guards can never interleave with another), run by the
//! committer thread, which makes concurrent writes durable with one `fsync` and answers each
//! only then (`group_commit`); reads run on tokio's blocking pool.
//!
//! Databases written before the chain ledger open as they are: the new tables are created on
//! open and `unsettled` is filled once from the existing receipts (flagged in `meta`).

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use modelhub_core::id;
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::group_commit::GroupCommitter;
use super::{MetadataStore, Sealed};
use crate::error::{RegistryError, Result};
use crate::model::{
    Account, ApiKey, BatchState, Charge, Model, Receipt, Reservation, ReservationState,
    SettlementBatch,
};

type Json = TableDefinition<'static, &'static str, &'static [u8]>;
type Index = TableDefinition<'static, &'static str, &'static str>;
/// A set ordered by (created_at, id).
type TimeIndex = TableDefinition<'static, (i64, &'static str), ()>;

const ACCOUNTS: Json = TableDefinition::new("accounts");
const KEYS: Json = TableDefinition::new("keys");
const MODELS: Json = TableDefinition::new("models");
const RESERVATIONS: Json = TableDefinition::new("reservations");
const RECEIPTS: Json = TableDefinition::new("receipts");
/// `owner \0 name \0 version` → model id, kept when the model is deleted: a published version
/// is never published again.
const MODEL_VERSIONS: Index = TableDefinition::new("model_versions");
/// What `model_versions` replaced: `name \0 version` → model id, names not owned by anyone.
const OLD_MODEL_NAMES: Index = TableDefinition::new("model_names");
/// Handle → account id.
const HANDLES: Index = TableDefinition::new("handles");
/// `account id \0 idempotency key` → reservation id.
const IDEMPOTENCY: Index = TableDefinition::new("idempotency");
/// `account \0 grant id` → the amount granted under that id (decimal), or `-taken` for a
/// [`debit_once`](MetadataStore::debit_once).
const GRANTS: Index = TableDefinition::new("grants");
/// Wallet → account id.
const WALLETS: Index = TableDefinition::new("wallets");
/// (created_at, receipt id) of every committed receipt in no batch.
const UNSETTLED: TimeIndex = TableDefinition::new("unsettled");
/// Batch id → batch.
const BATCHES: Json = TableDefinition::new("batches");
/// (created_at, batch id) of every batch.
const BATCHES_BY_TIME: TimeIndex = TableDefinition::new("batches_by_time");
/// (created_at, batch id) of the batches still pending.
const PENDING_BATCHES: TimeIndex = TableDefinition::new("pending_batches");
/// Cursor name → value.
const CURSORS: TableDefinition<'static, &'static str, u64> = TableDefinition::new("cursors");
/// Store-level flags (`unsettled_index`: the unsettled table was filled from old receipts;
/// `held_index`: the held tables were filled from old reservations; `versions_index`: the
/// owned model versions were filled from old models).
const META: Index = TableDefinition::new("meta");
const UNSETTLED_FLAG: &str = "unsettled_index";
const HELD_FLAG: &str = "held_index";
const VERSIONS_FLAG: &str = "versions_index";
/// Reservation id → the response kept with its commit (raw bytes).
const RESPONSES: Json = TableDefinition::new("responses");
/// `account \0 reservation id` → amount, for every reservation still held.
const HELD: TableDefinition<'static, &'static str, u64> = TableDefinition::new("held");
/// (created_at, reservation id) of every reservation still held.
const HELD_BY_TIME: TimeIndex = TableDefinition::new("held_by_time");
/// `key id \0 nonce` → when it may be forgotten (Unix seconds).
const NONCES: TableDefinition<'static, &'static str, i64> = TableDefinition::new("nonces");
/// (expires_at, `key id \0 nonce`) of every remembered nonce.
const NONCES_BY_EXPIRY: TimeIndex = TableDefinition::new("nonces_by_expiry");
/// `key id \0 bucket` → nonces spent by the key in that bucket of expiry time.
const NONCE_COUNTS: TableDefinition<'static, &'static str, u64> =
    TableDefinition::new("nonce_counts");

/// The embedded metadata store.
#[derive(Clone)]
pub struct RedbStore {
    db: Arc<Database>,
    /// Runs every write; group commit (see `group_commit`).
    committer: Arc<GroupCommitter>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").finish_non_exhaustive()
    }
}

macro_rules! impl_from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for RegistryError {
            fn from(e: $t) -> Self {
                RegistryError::store(e)
            }
        }
    )*};
}
impl_from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

fn pair(a: &str, b: &str) -> String {
    format!("{a}\0{b}")
}

fn version_key(owner: &str, name: &str, version: &str) -> String {
    format!("{owner}\0{name}\0{version}")
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(RegistryError::store)
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(RegistryError::store)
}

fn get_json<T: DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>> {
    match table.get(key)? {
        Some(v) => decode(v.value()).map(Some),
        None => Ok(None),
    }
}

fn get_index(
    table: &impl ReadableTable<&'static str, &'static str>,
    key: &str,
) -> Result<Option<String>> {
    Ok(table.get(key)?.map(|v| v.value().to_owned()))
}

fn put_json<T: Serialize>(
    table: &mut redb::Table<'_, &'static str, &'static [u8]>,
    key: &str,
    value: &T,
) -> Result<()> {
    table.insert(key, encode(value)?.as_slice())?;
    Ok(())
}

impl RedbStore {
    /// Every record of a JSON table, in key order, read on a blocking thread.
    async fn read_all<T: DeserializeOwned + Send + 'static>(&self, table: Json) -> Result<Vec<T>> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<T>> {
            let txn = db.begin_read()?;
            let t = txn.open_table(table)?;
            let mut out = Vec::new();
            for entry in t.iter()? {
                let (_, v) = entry?;
                out.push(decode(v.value())?);
            }
            Ok(out)
        })
        .await
        .map_err(RegistryError::store)?
    }

    /// Opens (or creates) the database file and its tables, with the default page cache.
    pub fn open(path: &Path) -> Result<RedbStore> {
        RedbStore::open_with_cache(path, super::DEFAULT_CACHE_MIB << 20)
    }

    /// Opens (or creates) the database file and its tables; redb caches at most
    /// `cache_bytes` of its pages in memory.
    pub fn open_with_cache(path: &Path, cache_bytes: u64) -> Result<RedbStore> {
        let db = redb::Builder::new()
            .set_cache_size(usize::try_from(cache_bytes).unwrap_or(usize::MAX))
            .create(path)?;
        let txn = db.begin_write()?;
        for t in [ACCOUNTS, KEYS, MODELS, RESERVATIONS, RECEIPTS] {
            txn.open_table(t)?;
        }
        for t in [MODEL_VERSIONS, HANDLES, IDEMPOTENCY, GRANTS, WALLETS] {
            txn.open_table(t)?;
        }
        for t in [UNSETTLED, BATCHES_BY_TIME, PENDING_BATCHES] {
            txn.open_table(t)?;
        }
        txn.open_table(BATCHES)?;
        txn.open_table(CURSORS)?;
        txn.open_table(RESPONSES)?;
        txn.open_table(HELD)?;
        txn.open_table(HELD_BY_TIME)?;
        txn.open_table(NONCES)?;
        txn.open_table(NONCES_BY_EXPIRY)?;
        txn.open_table(NONCE_COUNTS)?;
        let mut meta = txn.open_table(META)?;
        if meta.get(HELD_FLAG)?.is_none() {
            // A database from before the hold sweep: index its held reservations once.
            let reservations = txn.open_table(RESERVATIONS)?;
            for entry in reservations.iter()? {
                let (_, v) = entry?;
                let r: Reservation = decode(v.value())?;
                if r.state == ReservationState::Held {
                    index_held(&txn, &r)?;
                }
            }
            meta.insert(HELD_FLAG, "1")?;
        }
        if meta.get(VERSIONS_FLAG)?.is_none() {
            // A database from before owned names: every model's version is its owner's.
            let models = txn.open_table(MODELS)?;
            let mut versions = txn.open_table(MODEL_VERSIONS)?;
            for entry in models.iter()? {
                let (_, v) = entry?;
                let m: Model = decode(v.value())?;
                versions.insert(
                    version_key(&m.owner, &m.name, &m.version).as_str(),
                    m.model_id.as_str(),
                )?;
            }
            drop(versions);
            txn.delete_table(OLD_MODEL_NAMES)?;
            meta.insert(VERSIONS_FLAG, "1")?;
        }
        if meta.get(UNSETTLED_FLAG)?.is_none() {
            // A database from before the chain ledger: index its unbatched receipts once.
            let receipts = txn.open_table(RECEIPTS)?;
            let mut unsettled = txn.open_table(UNSETTLED)?;
            for entry in receipts.iter()? {
                let (_, v) = entry?;
                let receipt: Receipt = decode(v.value())?;
                if receipt.batch_id.is_none() {
                    unsettled.insert((receipt.created_at, receipt.receipt_id.as_str()), ())?;
                }
            }
            meta.insert(UNSETTLED_FLAG, "1")?;
        }
        drop(meta);
        txn.commit()?;
        let db = Arc::new(db);
        let committer = Arc::new(GroupCommitter::start(db.clone())?);
        Ok(RedbStore { db, committer })
    }

    /// Opens `<data_dir>/registry.redb`, creating the folder when needed, with a page cache
    /// of at most `cache_bytes`.
    pub fn open_in(data_dir: &Path, cache_bytes: u64) -> Result<RedbStore> {
        std::fs::create_dir_all(data_dir).map_err(RegistryError::store)?;
        RedbStore::open_with_cache(&data_dir.join("registry.redb"), cache_bytes)
    }

    /// Runs `f` in a write transaction of its own and answers once it is durable; commits
    /// when `f` succeeds and aborts (drops the transaction) when it fails. Concurrent writes
    /// share one `fsync` (`group_commit`).
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&WriteTransaction) -> Result<T> + Send + 'static,
    {
        self.committer.write(f).await
    }

    /// Runs `f` in one read transaction on the blocking pool.
    async fn view<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&redb::ReadTransaction) -> Result<T> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db.begin_read()?))
            .await
            .map_err(RegistryError::store)?
    }

    /// Reads one JSON record in a read transaction on the blocking pool.
    async fn read<T>(&self, table: Json, key: &str, what: &'static str) -> Result<T>
    where
        T: DeserializeOwned + Send + 'static,
    {
        let db = self.db.clone();
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read()?;
            let t = txn.open_table(table)?;
            get_json(&t, &key)?.ok_or_else(|| RegistryError::not_found(what, key))
        })
        .await
        .map_err(RegistryError::store)?
    }
}

#[async_trait]
impl MetadataStore for RedbStore {
    async fn create_account(&self, account: Account) -> Result<Account> {
        self.write(move |txn| {
            let mut t = txn.open_table(ACCOUNTS)?;
            if t.get(account.account_id.as_str())?.is_some() {
                return Err(RegistryError::conflict(format!(
                    "account {:?} already exists",
                    account.account_id
                )));
            }
            if let Some(wallet) = &account.wallet {
                let mut wallets = txn.open_table(WALLETS)?;
                if get_index(&wallets, wallet)?.is_some() {
                    return Err(RegistryError::conflict(format!(
                        "wallet {wallet} belongs to another account"
                    )));
                }
                wallets.insert(wallet.as_str(), account.account_id.as_str())?;
            }
            if let Some(handle) = &account.handle {
                let mut handles = txn.open_table(HANDLES)?;
                if get_index(&handles, handle)?.is_some() {
                    return Err(RegistryError::conflict(format!(
                        "handle {handle:?} belongs to another account"
                    )));
                }
                handles.insert(handle.as_str(), account.account_id.as_str())?;
            }
            put_json(&mut t, &account.account_id, &account)?;
            Ok(account.clone())
        })
        .await
    }

    async fn get_account(&self, account_id: &str) -> Result<Account> {
        self.read(ACCOUNTS, account_id, "account").await
    }

    async fn find_account_by_handle(&self, handle: &str) -> Result<Option<Account>> {
        let handle = handle.to_owned();
        self.view(move |txn| {
            let Some(account_id) = get_index(&txn.open_table(HANDLES)?, &handle)? else {
                return Ok(None);
            };
            get_json(&txn.open_table(ACCOUNTS)?, &account_id)
        })
        .await
    }

    async fn grant(&self, account_id: &str, amount: u64) -> Result<Account> {
        let account_id = account_id.to_owned();
        self.write(move |txn| {
            let mut t = txn.open_table(ACCOUNTS)?;
            let mut account: Account = get_json(&t, &account_id)?
                .ok_or_else(|| RegistryError::not_found("account", &account_id))?;
            account.take_in(amount)?;
            put_json(&mut t, &account_id, &account)?;
            Ok(account)
        })
        .await
    }

    async fn grant_once(&self, account_id: &str, amount: u64, grant_id: &str) -> Result<Account> {
        let (account_id, grant_key) = (account_id.to_owned(), pair(account_id, grant_id));
        self.write(move |txn| {
            let mut t = txn.open_table(ACCOUNTS)?;
            let mut account: Account = get_json(&t, &account_id)?
                .ok_or_else(|| RegistryError::not_found("account", &account_id))?;
            let mut grants = txn.open_table(GRANTS)?;
            if let Some(done) = get_index(&grants, &grant_key)? {
                return if done == amount.to_string() {
                    Ok(account)
                } else {
                    Err(RegistryError::conflict(
                        "this idempotency key was used for another amount",
                    ))
                };
            }
            account.take_in(amount)?;
            grants.insert(grant_key.as_str(), amount.to_string().as_str())?;
            put_json(&mut t, &account_id, &account)?;
            Ok(account)
        })
        .await
    }

    async fn debit_once(&self, account_id: &str, amount: u64, debit_id: &str) -> Result<u64> {
        let (account_id, debit_key) = (account_id.to_owned(), pair(account_id, debit_id));
        self.write(move |txn| {
            let mut t = txn.open_table(ACCOUNTS)?;
            let mut account: Account = get_json(&t, &account_id)?
                .ok_or_else(|| RegistryError::not_found("account", &account_id))?;
            let mut grants = txn.open_table(GRANTS)?;
            if let Some(done) = get_index(&grants, &debit_key)? {
                return done
                    .strip_prefix('-')
                    .and_then(|taken| taken.parse().ok())
                    .ok_or_else(|| RegistryError::conflict("this id was used for a grant"));
            }
            let taken = amount.min(account.credits);
            account.credits -= taken;
            account.refund_owed = amount - taken;
            grants.insert(debit_key.as_str(), format!("-{taken}").as_str())?;
            put_json(&mut t, &account_id, &account)?;
            Ok(taken)
        })
        .await
    }

    async fn clear_refund_owed(&self, account_id: &str) -> Result<Account> {
        let account_id = account_id.to_owned();
        self.write(move |txn| {
            let mut t = txn.open_table(ACCOUNTS)?;
            let mut account: Account = get_json(&t, &account_id)?
                .ok_or_else(|| RegistryError::not_found("account", &account_id))?;
            account.refund_owed = 0;
            put_json(&mut t, &account_id, &account)?;
            Ok(account)
        })
        .await
    }

    async fn set_daily_cap(&self, account_id: &str, cap: Option<u64>) -> Result<Account> {
        let account_id = account_id.to_owned();
        self.write(move |txn| {
            let mut t = txn.open_table(ACCOUNTS)?;
            let mut account: Account = get_json(&t, &account_id)?
                .ok_or_else(|| RegistryError::not_found("account", &account_id))?;
            account.daily_cap = cap;
            put_json(&mut t, &account_id, &account)?;
            Ok(account)
        })
        .await
    }

    async fn create_key(&self, key: ApiKey) -> Result<ApiKey> {
        self.write(move |txn| {
            let accounts = txn.open_table(ACCOUNTS)?;
            if accounts.get(key.account_id.as_str())?.is_none() {
                return Err(RegistryError::not_found("account", &key.account_id));
            }
            let mut t = txn.open_table(KEYS)?;
            if t.get(key.key_id.as_str())?.is_some() {
                return Err(RegistryError::conflict(format!(
                    "key {:?} already exists",
                    key.key_id
                )));
            }
            put_json(&mut t, &key.key_id, &key)?;
            Ok(key.clone())
        })
        .await
    }

    async fn get_key(&self, key_id: &str) -> Result<ApiKey> {
        self.read(KEYS, key_id, "key").await
    }

    async fn has_keys(&self) -> Result<bool> {
        self.view(|txn| Ok(!txn.open_table(KEYS)?.is_empty()?))
            .await
    }

    async fn rotate_key(
        &self,
        key_id: &str,
        new_sealed_secret: Vec<u8>,
        previous_valid_until: i64,
    ) -> Result<ApiKey> {
        let key_id = key_id.to_owned();
        self.write(move |txn| {
            let mut t = txn.open_table(KEYS)?;
            let mut key: ApiKey =
                get_json(&t, &key_id)?.ok_or_else(|| RegistryError::not_found("key", &key_id))?;
            if key.revoked {
                return Err(RegistryError::conflict("a revoked key can't be rotated"));
            }
            key.previous_sealed_secret = Some(std::mem::replace(
                &mut key.sealed_secret,
                new_sealed_secret.clone(),
            ));
            key.previous_valid_until = previous_valid_until;
            put_json(&mut t, &key_id, &key)?;
            Ok(key)
        })
        .await
    }

    async fn revoke_key(&self, key_id: &str) -> Result<ApiKey> {
        let key_id = key_id.to_owned();
        self.write(move |txn| {
            let mut t = txn.open_table(KEYS)?;
            let mut key: ApiKey =
                get_json(&t, &key_id)?.ok_or_else(|| RegistryError::not_found("key", &key_id))?;
            key.revoked = true;
            put_json(&mut t, &key_id, &key)?;
            Ok(key)
        })
        .await
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>> {
        self.read_all(KEYS).await
    }

    async fn reseal(&self, target: Sealed, old: &[u8], new: Vec<u8>) -> Result<bool> {
        let old = old.to_vec();
        self.write(move |txn| {
            // The sealed value in `record`, replaced when it is still `old`.
            let swap = |slot: &mut Vec<u8>| {
                let same = *slot == old;
                if same {
                    slot.clone_from(&new);
                }
                same
            };
            match &target {
                Sealed::ModelDek { model_id } => {
                    let mut t = txn.open_table(MODELS)?;
                    let Some(mut model) = get_json::<Model>(&t, model_id)? else {
                        return Ok(false);
                    };
                    let swapped = swap(&mut model.wrapped_dek);
                    if swapped {
                        put_json(&mut t, model_id, &model)?;
                    }
                    Ok(swapped)
                }
                Sealed::KeySecret { key_id } | Sealed::PreviousKeySecret { key_id } => {
                    let mut t = txn.open_table(KEYS)?;
                    let Some(mut key) = get_json::<ApiKey>(&t, key_id)? else {
                        return Ok(false);
                    };
                    let swapped = match &target {
                        Sealed::KeySecret { .. } => swap(&mut key.sealed_secret),
                        _ => key.previous_sealed_secret.as_mut().is_some_and(swap),
                    };
                    if swapped {
                        put_json(&mut t, key_id, &key)?;
                    }
                    Ok(swapped)
                }
            }
        })
        .await
    }

    async fn create_model(&self, model: Model) -> Result<Model> {
        self.write(move |txn| {
            let accounts = txn.open_table(ACCOUNTS)?;
            if accounts.get(model.owner.as_str())?.is_none() {
                return Err(RegistryError::not_found("account", &model.owner));
            }
            let mut t = txn.open_table(MODELS)?;
            if t.get(model.model_id.as_str())?.is_some() {
                return Err(RegistryError::conflict(format!(
                    "model {:?} already exists",
                    model.model_id
                )));
            }
            let mut versions = txn.open_table(MODEL_VERSIONS)?;
            let key = version_key(&model.owner, &model.name, &model.version);
            if versions.get(key.as_str())?.is_some() {
                return Err(RegistryError::version_taken(&model.name, &model.version));
            }
            versions.insert(key.as_str(), model.model_id.as_str())?;
            put_json(&mut t, &model.model_id, &model)?;
            Ok(model.clone())
        })
        .await
    }

    async fn delete_model(&self, model_id: &str) -> Result<Model> {
        let model_id = model_id.to_owned();
        self.write(move |txn| {
            let mut t = txn.open_table(MODELS)?;
            let Some(model) = get_json::<Model>(&t, &model_id)? else {
                return Err(RegistryError::not_found("model", &model_id));
            };
            t.remove(model_id.as_str())?;
            Ok(model)
        })
        .await
    }

    async fn get_model(&self, model_id: &str) -> Result<Model> {
        self.read(MODELS, model_id, "model").await
    }

    async fn model_version_taken(&self, owner: &str, name: &str, version: &str) -> Result<bool> {
        let key = version_key(owner, name, version);
        self.view(move |txn| Ok(txn.open_table(MODEL_VERSIONS)?.get(key.as_str())?.is_some()))
            .await
    }

    async fn list_models(&self) -> Result<Vec<Model>> {
        let mut models: Vec<Model> = self.read_all(MODELS).await?;
        models
            .sort_by(|a, b| (&a.name, &a.version, &a.owner).cmp(&(&b.name, &b.version, &b.owner)));
        Ok(models)
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
        let account_id = account_id.to_owned();
        let model_id = model_id.to_owned();
        let idempotency_key = idempotency_key.filter(|k| !k.is_empty()).map(str::to_owned);
        let fingerprint = fingerprint.map(str::to_owned);
        self.write(move |txn| {
            let mut reservations = txn.open_table(RESERVATIONS)?;
            let mut idem = txn.open_table(IDEMPOTENCY)?;
            let idem_key = idempotency_key.as_deref().map(|k| pair(&account_id, k));
            if let Some(ik) = &idem_key
                && let Some(first_id) = get_index(&idem, ik)?
            {
                let first: Reservation = get_json(&reservations, &first_id)?
                    .ok_or_else(|| RegistryError::not_found("reservation", &first_id))?;
                if first.model_id != model_id || first.charge != charge {
                    return Err(RegistryError::conflict(
                        "idempotency key was already used for another model",
                    ));
                }
                return Ok(first);
            }
            let mut accounts = txn.open_table(ACCOUNTS)?;
            let mut account: Account = get_json(&accounts, &account_id)?
                .ok_or_else(|| RegistryError::not_found("account", &account_id))?;
            let model: Model = get_json(&txn.open_table(MODELS)?, &model_id)?
                .ok_or_else(|| RegistryError::not_found("model", &model_id))?;
            let price = charge.amount(&model, units)?;
            let now = id::unix_now();
            let day = crate::model::utc_day(now);
            account.credits =
                account
                    .credits
                    .checked_sub(price)
                    .ok_or(RegistryError::PaymentRequired {
                        balance: account.credits,
                        price,
                    })?;
            account.check_daily_cap(day, price)?;
            account.count_charge(day, price);
            // With a key, the id is a function of (account, key), as in the MongoDB store.
            let reservation_id = match &idempotency_key {
                Some(k) => super::reservation_id_for(&account_id, k),
                None => loop {
                    let candidate = id::new_id(id::RESERVATION);
                    if reservations.get(candidate.as_str())?.is_none() {
                        break candidate;
                    }
                },
            };
            let reservation = Reservation {
                reservation_id,
                account_id: account_id.clone(),
                model_id: model_id.clone(),
                owner: model.owner,
                amount: price,
                charge,
                units: units.max(1),
                state: ReservationState::Held,
                receipt_id: None,
                idempotency_key: idempotency_key.clone(),
                fingerprint: fingerprint.clone(),
                created_at: now,
            };
            put_json(&mut accounts, &account_id, &account)?;
            put_json(&mut reservations, &reservation.reservation_id, &reservation)?;
            index_held(txn, &reservation)?;
            if let Some(ik) = &idem_key {
                idem.insert(ik.as_str(), reservation.reservation_id.as_str())?;
            }
            Ok(reservation)
        })
        .await
    }

    async fn get_reservation(&self, reservation_id: &str) -> Result<Reservation> {
        self.read(RESERVATIONS, reservation_id, "reservation").await
    }

    async fn commit_with(
        &self,
        reservation_id: &str,
        response: Option<Vec<u8>>,
    ) -> Result<Receipt> {
        let reservation_id = reservation_id.to_owned();
        self.write(move |txn| {
            let mut reservations = txn.open_table(RESERVATIONS)?;
            let mut receipts = txn.open_table(RECEIPTS)?;
            let mut r: Reservation = get_json(&reservations, &reservation_id)?
                .ok_or_else(|| RegistryError::not_found("reservation", &reservation_id))?;
            match r.state {
                ReservationState::Committed => {
                    let receipt_id = r.receipt_id.unwrap_or_default();
                    return get_json(&receipts, &receipt_id)?
                        .ok_or_else(|| RegistryError::not_found("receipt", receipt_id));
                }
                ReservationState::Released => {
                    return Err(RegistryError::conflict(format!(
                        "reservation {reservation_id:?} was released and cannot be committed"
                    )));
                }
                ReservationState::Held => {}
            }
            let mut accounts = txn.open_table(ACCOUNTS)?;
            let mut owner: Account = get_json(&accounts, &r.owner)?
                .ok_or_else(|| RegistryError::not_found("account", &r.owner))?;
            owner.earnings = owner
                .earnings
                .checked_add(r.amount)
                .ok_or_else(|| RegistryError::conflict("the owner's earnings would overflow"))?;
            let receipt_id = super::receipt_id_for(&reservation_id);
            let receipt = Receipt {
                receipt_id: receipt_id.clone(),
                reservation_id: reservation_id.clone(),
                account_id: r.account_id.clone(),
                model_id: r.model_id.clone(),
                owner: r.owner.clone(),
                credits_charged: r.amount,
                charge: r.charge,
                units: r.units,
                created_at: id::unix_now(),
                charged_at: r.created_at,
                batch_id: None,
            };
            r.state = ReservationState::Committed;
            r.receipt_id = Some(receipt_id.clone());
            put_json(&mut accounts, &owner.account_id.clone(), &owner)?;
            put_json(&mut receipts, &receipt_id, &receipt)?;
            txn.open_table(UNSETTLED)?
                .insert((receipt.created_at, receipt_id.as_str()), ())?;
            unindex_held(txn, &r)?;
            if let Some(response) = &response {
                txn.open_table(RESPONSES)?
                    .insert(reservation_id.as_str(), response.as_slice())?;
            }
            put_json(&mut reservations, &reservation_id, &r)?;
            Ok(receipt)
        })
        .await
    }

    async fn release(&self, reservation_id: &str) -> Result<Reservation> {
        let reservation_id = reservation_id.to_owned();
        self.write(move |txn| {
            let mut reservations = txn.open_table(RESERVATIONS)?;
            let mut r: Reservation = get_json(&reservations, &reservation_id)?
                .ok_or_else(|| RegistryError::not_found("reservation", &reservation_id))?;
            if r.state != ReservationState::Held {
                return Ok(r);
            }
            let mut accounts = txn.open_table(ACCOUNTS)?;
            let mut account: Account = get_json(&accounts, &r.account_id)?
                .ok_or_else(|| RegistryError::not_found("account", &r.account_id))?;
            account.take_in(r.amount).map_err(|_| {
                RegistryError::conflict("returning the held credits would overflow the balance")
            })?;
            r.state = ReservationState::Released;
            put_json(&mut accounts, &r.account_id, &account)?;
            unindex_held(txn, &r)?;
            put_json(&mut reservations, &reservation_id, &r)?;
            Ok(r)
        })
        .await
    }

    async fn get_receipt(&self, receipt_id: &str) -> Result<Receipt> {
        self.read(RECEIPTS, receipt_id, "receipt").await
    }

    async fn get_response(&self, reservation_id: &str) -> Result<Option<Vec<u8>>> {
        let reservation_id = reservation_id.to_owned();
        self.view(move |txn| {
            let t = txn.open_table(RESPONSES)?;
            Ok(t.get(reservation_id.as_str())?.map(|v| v.value().to_vec()))
        })
        .await
    }

    async fn held_credits(&self, account_id: &str) -> Result<u64> {
        let prefix = pair(account_id, "");
        self.view(move |txn| {
            let t = txn.open_table(HELD)?;
            let mut sum = 0_u64;
            for entry in t.range(prefix.as_str()..)? {
                let (k, v) = entry?;
                if !k.value().starts_with(&prefix) {
                    break;
                }
                sum = sum.saturating_add(v.value());
            }
            Ok(sum)
        })
        .await
    }

    async fn stale_holds(&self, cutoff: i64) -> Result<Vec<String>> {
        self.view(move |txn| {
            let t = txn.open_table(HELD_BY_TIME)?;
            let mut out = Vec::new();
            for entry in t.range(..=(cutoff, "\u{10FFFF}"))? {
                let (k, _) = entry?;
                out.push(k.value().1.to_owned());
            }
            Ok(out)
        })
        .await
    }

    async fn use_nonce(
        &self,
        key_id: &str,
        nonce: &str,
        expires_at: i64,
        per_key_limit: u64,
    ) -> Result<()> {
        let entry = pair(key_id, nonce);
        let count_key = pair(
            key_id,
            &expires_at.div_euclid(super::NONCE_BUCKET_SECS).to_string(),
        );
        self.write(move |txn| {
            let mut nonces = txn.open_table(NONCES)?;
            if nonces.get(entry.as_str())?.is_some() {
                return Err(RegistryError::conflict("nonce was already used"));
            }
            let mut counts = txn.open_table(NONCE_COUNTS)?;
            let spent = counts.get(count_key.as_str())?.map_or(0, |v| v.value());
            if spent >= per_key_limit {
                return Err(RegistryError::TooManyRequests {
                    what: "nonces for this key in the replay window".into(),
                });
            }
            counts.insert(count_key.as_str(), spent + 1)?;
            nonces.insert(entry.as_str(), expires_at)?;
            txn.open_table(NONCES_BY_EXPIRY)?
                .insert((expires_at, entry.as_str()), ())?;
            Ok(())
        })
        .await
    }

    async fn prune_nonces(&self, now: i64) -> Result<u64> {
        self.write(move |txn| {
            let mut by_expiry = txn.open_table(NONCES_BY_EXPIRY)?;
            let mut nonces = txn.open_table(NONCES)?;
            let mut pruned = 0;
            let expired: Vec<(i64, String)> = by_expiry
                .range(..(now, ""))?
                .map(|e| e.map(|(k, _)| (k.value().0, k.value().1.to_owned())))
                .collect::<std::result::Result<_, _>>()?;
            for (at, entry) in expired {
                nonces.remove(entry.as_str())?;
                by_expiry.remove((at, entry.as_str()))?;
                pruned += 1;
            }
            // Counts of buckets that hold no live nonce any more.
            let live_bucket = now.div_euclid(super::NONCE_BUCKET_SECS);
            let mut counts = txn.open_table(NONCE_COUNTS)?;
            let dead: Vec<String> = counts
                .iter()?
                .filter_map(|e| e.ok().map(|(k, _)| k.value().to_owned()))
                .filter(|k| {
                    k.rsplit_once('\0')
                        .and_then(|(_, b)| b.parse::<i64>().ok())
                        .is_some_and(|b| b < live_bucket)
                })
                .collect();
            for k in dead {
                counts.remove(k.as_str())?;
            }
            Ok(pruned)
        })
        .await
    }

    async fn find_account_by_wallet(&self, wallet: &str) -> Result<Option<Account>> {
        let wallet = wallet.to_owned();
        self.view(move |txn| {
            let Some(account_id) = get_index(&txn.open_table(WALLETS)?, &wallet)? else {
                return Ok(None);
            };
            get_json(&txn.open_table(ACCOUNTS)?, &account_id)
        })
        .await
    }

    async fn unsettled_receipts(&self, limit: usize) -> Result<Vec<Receipt>> {
        self.view(move |txn| {
            let unsettled = txn.open_table(UNSETTLED)?;
            let receipts = txn.open_table(RECEIPTS)?;
            let mut out = Vec::new();
            for entry in unsettled.iter()?.take(limit) {
                let (k, _) = entry?;
                let (_, receipt_id) = k.value();
                out.push(
                    get_json(&receipts, receipt_id)?
                        .ok_or_else(|| RegistryError::store("unsettled index names no receipt"))?,
                );
            }
            Ok(out)
        })
        .await
    }

    async fn count_unsettled_receipts(&self) -> Result<u64> {
        self.view(|txn| Ok(txn.open_table(UNSETTLED)?.len()?)).await
    }

    async fn create_batch(&self, batch: SettlementBatch) -> Result<SettlementBatch> {
        check_batch(&batch)?;
        self.write(move |txn| {
            let mut batches = txn.open_table(BATCHES)?;
            if let Some(stored) = get_json::<SettlementBatch>(&batches, &batch.batch_id)? {
                // A retry: every write happened in the first call's transaction.
                return if stored.receipt_ids == batch.receipt_ids {
                    Ok(stored)
                } else {
                    Err(batch_taken(&batch.batch_id))
                };
            }
            let mut receipts = txn.open_table(RECEIPTS)?;
            let mut unsettled = txn.open_table(UNSETTLED)?;
            let mut credits = 0_u64;
            for receipt_id in &batch.receipt_ids {
                let mut receipt: Receipt = get_json(&receipts, receipt_id)?
                    .ok_or_else(|| RegistryError::not_found("receipt", receipt_id))?;
                if let Some(other) = &receipt.batch_id {
                    return Err(in_other_batch(receipt_id, other));
                }
                credits = credits.saturating_add(receipt.credits_charged);
                receipt.batch_id = Some(batch.batch_id.clone());
                unsettled.remove((receipt.created_at, receipt_id.as_str()))?;
                put_json(&mut receipts, receipt_id, &receipt)?;
            }
            check_credits(&batch, credits)?;
            put_json(&mut batches, &batch.batch_id, &batch)?;
            let key = (batch.created_at, batch.batch_id.as_str());
            txn.open_table(BATCHES_BY_TIME)?.insert(key, ())?;
            if batch.state == BatchState::Pending {
                txn.open_table(PENDING_BATCHES)?.insert(key, ())?;
            }
            Ok(batch.clone())
        })
        .await
    }

    async fn get_batch(&self, batch_id: &str) -> Result<SettlementBatch> {
        self.read(BATCHES, batch_id, "batch").await
    }

    async fn update_batch(&self, batch: &SettlementBatch) -> Result<SettlementBatch> {
        let update = batch.clone();
        self.write(move |txn| {
            let mut batches = txn.open_table(BATCHES)?;
            let mut stored: SettlementBatch = get_json(&batches, &update.batch_id)?
                .ok_or_else(|| RegistryError::not_found("batch", &update.batch_id))?;
            if stored.state != BatchState::Pending {
                return Err(batch_final(&stored));
            }
            stored.state = update.state;
            stored.tx_hash = update.tx_hash.clone();
            stored.error = update.error.clone();
            stored.attempts = update.attempts;
            stored.updated_at = update.updated_at;
            put_json(&mut batches, &stored.batch_id, &stored)?;
            if stored.state != BatchState::Pending {
                txn.open_table(PENDING_BATCHES)?
                    .remove((stored.created_at, stored.batch_id.as_str()))?;
            }
            Ok(stored)
        })
        .await
    }

    async fn pending_batches(&self) -> Result<Vec<SettlementBatch>> {
        self.view(|txn| {
            let order = txn.open_table(PENDING_BATCHES)?;
            let batches = txn.open_table(BATCHES)?;
            let mut out = Vec::new();
            for entry in order.iter()? {
                let (k, _) = entry?;
                out.push(batch_at(&batches, k.value().1)?);
            }
            Ok(out)
        })
        .await
    }

    async fn recent_batches(&self, limit: usize) -> Result<Vec<SettlementBatch>> {
        self.view(move |txn| {
            let order = txn.open_table(BATCHES_BY_TIME)?;
            let batches = txn.open_table(BATCHES)?;
            let mut out = Vec::new();
            for entry in order.iter()?.rev().take(limit) {
                let (k, _) = entry?;
                out.push(batch_at(&batches, k.value().1)?);
            }
            Ok(out)
        })
        .await
    }

    async fn get_cursor(&self, name: &str) -> Result<Option<u64>> {
        let name = name.to_owned();
        self.view(move |txn| {
            Ok(txn
                .open_table(CURSORS)?
                .get(name.as_str())?
                .map(|v| v.value()))
        })
        .await
    }

    async fn set_cursor(&self, name: &str, value: u64) -> Result<()> {
        let name = name.to_owned();
        self.write(move |txn| {
            txn.open_table(CURSORS)?.insert(name.as_str(), value)?;
            Ok(())
        })
        .await
    }

    async fn release_batch(&self, batch_id: &str) -> Result<SettlementBatch> {
        let batch_id = batch_id.to_owned();
        self.write(move |txn| {
            let batch: SettlementBatch = get_json(&txn.open_table(BATCHES)?, &batch_id)?
                .ok_or_else(|| RegistryError::not_found("batch", &batch_id))?;
            if batch.state != BatchState::Failed {
                return Err(RegistryError::conflict(format!(
                    "batch {batch_id} is {}, not failed: its receipts stay in it",
                    batch.state.as_str()
                )));
            }
            let mut receipts = txn.open_table(RECEIPTS)?;
            let mut unsettled = txn.open_table(UNSETTLED)?;
            for receipt_id in &batch.receipt_ids {
                let Some(mut receipt) = get_json::<Receipt>(&receipts, receipt_id)? else {
                    continue;
                };
                if receipt.batch_id.as_deref() != Some(batch_id.as_str()) {
                    continue;
                }
                receipt.batch_id = None;
                put_json(&mut receipts, receipt_id, &receipt)?;
                unsettled.insert((receipt.created_at, receipt_id.as_str()), ())?;
            }
            Ok(batch)
        })
        .await
    }
}

/// Adds a held reservation to the held indexes.
fn index_held(txn: &WriteTransaction, r: &Reservation) -> Result<()> {
    txn.open_table(HELD)?
        .insert(pair(&r.account_id, &r.reservation_id).as_str(), r.amount)?;
    txn.open_table(HELD_BY_TIME)?
        .insert((r.created_at, r.reservation_id.as_str()), ())?;
    Ok(())
}

/// Removes a reservation that stops being held from the held indexes.
fn unindex_held(txn: &WriteTransaction, r: &Reservation) -> Result<()> {
    txn.open_table(HELD)?
        .remove(pair(&r.account_id, &r.reservation_id).as_str())?;
    txn.open_table(HELD_BY_TIME)?
        .remove((r.created_at, r.reservation_id.as_str()))?;
    Ok(())
}

fn batch_at(
    batches: &impl ReadableTable<&'static str, &'static [u8]>,
    batch_id: &str,
) -> Result<SettlementBatch> {
    get_json(batches, batch_id)?.ok_or_else(|| RegistryError::store("batch index names no batch"))
}

/// Checks a new batch before anything is written: no receipt twice (a receipt is settled once).
pub(super) fn check_batch(batch: &SettlementBatch) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for receipt_id in &batch.receipt_ids {
        if !seen.insert(receipt_id.as_str()) {
            return Err(RegistryError::bad_request(format!(
                "receipt {receipt_id:?} appears twice in batch {}",
                batch.batch_id
            )));
        }
    }
    Ok(())
}

/// The batch's `credits` must be the sum of its receipts' charges.
pub(super) fn check_credits(batch: &SettlementBatch, sum: u64) -> Result<()> {
    if batch.credits == sum {
        Ok(())
    } else {
        Err(RegistryError::bad_request(format!(
            "batch {} claims {} credits but its receipts charged {sum}",
            batch.batch_id, batch.credits
        )))
    }
}

pub(super) fn batch_taken(batch_id: &str) -> RegistryError {
    RegistryError::conflict(format!(
        "batch {batch_id} already exists with other receipts"
    ))
}

pub(super) fn in_other_batch(receipt_id: &str, other: &str) -> RegistryError {
    RegistryError::conflict(format!(
        "receipt {receipt_id:?} is already in batch {other}"
    ))
}

pub(super) fn batch_final(stored: &SettlementBatch) -> RegistryError {
    RegistryError::conflict(format!(
        "batch {} is already {}",
        stored.batch_id,
        stored.state.as_str()
    ))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::conformance::{self, Store};

    fn opener(path: PathBuf) -> impl Fn() -> std::future::Ready<Store> {
        move || {
            let store: Store = Arc::new(RedbStore::open(&path).expect("open redb store"));
            std::future::ready(store)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn redb_store_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        conformance::run_all(opener(dir.path().join("registry.redb"))).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_reserve_on_a_fresh_store() {
        let dir = tempfile::tempdir().unwrap();
        let store: Store = Arc::new(RedbStore::open_in(dir.path(), 64 << 20).unwrap());
        conformance::concurrent_reserve(store).await;
        assert!(dir.path().join("registry.redb").exists());
    }

    /// A database written before the chain ledger (no wallet, batch or cursor tables; records
    /// without `wallet` and `batch_id`) opens and works: its receipts are unsettled.
    #[tokio::test]
    async fn a_database_from_before_the_chain_ledger_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.redb");
        let old_account = serde_json::json!({
            "account_id": "acct_old", "name": "old", "admin": false, "credits": 3,
            "earnings": 2, "created_at": 10,
        });
        let old_receipts = [("rcpt_b", 20), ("rcpt_a", 20), ("rcpt_c", 5)].map(|(id, at)| {
            serde_json::json!({
                "receipt_id": id, "reservation_id": "rsv_x", "account_id": "acct_old",
                "model_id": "mdl_x", "owner": "acct_old", "credits_charged": 1, "created_at": at,
            })
        });
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            for t in [ACCOUNTS, KEYS, MODELS, RESERVATIONS] {
                txn.open_table(t).unwrap();
            }
            let mut accounts = txn.open_table(ACCOUNTS).unwrap();
            put_json(&mut accounts, "acct_old", &old_account).unwrap();
            let mut receipts = txn.open_table(RECEIPTS).unwrap();
            for r in &old_receipts {
                put_json(&mut receipts, r["receipt_id"].as_str().unwrap(), r).unwrap();
            }
            drop((accounts, receipts));
            txn.commit().unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        let account = store.get_account("acct_old").await.unwrap();
        assert_eq!((account.credits, account.wallet), (3, None));
        let unsettled = store.unsettled_receipts(10).await.unwrap();
        let ids: Vec<&str> = unsettled.iter().map(|r| r.receipt_id.as_str()).collect();
        assert_eq!(ids, ["rcpt_c", "rcpt_a", "rcpt_b"]);
        assert!(unsettled.iter().all(|r| r.batch_id.is_none()));
        assert_eq!(store.count_unsettled_receipts().await.unwrap(), 3);
        assert_eq!(store.get_cursor("blocks").await.unwrap(), None);
        assert!(store.pending_batches().await.unwrap().is_empty());
        let batch = crate::conformance::new_batch(&unsettled[..1]);
        store.create_batch(batch.clone()).await.unwrap();
        drop(store);
        // Filled once: reopening does not list the batched receipt again.
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.count_unsettled_receipts().await.unwrap(), 2);
        assert_eq!(
            store.get_receipt("rcpt_c").await.unwrap().batch_id,
            Some(batch.batch_id)
        );
    }

    /// A database from before owned names (global `model_names`, models without
    /// `owner_handle`): its versions become their owners' and stay taken.
    #[tokio::test]
    async fn a_database_from_before_owned_names_keeps_each_version_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.redb");
        let owner = crate::conformance::new_account("owner", 0);
        let mut model =
            serde_json::to_value(crate::conformance::new_model(&owner.account_id, 2)).unwrap();
        model.as_object_mut().unwrap().remove("owner_handle");
        let model_id = model["model_id"].as_str().unwrap().to_owned();
        let (name, version) = (model["name"].as_str().unwrap(), "1.0.0");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            put_json(
                &mut txn.open_table(ACCOUNTS).unwrap(),
                &owner.account_id,
                &owner,
            )
            .unwrap();
            put_json(&mut txn.open_table(MODELS).unwrap(), &model_id, &model).unwrap();
            txn.open_table(OLD_MODEL_NAMES)
                .unwrap()
                .insert(pair(name, version).as_str(), model_id.as_str())
                .unwrap();
            txn.commit().unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.get_model(&model_id).await.unwrap().owner_handle, None);
        assert!(
            store
                .model_version_taken(&owner.account_id, name, version)
                .await
                .unwrap()
        );
        store.delete_model(&model_id).await.unwrap();
        let again = Model {
            model_id: id::new_id(id::MODEL),
            ..serde_json::from_value(model.clone()).unwrap()
        };
        assert_eq!(
            store.create_model(again).await.unwrap_err().code(),
            modelhub_core::ErrorCode::Conflict
        );
    }

    #[tokio::test]
    async fn restart_durability_alone() {
        let dir = tempfile::tempdir().unwrap();
        conformance::restart_durability(opener(dir.path().join("r.redb"))).await;
    }
}
