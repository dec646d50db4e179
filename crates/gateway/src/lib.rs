//! Model Hub's public HTTP gateway (actix-web): verifies `MH-HMAC-SHA256` request signatures,
//! routes the `/v1` API (`docs/API.md`) to the registry, storage and inference services over
//! gRPC, streams uploads into storage, and charges predictions (reserve → predict → commit, or
//! release on any failure).
//!
//! Each actix worker thread has its own gRPC channels (lazily connected); the key cache is
//! shared by all workers, nonces are spent in the registry (shared by every gateway).
//!
//! Slow or greedy clients are bounded before they cost anything: every request is
//! authenticated from its headers before its body is read, bodies must arrive within a
//! deadline and above a minimum rate (`routes::body`), connections are capped in total and
//! requests in flight per client address ([`limits`]).

pub mod auth;
pub mod error;
pub mod limits;
pub mod rates;
mod records;
mod routes;
pub mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::{App, HttpServer, web};
use anyhow::Context;
use modelhub_mtls::{Identity, TlsDir, https_endpoint, lazy_channel};
use modelhub_proto::inference::v1::inference_client::InferenceClient;
use modelhub_proto::prover::v1::prover_client::ProverClient;
use modelhub_proto::registry::v1::Model as ModelPb;
use modelhub_proto::registry::v1::registry_client::RegistryClient;
use modelhub_proto::storage::v1::storage_client::StorageClient;
use tonic::transport::{Channel, Endpoint};

use crate::auth::{Authenticator, KeyCache, RegistryKeys, RegistryNonces};
use crate::limits::PerClient;

pub use crate::error::GatewayError;

