//! `modelhub chain ...`: the marketplace contract as creators, users and its admin use it,
//! straight on the chain with their own wallet key (deploy, register a model, buy credits,
//! withdraw earnings, set operators), plus the registry's view through the gateway (`status`,
//! `settle`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use modelhub_chain::{Address, Marketplace, U256};
use serde_json::{Value, json};

use crate::commands::{ClientArgs, print_json, resolve_model};

/// Where the chain is.
#[derive(Debug, Clone, Args)]
pub struct RpcArgs {
    /// EVM JSON-RPC endpoint.
    #[arg(
        long,
        env = "MODELHUB_CHAIN_RPC",
        default_value = "http://127.0.0.1:8545"
    )]
    pub chain_rpc: String,
}

/// A model's record on the marketplace contract, read through the RPC URL alone (no gateway):
/// for `proofs verify --chain` and `models check-commitment --chain`.
#[derive(Debug, Clone, Args)]
pub struct OnChainArgs {
    /// Check against the model digest the marketplace contract records for the model (with
    /// --marketplace and --owner; `proofs verify` then needs no gateway, and --model must be a
    /// model id).
    #[arg(long, requires_all = ["marketplace", "owner"])]
    pub chain: bool,
    /// Marketplace contract address.
    #[arg(long, env = "MODELHUB_MARKETPLACE")]
    pub marketplace: Option<String>,
    /// The wallet that registered the model on chain (its owner's).
    #[arg(long)]
    pub owner: Option<String>,
    #[command(flatten)]
    pub rpc: RpcArgs,
}

impl OnChainArgs {
    /// The digest the contract records for `model_id` registered by `--owner`; an error when it
    /// is not registered, has no digest, or is deactivated.
    pub async fn digest(&self, model_id: &str) -> anyhow::Result<modelhub_zk::ModelDigest> {
        let marketplace = self
            .marketplace
            .as_deref()
            .context("--chain needs --marketplace")?;
        let owner = self.owner.as_deref().context("--chain needs --owner")?;
        let contract = modelhub_chain::parse_address(marketplace).context("--marketplace")?;
        let owner = modelhub_chain::parse_address(owner).context("--owner")?;
        let market = Marketplace::connect(&self.rpc.chain_rpc, contract, None).await?;
        let key = modelhub_chain::model_key(owner, model_id);
        let model = market.get_model(key).await?.with_context(|| {
            format!(
                "model {model_id} is not registered on chain by {}",
                modelhub_chain::wallet_string(owner)
            )
        })?;
        anyhow::ensure!(model.active, "model {model_id} is deactivated on chain");
        anyhow::ensure!(
            !model.commitment.is_zero(),
            "model {model_id} is registered on chain without a digest (no circuit)"
        );
        Ok(modelhub_zk::ModelDigest(model.commitment.0))
    }
}

/// Where the chain is, and the wallet that signs.
#[derive(Debug, Clone, Args)]
pub struct WalletArgs {
    #[command(flatten)]
    pub rpc: RpcArgs,
    /// File holding the wallet's private key (0x hex; keep it 0600).
    #[arg(long, env = "MODELHUB_WALLET_KEY_FILE")]
    pub wallet_key_file: PathBuf,
}

/// The contract too.
#[derive(Debug, Clone, Args)]
pub struct MarketArgs {
    #[command(flatten)]
    pub wallet: WalletArgs,
    /// Marketplace contract address (`modelhub chain deploy` prints it; `modelhub chain status`
    /// shows the one the registry uses).
    #[arg(long, env = "MODELHUB_MARKETPLACE")]
    pub marketplace: String,
}

impl MarketArgs {
    async fn connect(&self) -> anyhow::Result<Marketplace> {
        connect(&self.wallet, &self.marketplace).await
    }
}

async fn connect(wallet: &WalletArgs, marketplace: &str) -> anyhow::Result<Marketplace> {
    let signer = modelhub_chain::load_signer(&wallet.wallet_key_file)
        .with_context(|| format!("reading {}", wallet.wallet_key_file.display()))?;
    let address = modelhub_chain::parse_address(marketplace).context("--marketplace")?;
    Ok(Marketplace::connect(&wallet.rpc.chain_rpc, address, Some(signer)).await?)
}

