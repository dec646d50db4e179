//! The ledger scenario suite: the same stories told on the embedded ledger and on the chain
//! ledger, the latter with the marketplace's Solidity twin on a real anvil (`scripts/anvil`),
//! the registry's chain ledger talking JSON-RPC to it, and users and creators acting with the
//! `modelhub` binary as they would (`chain register`, `chain buy`, `chain withdraw`). The Stylus
//! contract itself runs the contract-level half of these stories under the TestVM
//! (`stylus-contracts/marketplace/tests`).
//!
//! Buy, predict through the gateway, settle, withdraw; an operator key that isn't an operator;
//! a batch the chain already settled; a user who overspends between settlements; a deposit that
//! arrives before its account.

use std::path::{Path, PathBuf};
use std::process::Command;

use modelhub_chain::{Address, Marketplace, U256};
use modelhub_cli::client::{Answer, Client, KeyFile, ModelUpload};
use modelhub_cli::up::UpSettings;
use modelhub_testkit::ScriptServer;
use serde_json::{Value, json};

use crate::harness::{
    Cluster, account, assert_error, digits_bytes, digits_input, predict_with_proof, upload_digits,
};

/// anvil's well-known development keys (mnemonic "test test ... junk"), by role.
const ADMIN_KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
const OPERATOR_KEY: &str = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";
const CREATOR_KEY: &str = "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a";
const USER_KEY: &str = "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6";
const LATE_USER_KEY: &str = "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a";

/// Wei per credit of the test deployments.
const RATE: u64 = 1_000_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The embedded ledger (and metadata store).
    Embedded,
    /// The chain ledger on anvil, metadata in the embedded store.
    Anvil,
    /// The chain ledger on anvil, metadata in a real MongoDB-wire server (`scripts/mongo`).
    AnvilMongoDb,
}

impl Kind {
    fn on_chain(self) -> bool {
        self != Kind::Embedded
    }
}

/// Runs `async fn name(kind: Kind)` as tests `name::embedded`, `name::anvil` and
/// `name::anvil_mongodb`.
macro_rules! on_every_ledger {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name(super::Kind::Embedded).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn anvil() {
                super::$name(super::Kind::Anvil).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn anvil_mongodb() {
                super::$name(super::Kind::AnvilMongoDb).await
            }
        }
    )*};
}

/// The chain side of a world: anvil, the deployed twin, the files the binary reads.
struct Chain {
    anvil: ScriptServer,
    /// The contract as its admin sees it.
    admin: Marketplace,
    keys: PathBuf,
}

impl Chain {
    async fn start(dir: &Path, authorise_operator: bool) -> Chain {
        let anvil = ScriptServer::start("anvil");
        let admin_signer = modelhub_chain::signer_from_hex(ADMIN_KEY).unwrap();
        let admin_address = admin_signer.address();
        let admin = Marketplace::deploy(
            &anvil.uri,
            admin_signer,
            admin_address,
            U256::from(RATE),
            authorise_operator.then(|| address_of(OPERATOR_KEY)),
        )
        .await
        .expect("deploy the marketplace on anvil");
        let keys = dir.join("wallets");
        std::fs::create_dir_all(&keys).unwrap();
        for (name, key) in [
            ("operator", OPERATOR_KEY),
            ("creator", CREATOR_KEY),
            ("user", USER_KEY),
            ("late", LATE_USER_KEY),
        ] {
            std::fs::write(keys.join(format!("{name}.key")), format!("{key}\n")).unwrap();
        }
        Chain { anvil, admin, keys }
    }

    /// The contract as the wallet of `key` sees it.
    async fn as_wallet(&self, key: &str) -> Marketplace {
        Marketplace::connect(
            &self.anvil.uri,
            self.admin.address(),
            Some(modelhub_chain::signer_from_hex(key).unwrap()),
        )
        .await
        .unwrap()
    }

    fn key_file(&self, name: &str) -> String {
        self.keys.join(format!("{name}.key")).display().to_string()
    }

    fn marketplace(&self) -> String {
        modelhub_chain::wallet_string(self.admin.address())
    }

    /// Mines `n` empty blocks (anvil's `anvil_mine`), so deposits get confirmations.
    async fn mine(&self, n: u64) {
        let answer: Value = reqwest::Client::new()
            .post(&self.anvil.uri)
            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "anvil_mine", "params": [format!("{n:#x}")]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(answer.get("error").is_none(), "{answer}");
    }

