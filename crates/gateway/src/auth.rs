//! Verification of `MH-HMAC-SHA256` request signatures (`docs/API.md`, "Request signing").
//!
//! [`Authenticator`] checks, in order: the `authorization` header, the `x-mh-*` headers, that
//! every signed header is present (and `idempotency-key` is signed when sent), that the signed
//! `host` is one this gateway serves, the clock skew, the key and the signature (constant time;
//! an unknown key and a wrong signature give the same answer, so key ids can't be probed),
//! whether the key is revoked (said only to whoever holds its secret), and last spends the
//! nonce in the shared [`NonceStore`], atomically, so a nonce is spent only by a request whose
//! signature verified. All of it happens before a body is read: the routes check the body
//! against the signed hash afterwards. Every rejection is a 401 `unauthenticated` whose message
//! names the check that failed, never an expected value.
//!
//! Keys come from a [`KeySource`]: [`RegistryKeys`] asks the registry and caches answers, known
//! and unknown keys alike, for a few seconds. Nonces go to the registry's nonce store
//! ([`RegistryNonces`]), shared by every gateway and kept across restarts.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroize;

use actix_web::HttpRequest;
use async_trait::async_trait;
use modelhub_core::signing::{
    self, Authorization, HEADER_CONTENT_SHA256, HEADER_DATE, HEADER_NONCE, MAX_CLOCK_SKEW_SECS,
    RequestParts,
};
use modelhub_core::{ApiError, ErrorCode};
use modelhub_proto::registry::v1 as pb;
use modelhub_proto::registry::v1::registry_client::RegistryClient;
use tonic::transport::Channel;

use crate::rates::RateLimits;

/// How long a key looked up in the registry is trusted before it is asked again.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(5);
/// How long a nonce is remembered: the whole window in which its date is acceptable, plus slack.
pub const NONCE_TTL: Duration = Duration::from_secs(2 * MAX_CLOCK_SKEW_SECS as u64 + 60);
/// Longest accepted key id (ids are short; this only bounds what an attacker can make us cache).
const MAX_KEY_ID_LEN: usize = 128;
/// The one answer for an unknown key and a wrong signature.
pub const BAD_CREDENTIALS: &str = "unknown key or signature does not match";
/// The HMAC key checked for unknown key ids, so they cost the same as known ones.
const DECOY_SECRET: [u8; 32] = [0x5a; 32];

/// What the gateway knows about an API key.
#[derive(Clone)]
pub struct KeyInfo {
    pub key_id: String,
    pub account_id: String,
    /// The raw secret bytes (the HMAC key).
    pub secret: Vec<u8>,
    pub admin: bool,
    pub revoked: bool,
    /// After a rotation, the previous secret and until when (Unix seconds) it is accepted.
    pub previous: Option<(Vec<u8>, i64)>,
}

impl KeyInfo {
    /// Whether `signature` signs `string_to_sign` with the secret, or with the previous secret
    /// while it is still accepted (`now`, Unix seconds).
    fn signs(&self, string_to_sign: &str, signature: &str, now: i64) -> bool {
        signing::verify_signature(&self.secret, string_to_sign, signature)
            || self.previous.as_ref().is_some_and(|(previous, until)| {
                now < *until && signing::verify_signature(previous, string_to_sign, signature)
            })
    }
}

/// The secrets are zeroized when a copy of the key is dropped (the cache's on eviction, each
/// request's when it is done).
impl Drop for KeyInfo {
    fn drop(&mut self) {
        self.secret.zeroize();
        if let Some((previous, _)) = &mut self.previous {
            previous.zeroize();
        }
    }
}

impl fmt::Debug for KeyInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyInfo")
            .field("key_id", &self.key_id)
            .field("account_id", &self.account_id)
            .field("secret", &"<redacted>")
            .field("admin", &self.admin)
            .field("revoked", &self.revoked)
            .field(
                "previous_until",
                &self.previous.as_ref().map(|(_, until)| until),
            )
            .finish()
    }
}

impl From<pb::KeyInfo> for KeyInfo {
    fn from(k: pb::KeyInfo) -> Self {
        KeyInfo {
            key_id: k.key_id,
            account_id: k.account_id,
            secret: k.secret,
            admin: k.admin,
            revoked: k.revoked,
            previous: (!k.previous_secret.is_empty())
                .then_some((k.previous_secret, k.previous_valid_until)),
        }
    }
}

/// Where keys are resolved: `Ok(None)` for an unknown key; a backing service failure keeps its
/// own code (503 when the registry can't be reached).
#[async_trait]
pub trait KeySource: Send + Sync {
    async fn lookup(&self, key_id: &str) -> Result<Option<KeyInfo>, ApiError>;