#[derive(Debug, Subcommand)]
pub enum Chain {
    /// Deploy the marketplace contract (the Solidity twin on an EVM dev chain; see
    /// docs/OPERATIONS.md for the Stylus contract on Arbitrum) and print its address.
    Deploy {
        #[command(flatten)]
        wallet: WalletArgs,
        /// Admin of the contract (default: the deploying wallet).
        #[arg(long)]
        admin: Option<String>,
        /// Price of one credit in wei.
        #[arg(long, default_value = "1000000000000")]
        wei_per_credit: String,
        /// The first account that may settle usage (`consumeCredits`), e.g. the registry's
        /// operator: enabled at once. Later operators are named with `set-operator` and accept
        /// after the contract's delay.
        #[arg(long)]
        operator: Option<String>,
    },
    /// Name an account as operator (it accepts after the contract's delay with
    /// `accept-operator`), or with --disable revoke it at once (admin wallet).
    SetOperator {
        /// The operator's address.
        operator: String,
        /// Forbid instead of allow.
        #[arg(long)]
        disable: bool,
        #[command(flatten)]
        market: MarketArgs,
    },
    /// Take the operator role the admin named this wallet to, once the delay has passed.
    AcceptOperator {
        #[command(flatten)]
        market: MarketArgs,
    },
    /// Propose the next admin (admin wallet); it accepts after the delay with `accept-admin`.
    ProposeAdmin {
        /// The proposed admin's address (`0x` + 40 hex digits).
        admin: String,
        #[command(flatten)]
        market: MarketArgs,
    },
    /// Take the admin role this wallet was proposed for, once the delay has passed.
    AcceptAdmin {
        #[command(flatten)]
        market: MarketArgs,
    },
    /// Pause (or with --resume, resume) settlement and purchases (admin wallet). Withdrawals
    /// and refunds are never paused.
    Pause {
        /// Resume instead of pause.
        #[arg(long)]
        resume: bool,
        #[command(flatten)]
        market: MarketArgs,
    },
    /// Cap the credits operators may settle from this wallet per day.
    SetDailyCap {
        /// Most credits operators may settle from this wallet per UTC day (0: none at all). A
        /// raise is in force at once; a lower cap takes effect two days later on chain (the
        /// registry refuses charges past it as soon as it sees it).
        #[arg(long)]
        credits: String,
        #[command(flatten)]
        market: MarketArgs,
    },
    /// Ask for unspent credits back in ETH: claimable with `refund-claim` after the lock.
    RefundRequest {
        /// How many unspent credits to turn back into ETH.
        #[arg(long)]
        credits: u64,
        #[command(flatten)]
        market: MarketArgs,
    },
    /// Claim a requested refund once its lock has passed.
    RefundClaim {
        #[command(flatten)]
        market: MarketArgs,
    },
    /// Register an uploaded model on chain with its price, CID hash and model digest, from its
    /// owner's wallet: predictions are charged only once this is done. A model with a circuit
    /// also gets its proofs registered, at its proof price (`<model id>/proof`). What is
    /// registered already is left as it is, so running it again finishes a half-done one.
    Register {
        /// The model: its id, HANDLE/NAME@VERSION, or NAME@VERSION for one of your own.
        model: String,
        #[command(flatten)]
        wallet: WalletArgs,
        /// Marketplace address (default: the registry's, from `GET /v1/ledger`).
        #[arg(long, env = "MODELHUB_MARKETPLACE")]
        marketplace: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Buy credits with the wallet (`buyCredits()`); the registry counts them once confirmed.
    Buy {
        /// How many credits to buy.
        #[arg(long)]
        credits: u64,
        #[command(flatten)]
        market: MarketArgs,
    },
    /// Pay the wallet's settled earnings out (`withdraw()`).
    Withdraw {
        #[command(flatten)]
        market: MarketArgs,
    },
    /// Credits and earnings of an address on chain.
    Balance {
        /// The address to look up.
        address: String,
        #[command(flatten)]
        rpc: RpcArgs,
        /// Marketplace contract address.
        #[arg(long, env = "MODELHUB_MARKETPLACE")]
        marketplace: String,
    },
    /// The registry's ledger: contract, followed block, settlement batches.
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Count confirmed deposits and settle committed usage now (admin).
    Settle {
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn tx(hash: modelhub_chain::B256) -> Value {
    json!(format!("{hash:#x}"))
}

/// Runs one `modelhub chain` command.
pub async fn run(command: Chain) -> anyhow::Result<()> {
    match command {
        Chain::Deploy {
            wallet,
            admin,
            wei_per_credit,
            operator,
        } => {
            let signer = modelhub_chain::load_signer(&wallet.wallet_key_file)
                .with_context(|| format!("reading {}", wallet.wallet_key_file.display()))?;
            let deployer = signer.address();
            let admin = match admin {
                Some(a) => modelhub_chain::parse_address(&a).context("--admin")?,
                None => deployer,
            };
            let rate: U256 = wei_per_credit
                .parse()
                .context("--wei-per-credit must be a whole number of wei")?;
            let operator: Option<Address> = operator
                .map(|op| modelhub_chain::parse_address(&op).context("--operator"))
                .transpose()?;
            let market =
                Marketplace::deploy(&wallet.rpc.chain_rpc, signer, admin, rate, operator).await?;
            let operators: Vec<String> = operator
                .map(modelhub_chain::wallet_string)
                .into_iter()
                .collect();
            print_json(&json!({
                "marketplace": modelhub_chain::wallet_string(market.address()),
                "chain_id": market.chain_id().await?,
                "admin": modelhub_chain::wallet_string(admin),
                "wei_per_credit": rate.to_string(),
                "operators": operators,
                "block": market.block_number().await?,
            }));
            Ok(())
        }
        Chain::SetOperator {
            operator,
            disable,
            market,
        } => {
            let op = modelhub_chain::parse_address(&operator).context("operator")?;
            let hash = market.connect().await?.set_operator(op, !disable).await?;
            print_json(
                &json!({ "operator": modelhub_chain::wallet_string(op), "enabled": !disable, "tx": tx(hash) }),
            );
            Ok(())
        }
        Chain::AcceptOperator { market } => {
            let market = market.connect().await?;
            let hash = market.accept_operator().await?;
            let me = market.sender().context("no wallet")?;
            print_json(&json!({ "operator": modelhub_chain::wallet_string(me), "tx": tx(hash) }));
            Ok(())
        }
        Chain::ProposeAdmin { admin, market } => {
            let next = modelhub_chain::parse_address(&admin).context("admin")?;
            let market = market.connect().await?;
            let hash = market.propose_admin(next).await?;
            print_json(
                &json!({ "proposed_admin": modelhub_chain::wallet_string(next), "tx": tx(hash) }),
            );
            Ok(())
        }
        Chain::AcceptAdmin { market } => {
            let market = market.connect().await?;
            let hash = market.accept_admin().await?;
            let me = market.sender().context("no wallet")?;
            print_json(&json!({ "admin": modelhub_chain::wallet_string(me), "tx": tx(hash) }));
            Ok(())
        }
        Chain::Pause { resume, market } => {
            let hash = market.connect().await?.set_paused(!resume).await?;
            print_json(&json!({ "paused": !resume, "tx": tx(hash) }));
            Ok(())
        }
        Chain::SetDailyCap { credits, market } => {
            let cap: U256 = credits
                .parse()
                .context("--credits must be a whole number of credits")?;
            let market = market.connect().await?;
            let hash = market.set_daily_cap(cap).await?;
            let me = market.sender().context("no wallet")?;
            let in_force = market.daily_cap_of(me).await?;
            let (pending, effective_at) = market.pending_daily_cap_of(me).await?;
            // A raise is in force at once; a lower cap only after CAP_DELAY (two days).
            print_json(&json!({
                "daily_cap": cap.to_string(),
                "in_force": in_force.to_string(),
                "pending": (!effective_at.is_zero()).then(|| json!({
                    "daily_cap": pending.to_string(),
                    "effective_at": effective_at.to_string(),
                })),
                "tx": tx(hash),
            }));
            Ok(())
        }
        Chain::RefundRequest { credits, market } => {
            let market = market.connect().await?;
            let hash = market.request_refund(U256::from(credits)).await?;
            let me = market.sender().context("no wallet")?;
            let (requested, not_before) = market.refund_of(me).await?;
            print_json(&json!({
                "credits": requested.to_string(),
                "not_before": not_before.to_string(),
                "tx": tx(hash),
            }));
            Ok(())
        }
        Chain::RefundClaim { market } => {
            let market = market.connect().await?;
            let me = market.sender().context("no wallet")?;
            let before = market.credits_of(me).await?;
            let hash = market.claim_refund().await?;
            let after = market.credits_of(me).await?;
            let credits = before.saturating_sub(after);
            print_json(&json!({
                "credits": credits.to_string(),
                "wei": (credits * market.wei_per_credit().await?).to_string(),
                "tx": tx(hash),
            }));
            Ok(())
        }
        Chain::Register {
            model,
            wallet,
            marketplace,
            client,
        } => {
            let client = client.client()?;
            let model_id = resolve_model(&client, &model).await?;
            let record = client.get(&format!("/v1/models/{model_id}")).await?.ok()?;
            let marketplace = match marketplace {
                Some(m) => m,
                None => {
                    let ledger = client.get("/v1/ledger").await?.ok()?;
                    ledger["marketplace"]
                        .as_str()
                        .context("the registry has no chain ledger: pass --marketplace")?
                        .to_owned()
                }
            };
            let cid = record["cid"]
                .as_str()
                .context("no cid in the model record")?;
            let price = record["price"]
                .as_u64()
                .context("no price in the model record")?;
            // The model digest binds the circuit spec and the weight commitment (docs/ZK.md).
            let commitment = match record["digest"].as_str() {
                Some(d) => modelhub_chain::digest_word(d)?,
                None => modelhub_chain::B256::ZERO,
            };
            let market = connect(&wallet, &marketplace).await?;
            let owner = market.sender().context("no wallet")?;
            // Each product once: a retry after a half-done run registers what is missing.
            let register = async |local: &str, price: u64| -> anyhow::Result<Value> {
                let key = modelhub_chain::model_key(owner, local);
                let tx = match market.get_model(key).await? {
                    Some(_) => Value::Null,
                    None => json!(tx(market
                        .register_model(
                            modelhub_chain::local_id(local),
                            modelhub_chain::cid_hash(cid),
                            commitment,
                            U256::from(price),
                        )
                        .await?)),
                };
                Ok(json!({ "key": format!("{key:#x}"), "tx": tx }))
            };
            let model = register(&model_id, price).await?;
            let mut answer = json!({
                "model_id": model_id,
                "model_key": model["key"],
                "price": price,
                "digest": format!("{commitment:#x}"),
                "tx": model["tx"],
            });
            if let Some(proof_price) = record["proof_price"].as_u64() {
                let proofs =
                    register(&modelhub_chain::proof_model_id(&model_id), proof_price).await?;
                answer["proof_price"] = json!(proof_price);
                answer["proof_model_key"] = proofs["key"].clone();
                answer["proof_tx"] = proofs["tx"].clone();
            }
            print_json(&answer);
            Ok(())
        }
        Chain::Buy { credits, market } => {
            let market = market.connect().await?;
            let hash = market.buy_credits(U256::from(credits)).await?;
            let buyer = market.sender().context("no wallet")?;
            print_json(&json!({
                "buyer": modelhub_chain::wallet_string(buyer),
                "credits": credits,
                "on_chain_credits": market.credits_of(buyer).await?.to_string(),
                "tx": tx(hash),
            }));
            Ok(())
        }
        Chain::Withdraw { market } => {
            let market = market.connect().await?;
            let owner = market.sender().context("no wallet")?;
            let earned = market.earnings_of(owner).await?;
            let hash = market.withdraw().await?;
            print_json(&json!({
                "owner": modelhub_chain::wallet_string(owner),
                "credits": earned.to_string(),
                "wei": (earned * market.wei_per_credit().await?).to_string(),
                "tx": tx(hash),
            }));
            Ok(())
        }
        Chain::Balance {
            address,
            rpc,
            marketplace,
        } => {
            let who = modelhub_chain::parse_address(&address).context("address")?;
            let contract = modelhub_chain::parse_address(&marketplace).context("--marketplace")?;
            let market = Marketplace::connect(&rpc.chain_rpc, contract, None).await?;
            print_json(&json!({
                "address": modelhub_chain::wallet_string(who),
                "credits": market.credits_of(who).await?.to_string(),
                "earnings": market.earnings_of(who).await?.to_string(),
            }));
            Ok(())
        }
        Chain::Status { client } => {
            print_json(&client.client()?.get("/v1/ledger").await?.ok()?);
            Ok(())
        }
        Chain::Settle { client } => {
            print_json(
                &client
                    .client()?
                    .post("/v1/ledger/settle", &json!({}))
                    .await?
                    .ok()?,
            );
            Ok(())
        }
    }
}