    /// Moves anvil's clock `seconds` ahead (`evm_increaseTime`) and mines a block.
    async fn advance(&self, seconds: u64) {
        for (method, params) in [
            ("evm_increaseTime", json!([seconds])),
            ("evm_mine", json!([])),
        ] {
            let answer: Value = reqwest::Client::new()
                .post(&self.anvil.uri)
                .json(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert!(answer.get("error").is_none(), "{answer}");
        }
    }

    async fn credits_of(&self, key: &str) -> u64 {
        let credits = self.admin.credits_of(address_of(key)).await.unwrap();
        u64::try_from(credits).unwrap()
    }

    async fn earnings_of(&self, key: &str) -> u64 {
        let earnings = self.admin.earnings_of(address_of(key)).await.unwrap();
        u64::try_from(earnings).unwrap()
    }

    /// [`cli`](Self::cli) as the wallet of `name`, on the test's marketplace.
    fn wallet_cli(&self, name: &str, args: &[&str]) -> Value {
        let (key, market) = (self.key_file(name), self.marketplace());
        let mut all = args.to_vec();
        all.extend(["--wallet-key-file", &key, "--marketplace", &market]);
        self.cli(&all)
    }

    /// Runs `modelhub chain ARGS... --chain-rpc URL` and returns its JSON answer.
    fn cli(&self, args: &[&str]) -> Value {
        let out = Command::new(env!("CARGO_BIN_EXE_modelhub"))
            .arg("chain")
            .args(args)
            .args(["--chain-rpc", &self.anvil.uri])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "modelhub chain {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

fn address_of(key: &str) -> Address {
    modelhub_chain::signer_from_hex(key).unwrap().address()
}

fn wallet_of(key: &str) -> String {
    modelhub_chain::wallet_string(address_of(key))
}

struct World {
    kind: Kind,
    cluster: Cluster,
    chain: Option<Chain>,
}

impl World {
    async fn start(kind: Kind) -> World {
        World::start_with(kind, true).await
    }

    async fn start_with(kind: Kind, authorise_operator: bool) -> World {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = UpSettings::for_test(dir.path());
        let mut servers = Vec::new();
        if kind == Kind::AnvilMongoDb {
            let mongo = ScriptServer::start("mongo");
            settings.mongodb_uri = Some(format!("{}/modelhub_ledger", mongo.uri));
            servers.push(mongo);
        }
        let chain = match kind {
            Kind::Embedded => None,
            Kind::Anvil | Kind::AnvilMongoDb => {
                let chain = Chain::start(dir.path(), authorise_operator).await;
                settings.chain.chain_rpc = Some(chain.anvil.uri.clone());
                settings.chain.marketplace = Some(chain.marketplace());
                settings.chain.operator_key_file = Some(chain.key_file("operator").into());
                settings.chain.chain_confirmations = 1;
                // Settlement only when a test asks for it.
                settings.chain.settle_interval_secs = 3600;
                settings.chain.settle_batch_size = 1000;
                settings.chain.chain_poll_ms = 200;
                // Ask the chain about models on every predict.
                settings.chain.chain_check_ttl_ms = 1;
                Some(chain)
            }
        };
        let cluster = Cluster::start_with(dir, settings, servers).await;
        World {
            kind,
            cluster,
            chain,
        }
    }

    fn chain(&self) -> &Chain {
        self.chain.as_ref().expect("a chain world")
    }

    /// Stops every service and starts them again on the same state (and the same chain).
    async fn restart(self) -> World {
        World {
            cluster: self.cluster.restart().await,
            ..self
        }
    }

    /// An account with a key; with a chain, its wallet is `wallet_key`'s address.
    async fn account(&self, name: &str, wallet_key: &str) -> Client {
        let body = if self.kind.on_chain() {
            json!({ "name": name, "wallet": wallet_of(wallet_key) })
        } else {
            json!({ "name": name })
        };
        let created = self
            .cluster
            .admin
            .post("/v1/accounts", &body)
            .await
            .unwrap();
        assert_eq!(created.status, 201, "{:?}", created.body);
        self.key_for(created.body["account_id"].as_str().unwrap())
            .await
    }

    async fn key_for(&self, account_id: &str) -> Client {
        let key = self
            .cluster
            .admin
            .post("/v1/keys", &json!({ "account_id": account_id }))
            .await
            .unwrap()
            .ok()
            .unwrap();
        self.cluster
            .admin
            .with_key(serde_json::from_value::<KeyFile>(key).unwrap())
    }

    /// `user` gets `credits`: granted by the admin, or bought on chain with `wallet`'s key and
    /// counted once confirmed.
    /// Buys `credits` on chain from `wallet` and lets the registry follow the deposit.
    async fn buy_raw(&self, wallet: &str, credits: u64) {
        let chain = self.chain();
        let bought = chain.wallet_cli(wallet, &["buy", "--credits", &credits.to_string()]);
        assert_eq!(bought["credits"], credits);
        chain.mine(64).await;
        self.settle().await;
    }

    async fn buy(&self, user: &Client, wallet: &str, credits: u64) {
        let before = account(user).await["credits"].as_u64().unwrap();
        if let Some(chain) = &self.chain {
            let bought = chain.wallet_cli(wallet, &["buy", "--credits", &credits.to_string()]);
            assert_eq!(bought["credits"], credits);
            // Not finalized yet (anvil finalizes 64 blocks below the head): not counted.
            self.settle().await;
            assert_eq!(account(user).await["credits"].as_u64().unwrap(), before);
            chain.mine(64).await;
            self.settle().await;
        } else {
            let granted = self
                .cluster
                .admin
                .post(
                    "/v1/credits/grant",
                    &json!({ "account_id": user.key().account_id, "amount": credits }),
                )
                .await
                .unwrap();
            assert_eq!(granted.status, 200, "{:?}", granted.body);
        }
        assert_eq!(
            account(user).await["credits"].as_u64().unwrap(),
            before + credits
        );
    }

    /// Uploads the digits model as `creator` at `price`; with a chain, registers it on chain
    /// with the binary from the creator's wallet (after checking it can't be used before).
    async fn list_model(&self, creator: &Client, creator_key_name: &str, price: u64) -> String {
        self.list_model_named(creator, creator_key_name, "digits", price)
            .await
    }

    /// [`list_model`](Self::list_model) under another name.
    async fn list_model_named(
        &self,
        creator: &Client,
        creator_key_name: &str,
        name: &str,
        price: u64,
    ) -> String {
        let record = upload_digits(creator, name, price).await;
        let model_id = record["model_id"].as_str().unwrap().to_owned();
        if self.kind.on_chain() {
            self.register(creator, creator_key_name, &record).await;
        }
        model_id
    }

    /// Registers the model of `record` on chain with `modelhub chain register`, from the
    /// wallet of `creator_key_name` (CREATOR_KEY's), and checks what the chain holds: the
    /// owner, the price and the model digest.
    async fn register(&self, creator: &Client, creator_key_name: &str, record: &Value) {
        let chain = self.chain();
        let model_id = record["model_id"].as_str().unwrap();
        let key_path = self
            .cluster
            .data_dir()
            .join(format!("{creator_key_name}-api-key.json"));
        if !key_path.exists() {
            creator.key().write_new(&key_path).unwrap();
        }
        let registered = chain.cli(&[
            "register",
            model_id,
            "--wallet-key-file",
            &chain.key_file(creator_key_name),
            "--url",
            creator.base_url(),
            "--key-file",
            key_path.to_str().unwrap(),
        ]);
        assert_eq!(registered["model_id"], model_id);
        let on_chain = chain
            .admin
            .get_model(modelhub_chain::model_key(address_of(CREATOR_KEY), model_id))
            .await
            .unwrap()
            .expect("registered");
        assert_eq!(on_chain.owner, address_of(CREATOR_KEY));
        assert_eq!(
            on_chain.price_per_call,
            U256::from(record["price"].as_u64().unwrap())
        );
        assert!(on_chain.active);
        // The chain records the model digest (circuit spec and weight commitment together).
        let digest = modelhub_chain::digest_word(record["digest"].as_str().unwrap()).unwrap();
        assert_eq!(on_chain.commitment, digest);
        // Its proofs are a product of their own, at the proof price.
        let proofs = chain
            .admin
            .get_model(modelhub_chain::model_key(
                address_of(CREATOR_KEY),
                &modelhub_chain::proof_model_id(model_id),
            ))
            .await
            .unwrap()
            .expect("the proofs are registered");
        assert_eq!(
            (proofs.owner, proofs.price_per_call, proofs.commitment),
            (
                address_of(CREATOR_KEY),
                U256::from(record["proof_price"].as_u64().unwrap()),
                digest
            )
        );
        assert_eq!(registered["proof_price"], record["proof_price"]);
    }

    /// A creator (wallet: CREATOR_KEY) with the digits model listed at `price`, and a user
    /// (wallet: USER_KEY) holding `credits`.
    async fn listing(&self, price: u64, credits: u64) -> (Client, Client, String) {
        let creator = self.account("creator", CREATOR_KEY).await;
        let user = self.account("user", USER_KEY).await;
        let model_id = self.list_model(&creator, "creator", price).await;
        self.buy(&user, "user", credits).await;
        (creator, user, model_id)
    }

    async fn settle(&self) -> Value {
        let answer = self
            .cluster
            .admin
            .post("/v1/ledger/settle", &json!({}))
            .await
            .unwrap();
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        answer.body
    }

    async fn stop(self) {
        self.cluster.stop().await;
    }
}

async fn predict(user: &Client, model_id: &str) -> Answer {
    user.post(
        &format!("/v1/models/{model_id}/predict"),
        &json!({ "inputs": digits_input(0) }),
    )
    .await
    .unwrap()
}

async fn buy_predict_settle_withdraw(kind: Kind) {
    let world = World::start(kind).await;
    let creator = world.account("creator", CREATOR_KEY).await;
    let user = world.account("user", USER_KEY).await;
    if kind.on_chain() {
        // Credits come from the chain only.
        let grant = world
            .cluster
            .admin
            .post(
                "/v1/credits/grant",
                &json!({ "account_id": user.key().account_id, "amount": 5 }),
            )
            .await
            .unwrap();
        assert_error(&grant, 409, "conflict", "chain ledger");
        // A model not registered on chain can't be charged for.
        let record = upload_digits(&creator, "unlisted", 1).await;
        let answer = predict(&user, record["model_id"].as_str().unwrap()).await;
        assert_error(&answer, 409, "conflict", "not registered on chain");
    }
    let model_id = world.list_model(&creator, "creator", 3).await;
    world.buy(&user, "user", 10).await;

    // Three predictions fit in 10 credits at 3 each; the fourth is refused by the gateway
    // before anything reaches the chain.
    let mut receipts = Vec::new();
    for _ in 0..3 {
        let answer = predict(&user, &model_id).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        assert_eq!(answer.body["receipt"]["credits_charged"], 3);
        receipts.push(answer.body["receipt"]["id"].as_str().unwrap().to_owned());
    }
    let answer = predict(&user, &model_id).await;
    assert_error(&answer, 402, "payment_required", "insufficient credits");
    assert_eq!(account(&user).await["credits"], 1);
    assert_eq!(account(&creator).await["earnings"], 9);

    if let Some(chain) = &world.chain {
        // Nothing settled yet: the chain still holds the whole deposit.
        assert_eq!(chain.credits_of(USER_KEY).await, 10);
        assert_eq!(chain.earnings_of(CREATOR_KEY).await, 0);
    }
    let ledger = world.settle().await;
    match kind {
        Kind::Embedded => assert_eq!(ledger, json!({ "kind": "embedded" })),
        Kind::Anvil | Kind::AnvilMongoDb => {
            let chain = world.chain();
            assert_eq!(ledger["kind"], "chain");
            assert_eq!(ledger["marketplace"], chain.marketplace());
            assert_eq!(ledger["operator"], wallet_of(OPERATOR_KEY));
            assert_eq!(ledger["unsettled_receipts"], 0);
            let batches = ledger["batches"].as_array().unwrap();
            assert_eq!(batches.len(), 1, "{ledger}");
            assert_eq!(batches[0]["state"], "settled", "{ledger}");
            assert_eq!(batches[0]["receipts"], 3);
            assert_eq!(batches[0]["credits"], 9);
            let batch_id = batches[0]["batch_id"].as_str().unwrap();
            assert_eq!(
                batch_id,
                format!(
                    "{:#x}",
                    modelhub_registry::ledger::chain::batch_id(
                        address_of(OPERATOR_KEY),
                        &receipts,
                        0
                    )
                )
            );
            assert!(
                chain
                    .admin
                    .batch_records_hash(address_of(OPERATOR_KEY), batch_id.parse().unwrap())
                    .await
                    .unwrap()
                    .is_some()
            );
            assert_eq!(chain.credits_of(USER_KEY).await, 1);
            assert_eq!(chain.earnings_of(CREATOR_KEY).await, 9);

            // Settling again settles nothing twice.
            let again = world.settle().await;
            assert_eq!(again["batches"].as_array().unwrap().len(), 1);
            assert_eq!(chain.credits_of(USER_KEY).await, 1);

            // The creator is paid by the contract.
            let paid = chain.wallet_cli("creator", &["withdraw"]);
            assert_eq!(paid["credits"], "9");
            assert_eq!(paid["wei"], (9 * RATE).to_string());
            assert_eq!(chain.earnings_of(CREATOR_KEY).await, 0);
        }
    }
    // The off-chain view is unchanged by settlement.
    assert_eq!(account(&user).await["credits"], 1);
    world.stop().await;
}

on_every_ledger!(buy_predict_settle_withdraw);

/// Two users race past their balance between settlements: each is stopped by the gateway at
/// their own balance, and what settles is exactly what was charged.
async fn overspending_between_settlements(kind: Kind) {
    let world = World::start(kind).await;
    let (creator, user, model_id) = world.listing(2, 7).await;
    let attempts = futures::future::join_all((0..8).map(|_| predict(&user, &model_id))).await;
    let ok = attempts.iter().filter(|a| a.status == 200).count();
    let refused = attempts.iter().filter(|a| a.status == 402).count();
    assert_eq!(
        (ok, refused),
        (3, 5),
        "{:?}",
        attempts.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    assert_eq!(account(&user).await["credits"], 1);
    world.settle().await;
    if let Some(chain) = &world.chain {
        assert_eq!(chain.credits_of(USER_KEY).await, 1);
        assert_eq!(chain.earnings_of(CREATOR_KEY).await, 6);
    } else {
        assert_eq!(account(&creator).await["earnings"], 6);
    }
    world.stop().await;
}

on_every_ledger!(overspending_between_settlements);

/// The registry's operator key is not (yet) an operator: predictions go on, settlement stays
/// pending with the reason, and goes through once the admin authorises the operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_key_that_is_not_an_operator() {
    let world = World::start_with(Kind::Anvil, false).await;
    let chain = world.chain();
    let (_creator, user, model_id) = world.listing(2, 10).await;
    for _ in 0..2 {
        assert_eq!(predict(&user, &model_id).await.status, 200);
    }
    let ledger = world.settle().await;
    let batch = &ledger["batches"][0];
    assert_eq!(batch["state"], "pending", "{ledger}");
    assert!(
        batch["error"].as_str().unwrap().contains("Unauthorized"),
        "{ledger}"
    );
    assert_eq!(chain.credits_of(USER_KEY).await, 10);

    // The pending batch survives a restart of the marketplace and is sent again, same id.
    let batch_id = batch["batch_id"].clone();
    let world = world.restart().await;
    let chain = world.chain();
    chain
        .admin
        .set_operator(address_of(OPERATOR_KEY), true)
        .await
        .unwrap();
    // Named, not yet accepted: still pending.
    let ledger = world.settle().await;
    assert_eq!(ledger["batches"][0]["state"], "pending", "{ledger}");
    chain.advance(86_400).await;
    chain
        .as_wallet(OPERATOR_KEY)
        .await
        .accept_operator()
        .await
        .unwrap();
    let ledger = world.settle().await;
    assert_eq!(ledger["batches"].as_array().unwrap().len(), 1, "{ledger}");
    assert_eq!(ledger["batches"][0]["batch_id"], batch_id);
    let batch = &ledger["batches"][0];
    assert_eq!(batch["state"], "settled", "{ledger}");
    assert_eq!(batch["attempts"], 3);
    assert_eq!(chain.credits_of(USER_KEY).await, 6);
    assert_eq!(chain.earnings_of(CREATOR_KEY).await, 4);
    world.stop().await;
}

/// A batch that reached the chain although the registry never heard back (it crashed, or the
/// answer was lost) is recognised when it is sent again: settled once, not twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_chain_already_settled() {
    let world = World::start(Kind::Anvil).await;
    let chain = world.chain();
    let (_creator, user, model_id) = world.listing(2, 10).await;
    let mut receipts = Vec::new();
    for _ in 0..2 {
        let answer = predict(&user, &model_id).await;
        receipts.push(answer.body["receipt"]["id"].as_str().unwrap().to_owned());
    }
    // The same batch the registry will send, sent first by the operator.
    let operator = chain.as_wallet(OPERATOR_KEY).await;
    let batch_id =
        modelhub_registry::ledger::chain::batch_id(address_of(OPERATOR_KEY), &receipts, 0);
    operator
        .consume_credits(
            batch_id,
            vec![modelhub_chain::UsageRecord {
                user: address_of(USER_KEY),
                modelId: modelhub_chain::model_key(address_of(CREATOR_KEY), &model_id),
                calls: 2,
                credits: U256::from(4),
                day: today(),
                receiptBatchHash: modelhub_registry::ledger::chain::receipts_hash(&receipts),
            }],
        )
        .await
        .unwrap();
    assert_eq!(chain.credits_of(USER_KEY).await, 6);

    let ledger = world.settle().await;
    let batch = &ledger["batches"][0];
    assert_eq!(batch["batch_id"], format!("{batch_id:#x}"));
    assert_eq!(batch["state"], "settled", "{ledger}");
    assert_eq!(chain.credits_of(USER_KEY).await, 6, "charged once");
    assert_eq!(chain.earnings_of(CREATOR_KEY).await, 4);
    world.stop().await;
}

/// The UTC day of the wall clock: the label the registry gives today's usage on chain.
fn today() -> u64 {
    let day = modelhub_registry::model::utc_day(modelhub_core::id::unix_now());
    u64::try_from(day).unwrap()
}

/// A user can't lower their daily cap to leave usage they had unpaid: on chain a lower cap
/// waits two days, so the usage charged before it settles; off chain the registry refuses
/// charges past the lower cap as soon as it sees it. A raise counts at once, and a cap set
/// before its wallet had an account is known before the first deposit can be spent.
async fn a_lowered_daily_cap_cannot_unpay_usage(kind: Kind) {
    let world = World::start(kind).await;
    let chain = world.chain();
    let (_creator, user, model_id) = world.listing(2, 20).await;
    assert_eq!(predict(&user, &model_id).await.status, 200);
    let me = account(&user).await;
    assert_eq!(me["daily_cap"], Value::Null, "{me}");
    assert_eq!(me["charged_today"], 2, "{me}");

    // The exploit: lower the cap to 0 before the usage settles, then ask the credits back.
    let capped = chain.wallet_cli("user", &["set-daily-cap", "--credits", "0"]);
    assert_eq!(capped["in_force"], U256::MAX.to_string(), "{capped}");
    assert_eq!(capped["pending"]["daily_cap"], "0", "{capped}");
    chain.wallet_cli("user", &["refund-request", "--credits", "20"]);
    chain.mine(64).await;
    let ledger = world.settle().await;
    // The usage settled: the lower cap is not in force on chain yet.
    assert_eq!(ledger["batches"][0]["state"], "settled", "{ledger}");
    assert_eq!(ledger["batches"][0]["error"], Value::Null, "{ledger}");
    assert_eq!(chain.credits_of(USER_KEY).await, 18);
    assert_eq!(chain.earnings_of(CREATOR_KEY).await, 2);
    // Off chain the cap of 0 counts at once (and the refund took the rest of the balance).
    let me = account(&user).await;
    assert_eq!(me["daily_cap"], 0, "{me}");
    assert_eq!(me["credits"], 0, "{me}");

    // A new announcement replaces the pending one (on chain there is still no cap in force);
    // here the lower of the two counts at once.
    let raised = chain.wallet_cli("user", &["set-daily-cap", "--credits", "4"]);
    assert_eq!(raised["in_force"], U256::MAX.to_string(), "{raised}");
    assert_eq!(raised["pending"]["daily_cap"], "4", "{raised}");
    chain.mine(64).await;
    world.settle().await;
    assert_eq!(account(&user).await["daily_cap"], 4);

    // A second user whose wallet set a cap of 3 before any account had it: the deposit that
    // creates the account brings the cap with it.
    chain.wallet_cli("late", &["set-daily-cap", "--credits", "3"]);
    chain.mine(64).await;
    world.settle().await;
    chain.wallet_cli("late", &["buy", "--credits", "10"]);
    chain.mine(64).await;
    world.settle().await;
    let late_id = modelhub_registry::ledger::chain::wallet_account_id(&wallet_of(LATE_USER_KEY));
    let late = world.key_for(&late_id).await;
    let me = account(&late).await;
    assert_eq!(
        (me["credits"].as_u64(), me["daily_cap"].as_u64()),
        (Some(10), Some(3)),
        "{me}"
    );
    assert_eq!(predict(&late, &model_id).await.status, 200);
    let answer = predict(&late, &model_id).await;
    assert_error(&answer, 402, "payment_required", "daily cap reached");
    assert!(
        answer.error_message().contains("2 charged today"),
        "{:?}",
        answer.body
    );
    let me = account(&late).await;
    assert_eq!(
        (me["credits"].as_u64(), me["charged_today"].as_u64()),
        (Some(8), Some(2)),
        "{me}"
    );
    // What the registry accepted settles within the cap on chain.
    let ledger = world.settle().await;
    assert!(
        ledger["batches"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["state"] == "settled" && b["error"].is_null()),
        "{ledger}"
    );
    assert_eq!(chain.credits_of(LATE_USER_KEY).await, 8);
    assert_eq!(chain.earnings_of(CREATOR_KEY).await, 4);
    world.stop().await;
}

mod a_lowered_daily_cap_cannot_unpay_usage {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn anvil() {
        super::a_lowered_daily_cap_cannot_unpay_usage(super::Kind::Anvil).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn anvil_mongodb() {
        super::a_lowered_daily_cap_cannot_unpay_usage(super::Kind::AnvilMongoDb).await
    }
}

/// Credits bought from a wallet no account has yet are kept on an account made for it, which
/// an admin can then hand keys to; the wallet can't be claimed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposit_before_its_account() {
    let world = World::start(Kind::Anvil).await;
    let chain = world.chain();
    let creator = world.account("creator", CREATOR_KEY).await;
    let model_id = world.list_model(&creator, "creator", 1).await;
    chain.wallet_cli("late", &["buy", "--credits", "4"]);
    chain.mine(64).await;
    world.settle().await;

    let claim = world
        .cluster
        .admin
        .post(
            "/v1/accounts",
            &json!({ "name": "late", "wallet": wallet_of(LATE_USER_KEY).to_uppercase().replace("0X", "0x") }),
        )
        .await
        .unwrap();
    assert_error(&claim, 409, "conflict", "already belongs to account");
    let account_id = claim.error_message().rsplit(' ').next().unwrap().to_owned();
    let late = world.key_for(&account_id).await;
    let me = account(&late).await;
    assert_eq!(me["credits"], 4);
    assert_eq!(me["wallet"], wallet_of(LATE_USER_KEY));
    assert_eq!(predict(&late, &model_id).await.status, 200);
    world.stop().await;
}

/// Bad wallets are refused with a clear 400, before anything is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_wallets_are_refused() {
    let world = World::start(Kind::Embedded).await;
    for wallet in [
        "",
        "0x12",
        "0xZZ00000000000000000000000000000000000000",
        "not an address",
    ] {
        let answer = world
            .cluster
            .admin
            .post("/v1/accounts", &json!({ "name": "w", "wallet": wallet }))
            .await
            .unwrap();
        if wallet.is_empty() {
            // An empty wallet is no wallet.
            assert_eq!(answer.status, 201, "{:?}", answer.body);
            assert_eq!(answer.body["wallet"], Value::Null);
        } else {
            assert_error(&answer, 400, "bad_request", "wallet must be an EVM address");
        }
    }
    world.stop().await;
}

/// The chain node goes away: a model the chain accepted stays chargeable (its usage waits to be
/// settled), a model the ledger never checked waits for the node (503), and settling says the
/// node is unavailable. Nothing panics, nothing is charged twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_node_goes_away() {
    let world = World::start(Kind::Anvil).await;
    let chain = world.chain();
    let creator = world.account("creator", CREATOR_KEY).await;
    let user = world.account("user", USER_KEY).await;
    let model_id = world.list_model(&creator, "creator", 1).await;
    let unchecked = upload_digits(&creator, "unchecked", 1).await;
    world.buy(&user, "user", 5).await;
    assert_eq!(predict(&user, &model_id).await.status, 200);

