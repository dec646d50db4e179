//! Model Hub registry service: accounts, API keys (secrets sealed by the KEK), models and the
//! embedded credits ledger (reserve → commit/release, receipts), served over gRPC
//! (`proto/modelhub/registry/v1/registry.proto`).
//!
//! The records live behind the [`MetadataStore`] trait; [`RedbStore`] is the embedded
//! implementation (`<data_dir>/registry.redb`), [`MongoStore`] the MongoDB one, used when
//! `--mongodb-uri` is set. [`conformance`] holds the store test suite every implementation
//! must pass.

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod error;
pub mod ledger;
pub mod model;
pub mod service;
pub mod store;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use modelhub_core::crypto::Kek;
use modelhub_mtls::{Identity, TlsDir, policy};
use modelhub_proto::registry::v1::registry_server::RegistryServer;
use tonic::transport::server::TcpIncoming;

pub use error::{RegistryError, Result};
pub use ledger::{ChainArgs, ChainLedger, EmbeddedLedger, Ledger};
pub use service::RegistryService;
pub use store::{MetadataStore, MongoStore, RedbStore};

/// Registry settings (the listen address belongs to the binary).
#[derive(Clone, clap::Args)]
pub struct Settings {
    /// Folder of the embedded database (`registry.redb`) and, by default, the KEK file.
    #[arg(
        long,
        env = "MODELHUB_REGISTRY_DATA_DIR",
        default_value = "./modelhub-data/registry"
    )]
    pub data_dir: PathBuf,
    /// Key-encryption key file (base64 of 32 bytes); default `<data_dir>/kek`, created when
    /// missing.
    #[arg(long, env = "MODELHUB_REGISTRY_KEK_FILE")]
    pub kek_file: Option<PathBuf>,
    /// MongoDB connection string, e.g. `mongodb://db1,db2,db3/modelhub?replicaSet=rs0`: when
    /// set, the metadata lives there (database from the URI, else `modelhub`) instead of the
    /// embedded database. The KEK file stays local.
    #[arg(long, env = "MODELHUB_REGISTRY_MONGODB_URI")]
    pub mongodb_uri: Option<String>,
    /// How long a request waits for a reachable MongoDB server before failing with
    /// `unavailable` (milliseconds).
    #[arg(
        long,
        env = "MODELHUB_REGISTRY_MONGODB_TIMEOUT_MS",
        default_value_t = 2000
    )]
    pub mongodb_timeout_ms: u64,
    /// Folder of the mutual-TLS files made by `modelhub certs`: `ca.pem`, `registry.pem`,
    /// `registry.key`. The registry speaks only TLS and serves only callers with a certificate from
    /// that CA, each only the methods its identity may call.
    #[arg(
        long,
        env = "MODELHUB_REGISTRY_MTLS_DIR",
        default_value = "./modelhub-data/tls"
    )]
    pub mtls_dir: PathBuf,
    /// The chain ledger (credits on the marketplace contract), when `--chain-rpc` is set.
    #[command(flatten)]
    pub chain: ChainArgs,
    /// Seconds a prediction may hold credits before the hold is released (the caller died);
    /// a commit after that is refused.
    #[arg(
        long,
        env = "MODELHUB_REGISTRY_HOLD_TIMEOUT_SECS",
        default_value_t = service::Policy::default().hold_timeout_secs
    )]
    pub hold_timeout_secs: u64,
    /// Seconds an idempotency key stays bound to its request and its stored response.
    #[arg(
        long,
        env = "MODELHUB_REGISTRY_IDEMPOTENCY_TTL_SECS",
        default_value_t = service::Policy::default().idempotency_ttl_secs
    )]
    pub idempotency_ttl_secs: u64,
    /// Most request nonces one API key may spend per 10 minutes (the nonce store keeps each
    /// for the replay window; this bounds what one key can make it keep).
    #[arg(
        long,
        env = "MODELHUB_REGISTRY_MAX_NONCES_PER_KEY",
        default_value_t = service::Policy::default().max_nonces_per_key
    )]
    pub max_nonces_per_key: u64,
    /// Memory the embedded database may use to cache its pages (MiB). The database grows with
    /// every receipt; past this its pages are read from the file again, so the registry's
    /// memory stays bounded (`scripts/soak`).
    #[arg(
        long,
        env = "MODELHUB_REGISTRY_STORE_CACHE_MIB",
        default_value_t = store::DEFAULT_CACHE_MIB
    )]
    pub store_cache_mib: u64,
}