    /// Forgets anything cached about `key_id` (called after a revoke).
    async fn invalidate(&self, _key_id: &str) {}
}

/// The key cache shared by every worker of one gateway; unknown keys are cached too (`None`),
/// so a flood of made-up key ids costs one registry call per id and TTL.
#[derive(Clone)]
pub struct KeyCache(moka::future::Cache<String, Option<KeyInfo>>);

impl KeyCache {
    pub fn new() -> KeyCache {
        KeyCache(
            moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(KEY_CACHE_TTL)
                .build(),
        )
    }
}

impl Default for KeyCache {
    fn default() -> Self {
        KeyCache::new()
    }
}

/// Keys from the registry's `LookupKey`, cached for [`KEY_CACHE_TTL`] (concurrent lookups of one
/// key share one call). A revoke made through this gateway takes effect at once; one made
/// elsewhere within the TTL.
pub struct RegistryKeys {
    client: RegistryClient<Channel>,
    cache: KeyCache,
}

impl RegistryKeys {
    pub fn new(client: RegistryClient<Channel>, cache: KeyCache) -> RegistryKeys {
        RegistryKeys { client, cache }
    }
}

#[async_trait]
impl KeySource for RegistryKeys {
    async fn lookup(&self, key_id: &str) -> Result<Option<KeyInfo>, ApiError> {
        let fetch = async {
            let mut client = self.client.clone();
            let request = pb::LookupKeyRequest {
                key_id: key_id.to_owned(),
            };
            match client.lookup_key(request).await {
                Ok(answer) => Ok(Some(KeyInfo::from(answer.into_inner()))),
                Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
                Err(status) => {
                    tracing::warn!(grpc_code = ?status.code(), grpc_message = status.message(), "registry LookupKey failed");
                    Err(ApiError::from_status(&status))
                }
            }
        };
        self.cache
            .0
            .try_get_with(key_id.to_owned(), fetch)
            .await
            .map_err(|e: Arc<ApiError>| (*e).clone())
    }

    async fn invalidate(&self, key_id: &str) {
        self.cache.0.invalidate(key_id).await;
    }
}

/// Where request nonces are spent. `spend` fails with a 401 when the nonce was used before
/// (or the request is dated before the window the store covers), and keeps the store's code
/// otherwise (429 when the key spent too many, 503 when the store is unreachable).
#[async_trait]
pub trait NonceStore: Send + Sync {
    async fn spend(&self, key_id: &str, nonce: &str, date: i64) -> Result<(), ApiError>;
}

/// Nonces in the registry's store (`UseNonce`): shared by every gateway, kept across restarts.
pub struct RegistryNonces {
    client: RegistryClient<Channel>,
}

impl RegistryNonces {
    pub fn new(client: RegistryClient<Channel>) -> RegistryNonces {
        RegistryNonces { client }
    }
}

#[async_trait]
impl NonceStore for RegistryNonces {
    async fn spend(&self, key_id: &str, nonce: &str, date: i64) -> Result<(), ApiError> {
        let request = pb::UseNonceRequest {
            key_id: key_id.to_owned(),
            nonce: nonce.to_owned(),
            date,
        };
        match self.client.clone().use_nonce(request).await {
            Ok(_) => Ok(()),
            Err(status) => {
                let e = ApiError::from_status(&status);
                Err(match e.code {
                    ErrorCode::Conflict => unauthenticated("nonce was already used"),
                    ErrorCode::BadRequest => unauthenticated(e.message),
                    _ => e,
                })
            }
        }
    }
}

/// Nonces seen per key in this process only: for unit tests of the code around the
/// [`NonceStore`]. A gateway uses [`RegistryNonces`].
#[derive(Clone)]
pub struct NonceCache(moka::future::Cache<(String, String), ()>);

impl NonceCache {
    /// Unbounded in count on purpose: evicting a nonce before [`NONCE_TTL`] would let its
    /// request be replayed. Only requests with a verified signature add entries.
    pub fn new() -> NonceCache {
        NonceCache(
            moka::future::Cache::builder()
                .time_to_live(NONCE_TTL)
                .build(),
        )
    }

    /// Records the nonce; `false` when it was already there. Atomic: of two concurrent calls
    /// with the same key and nonce, exactly one gets `true`. (`or_insert_with`, which moka
    /// coalesces per key; its `or_insert` is a get then an insert, and let two calls through.)
    async fn record(&self, key_id: &str, nonce: &str) -> bool {
        self.0
            .entry((key_id.to_owned(), nonce.to_owned()))
            .or_insert_with(async {})
            .await
            .is_fresh()
    }
}