    chain.anvil.stop();
    let answer = predict(&user, &model_id).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let answer = predict(&user, unchecked["model_id"].as_str().unwrap()).await;
    assert_error(&answer, 503, "unavailable", "chain node is unavailable");
    let settle = world
        .cluster
        .admin
        .post("/v1/ledger/settle", &json!({}))
        .await
        .unwrap();
    assert_error(&settle, 503, "unavailable", "chain node is unavailable");
    // Charged off chain for the two predictions, exactly.
    assert_eq!(account(&user).await["credits"], 3);
    world.stop().await;
}

/// A creator deactivates a model on chain after it was used: new predictions are refused with
/// the reason; the batch holding the earlier usage (and good usage of another model) settles:
/// the bad record skipped by the contract (`ModelInactive`) and reported, the good ones debited
/// and earned, and the bad record's credits given back off chain. The batch is not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_deactivated_after_use() {
    let world = World::start(Kind::Anvil).await;
    let chain = world.chain();
    let (creator, user, model_id) = world.listing(2, 10).await;
    assert_eq!(predict(&user, &model_id).await.status, 200);
    assert_eq!(account(&user).await["credits"], 8);
    // Good usage of another model goes into the same batch as the record that will go bad.
    let other = world
        .list_model_named(&creator, "creator", "other", 1)
        .await;
    for _ in 0..3 {
        assert_eq!(predict(&user, &other).await.status, 200);
    }
    assert_eq!(account(&user).await["credits"], 5);

    let as_creator = chain.as_wallet(CREATOR_KEY).await;
    as_creator
        .deactivate(modelhub_chain::model_key(
            address_of(CREATOR_KEY),
            &model_id,
        ))
        .await
        .unwrap();
    let answer = predict(&user, &model_id).await;
    assert_error(&answer, 409, "conflict", "deactivated on chain");

    let ledger = world.settle().await;
    let batch = &ledger["batches"][0];
    assert_eq!(batch["state"], "settled", "{ledger}");
    assert!(
        batch["error"].as_str().unwrap().contains("ModelInactive"),
        "{ledger}"
    );
    assert_eq!(batch["receipts"], 4, "{ledger}");
    // The bad record is skipped, the good ones settle: the other model's 3 calls are debited on
    // chain and earned by the creator; the deactivated model's 2 credits come back off chain.
    assert_eq!(chain.credits_of(USER_KEY).await, 7);
    assert_eq!(chain.earnings_of(CREATOR_KEY).await, 3);
    assert_eq!(account(&user).await["credits"], 7);
    // Not sent again, not given back twice.
    let again = world.settle().await;
    assert_eq!(again["batches"][0]["attempts"], 1, "{again}");
    assert_eq!(account(&user).await["credits"], 7);
    world.stop().await;
}