/// Gateway settings; each can be set by flag or by `MODELHUB_GATEWAY_*` environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// gRPC address of the registry.
    #[arg(
        long,
        env = "MODELHUB_GATEWAY_REGISTRY",
        default_value = "https://127.0.0.1:50051"
    )]
    pub registry: String,
    /// gRPC address of storage.
    #[arg(
        long,
        env = "MODELHUB_GATEWAY_STORAGE",
        default_value = "https://127.0.0.1:50052"
    )]
    pub storage: String,
    /// gRPC address of the inference service.
    #[arg(
        long,
        env = "MODELHUB_GATEWAY_INFERENCE",
        default_value = "https://127.0.0.1:50053"
    )]
    pub inference: String,
    /// gRPC endpoint of the prover. Without it uploads get no circuit (commitment null) and
    /// predictions can't ask for proofs.
    #[arg(long, env = "MODELHUB_GATEWAY_PROVER")]
    pub prover: Option<String>,
    /// Largest model upload accepted, in bytes.
    #[arg(long, env = "MODELHUB_GATEWAY_MAX_UPLOAD_BYTES", default_value_t = 1 << 30)]
    pub max_upload_bytes: u64,
    /// Largest JSON request body accepted, in bytes.
    #[arg(long, env = "MODELHUB_GATEWAY_MAX_JSON_BYTES", default_value_t = 64 << 20)]
    pub max_json_bytes: usize,
    /// HTTP worker threads.
    #[arg(long, env = "MODELHUB_GATEWAY_WORKERS", default_value_t = 2)]
    pub workers: usize,
    /// Hosts requests may be signed for (`name:port` as clients send the `host` header),
    /// comma-separated. Default: on a loopback address, that address and `localhost:<port>`;
    /// required on any other address.
    #[arg(long, env = "MODELHUB_GATEWAY_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// Most connections open at once (all workers together); more wait in the backlog.
    #[arg(long, env = "MODELHUB_GATEWAY_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Most requests in flight from one client address; more are answered 429 at once.
    #[arg(
        long,
        env = "MODELHUB_GATEWAY_MAX_REQUESTS_PER_CLIENT",
        default_value_t = 64
    )]
    pub max_requests_per_client: usize,
    /// Uploads one account may have in progress at once; more are answered 429 at once.
    #[arg(
        long,
        env = "MODELHUB_GATEWAY_MAX_UPLOADS_PER_ACCOUNT",
        default_value_t = 2
    )]
    pub max_uploads_per_account: usize,
    /// Predictions of free (price 0) models one account may make per minute on this gateway
    /// (a burst of that many, then a steady refill); more are answered 429 with
    /// `retry-after`. Paid predictions don't count.
    #[arg(
        long,
        env = "MODELHUB_GATEWAY_FREE_CALLS_PER_MINUTE",
        default_value_t = 60
    )]
    pub free_calls_per_minute: u32,
    /// Signed requests one API key may make per second on this gateway (a burst of that
    /// many); more are answered 429 with `retry-after`, before the nonce is spent. 0: no limit.
    #[arg(
        long,
        env = "MODELHUB_GATEWAY_REQUESTS_PER_SECOND_PER_KEY",
        default_value_t = 1000
    )]
    pub requests_per_second_per_key: u32,
    /// Signed requests one account (all its keys) may make per second on this gateway; more
    /// are answered 429 with `retry-after`. 0: no limit.
    #[arg(
        long,
        env = "MODELHUB_GATEWAY_REQUESTS_PER_SECOND_PER_ACCOUNT",
        default_value_t = 2000
    )]
    pub requests_per_second_per_account: u32,
    /// The default proof price of an upload that sets none: one credit per this many circuit
    /// cells (rows × neuron lanes, what proving time grows with), rounded up, at least 1.
    #[arg(
        long,
        env = "MODELHUB_GATEWAY_PROOF_CELLS_PER_CREDIT",
        default_value_t = DEFAULT_PROOF_CELLS_PER_CREDIT
    )]
    pub proof_cells_per_credit: u64,
    /// The most rows (the size of a model's dynamic first dimension) one predict may hold;
    /// each row is charged the model's price. More is answered 413, uncharged.
    #[arg(
        long,
        env = "MODELHUB_GATEWAY_MAX_ROWS_PER_REQUEST",
        default_value_t = 1024
    )]
    pub max_rows_per_request: u32,
    /// Deadline of every call to the registry (but an admin's settlement run, which waits for
    /// the chain), in seconds: a registry that does not answer in time (stalled, overloaded)
    /// makes the request fail with 503, uncharged, instead of holding it.
    #[arg(
        long,
        env = "MODELHUB_GATEWAY_REGISTRY_TIMEOUT_SECS",
        default_value_t = 10
    )]
    pub registry_timeout_secs: u64,
    /// Deadline of every call to inference (a prediction: queue, load and run), in seconds; 503
    /// beyond, uncharged. Keep it above inference's own run timeout.
    #[arg(
        long,
        env = "MODELHUB_GATEWAY_INFERENCE_TIMEOUT_SECS",
        default_value_t = 60
    )]
    pub inference_timeout_secs: u64,
    /// Seconds a JSON request body may take to arrive in full (408 beyond).
    #[arg(long, env = "MODELHUB_GATEWAY_BODY_TIMEOUT_SECS", default_value_t = 30)]
    pub body_timeout_secs: u64,
    /// Slowest accepted request body (uploads too), in bytes per second averaged over the
    /// body after its first seconds; a body that stalls for 10 s is cut as well (408).
    #[arg(long, env = "MODELHUB_GATEWAY_MIN_BODY_RATE", default_value_t = 16 * 1024)]
    pub min_body_rate: u64,
    /// Folder of the mutual-TLS files made by `modelhub certs` (`ca.pem`, `gateway.pem`,
    /// `gateway.key`): the gateway calls the internal services (`https://` addresses) with them.
    #[arg(
        long,
        env = "MODELHUB_GATEWAY_MTLS_DIR",
        default_value = "./modelhub-data/tls"
    )]
    pub mtls_dir: std::path::PathBuf,
    /// PEM certificate chain (leaf first) to serve HTTPS with; needs --tls-key. Without the
    /// pair the gateway speaks plain HTTP, only on a loopback address or with
    /// --behind-tls-proxy.
    #[arg(long, env = "MODELHUB_GATEWAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "MODELHUB_GATEWAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Serve plain HTTP on a non-loopback address because a TLS-terminating proxy (an ingress,
    /// a load balancer) is in front: clients reach the gateway only through it.
    #[arg(long, env = "MODELHUB_GATEWAY_BEHIND_TLS_PROXY")]
    pub behind_tls_proxy: bool,
}