impl Default for NonceCache {
    fn default() -> Self {
        NonceCache::new()
    }
}

#[async_trait]
impl NonceStore for NonceCache {
    async fn spend(&self, key_id: &str, nonce: &str, _date: i64) -> Result<(), ApiError> {
        if self.record(key_id, nonce).await {
            Ok(())
        } else {
            Err(unauthenticated("nonce was already used"))
        }
    }
}

/// Who made a verified request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub key_id: String,
    pub account_id: String,
    pub admin: bool,
}

impl Caller {
    /// 403 unless the key is an admin key.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.admin {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::Forbidden,
                "this route needs an admin key",
            ))
        }
    }
}

/// A request whose headers verified; its body is still to be checked against `content_sha256`.
#[derive(Debug)]
pub struct HeadersVerified {
    pub caller: Caller,
    /// The body hash the signature covers (64 lowercase hex characters).
    pub content_sha256: String,
}

fn unauthenticated(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Unauthenticated, message)
}

/// Verifies signed requests.
#[derive(Clone)]
pub struct Authenticator {
    keys: Arc<dyn KeySource>,
    nonces: Arc<dyn NonceStore>,
    /// The `host` values (lowercase) a request may be signed for; `None` accepts any.
    allowed_hosts: Option<Arc<std::collections::HashSet<String>>>,
    /// Requests per second per key and per account, checked before the nonce is spent.
    rates: Option<Arc<RateLimits>>,
}

/// Everything read from the request before the key is known.
struct Claims {
    auth: Authorization,
    date: i64,
    nonce: String,
    content_sha256: String,
    string_to_sign: String,
}

impl Authenticator {
    pub fn new(keys: Arc<dyn KeySource>, nonces: Arc<dyn NonceStore>) -> Authenticator {
        Authenticator {
            keys,
            nonces,
            allowed_hosts: None,
            rates: None,
        }
    }

    /// Refuses (429) requests of a key or account over its rate, before spending the nonce.
    pub fn with_rates(self, rates: Arc<RateLimits>) -> Authenticator {
        Authenticator {
            rates: Some(rates),
            ..self
        }
    }

    /// Accepts only requests signed for one of `hosts` (`name:port` as clients send it in the
    /// `host` header; compared case-insensitively).
    pub fn with_allowed_hosts(self, hosts: impl IntoIterator<Item = String>) -> Authenticator {
        let hosts = hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect();
        Authenticator {
            allowed_hosts: Some(Arc::new(hosts)),
            ..self
        }
    }

    pub fn keys(&self) -> &dyn KeySource {
        self.keys.as_ref()
    }

    /// Verifies a request whose whole body is at hand.
    pub async fn verify(&self, req: &HttpRequest, body: &[u8]) -> Result<Caller, ApiError> {
        let claims = self.claims(req)?;
        if signing::sha256_hex(body) != claims.content_sha256 {
            return Err(unauthenticated("body does not match x-mh-content-sha256"));
        }
        self.verify_claims(claims).await
    }

    /// Verifies everything but the body, for a body that is streamed: the caller hashes it as
    /// it goes and must reject the request (401) when it differs from `content_sha256`.
    pub async fn verify_headers(&self, req: &HttpRequest) -> Result<HeadersVerified, ApiError> {
        let claims = self.claims(req)?;
        let content_sha256 = claims.content_sha256.clone();
        let caller = self.verify_claims(claims).await?;
        Ok(HeadersVerified {
            caller,
            content_sha256,
        })
    }

    async fn verify_claims(&self, claims: Claims) -> Result<Caller, ApiError> {
        let key = self.keys.lookup(&claims.auth.key_id).await?;
        let valid = match &key {
            Some(k) => k.signs(
                &claims.string_to_sign,
                &claims.auth.signature,
                modelhub_core::id::unix_now(),
            ),
            None => signing::verify_signature(
                &DECOY_SECRET,
                &claims.string_to_sign,
                &claims.auth.signature,
            ),
        };
        let key = match key {
            Some(key) if valid => key,
            _ => return Err(unauthenticated(BAD_CREDENTIALS)),
        };
        // Only whoever holds the secret learns that the key was revoked.
        if key.revoked {
            return Err(unauthenticated("key is revoked"));
        }
        // Before the nonce: a key over its rate cannot make the registry keep more nonces.
        if let Some(rates) = &self.rates {
            rates
                .check(&key.key_id, &key.account_id)
                .map_err(|over| over.error())?;
        }
        self.nonces
            .spend(&key.key_id, &claims.nonce, claims.date)
            .await?;
        Ok(Caller {
            key_id: key.key_id.clone(),
            account_id: key.account_id.clone(),
            admin: key.admin,
        })
    }
}

