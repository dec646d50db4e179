//! A signing HTTP client for the public API, used by the `modelhub` commands and by the tests.
//!
//! It signs with `modelhub_core::signing`, the very code the gateway verifies with.

use std::path::Path;

use anyhow::Context;
use bytes::Bytes;
use futures::Stream;
use modelhub_core::id::unix_now;
use modelhub_core::signing;
use serde::{Deserialize, Serialize};

/// An API key as `modelhub up` writes `admin-key.json` and `modelhub keys create --out` writes
/// user keys: `{"key_id","secret","account_id"}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyFile {
    pub key_id: String,
    pub secret: String,
    pub account_id: String,
}

impl KeyFile {
    pub fn read(path: &Path) -> anyhow::Result<KeyFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading key file {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing key file {}", path.display()))
    }

    /// Writes the key to a new file readable only by its owner.
    pub fn write_new(&self, path: &Path) -> anyhow::Result<()> {
        use std::io::Write;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = modelhub_core::crypto::create_private(path)
            .with_context(|| format!("creating key file {}", path.display()))?;
        f.write_all(serde_json::to_string_pretty(self)?.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        Ok(())
    }

    fn secret_bytes(&self) -> anyhow::Result<Vec<u8>> {
        signing::decode_secret(&self.secret).context("the key file's secret is not base64url")
    }
}

/// An answer of the API: status and JSON body (`null` when there is none).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: serde_json::Value,
    pub retry_after: Option<String>,
}

impl Answer {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The `error.code` of an error answer.
    pub fn error_code(&self) -> Option<&str> {
        self.body["error"]["code"].as_str()
    }

    pub fn error_message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }

    /// The body of a 2xx answer, or an error carrying the API's message.
    pub fn ok(self) -> anyhow::Result<serde_json::Value> {
        if self.is_success() {
            Ok(self.body)
        } else {
            anyhow::bail!(
                "HTTP {}: {} ({})",
                self.status,
                self.error_message(),
                self.error_code().unwrap_or("no error code")
            )
        }
    }
}