impl std::fmt::Debug for Settings {
    /// The MongoDB URI may hold a password: only whether it is set is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("data_dir", &self.data_dir)
            .field("kek_file", &self.kek_file)
            .field(
                "mongodb_uri",
                &self.mongodb_uri.as_ref().map(|_| "<redacted>"),
            )
            .field("mongodb_timeout_ms", &self.mongodb_timeout_ms)
            .field("mtls_dir", &self.mtls_dir)
            .field("chain", &self.chain)
            .field("hold_timeout_secs", &self.hold_timeout_secs)
            .field("idempotency_ttl_secs", &self.idempotency_ttl_secs)
            .field("max_nonces_per_key", &self.max_nonces_per_key)
            .field("store_cache_mib", &self.store_cache_mib)
            .finish()
    }
}

impl Settings {
    /// Settings for tests: everything under `data_dir`; set `mtls_dir` to a test PKI
    /// (`modelhub_testkit::tls`).
    pub fn for_test(data_dir: impl Into<PathBuf>) -> Settings {
        Settings {
            mtls_dir: PathBuf::from("./modelhub-data/tls"),
            data_dir: data_dir.into(),
            kek_file: None,
            mongodb_uri: None,
            mongodb_timeout_ms: 2000,
            chain: ChainArgs::default(),
            hold_timeout_secs: service::Policy::default().hold_timeout_secs,
            idempotency_ttl_secs: service::Policy::default().idempotency_ttl_secs,
            max_nonces_per_key: service::Policy::default().max_nonces_per_key,
            store_cache_mib: store::DEFAULT_CACHE_MIB,
        }
    }

    /// Settings for tests with the metadata in MongoDB at `uri`.
    pub fn for_test_mongodb(data_dir: impl Into<PathBuf>, uri: impl Into<String>) -> Settings {
        Settings {
            mongodb_uri: Some(uri.into()),
            ..Settings::for_test(data_dir)
        }
    }

    /// The request-handling policy these settings describe.
    pub fn policy(&self) -> service::Policy {
        service::Policy {
            hold_timeout_secs: self.hold_timeout_secs,
            idempotency_ttl_secs: self.idempotency_ttl_secs,
            max_nonces_per_key: self.max_nonces_per_key,
        }
    }

    /// The KEK file in use.
    pub fn kek_path(&self) -> PathBuf {
        self.kek_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("kek"))
    }
}

impl RegistryService {
    /// Opens the store (MongoDB when `mongodb_uri` is set, else the embedded one), the KEK
    /// and the ledger (the chain one when `chain.chain_rpc` is set) named by `settings`.
    pub async fn open(settings: &Settings) -> anyhow::Result<RegistryService> {
        let mongo = match &settings.mongodb_uri {
            Some(uri) => {
                let timeout = Duration::from_millis(settings.mongodb_timeout_ms.max(1));
                let store = MongoStore::connect(uri, timeout)
                    .await
                    .context("connecting to MongoDB")?;
                Some(Arc::new(store) as Arc<dyn MetadataStore>)
            }
            None => None,
        };
        let chain = settings.chain.clone();
        let policy = settings.policy();
        let settings = settings.clone();
        let (store, kek) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let store = match mongo {
                Some(store) => store,
                None => Arc::new(
                    RedbStore::open_in(&settings.data_dir, settings.store_cache_mib << 20)
                        .with_context(|| {
                            format!(
                                "opening the registry database in {}",
                                settings.data_dir.display()
                            )
                        })?,
                ),
            };
            let kek = Kek::load_or_generate(&settings.kek_path()).context("loading the KEK")?;
            Ok((store, kek))
        })
        .await??;
        let service = RegistryService::new(store.clone(), kek).with_policy(policy);
        service
            .start_keeping_nonces()
            .await
            .context("recording when the nonce store began")?;
        Ok(match chain.chain_rpc {
            Some(_) => {
                let ledger = ChainLedger::connect(chain, store)
                    .await
                    .context("starting the chain ledger")?;
                service.with_ledger(Arc::new(ledger))
            }
            None => service,
        })
    }
}

/// Serves the registry (and `grpc.health.v1`) on `listener` until `shutdown` resolves and the
/// in-flight requests have finished.
pub async fn run(
    settings: Settings,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tls = TlsDir::load(&settings.mtls_dir, Identity::Registry)?;
    let service = RegistryService::open(&settings).await?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<RegistryServer<RegistryService>>()
        .await;
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, "registry listening"),
        Err(e) => tracing::warn!(error = %e, "registry listening on an unknown address"),
    }
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let ledger = service.ledger().clone();
    let background = tokio::spawn(async move { ledger.run().await });
    let housekeeping = tokio::spawn(service.clone().housekeeping());
    let served = tls
        .server(&policy::REGISTRY)?
        .add_service(health_service)
        .add_service(RegistryServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    background.abort();
    housekeeping.abort();
    served.context("serving the registry")?;
    tracing::info!("registry stopped");
    Ok(())
}

modelhub_core::serve_args!("registry", "MODELHUB_REGISTRY_LISTEN", "127.0.0.1:50051");