/// The one value of a header, trimmed; `None` when absent, an error when repeated or not text.
fn header<'r>(req: &'r HttpRequest, name: &str) -> Result<Option<&'r str>, ApiError> {
    let mut values = req.headers().get_all(name);
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(unauthenticated(format!("header {name} is repeated")));
    }
    first
        .to_str()
        .map(|v| Some(v.trim()))
        .map_err(|_| unauthenticated(format!("header {name} is not printable ASCII")))
}

fn required<'r>(req: &'r HttpRequest, name: &str) -> Result<&'r str, ApiError> {
    header(req, name)?.ok_or_else(|| unauthenticated(format!("missing {name} header")))
}

impl Authenticator {
    /// Reads and checks everything that needs no key.
    fn claims(&self, req: &HttpRequest) -> Result<Claims, ApiError> {
        let claims = claims(req)?;
        if req.headers().contains_key(IDEMPOTENCY_KEY)
            && !claims
                .auth
                .signed_headers
                .iter()
                .any(|h| h == IDEMPOTENCY_KEY)
        {
            return Err(unauthenticated(
                "idempotency-key must be one of the SignedHeaders when it is sent",
            ));
        }
        if let Some(allowed) = &self.allowed_hosts {
            let host = required(req, "host")?.to_ascii_lowercase();
            if !allowed.contains(&host) {
                return Err(unauthenticated(
                    "the signed host is not one this gateway serves",
                ));
            }
        }
        Ok(claims)
    }
}

/// The `idempotency-key` request header (`docs/API.md`): signed whenever it is sent.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

fn claims(req: &HttpRequest) -> Result<Claims, ApiError> {
    let auth = Authorization::parse(required(req, "authorization")?).map_err(unauthenticated)?;
    if auth.key_id.len() > MAX_KEY_ID_LEN {
        return Err(unauthenticated("Credential is too long"));
    }
    let date = required(req, HEADER_DATE)?;
    let nonce = required(req, HEADER_NONCE)?;
    let content_sha256 = required(req, HEADER_CONTENT_SHA256)?;
    let date_secs: i64 = date
        .parse()
        .map_err(|_| unauthenticated("malformed x-mh-date (must be Unix seconds)"))?;
    if !signing::is_valid_nonce(nonce) {
        return Err(unauthenticated(
            "malformed x-mh-nonce (must be 16 to 64 characters of [A-Za-z0-9_-])",
        ));
    }
    let is_hex = content_sha256.len() == 64
        && content_sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !is_hex {
        return Err(unauthenticated(
            "malformed x-mh-content-sha256 (must be 64 lowercase hex characters)",
        ));
    }
    let mut headers = Vec::with_capacity(auth.signed_headers.len());
    for name in &auth.signed_headers {
        let value = header(req, name)?.ok_or_else(|| {
            unauthenticated(format!("signed header {name} is missing from the request"))
        })?;
        headers.push((name.clone(), value.to_owned()));
    }
    let now = modelhub_core::id::unix_now();
    if now.abs_diff(date_secs) > MAX_CLOCK_SKEW_SECS as u64 {
        return Err(unauthenticated(format!(
            "x-mh-date is more than {MAX_CLOCK_SKEW_SECS} s from the server clock"
        )));
    }
    let parts = RequestParts {
        method: req.method().as_str(),
        path: req.uri().path(),
        query: req.uri().query().unwrap_or(""),
        headers,
        content_sha256,
    };
    let string_to_sign = parts.string_to_sign(date, nonce);
    Ok(Claims {
        date: date_secs,
        nonce: nonce.to_owned(),
        content_sha256: content_sha256.to_owned(),
        string_to_sign,
        auth,
    })
}

/// A fixed set of keys, for unit tests of the code around the [`KeySource`].
#[cfg(test)]
pub(crate) struct FixedKeys(pub std::collections::HashMap<String, KeyInfo>);

