//! Differential tests: the same calls, as raw calldata, go to the Stylus contract and to the
//! Solidity twin (abi/Marketplace.json's bytecode on revm, an in-process EVM); return data,
//! revert data and logs must be byte-for-byte the same. The Stylus contract runs two ways, on
//! the same scenario: natively (its router on a TestVM), and as the release WASM `cargo
//! stylus` would deploy (target/wasm32-unknown-unknown/release/stylus_marketplace.wasm, built
//! by `scripts/contracts test`) in a minimal Stylus host on wasmi (`wasm_host`).

mod wasm_host;

use std::collections::{BTreeSet, HashMap};

use alloy_primitives::{address, keccak256, Address, Bytes, FixedBytes, B256, U256};
use alloy_sol_types::{sol, SolCall, SolConstructor, SolValue};
use revm::{
    context::{result::ExecutionResult, result::Output, TxEnv},
    database::{CacheDB, EmptyDB},
    state::AccountInfo,
    Context, ExecuteCommitEvm, MainBuilder, MainContext, MainnetEvm,
};
use stylus_marketplace::{Marketplace, MIN_WEI_PER_CREDIT};
use stylus_sdk::{
    abi::{Router, CONSTRUCTOR_SELECTOR},
    testing::TestVM,
};
use wasm_host::WasmHost;

sol! {
    struct UsageRecord { address user; bytes32 modelId; uint64 calls; uint256 credits; uint64 day; bytes32 receiptBatchHash; }
    constructor(address admin, uint256 weiPerCredit, address operator);
    function modelKey(address owner, bytes32 localId) external view returns (bytes32);
    function registerModel(bytes32 localId, bytes32 cidHash, bytes32 commitment, uint256 pricePerCall) external returns (bytes32);
    function updatePrice(bytes32 modelId, uint256 newPrice) external;
    function deactivate(bytes32 modelId) external;
    function getModel(bytes32 modelId) external view returns (address, bytes32, bytes32, uint256, bool);
    function getPrices(bytes32 modelId) external view returns (uint256, uint256, uint256);
    function buyCredits() external payable returns (uint256);
    function creditsOf(address user) external view returns (uint256);
    function earningsOf(address owner) external view returns (uint256);
    function dailyCapOf(address user) external view returns (uint256);
    function pendingDailyCapOf(address user) external view returns (uint256, uint256);
    function spentOf(address user, uint64 day) external view returns (uint256);
    function refundOf(address user) external view returns (uint256, uint256);
    function weiPerCredit() external view returns (uint256);
    function admin() external view returns (address);
    function pendingAdmin() external view returns (address, uint256);
    function isOperator(address account) external view returns (bool);
    function operatorNotBefore(address account) external view returns (uint256);
    function paused() external view returns (bool);
    function batchRecordsHash(address operator, bytes32 batchId) external view returns (bytes32);
    function consumeCredits(bytes32 batchId, UsageRecord[] records) external;
    function withdraw() external returns (uint256);
    function setDailyCap(uint256 cap) external;
    function requestRefund(uint256 credits) external;
    function claimRefund() external returns (uint256);
    function setOperator(address operator, bool enabled) external;
    function acceptOperator() external;
    function proposeAdmin(address newAdmin) external;
    function acceptAdmin() external;
    function setPaused(bool paused) external;
}

const DEPLOYER: Address = address!("00000000000000000000000000000000000000d0");
const ADMIN: Address = address!("00000000000000000000000000000000000000a1");
const ADMIN2: Address = address!("00000000000000000000000000000000000000a2");
const OPERATOR: Address = address!("00000000000000000000000000000000000000b1");
const CREATOR: Address = address!("00000000000000000000000000000000000000c1");
const CREATOR2: Address = address!("00000000000000000000000000000000000000c2");
const ALICE: Address = address!("0000000000000000000000000000000000000a11");
const BOB: Address = address!("0000000000000000000000000000000000000b0b");
const OPERATOR2: Address = address!("00000000000000000000000000000000000000b2");
const STRANGER: Address = address!("0000000000000000000000000000000000000bad");
const RATE: u64 = MIN_WEI_PER_CREDIT;
/// Every account's starting balance on the twin's chain and the WASM host's.
const ACCOUNTS: [Address; 10] = [
    DEPLOYER, ADMIN, ADMIN2, OPERATOR, OPERATOR2, CREATOR, CREATOR2, ALICE, BOB, STRANGER,
];
/// Where the WASM host deploys the program.
const CONTRACT: Address = address!("000000000000000000000000000000000000c0de");
/// The block time both start at.
const T0: u64 = 1_700_000_000;
const DAY: u64 = 86_400;
/// The UTC day of `T0` (T0 is at 22:13).
const D0: u64 = T0 / DAY;

