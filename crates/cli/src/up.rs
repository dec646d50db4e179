//! `modelhub up`: every service in one process, talking real gRPC over loopback, with the
//! embedded back ends under one data folder:
//!
//! ```text
//! <data-dir>/kek              key-encryption key (0600), shared by registry and storage
//! <data-dir>/registry/        embedded metadata store and credits ledger (redb)
//! <data-dir>/storage/blobs/   content-addressed ciphertext, named by IPFS CIDv1
//! <data-dir>/prover/          proofs, compiled-model records, cached proving params
//! <data-dir>/admin-key.json   the admin's API key (0600), written on first start
//! <data-dir>/tls/             CA and per-service certificates (keys 0600), made on first
//!                             start: every gRPC call between the services is mutual TLS
//! ```
//! Tests start the same thing on `127.0.0.1:0`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use futures::future::BoxFuture;
use modelhub_proto::registry::v1 as reg;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::client::KeyFile;

/// Settings of `modelhub up`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpSettings {
    /// Folder for all state (metadata, blobs, keys); created if missing.
    #[arg(long, env = "MODELHUB_DATA_DIR", default_value = "./modelhub-data")]
    pub data_dir: PathBuf,
    /// Address of the public HTTP gateway.
    #[arg(long, env = "MODELHUB_HTTP", default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// Keep the registry's metadata in this MongoDB instead of the embedded store.
    #[arg(long, env = "MODELHUB_REGISTRY_MONGODB_URI")]
    pub mongodb_uri: Option<String>,
    /// Keep model blobs on this IPFS node (kubo RPC API) instead of the local blob store.
    #[arg(long, env = "MODELHUB_STORAGE_IPFS_API")]
    pub ipfs_api: Option<String>,
    /// Credits on a marketplace contract (`--chain-rpc URL --marketplace ADDR
    /// --operator-key-file F`) instead of the embedded ledger.
    #[command(flatten)]
    pub chain: modelhub_registry::ChainArgs,
}

impl UpSettings {
    pub fn for_test(data_dir: &Path) -> UpSettings {
        UpSettings {
            data_dir: data_dir.to_path_buf(),
            http: "127.0.0.1:0".parse().expect("addr"),
            mongodb_uri: None,
            ipfs_api: None,
            chain: modelhub_registry::ChainArgs::default(),
        }
    }
}

/// The loopback gRPC endpoints (`https://`, mutual TLS) of the in-process services.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub registry: String,
    pub storage: String,
    pub inference: String,
    pub prover: String,
}

/// A running marketplace; [`Running::stop`] shuts it down gracefully.
#[derive(Debug)]
pub struct Running {
    pub gateway_url: String,
    pub admin_key_path: PathBuf,
    pub admin_key: KeyFile,
    pub endpoints: Endpoints,
    /// The certificates folder (`<data-dir>/tls`).
    pub mtls_dir: PathBuf,
    cancel: CancellationToken,
    tasks: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
}

/// Validity of the certificates `up` makes (renewed by deleting `<data-dir>/tls`).
const TLS_VALIDITY_DAYS: u32 = 3650;

async fn loopback() -> anyhow::Result<(TcpListener, String)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("https://{}", l.local_addr()?);
    Ok((l, url))
}