#[cfg(test)]
#[async_trait]
impl KeySource for FixedKeys {
    async fn lookup(&self, key_id: &str) -> Result<Option<KeyInfo>, ApiError> {
        Ok(self.0.get(key_id).cloned())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use actix_web::http::StatusCode;
    use actix_web::{App, HttpResponse, test, web};
    use modelhub_core::signing::{sha256_hex, sign};

    use super::*;

    pub const USER_KEY: &str = "mhk_user";
    pub const ADMIN_KEY: &str = "mhk_admin";
    pub const REVOKED_KEY: &str = "mhk_revoked";
    pub const USER_ACCOUNT: &str = "acct_user";
    pub const ADMIN_ACCOUNT: &str = "acct_admin";
    pub const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    pub const HOST: &str = "gw.test";

    pub fn fixed_keys() -> Arc<dyn KeySource> {
        let key = |key_id: &str, account_id: &str, admin, revoked| {
            (
                key_id.to_owned(),
                KeyInfo {
                    key_id: key_id.into(),
                    account_id: account_id.into(),
                    secret: SECRET.to_vec(),
                    admin,
                    revoked,
                    previous: None,
                },
            )
        };
        Arc::new(FixedKeys(HashMap::from([
            key(USER_KEY, USER_ACCOUNT, false, false),
            key(ADMIN_KEY, ADMIN_ACCOUNT, true, false),
            key(REVOKED_KEY, USER_ACCOUNT, false, true),
        ])))
    }

    /// A request to sign; fields can be changed to break one thing at a time.
    pub struct Signer {
        pub key_id: String,
        pub method: &'static str,
        pub path: String,
        pub query: String,
        pub body: Vec<u8>,
        pub date: i64,
        pub nonce: String,
    }

    impl Signer {
        pub fn new(key_id: &str, method: &'static str, path_and_query: &str, body: &[u8]) -> Self {
            let (path, query) = path_and_query
                .split_once('?')
                .unwrap_or((path_and_query, ""));
            Signer {
                key_id: key_id.into(),
                method,
                path: path.into(),
                query: query.into(),
                body: body.to_vec(),
                date: modelhub_core::id::unix_now(),
                nonce: signing::new_nonce(),
            }
        }

        /// The signed headers `(name, value)`, `host` included.
        pub fn headers(&self) -> Vec<(String, String)> {
            let mut out: Vec<(String, String)> = sign(
                &self.key_id,
                SECRET,
                self.method,
                &self.path,
                &self.query,
                HOST,
                &sha256_hex(&self.body),
                self.date,
                &self.nonce,
            )
            .into_iter()
            .map(|(n, v)| (n.to_owned(), v))
            .collect();
            out.push(("host".into(), HOST.into()));
            out
        }

        pub fn uri(&self) -> String {
            if self.query.is_empty() {
                self.path.clone()
            } else {
                format!("{}?{}", self.path, self.query)
            }
        }

        /// A test request with these headers (after `edit`) and body.
        pub fn request_with(
            &self,
            edit: impl FnOnce(&mut Vec<(String, String)>),
        ) -> test::TestRequest {
            let mut headers = self.headers();
            edit(&mut headers);
            let method = actix_web::http::Method::from_bytes(self.method.as_bytes()).unwrap();
            let mut req = test::TestRequest::default()
                .method(method)
                .uri(&self.uri())
                .set_payload(self.body.clone());
            for (n, v) in headers {
                req = req.append_header((n, v));
            }
            req
        }

        pub fn request(&self) -> test::TestRequest {
            self.request_with(|_| {})
        }
    }

    async fn echo(
        req: HttpRequest,
        body: web::Bytes,
        auth: web::Data<Authenticator>,
    ) -> Result<HttpResponse, crate::error::GatewayError> {
        let caller = auth.verify(&req, &body).await?;
        Ok(HttpResponse::Ok().json(serde_json::json!({
            "account_id": caller.account_id,
            "admin": caller.admin,
        })))
    }

    /// Sends `req` to a route guarded by the authenticator; returns status and JSON body.
    async fn send(auth: &Authenticator, req: test::TestRequest) -> (StatusCode, serde_json::Value) {
        let app = test::init_service(
            App::new()
                .app_data(web::Data::new(auth.clone()))
                .default_service(web::to(echo)),
        )
        .await;
        let res = test::call_service(&app, req.to_request()).await;
        let status = res.status();
        let body: serde_json::Value = test::read_body_json(res).await;
        (status, body)
    }

    fn authenticator() -> Authenticator {
        Authenticator::new(fixed_keys(), Arc::new(NonceCache::new()))
    }

    /// Asserts a 401 `unauthenticated` whose message contains `want`.
    async fn rejected(auth: &Authenticator, req: test::TestRequest, want: &str) {
        let (status, body) = send(auth, req).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["error"]["code"], "unauthenticated", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(want), "{message:?} should say {want:?}");
    }

    fn remove(name: &'static str) -> impl FnOnce(&mut Vec<(String, String)>) {
        move |h| h.retain(|(n, _)| n != name)
    }

    fn replace(name: &'static str, value: String) -> impl FnOnce(&mut Vec<(String, String)>) {
        move |h| {
            for (n, v) in h.iter_mut() {
                if n == name {
                    *v = value.clone();
                }
            }
        }
    }