/// What a call did: success or revert, the returned or revert bytes, the logs.
#[derive(Debug, PartialEq)]
struct Outcome {
    ok: bool,
    data: Vec<u8>,
    logs: Vec<(Vec<B256>, Vec<u8>)>,
}

struct Stylus {
    vm: TestVM,
    c: Marketplace,
}

impl Stylus {
    fn deploy(admin: Address, rate: U256) -> (Stylus, Outcome) {
        let vm = TestVM::default();
        vm.set_block_timestamp(T0);
        let mut c = Marketplace::from(&vm);
        vm.set_sender(DEPLOYER);
        let res = c
            .constructor(admin, rate, OPERATOR)
            .map_err(Vec::<u8>::from);
        let out = Stylus::outcome(&vm, res.map(|()| Vec::new()));
        (Stylus { vm, c }, out)
    }

    fn outcome(vm: &TestVM, res: Result<Vec<u8>, Vec<u8>>) -> Outcome {
        let logs = vm.get_emitted_logs();
        vm.clear_mocks();
        match res {
            Ok(data) => Outcome {
                ok: true,
                data,
                logs,
            },
            // A reverted call leaves no logs on chain.
            Err(data) => Outcome {
                ok: false,
                data,
                logs: Vec::new(),
            },
        }
    }

    fn call(&mut self, from: Address, value: U256, data: &[u8]) -> Outcome {
        self.vm.set_sender(from);
        self.vm.set_value(value);
        // As the SDK's router: calldata too short for a selector reverts (no fallback here).
        let Some(selector) = data.get(..4) else {
            return Stylus::outcome(&self.vm, Err(Vec::new()));
        };
        let selector = u32::from_be_bytes(selector.try_into().unwrap());
        let res = <Marketplace as Router<Marketplace>>::route(&mut self.c, selector, &data[4..])
            .unwrap_or(Err(Vec::new()));
        Stylus::outcome(&self.vm, res)
    }
}

/// More than 2^128 wei, so a purchase over the contracts' 128-bit payment bound can be tried.
fn start_balance() -> U256 {
    U256::from(1) << 200
}

/// A deployed contract the scenario calls.
trait Contract {
    fn call(&mut self, from: Address, value: U256, data: &[u8]) -> Outcome;
    /// Moves the chain to the block time `t`.
    fn at(&mut self, t: u64);
}

impl Contract for Stylus {
    fn call(&mut self, from: Address, value: U256, data: &[u8]) -> Outcome {
        Stylus::call(self, from, value, data)
    }
    fn at(&mut self, t: u64) {
        self.vm.set_block_timestamp(t);
    }
}

/// The release WASM of the contract, on the minimal Stylus host.
struct Wasm {
    host: WasmHost,
}

/// The WASM `scripts/contracts test` builds: `cargo build --release --locked --target
/// wasm32-unknown-unknown --lib` in stylus-contracts (`STYLUS_MARKETPLACE_WASM` overrides).
fn release_wasm() -> Vec<u8> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = std::env::var_os("STYLUS_MARKETPLACE_WASM").map_or_else(
        || root.join("../target/wasm32-unknown-unknown/release/stylus_marketplace.wasm"),
        std::path::PathBuf::from,
    );
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; build it with `scripts/contracts build` (scripts/contracts test does)",
                path.display()
            )
        });
    // A WASM older than the contract's source would test an old contract.
    let source = std::fs::metadata(root.join("src/lib.rs"))
        .and_then(|m| m.modified())
        .unwrap();
    assert!(
        source <= built,
        "{} is older than src/lib.rs: rebuild it (scripts/contracts test)",
        path.display()
    );
    std::fs::read(&path).unwrap()
}

impl Wasm {
    /// Deploys as Stylus 0.10 does: the program is placed, then called (here from the
    /// deployer) with `CONSTRUCTOR_SELECTOR ++ abi.encode(args)`; the SDK's router runs the
    /// `#[constructor]` once (a storage slot guards it). A reverting constructor fails the
    /// deployment.
    fn deploy(admin: Address, rate: U256) -> (Wasm, Outcome) {
        let mut chain = wasm_host::Chain {
            timestamp: T0,
            ..Default::default()
        };
        for who in ACCOUNTS {
            chain.balances.insert(who, start_balance());
        }
        let mut wasm = Wasm {
            host: WasmHost::new(&release_wasm(), CONTRACT, chain),
        };
        let mut data = CONSTRUCTOR_SELECTOR.to_be_bytes().to_vec();
        data.extend(
            constructorCall {
                admin,
                weiPerCredit: rate,
                operator: OPERATOR,
            }
            .abi_encode(),
        );
        let mut out = wasm.call(DEPLOYER, U256::ZERO, &data);
        if out.ok {
            // A deployment returns no data (the twin's CREATE neither).
            out.data.clear();
        }
        (wasm, out)
    }
}

