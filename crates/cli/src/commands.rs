//! The `modelhub` command line: running the marketplace (`up`, `serve`) and using it as a
//! client (`keys`, `models`, `predict`, ...).

use std::path::{Path, PathBuf};

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use futures::TryStreamExt;
use serde_json::{Value, json};

use crate::client::{Client, KeyFile, ModelUpload};
use crate::up::{self, UpSettings};

#[derive(Debug, Parser)]
#[command(
    name = "modelhub",
    version,
    about = "Model Hub: an open marketplace for ONNX models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where the proof commands cache halo2 params and verifying keys.
#[derive(Debug, Clone, Args)]
pub struct ParamsArgs {
    /// Where proving params and verifying keys are cached (made on first use; keys in
    /// `<params-dir>/keys`).
    #[arg(
        long,
        env = "MODELHUB_PARAMS_DIR",
        default_value = "./modelhub-data/params"
    )]
    pub params_dir: PathBuf,
}

/// Where the client commands find the gateway and the key they sign with.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Gateway base URL.
    #[arg(
        long,
        global = true,
        env = "MODELHUB_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// API key file ({"key_id","secret","account_id"}); `modelhub up` writes the admin's.
    #[arg(
        long,
        global = true,
        env = "MODELHUB_KEY_FILE",
        default_value = "./modelhub-data/admin-key.json"
    )]
    pub key_file: PathBuf,
}