    #[actix_web::test]
    async fn a_valid_request_with_a_query_string_passes() {
        let auth = authenticator();
        let s = Signer::new(
            USER_KEY,
            "POST",
            "/v1/models?version=1.0&name=digits+mlp&price=3&flag",
            b"{\"x\":1}",
        );
        let (status, body) = send(&auth, s.request()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["account_id"], USER_ACCOUNT);
        assert_eq!(body["admin"], false);

        // an admin key is reported as such, and an empty body hashes as the empty string
        let s = Signer::new(ADMIN_KEY, "GET", "/v1/account", b"");
        let (status, body) = send(&auth, s.request()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["admin"], true);
    }

    #[actix_web::test]
    async fn missing_or_malformed_authorization_is_rejected() {
        let auth = authenticator();
        let s = Signer::new(USER_KEY, "GET", "/v1/account", b"");
        rejected(
            &auth,
            s.request_with(remove("authorization")),
            "missing authorization",
        )
        .await;
        rejected(
            &auth,
            s.request_with(replace("authorization", "Bearer abc".into())),
            "MH-HMAC-SHA256",
        )
        .await;
        let sig = "0".repeat(64);
        rejected(
            &auth,
            s.request_with(replace(
                "authorization",
                format!("MH-HMAC-SHA256 Credential={USER_KEY}, SignedHeaders=host;x-mh-date;x-mh-nonce, Signature={sig}"),
            )),
            "SignedHeaders must include x-mh-content-sha256",
        )
        .await;
    }

    #[actix_web::test]
    async fn each_missing_x_mh_header_is_named() {
        let auth = authenticator();
        let s = Signer::new(USER_KEY, "GET", "/v1/account", b"");
        for name in [HEADER_DATE, HEADER_NONCE, HEADER_CONTENT_SHA256] {
            rejected(
                &auth,
                s.request_with(remove(name)),
                &format!("missing {name}"),
            )
            .await;
        }
    }

    #[actix_web::test]
    async fn a_signed_header_absent_from_the_request_is_rejected() {
        let auth = authenticator();
        let s = Signer::new(USER_KEY, "GET", "/v1/account", b"");
        rejected(
            &auth,
            s.request_with(remove("host")),
            "signed header host is missing",
        )
        .await;
        // an extra signed header that the request lacks
        let s = Signer::new(USER_KEY, "GET", "/v1/account", b"");
        let auth_header = s
            .headers()
            .into_iter()
            .find(|(n, _)| n == "authorization")
            .unwrap()
            .1
            .replace("x-mh-nonce", "x-mh-nonce;x-other");
        rejected(
            &auth,
            s.request_with(replace("authorization", auth_header)),
            "signed header x-other is missing",
        )
        .await;
    }

    #[actix_web::test]
    async fn after_a_rotation_both_secrets_sign_until_the_grace_period_ends() {
        use modelhub_core::signing::signature;
        let old = b"old secret old secret old secret".to_vec();
        let key = KeyInfo {
            key_id: USER_KEY.into(),
            account_id: USER_ACCOUNT.into(),
            secret: SECRET.to_vec(),
            admin: false,
            revoked: false,
            previous: Some((old.clone(), 1_000)),
        };
        let text = "string to sign";
        let by_new = signature(SECRET, text);
        let by_old = signature(&old, text);
        assert!(key.signs(text, &by_new, 999));
        assert!(key.signs(text, &by_old, 999));
        assert!(!key.signs(text, &by_old, 1_000), "the grace period is over");
        assert!(key.signs(text, &by_new, 5_000));
        assert!(!key.signs(text, &signature(b"another", text), 999));
    }

    #[actix_web::test]
    async fn unknown_and_revoked_keys_are_rejected() {
        let auth = authenticator();
        let s = Signer::new("mhk_nobody", "GET", "/v1/account", b"");
        let (_, unknown) = send(&auth, s.request()).await;
        rejected(&auth, s.request(), BAD_CREDENTIALS).await;
        let s = Signer::new(REVOKED_KEY, "GET", "/v1/account", b"");
        rejected(&auth, s.request(), "key is revoked").await;
        // An unknown key and a wrong signature answer alike: key ids can't be probed.
        let mut forged = Signer::new(USER_KEY, "GET", "/v1/account", b"");
        forged.path = "/v1/other".into();
        let (_, wrong) = send(&auth, forged.request().uri("/v1/account")).await;
        assert_eq!(unknown, wrong);
        // A revoked key is named only to whoever signs with its secret.
        let mut forged = Signer::new(REVOKED_KEY, "GET", "/v1/account", b"");
        forged.path = "/v1/other".into();
        let (_, revoked_forged) = send(&auth, forged.request().uri("/v1/account")).await;
        assert_eq!(revoked_forged, wrong);
    }

