//! [`RegistryService`]: the gRPC face of the registry. Protobuf messages are validated and
//! turned into domain records here; everything else happens in the [`MetadataStore`].

use std::sync::Arc;

use modelhub_core::crypto::Kek;
use modelhub_core::kek::ResealTally;
use modelhub_core::{ErrorCode, TensorSpec, id, signing};
use modelhub_proto::common::v1::ResealReport;
use modelhub_proto::registry::v1 as pb;
use modelhub_proto::registry::v1::registry_server::Registry;
use tonic::{Request, Response, Status};
use tracing::{error, warn};

use crate::error::{RegistryError, Result};
use crate::ledger::{EmbeddedLedger, Ledger, LedgerStatus};
use crate::model::{
    Account, ApiKey, Charge, Model, Receipt, Reservation, ReservationState, SettlementBatch,
};
use crate::store::{MetadataStore, Sealed};

/// Longest account name, in characters.
pub const MAX_ACCOUNT_NAME: usize = 64;

/// Largest response kept with a commit for replays; a larger one is not kept (a replay then
/// says so instead of answering it).
pub const MAX_KEPT_RESPONSE: usize = 1 << 20;

/// How many attempts one idempotency key may make after failed ones (each released, nothing
/// charged) before it must be replaced by a new key.
pub const MAX_KEY_ATTEMPTS: u32 = 16;

/// How long a nonce is remembered after its request's date: the ±300 s the gateways accept,
/// plus slack for their clocks.
pub const NONCE_KEEP_SECS: i64 = signing::MAX_CLOCK_SKEW_SECS + 120;

/// The cursor that records since when the nonce store has kept every nonce.
const NONCES_SINCE: &str = "nonces_since";