/// A user asks for unspent credits back on chain (`modelhub chain refund-request`): once the
/// request is final, the registry takes them from the off-chain balance too (at most what is
/// left), once; a request that replaces it takes again from what is left. After the lock the
/// contract pays at most what is left on chain, and nothing is spendable twice.
async fn refunds_leave_the_off_chain_balance_too(kind: Kind) {
    let world = World::start(kind).await;
    let chain = world.chain();
    let (creator, user, model_id) = world.listing(1, 10).await;
    assert_eq!(predict(&user, &model_id).await.status, 200);
    assert_eq!(account(&user).await["credits"], 9);
    let asked = chain.wallet_cli("user", &["refund-request", "--credits", "4"]);
    assert_eq!(asked["credits"], "4");
    // Not final yet: not counted.
    world.settle().await;
    assert_eq!(account(&user).await["credits"], 9);
    chain.mine(64).await;
    world.settle().await;
    assert_eq!(account(&user).await["credits"], 5);
    // The prediction's usage settled on chain meanwhile.
    assert_eq!(chain.credits_of(USER_KEY).await, 9);
    assert_eq!(chain.earnings_of(CREATOR_KEY).await, 1);
    // Counted once, whatever the restarts.
    let world = world.restart().await;
    let user = world.key_for(&user.key().account_id).await;
    let creator = world.key_for(&creator.key().account_id).await;
    let chain = world.chain();
    world.settle().await;
    assert_eq!(account(&user).await["credits"], 5);

    // A new request replaces the first; it takes what is left off chain.
    chain.wallet_cli("user", &["refund-request", "--credits", "9"]);
    chain.mine(64).await;
    world.settle().await;
    assert_eq!(account(&user).await["credits"], 0);
    let answer = predict(&user, &model_id).await;
    assert_error(&answer, 402, "payment_required", "insufficient credits");

    chain.advance(2 * 86_400).await;
    let claimed = chain.wallet_cli("user", &["refund-claim"]);
    assert_eq!(claimed["credits"], "9");
    assert_eq!(chain.credits_of(USER_KEY).await, 0);
    chain.mine(64).await;
    world.settle().await;
    assert_eq!(account(&user).await["credits"], 0);
    // The creator's earning is untouched.
    assert_eq!(account(&creator).await["earnings"], 1);
    world.stop().await;
}