    #[actix_web::test]
    async fn an_idempotency_key_must_be_signed() {
        let auth = authenticator();
        let s = Signer::new(USER_KEY, "POST", "/v1/models/m/predict", b"{}");
        rejected(
            &auth,
            s.request_with(|h| h.push((IDEMPOTENCY_KEY.into(), "retry-1".into()))),
            "idempotency-key must be one of the SignedHeaders",
        )
        .await;
    }

    #[actix_web::test]
    async fn only_allowed_hosts_are_served() {
        let auth = authenticator().with_allowed_hosts([HOST.to_uppercase()]);
        let s = Signer::new(USER_KEY, "GET", "/v1/account", b"");
        assert_eq!(send(&auth, s.request()).await.0, StatusCode::OK);
        let auth = authenticator().with_allowed_hosts(["gw.example:443".to_owned()]);
        let s = Signer::new(USER_KEY, "GET", "/v1/account", b"");
        rejected(
            &auth,
            s.request(),
            "the signed host is not one this gateway serves",
        )
        .await;
    }

    #[actix_web::test]
    async fn a_date_outside_the_window_is_rejected() {
        let auth = authenticator();
        for offset in [-(MAX_CLOCK_SKEW_SECS + 5), MAX_CLOCK_SKEW_SECS + 5] {
            let mut s = Signer::new(USER_KEY, "GET", "/v1/account", b"");
            s.date += offset;
            rejected(&auth, s.request(), "x-mh-date is more than 300 s").await;
        }
        // just inside the window passes
        let mut s = Signer::new(USER_KEY, "GET", "/v1/account", b"");
        s.date -= MAX_CLOCK_SKEW_SECS - 5;
        assert_eq!(send(&auth, s.request()).await.0, StatusCode::OK);
        // not a number at all
        let s = Signer::new(USER_KEY, "GET", "/v1/account", b"");
        rejected(
            &auth,
            s.request_with(replace(HEADER_DATE, "yesterday".into())),
            "malformed x-mh-date",
        )
        .await;
        rejected(
            &auth,
            s.request_with(replace(HEADER_DATE, i64::MIN.to_string())),
            "x-mh-date is more than",
        )
        .await;
    }

    #[actix_web::test]
    async fn a_malformed_nonce_is_rejected() {
        let auth = authenticator();
        for nonce in ["short", "has spaces in it, too many", &"a".repeat(65)] {
            let mut s = Signer::new(USER_KEY, "GET", "/v1/account", b"");
            s.nonce = nonce.into();
            rejected(&auth, s.request(), "malformed x-mh-nonce").await;
        }
    }

    #[actix_web::test]
    async fn a_replayed_nonce_is_rejected_and_a_failed_request_does_not_spend_it() {
        let auth = authenticator();
        let s = Signer::new(USER_KEY, "GET", "/v1/account", b"");
        // a request with a bad signature and this nonce does not burn it
        let mut forged = Signer::new(USER_KEY, "GET", "/v1/account", b"");
        forged.nonce = s.nonce.clone();
        forged.path = "/v1/other".into();
        let req = forged.request_with(|_| {});
        let req = req.uri("/v1/account");
        rejected(&auth, req, "signature does not match").await;

        assert_eq!(send(&auth, s.request()).await.0, StatusCode::OK);
        rejected(&auth, s.request(), "nonce was already used").await;

        // the same nonce under another key is a different nonce
        let mut other = Signer::new(ADMIN_KEY, "GET", "/v1/account", b"");
        other.nonce = s.nonce.clone();
        assert_eq!(send(&auth, other.request()).await.0, StatusCode::OK);
    }