impl Settings {
    /// Settings for tests: the given service addresses, the default limits.
    pub fn for_test(registry: String, storage: String, inference: String) -> Settings {
        Settings {
            registry,
            storage,
            inference,
            prover: None,
            max_upload_bytes: 1 << 30,
            max_json_bytes: 64 << 20,
            workers: 2,
            allowed_hosts: Vec::new(),
            max_connections: 4096,
            max_requests_per_client: 64,
            max_uploads_per_account: 2,
            free_calls_per_minute: 60,
            requests_per_second_per_key: 1000,
            requests_per_second_per_account: 2000,
            proof_cells_per_credit: DEFAULT_PROOF_CELLS_PER_CREDIT,
            max_rows_per_request: 1024,
            registry_timeout_secs: 10,
            inference_timeout_secs: 60,
            body_timeout_secs: 30,
            min_body_rate: 16 * 1024,
            mtls_dir: "./modelhub-data/tls".into(),
            tls_cert: None,
            tls_key: None,
            behind_tls_proxy: false,
        }
    }

    /// Checks the settings (`run` does too); binaries call it before they bind a port.
    pub fn validate(&self) -> anyhow::Result<()> {
        https_endpoint(Identity::Registry, &self.registry)?;
        https_endpoint(Identity::Storage, &self.storage)?;
        https_endpoint(Identity::Inference, &self.inference)?;
        if let Some(prover) = &self.prover {
            https_endpoint(Identity::Prover, prover)?;
        }
        anyhow::ensure!(self.workers >= 1, "workers must be at least 1");
        anyhow::ensure!(
            self.max_upload_bytes >= 1,
            "max_upload_bytes must be at least 1"
        );
        anyhow::ensure!(
            self.max_json_bytes >= 1,
            "max_json_bytes must be at least 1"
        );
        anyhow::ensure!(
            self.max_connections >= self.workers,
            "max_connections must be at least the number of workers"
        );
        anyhow::ensure!(
            self.max_requests_per_client >= 1,
            "max_requests_per_client must be at least 1"
        );
        anyhow::ensure!(
            self.max_uploads_per_account >= 1,
            "max_uploads_per_account must be at least 1"
        );
        anyhow::ensure!(
            self.free_calls_per_minute >= 1,
            "free_calls_per_minute must be at least 1"
        );
        anyhow::ensure!(
            self.proof_cells_per_credit >= 1,
            "proof_cells_per_credit must be at least 1"
        );
        anyhow::ensure!(
            self.max_rows_per_request >= 1,
            "max_rows_per_request must be at least 1"
        );
        anyhow::ensure!(
            self.registry_timeout_secs >= 1 && self.inference_timeout_secs >= 1,
            "the registry and inference timeouts must be at least 1 s"
        );
        anyhow::ensure!(
            self.body_timeout_secs >= 1,
            "body_timeout_secs must be at least 1"
        );
        anyhow::ensure!(
            self.tls_cert.is_some() == self.tls_key.is_some(),
            "--tls-cert and --tls-key go together"
        );
        for host in &self.allowed_hosts {
            anyhow::ensure!(
                !host.is_empty() && !host.contains(char::is_whitespace),
                "allowed host {host:?} is not a host[:port]"
            );
        }
        Ok(())
    }

    /// The hosts requests may be signed for when serving on `addr`: the configured ones, or
    /// on a loopback address that address and `localhost`; an error on any other address
    /// without configured hosts.
    pub fn hosts_for(&self, addr: std::net::SocketAddr) -> anyhow::Result<Vec<String>> {
        if !self.allowed_hosts.is_empty() {
            return Ok(self.allowed_hosts.clone());
        }
        anyhow::ensure!(
            addr.ip().is_loopback(),
            "--allowed-hosts (MODELHUB_GATEWAY_ALLOWED_HOSTS) must name the hosts clients \
             sign for when the gateway listens on {addr}"
        );
        let port = addr.port();
        let mut hosts = vec![addr.to_string(), format!("localhost:{port}")];
        if port == 80 {
            hosts.extend([addr.ip().to_string(), "localhost".to_owned()]);
        }
        Ok(hosts)
    }
}