/// A refund request claims, at the claim, that many credits of whatever the chain holds: what
/// it asks beyond the off-chain balance (here usage not settled yet) is a lien that credits
/// coming in before the claim pay first; the claim's `Refunded` log ends it.
async fn a_refund_claims_what_comes_in_before_it(kind: Kind) {
    let world = World::start(kind).await;
    let chain = world.chain();
    let (_creator, user, model_id) = world.listing(1, 10).await;
    let late = world.account("late", LATE_USER_KEY).await;
    world.buy(&late, "late", 5).await;
    for _ in 0..2 {
        assert_eq!(predict(&user, &model_id).await.status, 200);
        assert_eq!(predict(&late, &model_id).await.status, 200);
    }
    // All on chain asked back while 2 of it are spent but not settled.
    chain.wallet_cli("user", &["refund-request", "--credits", "10"]);
    chain.wallet_cli("late", &["refund-request", "--credits", "5"]);
    chain.mine(64).await;
    world.settle().await;
    for who in [&user, &late] {
        let me = account(who).await;
        assert_eq!(me["credits"], 0, "{me}");
        assert_eq!(me["refund_owed"], 2, "{me}");
    }
    assert_eq!(chain.credits_of(USER_KEY).await, 8, "the usage settled");
    assert_eq!(
        chain.credits_of(LATE_USER_KEY).await,
        3,
        "the usage settled"
    );
    // A deposit before the claim pays the lien first: the claim will take 10 of the 13.
    world.buy_raw("user", 5).await;
    let me = account(&user).await;
    assert_eq!(
        (me["credits"].as_u64(), me["refund_owed"].as_u64()),
        (Some(3), Some(0)),
        "{me}"
    );

    chain.advance(2 * 86_400).await;
    assert_eq!(chain.wallet_cli("user", &["refund-claim"])["credits"], "10");
    assert_eq!(chain.credits_of(USER_KEY).await, 3);
    // A lien still there at the claim (the claim paid less than asked) ends with it.
    assert_eq!(chain.wallet_cli("late", &["refund-claim"])["credits"], "3");
    chain.mine(64).await;
    world.settle().await;
    assert_eq!(account(&user).await["credits"], 3);
    assert_eq!(account(&late).await["refund_owed"], 0);
    world.buy_raw("late", 4).await;
    assert_eq!(account(&late).await["credits"], 4);
    assert_eq!(chain.credits_of(LATE_USER_KEY).await, 4);
    world.stop().await;
}