impl Contract for Wasm {
    fn call(&mut self, from: Address, value: U256, data: &[u8]) -> Outcome {
        let r = self.host.call(from, value, data);
        Outcome {
            ok: r.ok,
            data: r.data,
            logs: r.logs,
        }
    }
    fn at(&mut self, t: u64) {
        self.host.chain.timestamp = t;
    }
}

/// Which build of the Stylus contract a differential test runs.
#[derive(Clone, Copy, Debug)]
enum Build {
    /// The Rust code, natively: its router on a TestVM.
    Native,
    /// The release WASM on the minimal Stylus host.
    Wasm,
}

fn deploy_stylus(build: Build, admin: Address, rate: U256) -> (Box<dyn Contract>, Outcome) {
    match build {
        Build::Native => {
            let (c, out) = Stylus::deploy(admin, rate);
            (Box::new(c), out)
        }
        Build::Wasm => {
            let (c, out) = Wasm::deploy(admin, rate);
            (Box::new(c), out)
        }
    }
}

struct Twin {
    evm: MainnetEvm<revm::handler::MainnetContext<CacheDB<EmptyDB>>>,
    nonces: HashMap<Address, u64>,
    contract: Address,
}

impl Twin {
    fn deploy(admin: Address, rate: U256) -> (Twin, Outcome) {
        let artifact: serde_json::Value =
            serde_json::from_str(include_str!("../../abi/Marketplace.json")).unwrap();
        let code = artifact["bytecode"].as_str().unwrap();
        let mut init = alloy_primitives::hex::decode(code).unwrap();
        init.extend(
            constructorCall {
                admin,
                weiPerCredit: rate,
                operator: OPERATOR,
            }
            .abi_encode(),
        );

        let mut db = CacheDB::<EmptyDB>::default();
        for who in ACCOUNTS {
            db.insert_account_info(who, AccountInfo::from_balance(start_balance()));
        }
        let evm = Context::mainnet()
            .with_db(db)
            .modify_block_chained(|b| b.timestamp = U256::from(T0))
            .build_mainnet();
        let mut twin = Twin {
            evm,
            nonces: HashMap::new(),
            contract: Address::ZERO,
        };
        let (out, created) = twin.transact(DEPLOYER, None, U256::ZERO, init);
        twin.contract = created.unwrap_or_default();
        (twin, out)
    }

    fn transact(
        &mut self,
        from: Address,
        to: Option<Address>,
        value: U256,
        data: Vec<u8>,
    ) -> (Outcome, Option<Address>) {
        let nonce = self.nonces.entry(from).or_default();
        let builder = TxEnv::builder()
            .caller(from)
            .value(value)
            .data(Bytes::from(data))
            .gas_limit(10_000_000)
            .gas_price(0)
            .nonce(*nonce);
        let tx = match to {
            Some(to) => builder.call(to),
            None => builder.create(),
        }
        .build_fill();
        let result = self.evm.transact_commit(tx).expect("valid transaction");
        *nonce += 1;
        match result {
            ExecutionResult::Success { output, logs, .. } => {
                let logs = logs
                    .into_iter()
                    .map(|l| (l.data.topics().to_vec(), l.data.data.to_vec()))
                    .collect();
                let (data, created) = match output {
                    Output::Call(b) => (b.to_vec(), None),
                    Output::Create(_, addr) => (Vec::new(), addr),
                };
                (
                    Outcome {
                        ok: true,
                        data,
                        logs,
                    },
                    created,
                )
            }
            ExecutionResult::Revert { output, .. } => (
                Outcome {
                    ok: false,
                    data: output.to_vec(),
                    logs: Vec::new(),
                },
                None,
            ),
            ExecutionResult::Halt { reason, .. } => panic!("the twin halted: {reason:?}"),
        }
    }

    fn call(&mut self, from: Address, value: U256, data: &[u8]) -> Outcome {
        self.transact(from, Some(self.contract), value, data.to_vec())
            .0
    }
}