/// Per-request policy: body size and pace limits, rows per predict, and the default proof
/// price.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_upload_bytes: u64,
    pub max_json_bytes: usize,
    pub body_timeout: Duration,
    pub min_body_rate: u64,
    /// See [`Settings::proof_cells_per_credit`].
    pub proof_cells_per_credit: u64,
    /// See [`Settings::max_rows_per_request`].
    pub max_rows_per_request: u32,
}

/// One credit per 65,536 circuit cells: the digits MLP's proofs cost 1 credit, a LeNet-size
/// CNN's about a hundred.
pub const DEFAULT_PROOF_CELLS_PER_CREDIT: u64 = 1 << 16;

/// Largest gRPC message accepted from the inference service (outputs can be large).
const INFERENCE_MAX_MESSAGE: usize = 512 << 20;
/// Largest gRPC message accepted from the registry (model lists).
const REGISTRY_MAX_MESSAGE: usize = 64 << 20;
const PROVER_MAX_MESSAGE: usize = 64 << 20;

/// How long a model record read for a prediction is reused. Records never change once
/// created (the registry has no update), so this only bounds memory and staleness of deletes.
const MODEL_CACHE_TTL: Duration = Duration::from_secs(60);

/// Model records by id, shared by every worker: a prediction needs no registry read for them.
#[derive(Clone)]
pub(crate) struct ModelCache(moka::future::Cache<String, Arc<ModelPb>>);

impl ModelCache {
    fn new() -> ModelCache {
        ModelCache(
            moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(MODEL_CACHE_TTL)
                .build(),
        )
    }
}

/// What one worker's handlers use.
pub(crate) struct AppState {
    registry: RegistryClient<Channel>,
    /// The registry without the request-path deadline: for an admin's settlement run, which
    /// waits for chain transactions.
    registry_slow: RegistryClient<Channel>,
    storage: StorageClient<Channel>,
    inference: InferenceClient<Channel>,
    prover: Option<ProverClient<Channel>>,
    models: ModelCache,
    pub auth: Authenticator,
    pub limits: Limits,
    /// Uploads in flight per account (shared by every worker).
    pub uploads: limits::PerAccount,
    /// Predictions of free models per account (shared by every worker).
    pub free_quota: Arc<rates::FreeQuota>,
    /// The owners' per-model rates (shared by every worker).
    pub model_quotas: Arc<rates::ModelQuotas>,
}

impl AppState {
    pub fn registry(&self) -> RegistryClient<Channel> {
        self.registry.clone()
    }

    pub fn registry_slow(&self) -> RegistryClient<Channel> {
        self.registry_slow.clone()
    }

    pub fn storage(&self) -> StorageClient<Channel> {
        self.storage.clone()
    }

    pub fn inference(&self) -> InferenceClient<Channel> {
        self.inference.clone()
    }

    /// The prover client, when this gateway has a prover.
    pub fn prover(&self) -> Option<ProverClient<Channel>> {
        self.prover.clone()
    }

    /// A model record, from the cache or the registry (`GetModel`; unknown → 404).
    /// Drops a model record from this gateway's cache (after a delete).
    pub async fn forget_model(&self, model_id: &str) {
        self.models.0.invalidate(model_id).await;
    }

    pub async fn model(&self, model_id: &str) -> Result<Arc<ModelPb>, GatewayError> {
        let fetch = async {
            let request = modelhub_proto::registry::v1::GetModelRequest {
                model_id: model_id.to_owned(),
            };
            let model = self.registry().get_model(request).await?.into_inner();
            Ok::<_, tonic::Status>(Arc::new(model))
        };
        self.models
            .0
            .try_get_with(model_id.to_owned(), fetch)
            .await
            .map_err(|status| GatewayError::upstream("registry", "GetModel")((*status).clone()))
    }
}