/// How often held credits are swept and expired nonces pruned.
const HOUSEKEEPING_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Time limits and bounds of request handling (`Settings::policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Held credits older than this are released (their caller died).
    pub hold_timeout_secs: u64,
    /// An idempotency key binds its request (and its stored response) this long.
    pub idempotency_ttl_secs: u64,
    /// Nonces one key may spend per [`NONCE_BUCKET_SECS`](crate::store::NONCE_BUCKET_SECS).
    pub max_nonces_per_key: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            hold_timeout_secs: 120,
            idempotency_ttl_secs: 24 * 3600,
            max_nonces_per_key: 1_000_000,
        }
    }
}

/// A reservation as `Reserve` answers it.
#[derive(Debug, Clone)]
pub struct Reserved {
    pub reservation: Reservation,
    /// Made by an earlier attempt with the same idempotency key.
    pub existing: bool,
    /// The response kept with its commit, for a committed existing reservation.
    pub response: Option<Vec<u8>>,
}

/// The registry gRPC service; wrap it in
/// [`RegistryServer`](modelhub_proto::registry::v1::registry_server::RegistryServer) to serve it.
#[derive(Clone)]
pub struct RegistryService {
    store: Arc<dyn MetadataStore>,
    kek: Arc<Kek>,
    ledger: Arc<dyn Ledger>,
    policy: Policy,
    /// Since when (Unix seconds) the store has kept every nonce; read or set on first use.
    nonces_since: Arc<tokio::sync::OnceCell<i64>>,
}

impl std::fmt::Debug for RegistryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryService").finish_non_exhaustive()
    }
}

/// Turns a registry error into a status, logging what the client will not see.
fn status(op: &'static str, e: RegistryError) -> Status {
    match e.code() {
        modelhub_core::ErrorCode::Internal => error!(op, error = %e, "registry operation failed"),
        modelhub_core::ErrorCode::Unavailable => {
            tracing::warn!(op, error = %e, "metadata store unavailable")
        }
        code => tracing::debug!(op, %code, error = %e, "registry request refused"),
    }
    e.into()
}

fn required<'a>(field: &'static str, value: &'a str) -> Result<&'a str> {
    if value.is_empty() {
        return Err(RegistryError::bad_request(format!("{field} is required")));
    }
    Ok(value)
}

fn valid_chars(value: &str, max: usize, extra: &str) -> bool {
    (1..=max).contains(&value.len())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
}

/// Handles nobody may take: they would pass for the hub itself.
const RESERVED_HANDLES: &[&str] = &["admin", "api", "hub", "modelhub", "root", "system", "v1"];

/// Checks a handle: 2 to 39 of `a-z 0-9 -`, starting and ending with a letter or digit, not
/// reserved. Account ids (`acct_…`) can't be handles, so a namespace is never ambiguous.
pub fn validate_handle(handle: &str) -> Result<()> {
    let ok = (2..=39).contains(&handle.len())
        && handle
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !handle.starts_with('-')
        && !handle.ends_with('-');
    if !ok {
        return Err(RegistryError::bad_request(
            "handle must be 2 to 39 characters of a-z 0-9 -, starting and ending with a letter \
             or digit",
        ));
    }
    if RESERVED_HANDLES.contains(&handle) {
        return Err(RegistryError::bad_request(format!(
            "handle {handle:?} is reserved"
        )));
    }
    Ok(())
}

/// Checks a model name (`[A-Za-z0-9._-]{1,128}`) and version (`[A-Za-z0-9._+-]{1,64}`).
pub fn validate_name_version(name: &str, version: &str) -> Result<()> {
    if !valid_chars(name, 128, "._-") {
        return Err(RegistryError::bad_request(
            "model name must be 1 to 128 characters of A-Z a-z 0-9 . _ -",
        ));
    }
    if !valid_chars(version, 64, "._+-") {
        return Err(RegistryError::bad_request(
            "model version must be 1 to 64 characters of A-Z a-z 0-9 . _ + -",
        ));
    }
    Ok(())
}

fn specs(
    field: &str,
    specs: Vec<modelhub_proto::common::v1::TensorSpec>,
) -> Result<Vec<TensorSpec>> {
    specs
        .into_iter()
        .map(|s| {
            TensorSpec::try_from(s)
                .map_err(|e| RegistryError::bad_request(format!("{field}: {}", e.message)))
        })
        .collect()
}

/// Validates a `CreateModelRequest` into a model record (id generated when empty).
fn model_from_request(req: pb::CreateModelRequest) -> Result<Model> {
    validate_name_version(&req.name, &req.version)?;
    required("owner", &req.owner)?;
    required("cid", &req.cid)?;
    required("sha256", &req.sha256)?;
    let model_id = if req.model_id.is_empty() {
        id::new_id(id::MODEL)
    } else if valid_chars(&req.model_id, 128, "_-") {
        req.model_id
    } else {
        return Err(RegistryError::bad_request(
            "model_id must be 1 to 128 characters of A-Z a-z 0-9 _ -",
        ));
    };
    if req.commitment.as_deref() == Some("") {
        return Err(RegistryError::bad_request(
            "commitment must not be empty when set",
        ));
    }
    if req
        .digest
        .as_deref()
        .is_some_and(|d| d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(RegistryError::bad_request(
            "digest must be 64 hex digits when set",
        ));
    }
    if req.proof_price > 0 && req.circuit_spec.is_none() {
        return Err(RegistryError::bad_request(
            "proof_price needs a circuit: a model without one has no proofs",
        ));
    }
    Ok(Model {
        model_id,
        owner: req.owner,
        owner_handle: None,
        name: req.name,
        version: req.version,
        price: req.price,
        cid: req.cid,
        sha256: req.sha256,
        size: req.size,
        wrapped_dek: req.wrapped_dek,
        inputs: specs("inputs", req.inputs)?,
        outputs: specs("outputs", req.outputs)?,
        commitment: req.commitment,
        circuit_spec: req.circuit_spec,
        zk_note: req.zk_note,
        digest: req.digest.map(|d| d.to_ascii_lowercase()),
        proof_price: req.proof_price,
        max_rows: req.max_rows,
        calls_per_minute: req.calls_per_minute,
        created_at: id::unix_now(),
    })
}

/// The longest a previous secret stays accepted after a rotation.
pub const MAX_ROTATION_GRACE_SECS: u64 = 7 * 86_400;

/// gRPC metadata entry that makes a write idempotent: a retry with the same value (scoped by
/// the caller, e.g. `<account>:<client key>`) takes effect once.
pub const IDEMPOTENCY_METADATA: &str = "mh-idempotency-key";

fn idempotency_key<T>(request: &Request<T>) -> Option<String> {
    request
        .metadata()
        .get(IDEMPOTENCY_METADATA)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// The id a keyed create uses, so that a retry names the same record.
pub(crate) fn keyed_id(prefix: &str, key: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{prefix}\0{key}").as_bytes());
    format!("{prefix}_{}", hex::encode(&digest[..16]))
}

fn account_pb(a: Account, held: u64) -> pb::Account {
    pb::Account {
        held,
        daily_cap: a.daily_cap,
        refund_owed: a.refund_owed,
        charged_today: a.charged_on(crate::model::utc_day(id::unix_now())),
        account_id: a.account_id,
        name: a.name,
        admin: a.admin,
        credits: a.credits,
        earnings: a.earnings,
        created_at: a.created_at,
        wallet: a.wallet.unwrap_or_default(),
        handle: a.handle.unwrap_or_default(),
    }
}

fn batch_pb(b: SettlementBatch) -> pb::SettlementBatch {
    pb::SettlementBatch {
        batch_id: b.batch_id,
        state: b.state.as_str().to_owned(),
        receipts: u32::try_from(b.receipt_ids.len()).unwrap_or(u32::MAX),
        credits: b.credits,
        tx_hash: b.tx_hash.unwrap_or_default(),
        error: b.error.unwrap_or_default(),
        attempts: b.attempts,
        created_at: b.created_at,
    }
}

fn ledger_pb(s: LedgerStatus) -> pb::LedgerInfo {
    pb::LedgerInfo {
        kind: s.kind.to_owned(),
        chain_id: s.chain_id,
        marketplace: s.marketplace,
        operator: s.operator,
        wei_per_credit: s.wei_per_credit,
        followed_block: s.followed_block,
        confirmations: s.confirmations,
        unsettled_receipts: s.unsettled_receipts,
        batches: s.batches.into_iter().map(batch_pb).collect(),
    }
}

/// A wallet as accounts store it: `0x` + 40 lowercase hex.
fn normalize_wallet(wallet: &str) -> Result<String> {
    match wallet
        .strip_prefix("0x")
        .or_else(|| wallet.strip_prefix("0X"))
    {
        Some(hex) if hex.len() == 40 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(format!("0x{}", hex.to_ascii_lowercase()))
        }
        _ => Err(RegistryError::bad_request(
            "wallet must be an EVM address: 0x and 40 hex digits",
        )),
    }
}

fn model_pb(m: Model) -> pb::Model {
    pb::Model {
        model_id: m.model_id,
        owner: m.owner,
        owner_handle: m.owner_handle.unwrap_or_default(),
        name: m.name,
        version: m.version,
        price: m.price,
        cid: m.cid,
        sha256: m.sha256,
        size: m.size,
        wrapped_dek: m.wrapped_dek,
        inputs: m.inputs.iter().map(TensorSpec::to_proto).collect(),
        outputs: m.outputs.iter().map(TensorSpec::to_proto).collect(),
        commitment: m.commitment,
        created_at: m.created_at,
        circuit_spec: m.circuit_spec,
        zk_note: m.zk_note,
        digest: m.digest,
        proof_price: m.proof_price,
        max_rows: m.max_rows,
        calls_per_minute: m.calls_per_minute,
    }
}

fn reservation_pb(r: Reserved) -> pb::Reservation {
    let state = match r.reservation.state {
        ReservationState::Held => "held",
        ReservationState::Committed => "committed",
        ReservationState::Released => "released",
    };
    pb::Reservation {
        receipt_id: crate::store::receipt_id_for(&r.reservation.reservation_id),
        reservation_id: r.reservation.reservation_id,
        account_id: r.reservation.account_id,
        model_id: r.reservation.model_id,
        amount: r.reservation.amount,
        state: state.to_owned(),
        existing: r.existing,
        response: r.response.unwrap_or_default(),
        charge: charge_pb(r.reservation.charge).into(),
        units: r.reservation.units,
    }
}

fn receipt_pb(r: Receipt) -> pb::Receipt {
    pb::Receipt {
        receipt_id: r.receipt_id,
        reservation_id: r.reservation_id,
        account_id: r.account_id,
        model_id: r.model_id,
        owner: r.owner,
        credits_charged: r.credits_charged,
        created_at: r.created_at,
        charge: charge_pb(r.charge).into(),
        units: r.units,
    }
}

fn charge_pb(c: Charge) -> pb::Charge {
    match c {
        Charge::Prediction => pb::Charge::Prediction,
        Charge::Proof => pb::Charge::Proof,
    }
}

impl RegistryService {
    /// A service over `store`, sealing key secrets with `kek`, with the embedded ledger.
    pub fn new(store: Arc<dyn MetadataStore>, kek: Kek) -> RegistryService {
        RegistryService {
            store,
            kek: Arc::new(kek),
            ledger: Arc::new(EmbeddedLedger),
            policy: Policy::default(),
            nonces_since: Arc::new(tokio::sync::OnceCell::new()),
        }
    }

    /// The same service with another policy.
    pub fn with_policy(self, policy: Policy) -> RegistryService {
        RegistryService { policy, ..self }
    }

    /// Releases holds older than the hold timeout and prunes expired nonces, once.
    pub async fn sweep(&self) -> Result<u64> {
        let now = id::unix_now();
        let cutoff =
            now.saturating_sub(i64::try_from(self.policy.hold_timeout_secs).unwrap_or(i64::MAX));
        let released = self.store.release_stale(cutoff).await?;
        if released > 0 {
            warn!(
                released,
                "released credits held longer than the hold timeout"
            );
        }
        self.store.prune_nonces(now).await?;
        Ok(released)
    }

    /// Runs [`sweep`](Self::sweep) every few seconds, for ever.
    pub async fn housekeeping(self) {
        // Often enough that a hold is swept soon after its timeout, even a short one.
        let every = HOUSEKEEPING_EVERY
            .min(std::time::Duration::from_secs(
                self.policy.hold_timeout_secs / 2,
            ))
            .max(std::time::Duration::from_secs(1));
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if let Err(e) = self.sweep().await {
                warn!(error = %e, "housekeeping pass failed");
            }
        }
    }

    /// Holds the price for one call. With an idempotency key: the attempt in flight or
    /// charged under that key (`existing`, with its kept response once committed); a new
    /// reservation when the key is unused, its last attempt was released (nothing charged:
    /// the key is free again) or it expired; `Conflict` when the key was used for another
    /// request (another fingerprint or model).
    pub async fn reserve(
        &self,
        account_id: &str,
        model_id: &str,
        charge: Charge,
        units: u32,
        key: Option<&str>,
        fingerprint: Option<&str>,
    ) -> Result<Reserved> {
        let Some(key) = key else {
            let reservation = self
                .store
                .reserve_with(account_id, model_id, charge, units, None, fingerprint)
                .await?;
            return Ok(Reserved {
                reservation,
                existing: false,
                response: None,
            });
        };
        let expired_before = id::unix_now()
            .saturating_sub(i64::try_from(self.policy.idempotency_ttl_secs).unwrap_or(i64::MAX));
        // Attempt n of a key is stored under `key~n`: each failed attempt frees the next.
        for attempt in 0..MAX_KEY_ATTEMPTS {
            let store_key = match attempt {
                0 => key.to_owned(),
                n => format!("{key}~{n}"),
            };
            let rid = crate::store::reservation_id_for(account_id, &store_key);
            let (reservation, existing) = match self.store.get_reservation(&rid).await {
                Ok(r) => (r, true),
                Err(e) if e.code() == ErrorCode::NotFound => {
                    let r = self
                        .store
                        .reserve_with(
                            account_id,
                            model_id,
                            charge,
                            units,
                            Some(&store_key),
                            fingerprint,
                        )
                        .await?;
                    // A concurrent attempt may have made it first: then it is theirs.
                    let theirs = r.fingerprint.as_deref() != fingerprint
                        || r.state != ReservationState::Held;
                    (r, theirs)
                }
                Err(e) => return Err(e),
            };
            // A prediction's key binds its request for the key's TTL; a proof's delivery charge
            // (key `proof/<job>`) binds for good, so a read of the proof a day later is not
            // charged again.
            let expired = charge == Charge::Prediction && reservation.created_at < expired_before;
            if existing && (reservation.state == ReservationState::Released || expired) {
                continue;
            }
            if existing
                && (reservation.fingerprint.as_deref() != fingerprint
                    || reservation.model_id != model_id
                    || reservation.charge != charge)
            {
                return Err(RegistryError::conflict(
                    "this idempotency key was already used for another request",
                ));
            }
            let response = match (existing, reservation.state) {
                (true, ReservationState::Committed) => {
                    self.store.get_response(&reservation.reservation_id).await?
                }
                _ => None,
            };
            return Ok(Reserved {
                reservation,
                existing,
                response,
            });
        }
        Err(RegistryError::conflict(format!(
            "this idempotency key failed {MAX_KEY_ATTEMPTS} times; use a new key"
        )))
    }

    /// Records, if the store has no record yet, since when it keeps every nonce: from the
    /// beginning for a new store, from now for one that already has keys (requests dated
    /// earlier are refused). `open` calls it before serving.
    pub async fn start_keeping_nonces(&self) -> Result<()> {
        self.nonces_since().await.map(drop)
    }

    /// Since when the store has kept every nonce (set on first use).
    async fn nonces_since(&self) -> Result<i64> {
        self.nonces_since
            .get_or_try_init(|| async {
                if let Some(since) = self.store.get_cursor(NONCES_SINCE).await? {
                    return Ok(i64::try_from(since).unwrap_or(i64::MAX));
                }
                // A store with keys but no record was written by a version that kept nonces
                // in each gateway's memory: requests dated before now may have been accepted
                // there. A store without keys has accepted no request, so it covers them all.
                let since = if self.store.has_keys().await? {
                    id::unix_now()
                } else {
                    0
                };
                self.store
                    .set_cursor(NONCES_SINCE, u64::try_from(since).unwrap_or(0))
                    .await?;
                Ok(since)
            })
            .await
            .copied()
    }

    /// Spends a request nonce (see the `UseNonce` RPC).
    pub async fn use_nonce(&self, key_id: &str, nonce: &str, date: i64) -> Result<()> {
        let key_id = required("key_id", key_id)?;
        if key_id.len() > 128 {
            return Err(RegistryError::bad_request("key_id is too long"));
        }
        if !signing::is_valid_nonce(nonce) {
            return Err(RegistryError::bad_request(
                "nonce must be 16 to 64 characters of [A-Za-z0-9_-]",
            ));
        }
        let now = id::unix_now();
        if date > now.saturating_add(NONCE_KEEP_SECS) {
            return Err(RegistryError::bad_request("request is dated in the future"));
        }
        if date < self.nonces_since().await? {
            return Err(RegistryError::bad_request(
                "request is dated before the replay window the nonce store covers",
            ));
        }
        self.store
            .use_nonce(
                key_id,
                nonce,
                date.saturating_add(NONCE_KEEP_SECS),
                self.policy.max_nonces_per_key,
            )
            .await
    }

    /// The same service with `ledger` instead of the embedded one.
    pub fn with_ledger(self, ledger: Arc<dyn Ledger>) -> RegistryService {
        RegistryService { ledger, ..self }
    }

    /// The ledger behind the service.
    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }

    /// The store behind the service.
    pub fn store(&self) -> &Arc<dyn MetadataStore> {
        &self.store
    }

    async fn create_account(
        &self,
        req: pb::CreateAccountRequest,
        idem: Option<String>,
    ) -> Result<Account> {
        let chars = req.name.chars().count();
        if !(1..=MAX_ACCOUNT_NAME).contains(&chars) || req.name.chars().any(char::is_control) {
            return Err(RegistryError::bad_request(format!(
                "account name must be 1 to {MAX_ACCOUNT_NAME} printable characters"
            )));
        }
        let wallet = match req.wallet.as_str() {
            "" => None,
            w => Some(normalize_wallet(w)?),
        };
        let handle = match req.handle.as_str() {
            "" => None,
            h => {
                validate_handle(h)?;
                Some(h.to_owned())
            }
        };
        let account_id = idem
            .as_deref()
            .map_or_else(|| id::new_id(id::ACCOUNT), |k| keyed_id(id::ACCOUNT, k));
        // A wallet belongs to one account; a retry of this very creation is not a clash.
        if let Some(wallet) = &wallet
            && let Some(owner) = self.store.find_account_by_wallet(wallet).await?
            && owner.account_id != account_id
        {
            return Err(RegistryError::conflict(format!(
                "wallet {wallet} already belongs to account {}",
                owner.account_id
            )));
        }
        let account = Account {
            wallet,
            handle,
            daily_cap: None,
            charged_today: (0, 0),
            refund_owed: 0,
            account_id,
            name: req.name,
            admin: req.admin,
            credits: 0,
            earnings: 0,
            created_at: id::unix_now(),
        };
        match self.store.create_account(account.clone()).await {
            // A retry of the same request: the account it made the first time.
            Err(e) if idem.is_some() && e.code() == ErrorCode::Conflict => {
                let first = match self.store.get_account(&account.account_id).await {
                    Ok(first) => first,
                    // Not a retry: the clash was the wallet or the handle.
                    Err(n) if n.code() == ErrorCode::NotFound => return Err(e),
                    Err(other) => return Err(other),
                };
                if first.name != account.name
                    || first.admin != account.admin
                    || first.wallet != account.wallet
                    || first.handle != account.handle
                {
                    return Err(RegistryError::conflict(
                        "this idempotency key was used for another account",
                    ));
                }
                Ok(first)
            }
            other => other,
        }
    }

    async fn create_key(
        &self,
        req: pb::CreateKeyRequest,
        idem: Option<String>,
    ) -> Result<pb::CreateKeyResponse> {
        let account_id = required("account_id", &req.account_id)?;
        let mut secret = id::random_bytes::<32>().to_vec();
        let key_id = idem
            .as_deref()
            .map_or_else(|| id::new_id(id::KEY), |k| keyed_id(id::KEY, k));
        let created = self
            .store
            .create_key(ApiKey {
                sealed_secret: self.kek.wrap(&secret, key_id.as_bytes()),
                key_id: key_id.clone(),
                account_id: account_id.to_owned(),
                revoked: false,
                created_at: id::unix_now(),
                previous_sealed_secret: None,
                previous_valid_until: 0,
            })
            .await;
        let key = match created {
            // A retry of the same request: the key (and secret) it made the first time.
            Err(e) if idem.is_some() && e.code() == ErrorCode::Conflict => {
                let first = self.store.get_key(&key_id).await?;
                if first.account_id != account_id || first.revoked {
                    return Err(RegistryError::conflict(
                        "this idempotency key was used for another key",
                    ));
                }
                secret = self
                    .kek
                    .unwrap(&first.sealed_secret, first.key_id.as_bytes())
                    .map_err(|_| RegistryError::Unseal {
                        key_id: first.key_id.clone(),
                    })?;
                first
            }
            other => other?,
        };
        Ok(pb::CreateKeyResponse {
            key_id: key.key_id,
            secret: signing::encode_secret(&secret),
            account_id: key.account_id,
            previous_valid_until: 0,
        })
    }

    async fn lookup_key(&self, req: pb::LookupKeyRequest) -> Result<pb::KeyInfo> {
        let key = self.store.get_key(required("key_id", &req.key_id)?).await?;
        let unseal = |sealed: &[u8]| {
            self.kek
                .unwrap(sealed, key.key_id.as_bytes())
                .map_err(|_| RegistryError::Unseal {
                    key_id: key.key_id.clone(),
                })
        };
        let secret = unseal(&key.sealed_secret)?;
        // The previous secret only while it is still accepted.
        let previous_secret = match &key.previous_sealed_secret {
            Some(sealed) if key.previous_valid_until > id::unix_now() => unseal(sealed)?,
            _ => Vec::new(),
        };
        let account = self.store.get_account(&key.account_id).await?;
        Ok(pb::KeyInfo {
            previous_valid_until: if previous_secret.is_empty() {
                0
            } else {
                key.previous_valid_until
            },
            previous_secret,
            key_id: key.key_id,
            account_id: key.account_id,
            secret,
            admin: account.admin,
            revoked: key.revoked,
        })
    }

    /// A new secret for a key; the current one stays accepted for `grace_secs` (at most
    /// [`MAX_ROTATION_GRACE_SECS`]).
    async fn rotate_key(&self, req: pb::RotateKeyRequest) -> Result<pb::CreateKeyResponse> {
        let key_id = required("key_id", &req.key_id)?;
        if req.grace_secs > MAX_ROTATION_GRACE_SECS {
            return Err(RegistryError::bad_request(format!(
                "grace_secs must be at most {MAX_ROTATION_GRACE_SECS} (7 days)"
            )));
        }
        let secret = id::random_bytes::<32>();
        let until = id::unix_now().saturating_add(i64::try_from(req.grace_secs).unwrap_or(0));
        let key = self
            .store
            .rotate_key(key_id, self.kek.wrap(&secret, key_id.as_bytes()), until)
            .await?;
        warn!(key_id = %key.key_id, account_id = %key.account_id, previous_valid_until = until, "api key rotated");
        Ok(pb::CreateKeyResponse {
            key_id: key.key_id,
            secret: signing::encode_secret(&secret),
            account_id: key.account_id,
            previous_valid_until: until,
        })
    }

    /// A KEK rotation's re-wrap: every model's data key and every API key's sealed secrets
    /// wrapped again under the current key of the KEK ring. Resumable: what already is under
    /// the current key is counted and left alone; a value that changed since it was read (a
    /// key rotated meanwhile) is counted and left for the next run.
    pub async fn reseal(&self) -> Result<ResealReport> {
        let mut tally = ResealTally::default();
        for m in self.store.list_models().await? {
            let aad = modelhub_core::crypto::model_aad(&m.model_id, &m.version);
            let target = Sealed::ModelDek {
                model_id: m.model_id.clone(),
            };
            let name = || format!("model {}", m.model_id);
            let store = |again| self.store.reseal(target, &m.wrapped_dek, again);
            tally
                .value(&self.kek, &m.wrapped_dek, &aad, name, store)
                .await?;
        }
        for k in self.store.list_keys().await? {
            let aad = k.key_id.as_bytes();
            let key_id = || k.key_id.clone();
            let store = |again| {
                let target = Sealed::KeySecret { key_id: key_id() };
                self.store.reseal(target, &k.sealed_secret, again)
            };
            let name = || format!("key {}", k.key_id);
            tally
                .value(&self.kek, &k.sealed_secret, aad, name, store)
                .await?;
            if let Some(previous) = &k.previous_sealed_secret {
                let store = |again| {
                    let target = Sealed::PreviousKeySecret { key_id: key_id() };
                    self.store.reseal(target, previous, again)
                };
                let name = || format!("previous secret of key {}", k.key_id);
                tally.value(&self.kek, previous, aad, name, store).await?;
            }
        }
        Ok(tally.finish(&self.kek, "data keys and API key secrets"))
    }

    async fn create_model(&self, req: pb::CreateModelRequest) -> Result<Model> {
        let mut model = model_from_request(req)?;
        model.owner_handle = self.store.get_account(&model.owner).await?.handle;
        self.store.create_model(model).await
    }

    async fn check_model_name(&self, req: pb::CheckModelNameRequest) -> Result<()> {
        validate_name_version(&req.name, &req.version)?;
        let owner = required("owner", &req.owner)?;
        if self
            .store
            .model_version_taken(owner, &req.name, &req.version)
            .await?
        {
            return Err(RegistryError::version_taken(&req.name, &req.version));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Registry for RegistryService {
    async fn create_account(
        &self,
        request: Request<pb::CreateAccountRequest>,
    ) -> Result<Response<pb::Account>, Status> {
        let idem = idempotency_key(&request);
        RegistryService::create_account(self, request.into_inner(), idem)
            .await
            .map(|a| Response::new(account_pb(a, 0)))
            .map_err(|e| status("create_account", e))
    }

    async fn get_account(
        &self,
        request: Request<pb::GetAccountRequest>,
    ) -> Result<Response<pb::Account>, Status> {
        let req = request.into_inner();
        async {
            let id = required("account_id", &req.account_id)?;
            let account = self.store.get_account(id).await?;
            let held = self.store.held_credits(id).await?;
            Ok(account_pb(account, held))
        }
        .await
        .map(Response::new)
        .map_err(|e| status("get_account", e))
    }

    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        let idem = idempotency_key(&request);
        RegistryService::create_key(self, request.into_inner(), idem)
            .await
            .map(Response::new)
            .map_err(|e| status("create_key", e))
    }

    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::RevokeKeyResponse>, Status> {
        let req = request.into_inner();
        async {
            let key = self
                .store
                .revoke_key(required("key_id", &req.key_id)?)
                .await?;
            warn!(key_id = %key.key_id, account_id = %key.account_id, "api key revoked");
            Ok(pb::RevokeKeyResponse {})
        }
        .await
        .map(Response::new)
        .map_err(|e| status("revoke_key", e))
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        RegistryService::rotate_key(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| status("rotate_key", e))
    }

    async fn lookup_key(
        &self,
        request: Request<pb::LookupKeyRequest>,
    ) -> Result<Response<pb::KeyInfo>, Status> {
        RegistryService::lookup_key(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| status("lookup_key", e))
    }

    async fn use_nonce(
        &self,
        request: Request<pb::UseNonceRequest>,
    ) -> Result<Response<pb::UseNonceResponse>, Status> {
        let req = request.into_inner();
        RegistryService::use_nonce(self, &req.key_id, &req.nonce, req.date)
            .await
            .map(|()| Response::new(pb::UseNonceResponse {}))
            .map_err(|e| status("use_nonce", e))
    }

    async fn grant_credits(
        &self,
        request: Request<pb::GrantCreditsRequest>,
    ) -> Result<Response<pb::Account>, Status> {
        let idem = idempotency_key(&request);
        let req = request.into_inner();
        async {
            let id = required("account_id", &req.account_id)?;
            if !self.ledger.grants_allowed() {
                return Err(RegistryError::conflict(
                    "credits come from the chain ledger: buy them with buyCredits() on the \
                     marketplace contract",
                ));
            }
            let account = match &idem {
                Some(key) => self.store.grant_once(id, req.amount, key).await?,
                None => self.store.grant(id, req.amount).await?,
            };
            let held = self.store.held_credits(id).await?;
            Ok(account_pb(account, held))
        }
        .await
        .map(Response::new)
        .map_err(|e| status("grant_credits", e))
    }

    async fn check_model_name(
        &self,
        request: Request<pb::CheckModelNameRequest>,
    ) -> Result<Response<pb::CheckModelNameResponse>, Status> {
        RegistryService::check_model_name(self, request.into_inner())
            .await
            .map(|()| Response::new(pb::CheckModelNameResponse {}))
            .map_err(|e| status("check_model_name", e))
    }

    async fn create_model(
        &self,
        request: Request<pb::CreateModelRequest>,
    ) -> Result<Response<pb::Model>, Status> {
        RegistryService::create_model(self, request.into_inner())
            .await
            .map(|m| Response::new(model_pb(m)))
            .map_err(|e| status("create_model", e))
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::Model>, Status> {
        let req = request.into_inner();
        async {
            let id = required("model_id", &req.model_id)?;
            self.store.get_model(id).await
        }
        .await
        .map(|m| Response::new(model_pb(m)))
        .map_err(|e| status("get_model", e))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        self.store
            .list_models()
            .await
            .map(|models| {
                Response::new(pb::ListModelsResponse {
                    models: models.into_iter().map(model_pb).collect(),
                })
            })
            .map_err(|e| status("list_models", e))
    }

    async fn delete_model(
        &self,
        request: Request<pb::DeleteModelRequest>,
    ) -> Result<Response<pb::Model>, Status> {
        let model_id = request.into_inner().model_id;
        self.store
            .delete_model(&model_id)
            .await
            .map(|m| Response::new(model_pb(m)))
            .map_err(|e| status("delete_model", e))
    }

    async fn reserve(
        &self,
        request: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::Reservation>, Status> {
        let req = request.into_inner();
        async {
            let account_id = required("account_id", &req.account_id)?;
            let model_id = required("model_id", &req.model_id)?;
            if req.idempotency_key.len() > 256 {
                return Err(RegistryError::bad_request(
                    "idempotency_key must be at most 256 bytes",
                ));
            }
            if req.fingerprint.len() > 128 {
                return Err(RegistryError::bad_request(
                    "fingerprint must be at most 128 bytes",
                ));
            }
            let key = Some(req.idempotency_key.as_str()).filter(|k| !k.is_empty());
            let fingerprint = Some(req.fingerprint.as_str()).filter(|f| !f.is_empty());
            let charge = match pb::Charge::try_from(req.charge) {
                Ok(pb::Charge::Prediction) => Charge::Prediction,
                Ok(pb::Charge::Proof) => Charge::Proof,
                Err(_) => return Err(RegistryError::bad_request("unknown charge")),
            };
            self.ledger.check_chargeable(model_id, charge).await?;
            let units = req.units.max(1);
            RegistryService::reserve(self, account_id, model_id, charge, units, key, fingerprint)
                .await
        }
        .await
        .map(|r| Response::new(reservation_pb(r)))
        .map_err(|e| status("reserve", e))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::Receipt>, Status> {
        let req = request.into_inner();
        async {
            let id = required("reservation_id", &req.reservation_id)?;
            let response =
                Some(req.response).filter(|r| !r.is_empty() && r.len() <= MAX_KEPT_RESPONSE);
            self.store.commit_with(id, response).await
        }
        .await
        .map(|r| Response::new(receipt_pb(r)))
        .map_err(|e| status("commit", e))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let req = request.into_inner();
        async {
            let id = required("reservation_id", &req.reservation_id)?;
            self.store.release(id).await
        }
        .await
        .map(|r| {
            Response::new(pb::ReleaseResponse {
                state: match r.state {
                    ReservationState::Committed => "committed",
                    _ => "released",
                }
                .to_owned(),
            })
        })
        .map_err(|e| status("release", e))
    }

    async fn get_ledger(
        &self,
        _request: Request<pb::GetLedgerRequest>,
    ) -> Result<Response<pb::LedgerInfo>, Status> {
        self.ledger
            .status()
            .await
            .map(|s| Response::new(ledger_pb(s)))
            .map_err(|e| status("get_ledger", e))
    }

    async fn settle_now(
        &self,
        _request: Request<pb::SettleNowRequest>,
    ) -> Result<Response<pb::LedgerInfo>, Status> {
        async {
            self.ledger.sync().await?;
            self.ledger.status().await
        }
        .await
        .map(|s| Response::new(ledger_pb(s)))
        .map_err(|e| status("settle_now", e))
    }

    async fn reseal_secrets(
        &self,
        _request: Request<pb::ResealRequest>,
    ) -> Result<Response<ResealReport>, Status> {
        self.reseal()
            .await
            .map(Response::new)
            .map_err(|e| status("reseal_secrets", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service_on(dir: &std::path::Path) -> RegistryService {
        let store = Arc::new(crate::store::RedbStore::open_in(dir, 64 << 20).unwrap());
        RegistryService::new(
            store,
            Kek::new(modelhub_core::crypto::SecretKey::generate()),
        )
    }

    #[tokio::test]
    async fn a_proof_is_charged_once_for_good_while_prediction_keys_expire() {
        let dir = tempfile::tempdir().unwrap();
        let service = service_on(dir.path()).with_policy(Policy {
            idempotency_ttl_secs: 0,
            ..Policy::default()
        });
        let store = service.store.clone();
        let owner = store
            .create_account(crate::conformance::new_account("owner", 0))
            .await
            .unwrap();
        let buyer = store
            .create_account(crate::conformance::new_account("buyer", 10))
            .await
            .unwrap();
        let model = store
            .create_model(Model {
                proof_price: 3,
                ..crate::conformance::new_model(&owner.account_id, 1)
            })
            .await
            .unwrap();
        let reserve = |charge, key: &'static str| {
            let (service, buyer, model) = (
                service.clone(),
                buyer.account_id.clone(),
                model.model_id.clone(),
            );
            async move {
                service
                    .reserve(&buyer, &model, charge, 1, Some(key), Some("fp"))
                    .await
                    .unwrap()
                    .reservation
            }
        };
        let proof = reserve(Charge::Proof, "proof/job_1").await;
        store.commit(&proof.reservation_id).await.unwrap();
        let predicted = reserve(Charge::Prediction, "key-1").await;
        store.commit(&predicted.reservation_id).await.unwrap();
        // Past the keys' time to live (0 s here).
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let again = reserve(Charge::Proof, "proof/job_1").await;
        assert_eq!(
            again.reservation_id, proof.reservation_id,
            "the same charge"
        );
        let new_prediction = reserve(Charge::Prediction, "key-1").await;
        assert_ne!(new_prediction.reservation_id, predicted.reservation_id);
        // 10 − 3 (the proof, once) − 1 − 1 (two predictions, the second one held).
        assert_eq!(
            store.get_account(&buyer.account_id).await.unwrap().credits,
            5
        );
    }

    #[tokio::test]
    async fn the_nonce_store_covers_every_date_of_a_new_store_and_none_before_an_upgrade() {
        let nonce = || signing::new_nonce();
        let old = id::unix_now() - 200;
        // A new store has accepted no request: any date in the window is fine.
        let fresh = tempfile::tempdir().unwrap();
        let service = service_on(fresh.path());
        service.start_keeping_nonces().await.unwrap();
        service.use_nonce("mhk_a", &nonce(), old).await.unwrap();

        // A store that has keys but no record of when nonces began (an upgrade from gateways
        // that kept nonces in memory) refuses requests dated before it began keeping them.
        let upgraded = tempfile::tempdir().unwrap();
        let store = crate::store::RedbStore::open_in(upgraded.path(), 64 << 20).unwrap();
        store
            .create_account(Account {
                account_id: "acct_a".into(),
                name: "a".into(),
                admin: false,
                credits: 0,
                earnings: 0,
                created_at: old,
                wallet: None,
                handle: None,
                daily_cap: None,
                charged_today: (0, 0),
                refund_owed: 0,
            })
            .await
            .unwrap();
        store
            .create_key(ApiKey {
                key_id: "mhk_a".into(),
                account_id: "acct_a".into(),
                sealed_secret: vec![1],
                revoked: false,
                created_at: old,
                previous_sealed_secret: None,
                previous_valid_until: 0,
            })
            .await
            .unwrap();
        drop(store);
        let service = service_on(upgraded.path());
        service.start_keeping_nonces().await.unwrap();
        let e = service.use_nonce("mhk_a", &nonce(), old).await.unwrap_err();
        assert_eq!(e.code(), modelhub_core::ErrorCode::BadRequest, "{e}");
        service
            .use_nonce("mhk_a", &nonce(), id::unix_now())
            .await
            .unwrap();
        // The record is kept: a restart does not move the line.
        drop(service);
        let service = service_on(upgraded.path());
        let again = service.use_nonce("mhk_a", &nonce(), old).await.unwrap_err();
        assert_eq!(again.code(), modelhub_core::ErrorCode::BadRequest);
    }

    #[test]
    fn names_and_versions_are_checked() {
        validate_name_version("digits.mlp-v_1", "1.0.0+build-2").unwrap();
        assert!(validate_name_version("", "1").is_err());
        assert!(validate_name_version("a b", "1").is_err());
        assert!(validate_name_version("a/b", "1").is_err());
        assert!(validate_name_version(&"a".repeat(129), "1").is_err());
        validate_name_version(&"a".repeat(128), &"1".repeat(64)).unwrap();
        assert!(validate_name_version("a", &"1".repeat(65)).is_err());
        assert!(validate_name_version("a+b", "1").is_err());
        assert!(validate_name_version("a", "").is_err());
    }

    #[test]
    fn model_requests_are_validated() {
        let ok = pb::CreateModelRequest {
            owner: "acct_1".into(),
            name: "m".into(),
            version: "1".into(),
            cid: "bafy".into(),
            sha256: "00".into(),
            ..Default::default()
        };
        let m = model_from_request(ok.clone()).unwrap();
        assert!(m.model_id.starts_with("mdl_"));
        assert_eq!(m.commitment, None);
        for bad in [
            pb::CreateModelRequest {
                cid: String::new(),
                ..ok.clone()
            },
            pb::CreateModelRequest {
                sha256: String::new(),
                ..ok.clone()
            },
            pb::CreateModelRequest {
                digest: Some("ab".repeat(31)),
                ..ok.clone()
            },
            pb::CreateModelRequest {
                owner: String::new(),
                ..ok.clone()
            },
            pb::CreateModelRequest {
                model_id: "../x".into(),
                ..ok.clone()
            },
            pb::CreateModelRequest {
                inputs: vec![modelhub_proto::common::v1::TensorSpec {
                    name: "x".into(),
                    datatype: 9999,
                    shape: vec![1],
                }],
                ..ok.clone()
            },
        ] {
            let e = model_from_request(bad).unwrap_err();
            assert_eq!(e.code(), modelhub_core::ErrorCode::BadRequest, "{e}");
        }
    }
}
