//! Integration tests of `modelhub-chain` against a real EVM node: anvil, started by
//! `scripts/anvil` (under `CI=true` a node that can't start fails the tests), with the Solidity
//! twin of the Marketplace deployed on it.

mod failures;
mod flow;

use modelhub_chain::{Address, Marketplace, Signer, U256, signer_from_hex};
use modelhub_testkit::ScriptServer;

/// anvil's well-known dev keys (accounts 0..4 of the "test test ... junk" mnemonic).
const KEYS: [&str; 4] = [
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
];

/// One credit costs 0.001 ETH: large enough that a withdrawal outweighs its gas.
const WEI_PER_CREDIT: u64 = 1_000_000_000_000_000;

fn key(i: usize) -> Signer {
    signer_from_hex(KEYS[i]).expect("dev key")
}

/// A fresh anvil with the contract deployed by account 0, which is also its admin, with
/// account 1 as its first operator.
struct Chain {
    node: ScriptServer,
    admin: Marketplace,
}

impl Chain {
    async fn start() -> Chain {
        let node = ScriptServer::start("anvil");
        let deployer = key(0);
        let admin_addr = deployer.address();
        let admin = Marketplace::deploy(
            &node.uri,
            deployer,
            admin_addr,
            U256::from(WEI_PER_CREDIT),
            Some(Chain::address(1)),
        )
        .await
        .expect("deploy");
        Chain { node, admin }
    }

    /// Moves the node's clock `seconds` ahead and mines a block (`evm_increaseTime`, `evm_mine`).
    async fn advance(&self, seconds: u64) {
        use alloy::providers::Provider;
        let provider =
            alloy::providers::ProviderBuilder::new().connect_http(self.node.uri.parse().unwrap());
        let _: serde_json::Value = provider
            .raw_request("evm_increaseTime".into(), (seconds,))
            .await
            .expect("evm_increaseTime");
        let _: serde_json::Value = provider
            .raw_request("evm_mine".into(), ())
            .await
            .expect("evm_mine");
    }

    /// The time of block `number` (`None`: the latest), unix seconds.
    async fn block_time(&self, number: Option<u64>) -> u64 {
        use alloy::eips::BlockNumberOrTag;
        use alloy::providers::Provider;
        let provider =
            alloy::providers::ProviderBuilder::new().connect_http(self.node.uri.parse().unwrap());
        let tag = number.map_or(BlockNumberOrTag::Latest, BlockNumberOrTag::Number);
        provider
            .get_block_by_number(tag)
            .await
            .expect("eth_getBlockByNumber")
            .expect("block")
            .header
            .timestamp
    }

    /// The chain's UTC day: the latest block's time / 86400, what a usage record charged now
    /// is labelled with.
    async fn today(&self) -> u64 {
        self.block_time(None).await / 86_400
    }

    /// The contract as seen by dev account `i`.
    async fn as_account(&self, i: usize) -> Marketplace {
        Marketplace::connect(&self.node.uri, self.admin.address(), Some(key(i)))
            .await
            .expect("connect")
    }

    fn address(i: usize) -> Address {
        key(i).address()
    }
}