impl Contract for Twin {
    fn call(&mut self, from: Address, value: U256, data: &[u8]) -> Outcome {
        Twin::call(self, from, value, data)
    }
    fn at(&mut self, t: u64) {
        self.evm.ctx.modify_block(|b| b.timestamp = U256::from(t));
    }
}

fn id(n: u8) -> FixedBytes<32> {
    FixedBytes::repeat_byte(n)
}

fn u(n: u64) -> U256 {
    U256::from(n)
}

/// `keccak256(abi.encode(owner, localId))`: the key a model of `owner` is registered under.
fn key(owner: Address, n: u8) -> FixedBytes<32> {
    keccak256((owner, id(n)).abi_encode())
}

/// `calls` calls by `user` to `model`, charged `credits` off chain on day `D0 + day`.
fn rec(user: Address, model: FixedBytes<32>, calls: u64, credits: u64, day: u64) -> UsageRecord {
    UsageRecord {
        user,
        modelId: model,
        calls,
        credits: u(credits),
        day: D0 + day,
        receiptBatchHash: keccak256(model),
    }
}

/// One step of a differential scenario.
enum Step {
    /// A call from an address, with a value; `true`: it must succeed.
    Call(Address, U256, Vec<u8>, bool),
    /// Both chains move to this block time.
    At(u64),
}

use Step::{At, Call};

fn ok<C: SolCall>(from: Address, call: C) -> Step {
    Call(from, U256::ZERO, call.abi_encode(), true)
}

fn any<C: SolCall>(from: Address, call: C) -> Step {
    Call(from, U256::ZERO, call.abi_encode(), false)
}

fn settle(from: Address, batch: u8, records: Vec<UsageRecord>) -> Step {
    any(
        from,
        consumeCreditsCall {
            batchId: id(batch),
            records,
        },
    )
}

/// Runs `steps` on the Stylus contract (`build`) and the twin; every outcome must be the same,
/// and `true` steps must succeed. Returns the number of calls, of reverts, and the reasons of
/// the `UsageRejected` logs seen.
fn differential(build: Build, rate: U256, steps: Vec<Step>) -> (usize, usize, BTreeSet<u8>) {
    let (mut stylus, s0) = deploy_stylus(build, ADMIN, rate);
    let (mut twin, t0) = Twin::deploy(ADMIN, rate);
    assert!(s0.ok && t0.ok);
    assert_eq!(s0.logs, t0.logs, "constructor logs");
    let (mut calls, mut reverts) = (0, 0);
    let mut reasons = BTreeSet::new();
    let rejected = keccak256("UsageRejected(bytes32,address,bytes32,uint64,uint256,bytes32,uint8)");
    for (i, step) in steps.into_iter().enumerate() {
        match step {
            At(t) => {
                stylus.at(t);
                Contract::at(&mut twin, t);
            }
            Call(from, value, data, must_succeed) => {
                let s = stylus.call(from, value, &data);
                let t = twin.call(from, value, &data);
                assert_eq!(
                    s, t,
                    "step {i}: Stylus {build:?} (left) and twin (right) differ"
                );
                if must_succeed {
                    assert!(s.ok, "step {i} should succeed: {s:?}");
                }
                calls += 1;
                reverts += usize::from(!s.ok);
                for (topics, data) in &s.logs {
                    if topics[0] == rejected {
                        reasons.insert(data[data.len() - 1]);
                    }
                }
            }
        }
    }
    (calls, reverts, reasons)
}

#[test]
fn stylus_contract_and_solidity_twin_behave_the_same() {
    run_scenario(Build::Native);
}

#[test]
fn the_deployed_wasm_behaves_as_the_twin() {
    run_scenario(Build::Wasm);
}