/// What every worker shares; each worker builds its [`AppState`] from it.
#[derive(Clone)]
struct Shared {
    registry: Endpoint,
    registry_slow: Endpoint,
    storage: Endpoint,
    inference: Endpoint,
    prover: Option<Endpoint>,
    keys: KeyCache,
    models: ModelCache,
    limits: Limits,
    uploads: limits::PerAccount,
    free_quota: Arc<rates::FreeQuota>,
    rates: Arc<rates::RateLimits>,
    model_quotas: Arc<rates::ModelQuotas>,
    allowed_hosts: Vec<String>,
}

/// A mutual-TLS endpoint of an internal service (`https://` only; TCP_NODELAY, 5 s connect).
fn endpoint(tls: &TlsDir, server: Identity, uri: &str) -> anyhow::Result<Endpoint> {
    Ok(tls.endpoint(server, uri)?)
}

/// An endpoint on the request path: every call ends within `secs`, and so does setting up
/// the connection it may have to wait for (TCP connect and TLS handshake, [`lazy_channel`]).
fn deadline_endpoint(
    tls: &TlsDir,
    server: Identity,
    uri: &str,
    secs: u64,
) -> anyhow::Result<Endpoint> {
    let deadline = Duration::from_secs(secs);
    let connect = deadline.min(Duration::from_secs(5));
    Ok(endpoint(tls, server, uri)?
        .timeout(deadline)
        .connect_timeout(connect))
}

impl Shared {
    /// For tests of the app without a listener: signed hosts are not checked.
    #[cfg(test)]
    fn new(settings: &Settings) -> anyhow::Result<Shared> {
        Shared::serving(settings, Vec::new())
    }

    /// What every worker of a gateway that serves `allowed_hosts` shares (empty: any host).
    fn serving(settings: &Settings, allowed_hosts: Vec<String>) -> anyhow::Result<Shared> {
        settings.validate()?;
        let tls = TlsDir::load(&settings.mtls_dir, Identity::Gateway)?;
        Ok(Shared {
            // Per-call deadlines on the request path (storage and the prover carry uploads and
            // proof waits, which take as long as they take, bounded by their own limits).
            registry: deadline_endpoint(
                &tls,
                Identity::Registry,
                &settings.registry,
                settings.registry_timeout_secs,
            )?,
            registry_slow: endpoint(&tls, Identity::Registry, &settings.registry)?,
            storage: endpoint(&tls, Identity::Storage, &settings.storage)?,
            inference: deadline_endpoint(
                &tls,
                Identity::Inference,
                &settings.inference,
                settings.inference_timeout_secs,
            )?,
            prover: settings
                .prover
                .as_deref()
                .map(|p| endpoint(&tls, Identity::Prover, p))
                .transpose()?,
            keys: KeyCache::new(),
            models: ModelCache::new(),
            limits: Limits {
                max_upload_bytes: settings.max_upload_bytes,
                max_json_bytes: settings.max_json_bytes,
                body_timeout: Duration::from_secs(settings.body_timeout_secs),
                min_body_rate: settings.min_body_rate,
                proof_cells_per_credit: settings.proof_cells_per_credit,
                max_rows_per_request: settings.max_rows_per_request,
            },
            uploads: limits::PerAccount::new(settings.max_uploads_per_account),
            free_quota: Arc::new(rates::FreeQuota::per_minute(
                std::num::NonZeroU32::new(settings.free_calls_per_minute)
                    .context("free_calls_per_minute must be at least 1")?,
            )),
            rates: Arc::new(rates::RateLimits::new(
                settings.requests_per_second_per_key,
                settings.requests_per_second_per_account,
            )),
            model_quotas: Arc::default(),
            allowed_hosts,
        })
    }

