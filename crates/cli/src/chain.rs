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
        /// Accounts that may settle usage (`consumeCredits`), e.g. the registry's operator;
        /// set when the deploying wallet is the admin.
        #[arg(long)]
        operator: Vec<String>,
    },
    /// Allow (or with --disable, forbid) an account to settle usage (admin wallet).
    SetOperator {
        /// The operator's address.
        operator: String,
        /// Forbid instead of allow.
        #[arg(long)]
        disable: bool,
        #[command(flatten)]
        market: MarketArgs,
    },
    /// Register an uploaded model on chain with its price, CID hash and weight commitment,
    /// from its owner's wallet: predictions are charged only once this is done.
    Register {
        /// The model: its id, or NAME@VERSION.
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
            let market = Marketplace::deploy(&wallet.rpc.chain_rpc, signer, admin, rate).await?;
            let mut operators = Vec::new();
            for op in operator {
                let op: Address = modelhub_chain::parse_address(&op).context("--operator")?;
                anyhow::ensure!(
                    admin == deployer,
                    "--operator needs the deploying wallet to be the admin"
                );
                market.set_operator(op, true).await?;
                operators.push(modelhub_chain::wallet_string(op));
            }
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
            let commitment = match record["commitment"].as_str() {
                Some(c) => modelhub_chain::commitment_word(c)?,
                None => modelhub_chain::B256::ZERO,
            };
            let market = connect(&wallet, &marketplace).await?;
            let key = modelhub_chain::model_key(&model_id);
            let hash = market
                .register_model(
                    key,
                    modelhub_chain::cid_hash(cid),
                    commitment,
                    U256::from(price),
                )
                .await?;
            print_json(&json!({
                "model_id": model_id,
                "model_key": format!("{key:#x}"),
                "price": price,
                "commitment": format!("{commitment:#x}"),
                "tx": tx(hash),
            }));
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