    #[actix_web::test]
    async fn concurrent_requests_with_one_nonce_pass_once() {
        let auth = authenticator();
        let s = Signer::new(USER_KEY, "GET", "/v1/account", b"");
        let results = futures::future::join_all((0..16).map(|_| {
            let auth = auth.clone();
            let req = s.request();
            async move { send(&auth, req).await.0 }
        }))
        .await;
        let ok = results.iter().filter(|s| **s == StatusCode::OK).count();
        assert_eq!(ok, 1, "{results:?}");
        assert!(
            results
                .iter()
                .all(|s| *s == StatusCode::OK || *s == StatusCode::UNAUTHORIZED)
        );

        // and directly on the cache, across threads
        let nonces = NonceCache::new();
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let nonces = nonces.clone();
                std::thread::spawn(move || {
                    futures::executor::block_on(nonces.record("k", "nonce-0123456789abc"))
                })
            })
            .collect();
        let fresh = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|f| *f)
            .count();
        assert_eq!(fresh, 1);
    }

    #[actix_web::test]
    async fn a_body_that_differs_from_its_hash_is_rejected() {
        let auth = authenticator();
        let s = Signer::new(USER_KEY, "POST", "/v1/accounts", b"{\"name\":\"a\"}");
        let req = s.request().set_payload("{\"name\":\"b\"}");
        rejected(&auth, req, "body does not match x-mh-content-sha256").await;
        rejected(
            &auth,
            s.request_with(replace(HEADER_CONTENT_SHA256, "ABC".into())),
            "malformed x-mh-content-sha256",
        )
        .await;
    }

    #[actix_web::test]
    async fn a_wrong_signature_is_rejected() {
        let auth = authenticator();
        // signed for another path
        let mut s = Signer::new(USER_KEY, "GET", "/v1/models", b"");
        s.path = "/v1/account".into();
        let req = s.request().uri("/v1/models");
        rejected(&auth, req, "signature does not match").await;
        // signed for another query
        let s = Signer::new(USER_KEY, "POST", "/v1/models?price=1", b"");
        let req = s.request().uri("/v1/models?price=1000");
        rejected(&auth, req, "signature does not match").await;
        // another method
        let s = Signer::new(USER_KEY, "POST", "/v1/account", b"");
        let req = s.request().method(actix_web::http::Method::GET);
        rejected(&auth, req, "signature does not match").await;
        // another host
        let s = Signer::new(USER_KEY, "GET", "/v1/account", b"");
        rejected(
            &auth,
            s.request_with(replace("host", "evil.test".into())),
            "signature does not match",
        )
        .await;
        // tampered signature hex
        let s = Signer::new(USER_KEY, "GET", "/v1/account", b"");
        let good = s
            .headers()
            .into_iter()
            .find(|(n, _)| n == "authorization")
            .unwrap()
            .1;
        let bad = format!("{}{}", &good[..good.len() - 64], "f".repeat(64));
        rejected(
            &auth,
            s.request_with(replace("authorization", bad)),
            "signature does not match",
        )
        .await;
    }

    #[actix_web::test]
    async fn messages_never_contain_the_expected_values() {
        let auth = authenticator();
        let mut s = Signer::new(USER_KEY, "GET", "/v1/models", b"");
        s.path = "/v1/account".into();
        let expected_sig = s
            .headers()
            .into_iter()
            .find(|(n, _)| n == "authorization")
            .unwrap()
            .1;
        let real = Signer {
            path: "/v1/models".into(),
            ..Signer::new(USER_KEY, "GET", "/v1/models", b"")
        };
        let real_auth = real
            .headers()
            .into_iter()
            .find(|(n, _)| n == "authorization")
            .unwrap()
            .1;
        let (_, body) = send(&auth, s.request().uri("/v1/models")).await;
        let text = body.to_string();
        assert!(!text.contains(&expected_sig[expected_sig.len() - 64..]));
        assert!(!text.contains(&real_auth[real_auth.len() - 64..]));
        let (_, body) = send(&auth, s.request().set_payload("x")).await;
        assert!(!body.to_string().contains(&sha256_hex(b"x")));
        assert!(!body.to_string().contains(&sha256_hex(b"")));
    }

    #[actix_web::test]
    async fn the_path_is_verified_as_sent_percent_encoded() {
        let auth = authenticator();
        let s = Signer::new(USER_KEY, "GET", "/v1/models/mdl%5Fa%20b", b"");
        assert_eq!(send(&auth, s.request()).await.0, StatusCode::OK);
        // the decoded form is a different path
        let mut s = Signer::new(USER_KEY, "GET", "/v1/models/mdl_a%20b", b"");
        s.path = "/v1/models/mdl_a%20b".into();
        let req = s.request().uri("/v1/models/mdl%5Fa%20b");
        rejected(&auth, req, "signature does not match").await;
    }

    #[actix_web::test]
    async fn verify_headers_leaves_the_body_to_the_caller() {
        let auth = authenticator();
        let s = Signer::new(
            USER_KEY,
            "POST",
            "/v1/models?name=a&version=1&price=0",
            b"onnx",
        );
        let req = s.request().set_payload("other").to_http_request();
        let ok = auth.verify_headers(&req).await.unwrap();
        assert_eq!(ok.caller.account_id, USER_ACCOUNT);
        assert_eq!(ok.content_sha256, sha256_hex(b"onnx"));
        // and the nonce is spent
        let again = auth.verify_headers(&req).await.unwrap_err();
        assert_eq!(again.message, "nonce was already used");
    }
}