/// A request that has been signed but not sent; tests alter its headers to check rejections.
#[derive(Debug, Clone)]
pub struct SignedRequest {
    pub method: reqwest::Method,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl SignedRequest {
    /// Replaces (or with `None` removes) one header.
    pub fn set_header(&mut self, name: &str, value: Option<&str>) {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        if let Some(v) = value {
            self.headers.push((name.to_string(), v.to_string()));
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A client bound to one gateway and one key.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: reqwest::Url,
    key: KeyFile,
}

impl Client {
    pub fn new(base_url: &str, key: KeyFile) -> anyhow::Result<Client> {
        let base = reqwest::Url::parse(base_url)
            .with_context(|| format!("bad gateway URL {base_url:?}"))?;
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .tcp_nodelay(true)
            .build()?;
        Ok(Client { http, base, key })
    }

    pub fn key(&self) -> &KeyFile {
        &self.key
    }

    pub fn base_url(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    /// The same gateway with another key.
    pub fn with_key(&self, key: KeyFile) -> Client {
        Client {
            http: self.http.clone(),
            base: self.base.clone(),
            key,
        }
    }

    /// The `host` value the HTTP client sends for this URL.
    fn host(&self) -> String {
        let host = self.base.host_str().unwrap_or_default();
        match self.base.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        }
    }

    /// Signs a request for `path_and_query` (e.g. `/v1/models?name=a`) whose body hashes to
    /// `content_sha256`.
    pub fn sign(
        &self,
        method: &str,
        path_and_query: &str,
        content_sha256: &str,
    ) -> anyhow::Result<Vec<(String, String)>> {
        self.sign_keyed(method, path_and_query, content_sha256, None)
    }

    /// [`sign`](Self::sign), with an `idempotency-key` that is signed and sent too.
    pub fn sign_keyed(
        &self,
        method: &str,
        path_and_query: &str,
        content_sha256: &str,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<Vec<(String, String)>> {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let extra: Vec<(&str, &str)> = idempotency_key
            .map(|k| (IDEMPOTENCY_KEY, k))
            .into_iter()
            .collect();
        let headers = signing::sign_with(
            &self.key.key_id,
            &self.key.secret_bytes()?,
            method,
            path,
            query,
            &self.host(),
            content_sha256,
            unix_now(),
            &signing::new_nonce(),
            &extra,
        );
        let mut headers: Vec<(String, String)> = headers
            .into_iter()
            .map(|(n, v)| (n.to_string(), v))
            .collect();
        headers.extend(extra.iter().map(|(n, v)| (n.to_string(), v.to_string())));
        Ok(headers)
    }

    /// Builds a signed request with a body held in memory.
    pub fn prepare(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: impl Into<Bytes>,
    ) -> anyhow::Result<SignedRequest> {
        self.prepare_keyed(method, path_and_query, body, None)
    }

    /// [`prepare`](Self::prepare) with a signed `idempotency-key`.
    pub fn prepare_keyed(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: impl Into<Bytes>,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<SignedRequest> {
        let body = body.into();
        let mut headers = self.sign_keyed(
            method.as_str(),
            path_and_query,
            &signing::sha256_hex(&body),
            idempotency_key,
        )?;
        if !body.is_empty() {
            headers.push(("content-type".into(), "application/json".into()));
        }
        Ok(SignedRequest {
            method,
            url: self.url(path_and_query),
            headers,
            body,
        })
    }

    fn url(&self, path_and_query: &str) -> String {
        format!("{}{}", self.base_url(), path_and_query)
    }

    /// Sends a prepared request.
    pub async fn send(&self, req: SignedRequest) -> anyhow::Result<Answer> {
        read_answer(self.request(req).send().await?).await
    }

    /// Sends a prepared request; returns the status and the body's bytes as they came.
    pub async fn send_raw(&self, req: SignedRequest) -> anyhow::Result<(u16, Bytes)> {
        let resp = self.request(req).send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.bytes().await?))
    }

    fn request(&self, req: SignedRequest) -> reqwest::RequestBuilder {
        let mut b = self.http.request(req.method, &req.url).body(req.body);
        for (n, v) in &req.headers {
            b = b.header(n, v);
        }
        b
    }

    /// Signs and sends a request with an optional JSON body.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<Answer> {
        let bytes = match body {
            Some(v) => Bytes::from(serde_json::to_vec(v)?),
            None => Bytes::new(),
        };
        self.send(self.prepare(method, path_and_query, bytes)?)
            .await
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Answer> {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<Answer> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Answer> {
        self.call(reqwest::Method::DELETE, path, None).await
    }

    /// Uploads a model from a byte stream whose SHA-256 is known beforehand: the body is
    /// streamed, never held whole.
    pub async fn upload_stream<S>(
        &self,
        query: &ModelUpload,
        content_sha256: &str,
        body: S,
    ) -> anyhow::Result<Answer>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        let path = query.path_and_query();
        let mut b = self
            .http
            .post(self.url(&path))
            .header("content-type", "application/octet-stream")
            .body(reqwest::Body::wrap_stream(body));
        for (n, v) in self.sign("POST", &path, content_sha256)? {
            b = b.header(n, v);
        }
        read_answer(b.send().await?).await
    }

    /// With the admin's key: creates an account named `name`, grants it `credits` (none when
    /// 0; embedded ledger) and answers a client signing with a new key of it.
    pub async fn new_account(&self, name: &str, credits: u64) -> anyhow::Result<Client> {
        let account = self
            .post("/v1/accounts", &serde_json::json!({ "name": name }))
            .await?
            .ok()?;
        let id = account["account_id"]
            .as_str()
            .context("the new account has no account_id")?;
        if credits > 0 {
            self.post(
                "/v1/credits/grant",
                &serde_json::json!({ "account_id": id, "amount": credits }),
            )
            .await?
            .ok()?;
        }
        let key = self
            .post("/v1/keys", &serde_json::json!({ "account_id": id }))
            .await?
            .ok()?;
        Ok(self.with_key(serde_json::from_value(key)?))
    }

    /// Uploads a model held in memory.
    pub async fn upload(&self, query: &ModelUpload, bytes: Vec<u8>) -> anyhow::Result<Answer> {
        let sha = signing::sha256_hex(&bytes);
        let stream = futures::stream::iter(
            bytes
                .chunks(64 * 1024)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        );
        self.upload_stream(query, &sha, stream).await
    }

    /// `POST /v1/models/{id}/predict` with `{"inputs": inputs}`, safely retried: see
    /// [`predict_body`](Self::predict_body).
    pub async fn predict(
        &self,
        model_id: &str,
        inputs: serde_json::Value,
    ) -> anyhow::Result<Answer> {
        self.predict_body(model_id, &serde_json::json!({ "inputs": inputs }))
            .await
    }

    /// `POST /v1/models/{id}/predict` with `body`, under a fresh idempotency key: a lost
    /// connection, a 503 or a 409 "in progress" is retried (capped exponential backoff with
    /// jitter, each attempt signed anew with the same key), so a charge whose answer was lost
    /// is answered by the retry, and charged once.
    pub async fn predict_body(
        &self,
        model_id: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<Answer> {
        let key = format!("cli-{}", signing::new_nonce());
        let path = format!("/v1/models/{model_id}/predict");
        let bytes = Bytes::from(serde_json::to_vec(body)?);
        self.send_retried(&path, bytes, &key).await
    }

    /// Sends a keyed POST until it gets an answer that is not worth retrying.
    pub async fn send_retried(
        &self,
        path: &str,
        body: Bytes,
        idempotency_key: &str,
    ) -> anyhow::Result<Answer> {
        use backon::{ExponentialBuilder, Retryable};
        let attempt = || async {
            let req = self.prepare_keyed(
                reqwest::Method::POST,
                path,
                body.clone(),
                Some(idempotency_key),
            )?;
            let answer = self.send(req).await?;
            if is_transient(&answer) {
                return Err(Transient(answer).into());
            }
            Ok(answer)
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(std::time::Duration::from_millis(100))
            .with_max_delay(std::time::Duration::from_secs(3))
            .with_max_times(RETRIES)
            .with_jitter();
        let result: anyhow::Result<Answer> = attempt
            .retry(backoff)
            .when(|e: &anyhow::Error| {
                e.is::<Transient>()
                    || e.downcast_ref::<reqwest::Error>()
                        .is_some_and(|e| e.is_connect() || e.is_request() || e.is_timeout())
            })
            .notify(|e, wait| tracing::debug!(error = %e, ?wait, "retrying"))
            .await;
        match result {
            Err(e) => match e.downcast::<Transient>() {
                Ok(Transient(answer)) => Ok(answer),
                Err(e) => Err(e),
            },
            ok => ok,
        }
    }
}

/// The header that makes a write idempotent (`docs/API.md`); signed whenever it is sent.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// How many times a keyed request is sent again after a transient failure.
pub const RETRIES: usize = 6;

/// A 503, 429 or 409 "in progress" answer: worth another try with the same key.
#[derive(Debug)]
struct Transient(Answer);

impl std::fmt::Display for Transient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}: {}", self.0.status, self.0.error_message())
    }
}

impl std::error::Error for Transient {}

fn is_transient(a: &Answer) -> bool {
    match a.status {
        503 | 429 => true,
        409 => a.retry_after.is_some(),
        _ => false,
    }
}

/// The query of a model upload.
#[derive(Debug, Clone)]
pub struct ModelUpload {
    pub name: String,
    pub version: String,
    pub price: u64,
    /// Credits per delivered proof (`None`: the gateway's default, proportional to the
    /// circuit's size).
    pub proof_price: Option<u64>,
    /// The range the model's inputs lie in, for proof calibration (`None`: the gateway's
    /// default, `[0, 1]`).
    pub input_range: Option<modelhub_core::InputRange>,
    /// The most rows one predict may hold (`None`: no cap of the model's own).
    pub max_rows: Option<u32>,
    /// The most predictions one account may make per minute (`None`: no quota of the
    /// model's own).
    pub calls_per_minute: Option<u32>,
}

impl ModelUpload {
    pub fn new(name: &str, version: &str, price: u64) -> ModelUpload {
        ModelUpload {
            name: name.into(),
            version: version.into(),
            price,
            proof_price: None,
            input_range: None,
            max_rows: None,
            calls_per_minute: None,
        }
    }

    pub fn path_and_query(&self) -> String {
        let price = self.price.to_string();
        let proof_price = self.proof_price.map(|p| p.to_string());
        let max_rows = self.max_rows.map(|n| n.to_string());
        let calls_per_minute = self.calls_per_minute.map(|n| n.to_string());
        let range = self
            .input_range
            .map(|r| (r.min.to_string(), r.max.to_string()));
        let mut pairs = vec![
            ("name", self.name.as_str()),
            ("version", self.version.as_str()),
            ("price", price.as_str()),
        ];
        if let Some(p) = &proof_price {
            pairs.push(("proof_price", p.as_str()));
        }
        if let Some((min, max)) = &range {
            pairs.extend([("input_min", min.as_str()), ("input_max", max.as_str())]);
        }
        if let Some(n) = &max_rows {
            pairs.push(("max_rows", n.as_str()));
        }
        if let Some(n) = &calls_per_minute {
            pairs.push(("calls_per_minute", n.as_str()));
        }
        format!("/v1/models?{}", form_query(&pairs))
    }
}

fn form_query(pairs: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            s.push('&');
        }
        s.push_str(k);
        s.push('=');
        s.extend(percent_encode(v));
    }
    s
}

fn percent_encode(v: &str) -> impl Iterator<Item = String> + '_ {
    v.bytes().map(|b| {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            (b as char).to_string()
        } else {
            format!("%{b:02X}")
        }
    })
}

async fn read_answer(resp: reqwest::Response) -> anyhow::Result<Answer> {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = resp.bytes().await?;
    let body = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
        })
    };
    Ok(Answer {
        status,
        body,
        retry_after,
    })
}