/// The scenario both differential tests run: every function, most errors, every rejection
/// reason but overflow, on the Stylus contract built as `build` and on the twin.
fn run_scenario(build: Build) {
    let m1 = key(CREATOR, 1);
    let m2 = key(CREATOR2, 2);
    let own = key(OPERATOR, 3);
    let register = |n: u8, price: u64| registerModelCall {
        localId: id(n),
        cidHash: id(0xc0 + n),
        commitment: id(0xe0 + n),
        pricePerCall: u(price),
    };
    let buy = |who: Address, credits: u64| {
        Call(who, u(credits * RATE), buyCreditsCall {}.abi_encode(), true)
    };
    let views = |who: Address| {
        vec![
            ok(who, creditsOfCall { user: who }),
            ok(who, earningsOfCall { owner: who }),
            ok(who, dailyCapOfCall { user: who }),
            ok(who, pendingDailyCapOfCall { user: who }),
            ok(who, refundOfCall { user: who }),
            ok(who, spentOfCall { user: who, day: D0 }),
            ok(
                who,
                spentOfCall {
                    user: who,
                    day: D0 + 1,
                },
            ),
            ok(
                who,
                spentOfCall {
                    user: who,
                    day: D0 + 2,
                },
            ),
            ok(
                who,
                spentOfCall {
                    user: who,
                    day: D0 + 3,
                },
            ),
            ok(
                who,
                spentOfCall {
                    user: who,
                    day: D0 + 4,
                },
            ),
        ]
    };
    let mut steps = vec![
        // Roles: operators named, accepted after the delay; admin proposed, accepted after its
        // delay; pause.
        any(
            ALICE,
            setOperatorCall {
                operator: OPERATOR2,
                enabled: true,
            },
        ),
        any(
            ADMIN,
            setOperatorCall {
                operator: Address::ZERO,
                enabled: true,
            },
        ),
        ok(
            ADMIN,
            setOperatorCall {
                operator: OPERATOR2,
                enabled: true,
            },
        ),
        ok(ADMIN, operatorNotBeforeCall { account: OPERATOR2 }),
        any(OPERATOR2, acceptOperatorCall {}),
        any(STRANGER, acceptOperatorCall {}),
        At(T0 + DAY),
        ok(OPERATOR2, acceptOperatorCall {}),
        any(OPERATOR2, acceptOperatorCall {}),
        ok(ADMIN, isOperatorCall { account: OPERATOR2 }),
        any(ALICE, proposeAdminCall { newAdmin: ADMIN2 }),
        any(
            ADMIN,
            proposeAdminCall {
                newAdmin: Address::ZERO,
            },
        ),
        any(ADMIN2, acceptAdminCall {}),
        ok(ADMIN, proposeAdminCall { newAdmin: ADMIN2 }),
        ok(ADMIN, pendingAdminCall {}),
        any(ADMIN2, acceptAdminCall {}),
        any(STRANGER, acceptAdminCall {}),
        ok(ADMIN, adminCall {}),
        ok(ADMIN, weiPerCreditCall {}),
        // Models, keyed by owner.
        ok(CREATOR, register(1, 3)),
        ok(STRANGER, register(1, 100)),
        any(CREATOR, register(1, 3)),
        ok(CREATOR2, register(2, 1)),
        ok(OPERATOR, register(3, 1)),
        ok(
            ALICE,
            modelKeyCall {
                owner: CREATOR,
                localId: id(1),
            },
        ),
        ok(ALICE, getModelCall { modelId: m1 }),
        any(ALICE, getModelCall { modelId: id(9) }),
        ok(ALICE, getPricesCall { modelId: m1 }),
        any(
            ALICE,
            updatePriceCall {
                modelId: m1,
                newPrice: u(5),
            },
        ),
        any(
            CREATOR,
            updatePriceCall {
                modelId: id(9),
                newPrice: u(5),
            },
        ),
        // Credits.
        buy(ALICE, 100),
        buy(BOB, 5),
        Call(BOB, U256::ZERO, buyCreditsCall {}.abi_encode(), false),
        Call(BOB, u(RATE + 1), buyCreditsCall {}.abi_encode(), false),
        // A multiple of the rate, but over 2^128 - 1 wei: refused by both.
        Call(
            BOB,
            (U256::from(1) << 128) * u(RATE),
            buyCreditsCall {}.abi_encode(),
            false,
        ),
        // Daily caps: a first cap and a lowering wait CAP_DELAY (2 days); a raise is at once.
        ok(BOB, setDailyCapCall { cap: u(4) }),
        ok(BOB, pendingDailyCapOfCall { user: BOB }),
        ok(ALICE, setDailyCapCall { cap: U256::MAX }),
        ok(ALICE, setDailyCapCall { cap: u(30) }),
        ok(ALICE, dailyCapOfCall { user: ALICE }),
        ok(ALICE, pendingDailyCapOfCall { user: ALICE }),
        ok(CREATOR2, setDailyCapCall { cap: u(9) }),
        ok(CREATOR2, setDailyCapCall { cap: u(7) }),
        ok(CREATOR2, pendingDailyCapOfCall { user: CREATOR2 }),
        ok(CREATOR2, setDailyCapCall { cap: u(7) }),
        ok(CREATOR2, pendingDailyCapOfCall { user: CREATOR2 }),
        // Settlement: good and bad records mixed.
        settle(STRANGER, 1, vec![rec(ALICE, m1, 1, 3, 1)]),
        settle(OPERATOR, 1, vec![]),
        settle(
            OPERATOR,
            1,
            vec![
                rec(ALICE, m1, 2, 6, 1),
                rec(ALICE, id(9), 1, 1, 1),
                rec(ALICE, own, 1, 1, 1),
                rec(ALICE, m1, 1, 4, 1),
                rec(ALICE, m1, 0, 0, 1),
                rec(BOB, m2, 3, 3, 1),
                rec(BOB, m2, 2, 2, 1),
                rec(ALICE, m2, u64::MAX, 1, 1),
                rec(ALICE, m2, 1, 1, 1),
                // Day labels: yesterday settles, under its own label; the day before and a
                // future day are stale (after the owner check, before the price check).
                rec(ALICE, m1, 1, 3, 0),
                rec(ALICE, m1, 1, 3, u64::MAX - D0),
                rec(ALICE, m1, 1, 3, 2),
                rec(ALICE, m1, 1, 4, 2),
                rec(ALICE, own, 1, 1, 2),
                rec(ALICE, id(9), 1, 1, 2),
                UsageRecord {
                    day: 0,
                    ..rec(ALICE, m1, 1, 3, 0)
                },
            ],
        ),
        settle(OPERATOR, 1, vec![rec(ALICE, m1, 1, 3, 1)]),
        settle(OPERATOR2, 1, vec![rec(ALICE, m1, 1, 3, 1)]),
        ok(
            ALICE,
            batchRecordsHashCall {
                operator: OPERATOR,
                batchId: id(1),
            },
        ),
        ok(
            ALICE,
            batchRecordsHashCall {
                operator: OPERATOR2,
                batchId: id(1),
            },
        ),
        ok(
            ALICE,
            batchRecordsHashCall {
                operator: STRANGER,
                batchId: id(1),
            },
        ),
        // A price raise: the old price still settles within the window, then not.
        At(T0 + DAY + 10),
        ok(
            CREATOR,
            updatePriceCall {
                modelId: m1,
                newPrice: u(50),
            },
        ),
        any(
            CREATOR,
            updatePriceCall {
                modelId: m1,
                newPrice: u(60),
            },
        ),
        ok(ALICE, getPricesCall { modelId: m1 }),
        settle(
            OPERATOR,
            2,
            vec![
                rec(ALICE, m1, 2, 6, 1),
                rec(ALICE, m1, 1, 50, 1),
                rec(ALICE, m1, 1, 49, 1),
            ],
        ),
        At(T0 + 2 * DAY + 10),
        ok(BOB, dailyCapOfCall { user: BOB }),
        ok(BOB, pendingDailyCapOfCall { user: BOB }),
        // Yesterday's usage near midnight, settled today, under yesterday's label.
        settle(
            OPERATOR,
            9,
            vec![rec(BOB, m2, 1, 1, 1), rec(ALICE, m1, 1, 50, 1)],
        ),
        settle(
            OPERATOR,
            3,
            vec![
                rec(ALICE, m1, 1, 3, 2),
                rec(BOB, m2, 2, 2, 2),
                rec(BOB, m2, 3, 3, 2),
            ],
        ),
        // Deactivation.
        any(STRANGER, deactivateCall { modelId: m2 }),
        ok(CREATOR2, deactivateCall { modelId: m2 }),
        any(CREATOR2, deactivateCall { modelId: m2 }),
        any(
            CREATOR2,
            updatePriceCall {
                modelId: m2,
                newPrice: u(1),
            },
        ),
        settle(OPERATOR, 4, vec![rec(BOB, m2, 1, 1, 2)]),
        // Pause.
        any(ALICE, setPausedCall { paused: true }),
        ok(ADMIN, setPausedCall { paused: true }),
        ok(ALICE, pausedCall {}),
        settle(OPERATOR, 5, vec![rec(ALICE, m1, 1, 50, 2)]),
        Call(BOB, u(RATE), buyCreditsCall {}.abi_encode(), false),
        ok(CREATOR, withdrawCall {}),
        any(CREATOR, withdrawCall {}),
        any(STRANGER, withdrawCall {}),
        ok(ADMIN, setPausedCall { paused: false }),
        // Refunds.
        any(ALICE, claimRefundCall {}),
        any(
            ALICE,
            requestRefundCall {
                credits: U256::ZERO,
            },
        ),
        any(ALICE, requestRefundCall { credits: u(1_000) }),
        ok(ALICE, requestRefundCall { credits: u(20) }),
        any(ALICE, claimRefundCall {}),
        settle(OPERATOR, 6, vec![rec(ALICE, m1, 1, 50, 2)]),
        At(T0 + 4 * DAY + 10),
        // The caps set on day 1 are in force; a lowering after one took effect keeps it until
        // its own delay; a raise drops a pending lowering.
        ok(ALICE, dailyCapOfCall { user: ALICE }),
        ok(ALICE, pendingDailyCapOfCall { user: ALICE }),
        buy(ALICE, 100),
        settle(
            OPERATOR,
            10,
            vec![rec(ALICE, m1, 1, 50, 4), rec(BOB, m1, 1, 50, 3)],
        ),
        ok(ALICE, setDailyCapCall { cap: u(10) }),
        ok(ALICE, dailyCapOfCall { user: ALICE }),
        ok(ALICE, pendingDailyCapOfCall { user: ALICE }),
        ok(ALICE, setDailyCapCall { cap: u(100) }),
        ok(ALICE, dailyCapOfCall { user: ALICE }),
        ok(ALICE, pendingDailyCapOfCall { user: ALICE }),
        ok(BOB, setDailyCapCall { cap: u(0) }),
        ok(BOB, setDailyCapCall { cap: u(2) }),
        ok(BOB, pendingDailyCapOfCall { user: BOB }),
        ok(ALICE, claimRefundCall {}),
        any(ALICE, claimRefundCall {}),
        any(BOB, requestRefundCall { credits: u(1) }),
        settle(OPERATOR, 7, vec![rec(BOB, m1, 0, 0, 4)]),
        // Revocation, and the admin hand-over.
        ok(
            ADMIN,
            setOperatorCall {
                operator: OPERATOR2,
                enabled: false,
            },
        ),
        settle(OPERATOR2, 8, vec![rec(ALICE, m1, 1, 50, 4)]),
        ok(ADMIN2, acceptAdminCall {}),
        any(ADMIN, setPausedCall { paused: true }),
        ok(ADMIN2, setPausedCall { paused: true }),
        ok(ALICE, adminCall {}),
    ];
    for who in [ALICE, BOB, CREATOR, CREATOR2, OPERATOR] {
        steps.extend(views(who));
    }
    let (n, reverts, reasons) = differential(build, u(RATE), steps);
    // The scenario exercises both paths, and every rejection reason but overflow.
    assert!(
        reverts > 25 && reverts < n - 25,
        "{reverts} of {n} calls reverted"
    );
    assert_eq!(
        reasons.into_iter().collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6, 8]
    );
}