mod a_refund_claims_what_comes_in_before_it {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn anvil() {
        super::a_refund_claims_what_comes_in_before_it(super::Kind::Anvil).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn anvil_mongodb() {
        super::a_refund_claims_what_comes_in_before_it(super::Kind::AnvilMongoDb).await
    }
}

mod refunds_leave_the_off_chain_balance_too {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn anvil() {
        super::refunds_leave_the_off_chain_balance_too(super::Kind::Anvil).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn anvil_mongodb() {
        super::refunds_leave_the_off_chain_balance_too(super::Kind::AnvilMongoDb).await
    }
}

/// A prediction and the delivery of its proof are two charges, settled on chain at their own
/// prices (and a batch of n rows as n calls): the proof under the model's proof product (`<model id>/proof`). A model registered
/// without its proof product (before proofs were priced) answers the proof's delivery 409,
/// uncharged, until `modelhub chain register` adds what is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictions_and_proofs_settle_at_their_own_prices() {
    let world = World::start(Kind::Anvil).await;
    let chain = world.chain();
    let creator = world.account("creator", CREATOR_KEY).await;
    let user = world.account("user", USER_KEY).await;
    let mut upload = ModelUpload::new("digits", "1", 2);
    upload.proof_price = Some(3);
    let record = creator.upload(&upload, digits_bytes()).await.unwrap();
    assert_eq!(record.status, 201, "{:?}", record.body);
    let record = record.body;
    let model_id = record["model_id"].as_str().unwrap();
    // Registered the way it was before proofs had a price: the model alone.
    chain
        .as_wallet(CREATOR_KEY)
        .await
        .register_model(
            modelhub_chain::local_id(model_id),
            modelhub_chain::cid_hash(record["cid"].as_str().unwrap()),
            modelhub_chain::digest_word(record["digest"].as_str().unwrap()).unwrap(),
            U256::from(2),
        )
        .await
        .unwrap();
    world.buy(&user, "user", 20).await;