impl ClientArgs {
    pub(crate) fn client(&self) -> anyhow::Result<Client> {
        Client::new(&self.url, KeyFile::read(&self.key_file)?)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole marketplace in this process with embedded back ends.
    Up(UpSettings),
    /// Run one service on its own.
    #[command(subcommand)]
    Serve(Serve),
    /// Make the certificates the internal services authenticate each other with (mutual TLS).
    Certs(crate::certs::CertsArgs),
    /// Operator tasks against the internal services.
    #[command(subcommand)]
    Admin(Admin),
    /// Create accounts (admin).
    #[command(subcommand)]
    Accounts(Accounts),
    /// Create and revoke API keys.
    #[command(subcommand)]
    Keys(Keys),
    /// Grant credits (admin, embedded ledger).
    #[command(subcommand)]
    Credits(Credits),
    /// Upload, list and show models.
    #[command(subcommand)]
    Models(Models),
    /// Run a paid prediction.
    Predict {
        /// The model: its id, HANDLE/NAME@VERSION, or NAME@VERSION for one of your own.
        model: String,
        /// The inputs: a JSON list of tensors, or a whole request body {"inputs": [...]}, or
        /// @FILE to read it from a file.
        #[arg(long)]
        input: String,
        /// Refuse to pay more than this many credits for the call (the gateway answers 409
        /// before charging anything when the model costs more).
        #[arg(long)]
        max_price: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Check and move model blobs (operators).
    #[command(subcommand)]
    Storage(Storage),
    /// Fetch and verify zero-knowledge proofs of predictions.
    #[command(subcommand)]
    Proofs(Proofs),
    /// The marketplace contract: deploy, register models, buy credits, withdraw earnings.
    #[command(subcommand)]
    Chain(crate::chain::Chain),
    /// Show the key's account: credits and earnings.
    Account {
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum Serve {
    Registry(modelhub_registry::ServeArgs),
    Storage(modelhub_storage::ServeArgs),
    Inference(modelhub_inference::ServeArgs),
    Prover(modelhub_prover::ServeArgs),
    Gateway(modelhub_gateway::ServeArgs),
}

/// Which blob store a storage command looks at.
#[derive(Debug, Clone, Args)]
pub struct BlobArgs {
    /// An IPFS node's RPC API (e.g. http://127.0.0.1:5001).
    #[arg(
        long,
        env = "MODELHUB_STORAGE_IPFS_API",
        conflicts_with = "storage_dir"
    )]
    pub ipfs_api: Option<String>,
    /// The embedded store: the storage service's data folder (holding `blobs/`).
    #[arg(long, default_value = "./modelhub-data/storage")]
    pub storage_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Storage {
    /// Reconcile the blob store with the registry (the models listed through the gateway with
    /// an admin key): reports blobs missing, unpinned, unreadable (--contents) or unexpected.
    /// Exits non-zero unless every model's blob is there.
    Verify {
        #[command(flatten)]
        blobs: BlobArgs,
        /// Also read every blob back and check its CID.
        #[arg(long)]
        contents: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Copy every blob of an embedded store into an IPFS node, checking each CID is unchanged
    /// (so no registry record needs to change).
    Export {
        /// The IPFS node's RPC API.
        #[arg(long)]
        to_ipfs: String,
        /// The embedded store's data folder (holding `blobs/`).
        #[arg(long, default_value = "./modelhub-data/storage")]
        storage_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum Proofs {
    /// Fetch the proof of a prediction (`proof_job` of a predict answer).
    Get {
        /// The proof job id (`proof_job` of the predict answer).
        job: String,
        /// Seconds to wait for the proof to finish.
        #[arg(long, default_value_t = 30)]
        wait: u64,
        /// Write the proof file here.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Verify a proof file against the model it must be for (crates/cli/src/proofs.rs).
    Verify {
        /// The proof file (`modelhub proofs get --out`).
        file: PathBuf,
        /// The model (id, HANDLE/NAME@VERSION, or NAME@VERSION): its digest comes from the gateway's record.
        #[arg(long)]
        model: Option<String>,
        /// The expected model digest (64 hex digits), instead of --model.
        #[arg(long)]
        digest: Option<String>,
        /// A JSON file with your float input: it must be the proof's input.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Debugging only: check the proof against itself (proves nothing about the model).
        #[arg(long)]
        self_consistent_only: bool,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        params: ParamsArgs,
        #[command(flatten)]
        on_chain: crate::chain::OnChainArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum Admin {
    /// Create the first admin account and key through the registry's gRPC API and write the
    /// key file (mode 0600). Does nothing if the file exists.
    Bootstrap {
        /// gRPC address of the registry.
        #[arg(
            long,
            env = "MODELHUB_REGISTRY",
            default_value = "https://127.0.0.1:50051"
        )]
        registry: String,
        /// Where to write the admin key file.
        #[arg(long, default_value = "./admin-key.json")]
        out: PathBuf,
        /// Certificates folder (`modelhub certs`): the registry is called as `admin`.
        #[arg(
            long,
            env = "MODELHUB_ADMIN_MTLS_DIR",
            default_value = "./modelhub-data/tls"
        )]
        mtls_dir: PathBuf,
    },
    /// Rotate the key-encryption key while everything runs: put a new key first in the KEK
    /// file (the old ones stay, to unwrap), wait for the services to follow the file, then
    /// have the registry re-wrap every model's data key and API key secret and the prover
    /// every commitment opening. Blobs are not re-encrypted. Run again if cut short: it resumes.
    /// Later, `--retire` re-wraps whatever came in meanwhile and drops the old keys.
    RotateKek {
        /// The deployment's KEK file (every service reads the same one).
        #[arg(long, env = "MODELHUB_KEK_FILE", default_value = "./modelhub-data/kek")]
        kek_file: PathBuf,
        /// gRPC address of the registry.
        #[arg(
            long,
            env = "MODELHUB_REGISTRY",
            default_value = "https://127.0.0.1:50051"
        )]
        registry: String,
        /// gRPC address of the prover, when the deployment has one.
        #[arg(long, env = "MODELHUB_PROVER")]
        prover: Option<String>,
        /// Certificates folder (`modelhub certs`): the services are called as `admin`.
        #[arg(
            long,
            env = "MODELHUB_ADMIN_MTLS_DIR",
            default_value = "./modelhub-data/tls"
        )]
        mtls_dir: PathBuf,
        /// Seconds to wait after staging a new key for every service to wrap with it (a
        /// service looks at its KEK file at least once a second; on Kubernetes, where a
        /// Secret reaches the pods a minute or more later, wait longer).
        #[arg(long, default_value_t = 3)]
        settle_secs: u64,
        /// Finish the rotation: re-wrap once more, then keep only the current key in the file
        /// (refused while anything is left that only an old key opens). Run it once gateways'
        /// model caches (60 s) and pending proofs no longer hold old wraps.
        #[arg(long)]
        retire: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum Accounts {
    /// Create an account (admin); optionally grant it credits and write a first key for it.
    Create {
        /// The account's display name.
        name: String,
        /// EVM address whose confirmed purchases (`buyCredits()`) credit the account, with the
        /// chain ledger.
        #[arg(long)]
        wallet: Option<String>,
        /// The account's public handle (2 to 39 of a-z 0-9 -; unique, never changed): its
        /// models are named HANDLE/NAME@VERSION.
        #[arg(long)]
        handle: Option<String>,
        /// Credits to grant the new account (embedded ledger).
        #[arg(long)]
        credits: Option<u64>,
        /// Create a key for the new account and write it to this file (mode 0600).
        #[arg(long)]
        key_out: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum Keys {
    /// Create a key for your own account, or (admin) for --account.
    Create {
        /// The account to make the key for (admin only; default: your own).
        #[arg(long)]
        account: Option<String>,
        /// Write the key to this file (mode 0600) instead of printing only.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Give a key of your own account (admin: any key) a new secret, without downtime: the
    /// current secret stays accepted for --grace-secs beside the new one.
    Rotate {
        /// The key id to rotate (default: the key this command signs with).
        key_id: Option<String>,
        /// Seconds the current secret stays accepted (at most 7 days; 0: not at all).
        #[arg(long, default_value_t = 86_400)]
        grace_secs: u64,
        /// Write the rotated key (same id, new secret) to this new file (mode 0600).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Revoke a key of your own account (admin: any key); it stops working at once.
    Revoke {
        /// The key id to revoke.
        key_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum Credits {
    /// Grant credits to an account (admin, embedded ledger).
    Grant {
        /// The account id.
        account: String,
        /// Credits to add.
        amount: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum Models {
    /// Upload an ONNX file (streamed, with a progress bar).
    Upload {
        /// The ONNX file.
        file: PathBuf,
        /// The model's name (with the version, unique in the marketplace).
        #[arg(long)]
        name: String,
        /// The version of this upload.
        #[arg(long)]
        version: String,
        /// Credits per prediction.
        #[arg(long)]
        price: u64,
        /// Credits per delivered proof of a prediction (default: the gateway's, proportional
        /// to the circuit's size; a model without a circuit has no proofs).
        #[arg(long)]
        proof_price: Option<u64>,
        /// The range the model's input values lie in, as MIN,MAX (default 0,1): proofs are
        /// calibrated on it, and inputs outside it can't be proved.
        #[arg(long, value_name = "MIN,MAX", value_parser = parse_input_range, allow_hyphen_values = true)]
        input_range: Option<modelhub_core::InputRange>,
        /// The most rows (batch size) one predict of this version may hold (default: no cap
        /// of its own; the gateway's limit applies either way).
        #[arg(long)]
        max_rows: Option<u32>,
        /// The most predictions (rows) of this version one account may make per minute
        /// (default: no quota of its own); more are refused with 429 and `retry-after`.
        #[arg(long)]
        calls_per_minute: Option<u32>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List every model version: owner, price, signature, commitment.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one model version's record.
    Get {
        /// The model: its id, HANDLE/NAME@VERSION, or NAME@VERSION for one of your own.
        model: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a model version you own (admin: any), and its blob.
    Delete {
        /// The model: its id, HANDLE/NAME@VERSION, or NAME@VERSION for one of your own.
        model: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Recompute a model's digest on this machine from its ONNX file and the opening its
    /// upload answered (`zk_opening`), and compare it with the registry's: it shows the
    /// registered commitment is the one of these weights (crates/cli/src/proofs.rs).
    CheckCommitment {
        /// The ONNX file that was uploaded.
        file: PathBuf,
        /// A JSON file with the upload answer's `zk_opening` (or the whole upload answer).
        #[arg(long)]
        opening: PathBuf,
        /// The model: its id, HANDLE/NAME@VERSION, or NAME@VERSION for one of your own.
        #[arg(long)]
        model: String,
        /// The input range declared at upload, as MIN,MAX (default 0,1).
        #[arg(long, value_name = "MIN,MAX", value_parser = parse_input_range, allow_hyphen_values = true)]
        input_range: Option<modelhub_core::InputRange>,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        params: ParamsArgs,
        #[command(flatten)]
        on_chain: crate::chain::OnChainArgs,
    },
}

/// Runs one command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(settings) => {
            let stop = modelhub_core::serve::shutdown_signal();
            let running = up::start(settings).await?;
            println!("Model Hub is up.");
            println!("  gateway:   {}", running.gateway_url);
            println!("  admin key: {}", running.admin_key_path.display());
            println!("Press ctrl-c to stop.");
            running.wait(stop).await
        }
        Command::Serve(serve) => run_service(serve).await,
        Command::Certs(args) => crate::certs::run(&args),
        Command::Admin(Admin::Bootstrap {
            registry,
            out,
            mtls_dir,
        }) => {
            let tls = modelhub_mtls::TlsDir::load(&mtls_dir, modelhub_mtls::Identity::Admin)?;
            let key = up::bootstrap_admin(&tls, &registry, &out).await?;
            print_json(
                &json!({ "account_id": key.account_id, "key_id": key.key_id, "key_file": out }),
            );
            Ok(())
        }
        Command::Admin(Admin::RotateKek {
            kek_file,
            registry,
            prover,
            mtls_dir,
            settle_secs,
            retire,
        }) => {
            let tls = modelhub_mtls::TlsDir::load(&mtls_dir, modelhub_mtls::Identity::Admin)?;
            let outcome = crate::kek::rotate(
                &tls,
                &crate::kek::Rotation {
                    kek_file,
                    registry,
                    prover,
                    settle: std::time::Duration::from_secs(settle_secs),
                    retire,
                },
            )
            .await?;
            print_json(&outcome);
            Ok(())
        }
        Command::Accounts(Accounts::Create {
            name,
            wallet,
            handle,
            credits,
            key_out,
            client,
        }) => {
            let client = client.client()?;
            let mut v = client
                .post(
                    "/v1/accounts",
                    &json!({ "name": name, "wallet": wallet, "handle": handle }),
                )
                .await?
                .ok()?;
            let account_id = v["account_id"]
                .as_str()
                .context("no account_id in the answer")?
                .to_string();
            if let Some(amount) = credits {
                let body = json!({ "account_id": account_id, "amount": amount });
                v["credits"] =
                    client.post("/v1/credits/grant", &body).await?.ok()?["credits"].take();
            }
            if let Some(out) = key_out {
                let key = client
                    .post("/v1/keys", &json!({ "account_id": account_id }))
                    .await?
                    .ok()?;
                let key: KeyFile = serde_json::from_value(key).context("reading the new key")?;
                key.write_new(&out)?;
                v["key_id"] = json!(key.key_id);
                v["key_file"] = json!(out);
            }
            print_json(&v);
            Ok(())
        }
        Command::Keys(Keys::Create {
            account,
            out,
            client,
        }) => {
            let body = match &account {
                Some(a) => json!({ "account_id": a }),
                None => json!({}),
            };
            let v = client.client()?.post("/v1/keys", &body).await?.ok()?;
            if let Some(out) = out {
                let key: KeyFile =
                    serde_json::from_value(v.clone()).context("reading the new key")?;
                key.write_new(&out)?;
                eprintln!("key written to {}", out.display());
            }
            print_json(&v);
            Ok(())
        }
        Command::Keys(Keys::Rotate {
            key_id,
            grace_secs,
            out,
            client,
        }) => {
            let client = client.client()?;
            let key_id = key_id.unwrap_or_else(|| client.key().key_id.clone());
            let v = client
                .post(
                    &format!("/v1/keys/{key_id}/rotate"),
                    &json!({ "grace_secs": grace_secs }),
                )
                .await?
                .ok()?;
            if let Some(out) = out {
                let key: KeyFile =
                    serde_json::from_value(v.clone()).context("reading the rotated key")?;
                key.write_new(&out)?;
                eprintln!("rotated key written to {}", out.display());
            }
            print_json(&v);
            Ok(())
        }
        Command::Keys(Keys::Revoke { key_id, client }) => {
            client
                .client()?
                .delete(&format!("/v1/keys/{key_id}"))
                .await?
                .ok()?;
            eprintln!("revoked {key_id}");
            Ok(())
        }
        Command::Credits(Credits::Grant {
            account,
            amount,
            client,
        }) => {
            let body = json!({ "account_id": account, "amount": amount });
            print_json(
                &client
                    .client()?
                    .post("/v1/credits/grant", &body)
                    .await?
                    .ok()?,
            );
            Ok(())
        }
        Command::Models(Models::Upload {
            file,
            name,
            version,
            price,
            proof_price,
            input_range,
            max_rows,
            calls_per_minute,
            client,
        }) => {
            let v = upload_file(
                &client.client()?,
                &file,
                &ModelUpload {
                    name,
                    version,
                    price,
                    proof_price,
                    input_range,
                    max_rows,
                    calls_per_minute,
                },
            )
            .await?;
            print_json(&v);
            Ok(())
        }
        Command::Models(Models::List { client }) => {
            print_json(&client.client()?.get("/v1/models").await?.ok()?);
            Ok(())
        }
        Command::Models(Models::CheckCommitment {
            file,
            opening,
            model,
            input_range,
            client,
            params: ParamsArgs { params_dir },
            on_chain,
        }) => {
            crate::proofs::check_commitment(crate::proofs::CheckArgs {
                file,
                opening,
                model,
                input_range: input_range.unwrap_or_default(),
                client,
                params_dir,
                on_chain,
            })
            .await
        }
        Command::Models(Models::Get { model, client }) => {
            let client = client.client()?;
            let model_id = resolve_model(&client, &model).await?;
            print_json(&client.get(&format!("/v1/models/{model_id}")).await?.ok()?);
            Ok(())
        }
        Command::Models(Models::Delete { model, client }) => {
            let client = client.client()?;
            let model_id = resolve_model(&client, &model).await?;
            client
                .delete(&format!("/v1/models/{model_id}"))
                .await?
                .ok()?;
            eprintln!("deleted {model_id}");
            Ok(())
        }
        Command::Predict {
            model,
            input,
            max_price,
            client,
        } => {
            let mut body = predict_body(&input)?;
            if let (Some(max), Some(b)) = (max_price, body.as_object_mut()) {
                b.insert("max_price".into(), max.into());
            }
            let client = client.client()?;
            let model_id = resolve_model(&client, &model).await?;
            // Under an idempotency key, retried on a lost connection or a 503: charged once.
            let v = client.predict_body(&model_id, &body).await?.ok()?;
            print_json(&v);
            Ok(())
        }
        Command::Storage(Storage::Verify {
            blobs,
            contents,
            client,
        }) => {
            let models = client.client()?.get("/v1/models").await?.ok()?;
            let expected: Vec<String> = models
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["cid"].as_str().map(str::to_string))
                .collect();
            let store: Box<dyn modelhub_storage::BlobStore> = match &blobs.ipfs_api {
                Some(api) => Box::new(modelhub_storage::IpfsBlobStore::new(
                    api,
                    Default::default(),
                )?),
                None => Box::new(modelhub_storage::LocalBlobStore::open(&blobs.storage_dir)?),
            };
            let report = if contents {
                modelhub_storage::reconcile::verify_contents(store.as_ref(), &expected).await?
            } else {
                modelhub_storage::reconcile::verify(store.as_ref(), &expected).await?
            };
            print_json(&json!({
                "clean": report.is_clean(),
                "ok": report.ok.len(),
                "missing": report.missing,
                "unreadable": report.unreadable,
                "unexpected": report.unexpected,
            }));
            anyhow::ensure!(
                report.is_clean(),
                "the blob store is missing or cannot read some models' blobs"
            );
            Ok(())
        }
        Command::Storage(Storage::Export {
            to_ipfs,
            storage_dir,
        }) => {
            let from = modelhub_storage::LocalBlobStore::open(&storage_dir)?;
            let to = modelhub_storage::IpfsBlobStore::new(&to_ipfs, Default::default())?;
            let report = modelhub_storage::reconcile::export(&from, &to).await?;
            print_json(
                &json!({ "copied": report.copied, "bytes": report.bytes, "failed": report.failed }),
            );
            anyhow::ensure!(report.failed.is_empty(), "some blobs could not be exported");
            Ok(())
        }
        Command::Proofs(Proofs::Get {
            job,
            wait,
            out,
            client,
        }) => {
            let v = client
                .client()?
                .get(&format!("/v1/proofs/{job}?wait={wait}"))
                .await?
                .ok()?;
            if let Some(out) = out {
                anyhow::ensure!(
                    v["status"] == "done",
                    "the proof is {} (not written)",
                    v["status"]
                );
                std::fs::write(&out, serde_json::to_vec_pretty(&v["proof"])?)
                    .with_context(|| format!("writing {}", out.display()))?;
                eprintln!("proof written to {}", out.display());
            }
            print_json(&v);
            Ok(())
        }
        Command::Proofs(Proofs::Verify {
            file,
            params: ParamsArgs { params_dir },
            model,
            digest,
            input,
            self_consistent_only,
            client,
            on_chain,
        }) => {
            crate::proofs::verify(crate::proofs::VerifyArgs {
                file,
                params_dir,
                model,
                digest,
                input,
                self_consistent_only,
                client,
                on_chain,
            })
            .await
        }
        Command::Chain(chain) => crate::chain::run(chain).await,
        Command::Account { client } => {
            print_json(&client.client()?.get("/v1/account").await?.ok()?);
            Ok(())
        }
    }
}

/// `MIN,MAX` as an input range.
fn parse_input_range(s: &str) -> Result<modelhub_core::InputRange, String> {
    let (min, max) = s
        .split_once(',')
        .ok_or_else(|| format!("expected MIN,MAX, got {s:?}"))?;
    let num = |v: &str| {
        v.trim()
            .parse::<f32>()
            .map_err(|e| format!("{v:?} is not a number: {e}"))
    };
    modelhub_core::InputRange::new(num(min)?, num(max)?)
}

/// A model reference as the CLI takes it: a model id; `NAMESPACE/NAME@VERSION`, the namespace
/// being the owner's handle or account id; or `NAME@VERSION`, one of the caller's own models.
/// A name is resolved through `GET /v1/models`, and what it resolved to (owner and price) is
/// shown on stderr: a name never silently picks another owner's model.
pub(crate) async fn resolve_model(client: &Client, model: &str) -> anyhow::Result<String> {
    let Some((path, version)) = model.split_once('@') else {
        return Ok(model.to_string());
    };
    let (namespace, name) = match path.split_once('/') {
        Some((ns, name)) => (ns.to_owned(), name),
        None => {
            let me = client.get("/v1/account").await?.ok()?;
            let id = me["account_id"]
                .as_str()
                .context("no account_id in /v1/account")?;
            (id.to_owned(), path)
        }
    };
    let models = client.get("/v1/models").await?.ok()?;
    let same_name: Vec<&Value> = models
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["name"] == name && m["version"] == version)
        .collect();
    let Some(found) = same_name
        .iter()
        .find(|m| m["owner"] == namespace.as_str() || m["owner_handle"] == namespace.as_str())
    else {
        let mut others: Vec<&str> = same_name
            .iter()
            .filter_map(|m| m["full_name"].as_str())
            .collect();
        others.sort_unstable();
        let mine = if path.contains('/') {
            namespace.as_str()
        } else {
            "your account"
        };
        anyhow::bail!(
            "no model {name} version {version} in {mine}{}",
            if others.is_empty() {
                String::new()
            } else {
                format!(" (other owners publish it as: {})", others.join(", "))
            }
        );
    };
    let model_id = found["model_id"]
        .as_str()
        .context("no model_id in the model record")?;
    eprintln!(
        "{} is {model_id}: owner {}, price {} credits per call",
        found["full_name"].as_str().unwrap_or(model),
        found["owner"].as_str().unwrap_or("?"),
        found["price"]
    );
    Ok(model_id.to_string())
}

/// Prints JSON on stdout; a closed stdout (`modelhub ... | head`) is not an error.
pub(crate) fn print_json(v: &Value) {
    use std::io::Write;
    let text = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

/// Reads `--input`: inline JSON or `@file`; a bare list of tensors is wrapped as `{"inputs": [...]}`.
pub fn predict_body(input: &str) -> anyhow::Result<Value> {
    let text = match input.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
        None => input.to_string(),
    };
    let v: Value = serde_json::from_str(&text).context("--input is not valid JSON")?;
    Ok(match v {
        Value::Array(_) => json!({ "inputs": v }),
        Value::Object(ref o) if o.contains_key("inputs") => v,
        Value::Object(_) => json!({ "inputs": [v] }),
        _ => anyhow::bail!("--input must be a tensor, a list of tensors, or {{\"inputs\": [...]}}"),
    })
}

/// Hashes the file in one pass, then streams it to the gateway in a second, with a progress bar.
pub async fn upload_file(
    client: &Client,
    file: &Path,
    query: &ModelUpload,
) -> anyhow::Result<Value> {
    use sha2::Digest;
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("opening {}", file.display()))?;
    let size = f.metadata().await?.len();
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let sha = hex::encode(hasher.finalize());

    let bar = indicatif::ProgressBar::new(size);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("uploading {}", file.display()));
    let f = tokio::fs::File::open(file).await?;
    let progress = bar.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024)
        .inspect_ok(move |chunk: &Bytes| progress.inc(chunk.len() as u64));
    let answer = client.upload_stream(query, &sha, stream).await;
    bar.finish_and_clear();
    answer?.ok()
}

/// Runs one service until SIGINT or SIGTERM.
async fn run_service(serve: Serve) -> anyhow::Result<()> {
    let stop = modelhub_core::serve::shutdown_signal();
    match serve {
        Serve::Registry(args) => args.serve(stop).await,
        Serve::Storage(args) => args.serve(stop).await,
        Serve::Inference(args) => args.serve(stop).await,
        Serve::Prover(args) => args.serve(stop).await,
        Serve::Gateway(args) => args.serve(stop).await,
    }
}

#[cfg(test)]
mod help_tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every subcommand (at any depth) has its own about text, distinct from its siblings'
    /// and from the flattened client arguments' doc; every argument has a help text.
    #[test]
    fn every_subcommand_and_argument_has_its_own_help() {
        fn walk(cmd: &clap::Command, path: &str, problems: &mut Vec<String>) {
            let mut seen = std::collections::HashMap::new();
            for sub in cmd.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                match sub.get_about().map(|a| a.to_string()) {
                    None => problems.push(format!("{name}: no about text")),
                    Some(about) if about.starts_with("Where the client commands") => {
                        problems.push(format!("{name}: shows the client arguments' text"))
                    }
                    Some(about) => {
                        if let Some(other) = seen.insert(about.clone(), name.clone()) {
                            problems.push(format!("{name} and {other} share their about text"));
                        }
                    }
                }
                for arg in sub.get_arguments() {
                    let id = arg.get_id().as_str();
                    if id == "help" || id == "version" {
                        continue;
                    }
                    if arg.get_help().is_none() && arg.get_long_help().is_none() {
                        problems.push(format!("{name}: argument {id} has no help"));
                    }
                }
                walk(sub, &name, problems);
            }
        }
        let cmd = Cli::command();
        let mut problems = Vec::new();
        walk(&cmd, "modelhub", &mut problems);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}