#[test]
fn deploy_errors_are_the_same() {
    for build in [Build::Native, Build::Wasm] {
        let below_floor = u(MIN_WEI_PER_CREDIT - 1);
        for (admin, rate) in [
            (Address::ZERO, u(RATE)),
            (ADMIN, U256::ZERO),
            (ADMIN, u(1)),
            (ADMIN, below_floor),
        ] {
            let (_, s) = deploy_stylus(build, admin, rate);
            let (_, t) = Twin::deploy(admin, rate);
            assert!(!s.ok, "{build:?}: deploy({admin}, {rate}) should fail");
            assert_eq!(s, t, "{build:?}: deploy({admin}, {rate})");
        }
        // The floor itself, 1 gwei, is accepted by both.
        let (mut s, s0) = deploy_stylus(build, ADMIN, u(MIN_WEI_PER_CREDIT));
        let (mut t, t0) = Twin::deploy(ADMIN, u(MIN_WEI_PER_CREDIT));
        assert!(s0.ok, "{build:?}: {s0:?}");
        assert_eq!(s0, t0);
        let rate = weiPerCreditCall {}.abi_encode();
        let out = s.call(ALICE, U256::ZERO, &rate);
        assert_eq!(out, t.call(ALICE, U256::ZERO, &rate));
        assert_eq!(out.data, u(MIN_WEI_PER_CREDIT).to_be_bytes::<32>());
    }
}