    /// Must run inside a Tokio runtime (the lazy channels spawn their workers on it). `auth`
    /// replaces the registry-backed authenticator (unit tests).
    fn state(&self, auth: Option<Authenticator>) -> AppState {
        let registry = RegistryClient::new(lazy_channel(&self.registry))
            .max_decoding_message_size(REGISTRY_MAX_MESSAGE);
        let auth = auth.unwrap_or_else(|| {
            let auth = Authenticator::new(
                Arc::new(RegistryKeys::new(registry.clone(), self.keys.clone())),
                Arc::new(RegistryNonces::new(registry.clone())),
            );
            if self.allowed_hosts.is_empty() {
                auth
            } else {
                auth.with_allowed_hosts(self.allowed_hosts.clone())
            }
        });
        let auth = auth.with_rates(self.rates.clone());
        AppState {
            storage: StorageClient::new(lazy_channel(&self.storage)),
            inference: InferenceClient::new(lazy_channel(&self.inference))
                .max_decoding_message_size(INFERENCE_MAX_MESSAGE),
            prover: self.prover.as_ref().map(|p| {
                ProverClient::new(lazy_channel(p)).max_decoding_message_size(PROVER_MAX_MESSAGE)
            }),
            registry,
            registry_slow: RegistryClient::new(lazy_channel(&self.registry_slow))
                .max_decoding_message_size(REGISTRY_MAX_MESSAGE),
            models: self.models.clone(),
            auth,
            limits: self.limits,
            uploads: self.uploads.clone(),
            free_quota: self.free_quota.clone(),
            model_quotas: self.model_quotas.clone(),
        }
    }
}

/// The application of one worker.
fn app(
    state: AppState,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    App::new()
        .app_data(web::Data::new(state))
        .wrap(error::json_errors())
        .configure(routes::configure)
        .default_service(web::to(routes::not_found))
}

/// Serves the gateway on `listener` until `shutdown` resolves; in-flight requests then finish
/// (up to 30 s). Works under any Tokio runtime (actix runs its workers on threads of their own).
pub async fn run(
    settings: Settings,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    listener
        .set_nonblocking(true)
        .context("setting the listener non-blocking")?;
    let addr = listener
        .local_addr()
        .context("reading the listen address")?;
    let shared = Shared::serving(&settings, settings.hosts_for(addr)?)?;
    let tls = match (&settings.tls_cert, &settings.tls_key) {
        (Some(cert), Some(key)) => Some(tls::server_config(cert, key)?),
        _ => {
            anyhow::ensure!(
                addr.ip().is_loopback() || settings.behind_tls_proxy,
                "the gateway serves plain HTTP on {addr}: give it --tls-cert and --tls-key \
                 (MODELHUB_GATEWAY_TLS_CERT/_KEY), or --behind-tls-proxy if a TLS-terminating \
                 proxy is in front"
            );
            None
        }
    };
    let per_client = PerClient::new(settings.max_requests_per_client);
    let server = HttpServer::new(move || {
        app(shared.state(None))
            .app_data(web::Data::new(per_client.clone()))
            .wrap(actix_web::middleware::from_fn(limits::limit_per_client))
    })
    .workers(settings.workers)
    .max_connections(settings.max_connections.div_ceil(settings.workers))
    .tcp_nodelay(true)
    .shutdown_signal(shutdown)
    .shutdown_timeout(30);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let server = match tls {
        Some(config) => server.listen_rustls_0_23(listener, config),
        None => server.listen(listener),
    }
    .context("listening")?
    .run();
    tracing::info!(%addr, scheme, registry = %settings.registry, storage = %settings.storage, inference = %settings.inference, "gateway listening");
    server.await.context("serving")?;
    tracing::info!("gateway stopped");
    Ok(())
}

#[cfg(test)]
mod tests;

/// What the `modelhub-gateway` binary and `modelhub serve gateway` take: where to listen, and the
/// settings.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0: any free port, printed once bound).
    #[arg(
        long,
        env = "MODELHUB_GATEWAY_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: std::net::SocketAddr,
    #[command(flatten)]
    pub settings: Settings,
}

impl ServeArgs {
    /// Binds, announces the bound address on stdout, and serves until `shutdown`.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        self.settings.validate()?;
        let listener = std::net::TcpListener::bind(self.listen)
            .map_err(|e| anyhow::anyhow!("binding {}: {e}", self.listen))?;
        modelhub_core::serve::announce("gateway", listener.local_addr()?);
        run(self.settings, listener, shutdown).await
    }
}