    let predicted =
        crate::harness::predict_asking_for_proof(&user, model_id, &digits_input(0)).await;
    let job = predicted["proof_job"].as_str().unwrap();
    let early = user
        .get(&format!("/v1/proofs/{job}?wait=60"))
        .await
        .unwrap();
    assert_error(
        &early,
        409,
        "conflict",
        "proofs are not registered on chain",
    );
    assert_eq!(account(&user).await["credits"], 18);

    // `chain register` adds the proof product (the model is left as it is).
    world.register(&creator, "creator", &record).await;
    let proof = user
        .get(&format!("/v1/proofs/{job}"))
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(proof["status"], "done", "{proof}");
    assert_eq!(proof["receipt"]["credits_charged"], 3);
    assert_eq!(account(&user).await["credits"], 15);
    // A batch of 3 rows: one receipt, 3 calls on chain.
    let batch = user
        .predict(model_id, crate::harness::digits_batch(3))
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(batch["receipt"]["credits_charged"], 6);
    assert_eq!(account(&user).await["credits"], 9);

    let ledger = world.settle().await;
    let batch = &ledger["batches"][0];
    assert_eq!(batch["state"], "settled", "{ledger}");
    assert_eq!(batch["error"], Value::Null, "{ledger}");
    assert_eq!(
        (&batch["receipts"], &batch["credits"]),
        (&json!(3), &json!(11))
    );
    assert_eq!(chain.credits_of(USER_KEY).await, 9);
    assert_eq!(chain.earnings_of(CREATOR_KEY).await, 11);
    assert_eq!(account(&user).await["credits"], 9);
    world.stop().await;
}

/// `proofs verify --chain` checks a proof against the digest the marketplace contract records
/// for the model, through the RPC URL alone (no gateway); `models check-commitment --chain`
/// compares the owner's file and opening with it too. A model registered by another wallet (or
/// not at all) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proofs_and_commitments_check_against_the_chain_record() {
    let world = World::start(Kind::Anvil).await;
    let chain = world.chain();
    let creator = world.account("creator", CREATOR_KEY).await;
    let user = world.account("user", USER_KEY).await;
    let upload = creator
        .upload(&ModelUpload::new("digits", "1", 1), digits_bytes())
        .await
        .unwrap();
    assert_eq!(upload.status, 201, "{:?}", upload.body);
    let model_id = upload.body["model_id"].as_str().unwrap().to_owned();
    world.register(&creator, "creator", &upload.body).await;
    world.buy(&user, "user", 5).await;