/// Starts every service and creates the admin key on first start.
pub async fn start(settings: UpSettings) -> anyhow::Result<Running> {
    let data = &settings.data_dir;
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let kek_file = data.join("kek");
    modelhub_core::crypto::Kek::load_or_generate(&kek_file)?;
    let mtls_dir = data.join("tls");
    if modelhub_mtls::generate::ensure(&mtls_dir, TLS_VALIDITY_DAYS)? {
        tracing::info!(dir = %mtls_dir.display(), "made the internal TLS certificates");
    }
    let admin_tls = modelhub_mtls::TlsDir::load(&mtls_dir, modelhub_mtls::Identity::Admin)?;

    let cancel = CancellationToken::new();
    let mut tasks = Vec::new();
    let (registry_l, registry) = loopback().await?;
    let (storage_l, storage) = loopback().await?;
    let (inference_l, inference) = loopback().await?;
    let (prover_l, prover) = loopback().await?;

    let registry_settings = modelhub_registry::Settings {
        kek_file: Some(kek_file.clone()),
        mongodb_uri: settings.mongodb_uri.clone(),
        chain: settings.chain.clone(),
        mtls_dir: mtls_dir.clone(),
        ..modelhub_registry::Settings::for_test(data.join("registry"))
    };
    let storage_settings = modelhub_storage::Settings {
        data_dir: data.join("storage"),
        kek_file: Some(kek_file.clone()),
        ipfs_api: settings.ipfs_api.clone(),
        mtls_dir: mtls_dir.clone(),
        ..modelhub_storage::Settings::for_test(&data.join("storage"))
    };
    let inference_settings = modelhub_inference::Settings {
        prover: Some(prover.clone()),
        mtls_dir: mtls_dir.clone(),
        ..modelhub_inference::Settings::for_test(&storage)
    };
    let prover_settings = modelhub_prover::Settings {
        kek_file: Some(kek_file.clone()),
        mtls_dir: mtls_dir.clone(),
        ..modelhub_prover::Settings::for_test(&data.join("prover"), &storage)
    };
    let gateway_settings = modelhub_gateway::Settings {
        prover: Some(prover.clone()),
        mtls_dir: mtls_dir.clone(),
        ..modelhub_gateway::Settings::for_test(registry.clone(), storage.clone(), inference.clone())
    };

    let stop = || cancel.clone().cancelled_owned();
    let mut spawn = |name, service: BoxFuture<'static, anyhow::Result<()>>| {
        tasks.push((name, tokio::spawn(service)));
    };
    spawn(
        "registry",
        Box::pin(modelhub_registry::run(
            registry_settings,
            registry_l,
            stop(),
        )),
    );
    spawn(
        "storage",
        Box::pin(modelhub_storage::run(storage_settings, storage_l, stop())),
    );
    spawn(
        "inference",
        Box::pin(modelhub_inference::run(
            inference_settings,
            inference_l,
            stop(),
        )),
    );
    spawn(
        "prover",
        Box::pin(modelhub_prover::run(prover_settings, prover_l, stop())),
    );

    let http = std::net::TcpListener::bind(settings.http)
        .with_context(|| format!("binding the gateway to {}", settings.http))?;
    let gateway_url = format!("http://{}", http.local_addr()?);
    spawn(
        "gateway",
        Box::pin(modelhub_gateway::run(gateway_settings, http, stop())),
    );

    let endpoints = Endpoints {
        registry,
        storage,
        inference,
        prover,
    };
    let admin_key_path = data.join("admin-key.json");
    let admin_key = match bootstrap_admin(&admin_tls, &endpoints.registry, &admin_key_path).await {
        Ok(k) => k,
        Err(e) => {
            let running = Running {
                gateway_url,
                admin_key_path,
                admin_key: dummy_key(),
                endpoints,
                mtls_dir,
                cancel,
                tasks,
            };
            running.stop().await;
            return Err(e);
        }
    };
    Ok(Running {
        gateway_url,
        admin_key_path,
        admin_key,
        endpoints,
        mtls_dir,
        cancel,
        tasks,
    })
}

fn dummy_key() -> KeyFile {
    KeyFile {
        key_id: String::new(),
        secret: String::new(),
        account_id: String::new(),
    }
}

/// Reads the admin key file, or creates an admin account and key through the registry (called
/// with `tls`, the `admin` certificate) and writes them there (mode 0600) when the file does
/// not exist yet.
pub async fn bootstrap_admin(
    tls: &modelhub_mtls::TlsDir,
    registry: &str,
    path: &Path,
) -> anyhow::Result<KeyFile> {
    if path.exists() {
        return KeyFile::read(path);
    }
    let channel =
        modelhub_mtls::lazy_channel(&tls.endpoint(modelhub_mtls::Identity::Registry, registry)?);
    let mut client = reg::registry_client::RegistryClient::new(channel);
    let account = client
        .create_account(reg::CreateAccountRequest {
            name: "admin".into(),
            admin: true,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating the admin account at the registry at {registry}"))?
        .into_inner();
    let key = client
        .create_key(reg::CreateKeyRequest {
            account_id: account.account_id.clone(),
        })
        .await
        .context("creating the admin key")?
        .into_inner();
    let key = KeyFile {
        key_id: key.key_id,
        secret: key.secret,
        account_id: key.account_id,
    };
    key.write_new(path)?;
    Ok(key)
}

impl Running {
    /// Runs until SIGINT or SIGTERM (or a service fails), then stops gracefully.
    /// `shutdown` is [`modelhub_core::serve::shutdown_signal`], made before the marketplace
    /// announced itself.
    pub async fn wait(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let failed = {
            let watch = futures::future::select_all(self.tasks.iter_mut().map(|(_, t)| t));
            tokio::select! {
                () = shutdown => None,
                (res, idx, _) = watch => Some((idx, res)),
            }
        };
        match failed {
            None => {
                self.stop().await;
                Ok(())
            }
            Some((idx, res)) => {
                let name = self.tasks.remove(idx).0;
                self.stop().await;
                match res {
                    Ok(Ok(())) => anyhow::bail!("the {name} service stopped unexpectedly"),
                    Ok(Err(e)) => Err(e.context(format!("the {name} service failed"))),
                    Err(e) => anyhow::bail!("the {name} service panicked: {e}"),
                }
            }
        }
    }

    /// Stops every service and waits for them to finish.
    pub async fn stop(self) {
        self.cancel.cancel();
        for (name, task) in self.tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(service = name, error = %e, "service stopped with an error")
                }
                Err(e) => tracing::warn!(service = name, error = %e, "service task failed"),
            }
        }
    }
}