#[test]
fn the_wasm_constructor_runs_once() {
    let (mut wasm, out) = Wasm::deploy(ADMIN, u(RATE));
    assert!(out.ok);
    let mut again = CONSTRUCTOR_SELECTOR.to_be_bytes().to_vec();
    again.extend(
        constructorCall {
            admin: STRANGER,
            weiPerCredit: u(RATE),
            operator: STRANGER,
        }
        .abi_encode(),
    );
    assert!(!wasm.call(STRANGER, U256::ZERO, &again).ok);
    let admin = wasm.call(ALICE, U256::ZERO, &adminCall {}.abi_encode());
    assert_eq!(admin.data, ADMIN.into_word().to_vec());
}

#[test]
fn malformed_calls_revert_on_both() {
    for build in [Build::Native, Build::Wasm] {
        malformed_calls(build);
    }
}

fn malformed_calls(build: Build) {
    let (mut stylus, _) = deploy_stylus(build, ADMIN, u(RATE));
    let (mut twin, _) = Twin::deploy(ADMIN, u(RATE));
    let set_op = setOperatorCall {
        operator: OPERATOR2,
        enabled: true,
    }
    .abi_encode();
    let cases: Vec<(&str, U256, Vec<u8>)> = vec![
        (
            "value sent to a non-payable function",
            u(RATE),
            set_op.clone(),
        ),
        ("unknown selector", U256::ZERO, vec![0xde, 0xad, 0xbe, 0xef]),
        ("truncated arguments", U256::ZERO, set_op[..20].to_vec()),
        ("bool out of range", U256::ZERO, {
            let mut bad = set_op.clone();
            bad[4 + 63] = 2;
            bad
        }),
        ("empty calldata", u(RATE), Vec::new()),
        ("short selector", U256::ZERO, vec![0x12, 0x34]),
    ];
    for (what, value, data) in cases {
        // Revert data may differ here (the SDK and solc word their decoding errors differently).
        let s = stylus.call(ADMIN, value, &data);
        let t = twin.call(ADMIN, value, &data);
        assert!(
            !s.ok && !t.ok,
            "{build:?}: {what}: Stylus {s:?}, twin {t:?}"
        );
        assert!(s.logs.is_empty() && t.logs.is_empty());
    }
    // Both still work afterwards, and nothing was set.
    let is_op = operatorNotBeforeCall { account: OPERATOR2 }.abi_encode();
    assert_eq!(
        stylus.call(ADMIN, U256::ZERO, &is_op),
        twin.call(ADMIN, U256::ZERO, &is_op)
    );
    assert_eq!(stylus.call(ADMIN, U256::ZERO, &is_op).data, vec![0u8; 32]);
}