    let (_, proof) = predict_with_proof(&user, &model_id, &digits_input(0)).await;
    assert_eq!(proof["status"], "done", "{proof}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proof.json");
    std::fs::write(&file, serde_json::to_vec(&proof["proof"]).unwrap()).unwrap();
    let params = dir.path().join("params");

    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_modelhub"))
            .args(args)
            .args([
                "--chain-rpc",
                &chain.anvil.uri,
                "--marketplace",
                &chain.marketplace(),
            ])
            .arg("--params-dir")
            .arg(&params)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let verify = |owner: &str| {
        run(&[
            "proofs",
            "verify",
            file.to_str().unwrap(),
            "--model",
            &model_id,
            "--chain",
            "--owner",
            owner,
        ])
    };
    let out = verify(&wallet_of(CREATOR_KEY));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verdict: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verdict["valid"], true);
    assert_eq!(verdict["checked_against"], "chain");
    assert_eq!(verdict["model_digest"], upload.body["digest"]);
    let out = verify(&wallet_of(USER_KEY));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not registered on chain"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The owner checks the file and the upload's opening against the registry and the chain.
    let answer = dir.path().join("upload.json");
    std::fs::write(&answer, upload.body.to_string()).unwrap();
    let key_file = dir.path().join("creator.json");
    creator.key().write_new(&key_file).unwrap();
    let model_path = modelhub_testkit::test_model("digits_mlp.onnx");
    let out = run(&[
        "models",
        "check-commitment",
        model_path.to_str().unwrap(),
        "--opening",
        answer.to_str().unwrap(),
        "--model",
        &model_id,
        "--url",
        creator.base_url(),
        "--key-file",
        key_file.to_str().unwrap(),
        "--chain",
        "--owner",
        &wallet_of(CREATOR_KEY),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["chain_digest"], upload.body["digest"]);
    assert_eq!(report["matches"], true);
    world.stop().await;
}