/// The limits `cargo stylus check` applies (cargo-stylus `constants.rs`): the deployed code,
/// the `EFF000` prefix then the WASM brotli-compressed at quality 11 (libbrotli's default
/// window, 22), must fit `ByteSize::kb(24)` = 24,000 bytes (the chain's own limit is the EVM
/// code size, 24 KiB = 24,576 bytes); the uncompressed WASM `ByteSize::kb(128)`.
///
/// The release WASM is what `scripts/contracts` builds (a pinned nightly, std rebuilt with the
/// `immediate-abort` panic strategy); a stable build is over the compressed limit.
#[test]
fn the_deployed_wasm_fits_stylus_size_limits() {
    let wasm = release_wasm();
    let mut compressed = Vec::new();
    let params = brotli::enc::BrotliEncoderParams {
        quality: 11,
        lgwin: 22,
        ..Default::default()
    };
    brotli::BrotliCompress(&mut wasm.as_slice(), &mut compressed, &params).unwrap();
    let code = 3 + compressed.len();
    println!(
        "release WASM: {} bytes, brotli (q11, w22) {} bytes, deployed code {code} bytes",
        wasm.len(),
        compressed.len()
    );
    assert!(
        wasm.len() <= 128_000,
        "the WASM is {} bytes, over cargo stylus' 128,000",
        wasm.len()
    );
    assert!(
        code <= 24_000,
        "the deployed code would be {code} bytes, {} over cargo stylus' 24,000 (24 KiB: {})",
        code - 24_000,
        code as i64 - 24_576
    );
}

/// The hostios the WASM imports are the ones `wasm_host` links (instantiation fails on any
/// other); a new one needs emulating there first.
#[test]
fn the_wasm_imports_only_what_the_host_emulates() {
    let host = WasmHost::new(&release_wasm(), CONTRACT, wasm_host::Chain::default());
    let mut imports = host.imports();
    imports.sort();
    let expected = [
        "block_timestamp",
        "call_contract",
        "delegate_call_contract",
        "emit_log",
        "msg_reentrant",
        "msg_sender",
        "msg_value",
        "native_keccak256",
        "pay_for_memory_grow",
        "read_args",
        "read_return_data",
        "return_data_size",
        "static_call_contract",
        "storage_cache_bytes32",
        "storage_flush_cache",
        "storage_load_bytes32",
        "write_result",
    ]
    .map(|name| format!("vm_hooks::{name}"));
    assert_eq!(imports, expected);
}
