//! Differential test: the same calls, as raw calldata, go to the Stylus contract (through its
//! router on a TestVM) and to the Solidity twin (abi/Marketplace.json's bytecode on revm, an
//! in-process EVM); return data, revert data and logs must be byte-for-byte the same.

use std::collections::HashMap;

use alloy_primitives::{address, Address, Bytes, FixedBytes, B256, U256};
use alloy_sol_types::{sol, SolCall, SolConstructor};
use revm::{
    context::{result::ExecutionResult, result::Output, TxEnv},
    database::{CacheDB, EmptyDB},
    state::AccountInfo,
    Context, ExecuteCommitEvm, MainBuilder, MainContext, MainnetEvm,
};
use stylus_marketplace::Marketplace;
use stylus_sdk::{abi::Router, testing::TestVM};

sol! {
    struct UsageRecord { address user; bytes32 modelId; uint64 calls; bytes32 receiptBatchHash; }
    constructor(address admin, uint256 weiPerCredit);
    function registerModel(bytes32 modelId, bytes32 cidHash, bytes32 commitment, uint256 pricePerCall) external;
    function updatePrice(bytes32 modelId, uint256 newPrice) external;
    function deactivate(bytes32 modelId) external;
    function getModel(bytes32 modelId) external view returns (address, bytes32, bytes32, uint256, bool);
    function buyCredits() external payable returns (uint256);
    function creditsOf(address user) external view returns (uint256);
    function earningsOf(address owner) external view returns (uint256);
    function weiPerCredit() external view returns (uint256);
    function admin() external view returns (address);
    function isOperator(address account) external view returns (bool);
    function isBatchSettled(bytes32 batchId) external view returns (bool);
    function consumeCredits(bytes32 batchId, UsageRecord[] records) external;
    function withdraw() external returns (uint256);
    function setOperator(address operator, bool enabled) external;
    function setAdmin(address newAdmin) external;
}

const DEPLOYER: Address = address!("00000000000000000000000000000000000000d0");
const ADMIN: Address = address!("00000000000000000000000000000000000000a1");
const ADMIN2: Address = address!("00000000000000000000000000000000000000a2");
const OPERATOR: Address = address!("00000000000000000000000000000000000000b1");
const CREATOR: Address = address!("00000000000000000000000000000000000000c1");
const CREATOR2: Address = address!("00000000000000000000000000000000000000c2");
const ALICE: Address = address!("0000000000000000000000000000000000000a11");
const BOB: Address = address!("0000000000000000000000000000000000000b0b");
const RATE: u64 = 1_000;

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
        let mut c = Marketplace::from(&vm);
        vm.set_sender(DEPLOYER);
        let res = c.constructor(admin, rate).map_err(Vec::<u8>::from);
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
        let selector = u32::from_be_bytes(data[..4].try_into().unwrap());
        let res = <Marketplace as Router<Marketplace>>::route(&mut self.c, selector, &data[4..])
            .unwrap_or(Err(Vec::new()));
        Stylus::outcome(&self.vm, res)
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
            }
            .abi_encode(),
        );

        let mut db = CacheDB::<EmptyDB>::default();
        for who in [
            DEPLOYER, ADMIN, ADMIN2, OPERATOR, CREATOR, CREATOR2, ALICE, BOB,
        ] {
            db.insert_account_info(
                who,
                AccountInfo::from_balance(U256::from(10).pow(U256::from(30))),
            );
        }
        let evm = Context::mainnet().with_db(db).build_mainnet();
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

fn id(n: u8) -> FixedBytes<32> {
    FixedBytes::repeat_byte(n)
}

fn u(n: u64) -> U256 {
    U256::from(n)
}

fn rec(user: Address, model: u8, calls: u64) -> UsageRecord {
    UsageRecord {
        user,
        modelId: id(model),
        calls,
        receiptBatchHash: id(0x70 + model),
    }
}

/// Runs `steps` on both contracts; every outcome must be the same, and `true` steps must succeed.
fn differential(rate: U256, steps: Vec<(Address, U256, Vec<u8>, bool)>) -> usize {
    let (mut stylus, s0) = Stylus::deploy(ADMIN, rate);
    let (mut twin, t0) = Twin::deploy(ADMIN, rate);
    assert!(s0.ok && t0.ok);
    assert_eq!(s0.logs, t0.logs, "constructor logs");
    let mut reverts = 0;
    for (i, (from, value, data, must_succeed)) in steps.into_iter().enumerate() {
        let s = stylus.call(from, value, &data);
        let t = twin.call(from, value, &data);
        assert_eq!(s, t, "step {i}: Stylus (left) and twin (right) differ");
        if must_succeed {
            assert!(s.ok, "step {i} should succeed: {s:?}");
        }
        reverts += usize::from(!s.ok);
    }
    reverts
}

#[test]
fn stylus_contract_and_solidity_twin_behave_the_same() {
    let z = U256::ZERO;
    let ok = true;
    let any = false;
    let steps = vec![
        // Admin and operators.
        (
            ALICE,
            z,
            setOperatorCall {
                operator: OPERATOR,
                enabled: true,
            }
            .abi_encode(),
            any,
        ),
        (
            ADMIN,
            z,
            setOperatorCall {
                operator: Address::ZERO,
                enabled: true,
            }
            .abi_encode(),
            any,
        ),
        (
            ADMIN,
            z,
            setOperatorCall {
                operator: OPERATOR,
                enabled: true,
            }
            .abi_encode(),
            ok,
        ),
        (
            ADMIN,
            z,
            isOperatorCall { account: OPERATOR }.abi_encode(),
            ok,
        ),
        (ADMIN, z, adminCall {}.abi_encode(), ok),
        (ADMIN, z, weiPerCreditCall {}.abi_encode(), ok),
        // Models.
        (
            CREATOR,
            z,
            registerModelCall {
                modelId: id(1),
                cidHash: id(2),
                commitment: id(3),
                pricePerCall: u(3),
            }
            .abi_encode(),
            ok,
        ),
        (
            CREATOR2,
            z,
            registerModelCall {
                modelId: id(1),
                cidHash: id(2),
                commitment: id(3),
                pricePerCall: u(3),
            }
            .abi_encode(),
            any,
        ),
        (
            CREATOR2,
            z,
            registerModelCall {
                modelId: id(2),
                cidHash: id(4),
                commitment: id(5),
                pricePerCall: u(5),
            }
            .abi_encode(),
            ok,
        ),
        (
            CREATOR2,
            z,
            registerModelCall {
                modelId: id(9),
                cidHash: id(4),
                commitment: id(5),
                pricePerCall: U256::MAX,
            }
            .abi_encode(),
            ok,
        ),
        (CREATOR, z, getModelCall { modelId: id(1) }.abi_encode(), ok),
        (
            CREATOR,
            z,
            getModelCall { modelId: id(7) }.abi_encode(),
            any,
        ),
        (
            CREATOR2,
            z,
            updatePriceCall {
                modelId: id(1),
                newPrice: u(1),
            }
            .abi_encode(),
            any,
        ),
        (
            CREATOR,
            z,
            updatePriceCall {
                modelId: id(7),
                newPrice: u(1),
            }
            .abi_encode(),
            any,
        ),
        (
            CREATOR,
            z,
            updatePriceCall {
                modelId: id(1),
                newPrice: u(4),
            }
            .abi_encode(),
            ok,
        ),
        // Credits.
        (ALICE, u(100 * RATE), buyCreditsCall {}.abi_encode(), ok),
        (BOB, u(10 * RATE), buyCreditsCall {}.abi_encode(), ok),
        (BOB, u(RATE + 1), buyCreditsCall {}.abi_encode(), any),
        (BOB, z, buyCreditsCall {}.abi_encode(), any),
        (ALICE, z, creditsOfCall { user: ALICE }.abi_encode(), ok),
        // Settlement.
        (
            ALICE,
            z,
            consumeCreditsCall {
                batchId: id(1),
                records: vec![rec(ALICE, 1, 1)],
            }
            .abi_encode(),
            any,
        ),
        (
            OPERATOR,
            z,
            consumeCreditsCall {
                batchId: id(1),
                records: vec![],
            }
            .abi_encode(),
            any,
        ),
        (
            OPERATOR,
            z,
            consumeCreditsCall {
                batchId: id(1),
                records: vec![rec(ALICE, 1, 2), rec(BOB, 2, 3)],
            }
            .abi_encode(),
            any,
        ),
        (
            OPERATOR,
            z,
            consumeCreditsCall {
                batchId: id(1),
                records: vec![rec(ALICE, 1, 2), rec(ALICE, 7, 1)],
            }
            .abi_encode(),
            any,
        ),
        (
            OPERATOR,
            z,
            consumeCreditsCall {
                batchId: id(1),
                records: vec![rec(ALICE, 9, 2)],
            }
            .abi_encode(),
            any,
        ),
        (
            OPERATOR,
            z,
            consumeCreditsCall {
                batchId: id(1),
                records: vec![
                    rec(ALICE, 1, 2),
                    rec(BOB, 2, 1),
                    rec(ALICE, 2, 3),
                    rec(BOB, 1, 0),
                ],
            }
            .abi_encode(),
            ok,
        ),
        (
            OPERATOR,
            z,
            consumeCreditsCall {
                batchId: id(1),
                records: vec![rec(ALICE, 1, 1)],
            }
            .abi_encode(),
            any,
        ),
        (
            OPERATOR,
            z,
            isBatchSettledCall { batchId: id(1) }.abi_encode(),
            ok,
        ),
        (
            OPERATOR,
            z,
            consumeCreditsCall {
                batchId: id(2),
                records: vec![rec(BOB, 1, 1)],
            }
            .abi_encode(),
            ok,
        ),
        (
            OPERATOR,
            z,
            consumeCreditsCall {
                batchId: id(3),
                records: vec![rec(BOB, 1, 1)],
            }
            .abi_encode(),
            any,
        ),
        (BOB, z, creditsOfCall { user: BOB }.abi_encode(), ok),
        (
            CREATOR,
            z,
            earningsOfCall { owner: CREATOR }.abi_encode(),
            ok,
        ),
        // Deactivation.
        (
            CREATOR,
            z,
            deactivateCall { modelId: id(2) }.abi_encode(),
            any,
        ),
        (
            CREATOR2,
            z,
            deactivateCall { modelId: id(2) }.abi_encode(),
            ok,
        ),
        (
            CREATOR2,
            z,
            deactivateCall { modelId: id(2) }.abi_encode(),
            any,
        ),
        (
            CREATOR2,
            z,
            updatePriceCall {
                modelId: id(2),
                newPrice: u(1),
            }
            .abi_encode(),
            any,
        ),
        (
            OPERATOR,
            z,
            consumeCreditsCall {
                batchId: id(4),
                records: vec![rec(ALICE, 2, 1)],
            }
            .abi_encode(),
            any,
        ),
        // Payouts.
        (CREATOR, z, withdrawCall {}.abi_encode(), ok),
        (CREATOR, z, withdrawCall {}.abi_encode(), any),
        (CREATOR2, z, withdrawCall {}.abi_encode(), ok),
        (ALICE, z, withdrawCall {}.abi_encode(), any),
        // Admin hand-over; the operator role is revoked.
        (
            ADMIN2,
            z,
            setAdminCall { newAdmin: ADMIN2 }.abi_encode(),
            any,
        ),
        (
            ADMIN,
            z,
            setAdminCall {
                newAdmin: Address::ZERO,
            }
            .abi_encode(),
            any,
        ),
        (ADMIN, z, setAdminCall { newAdmin: ADMIN2 }.abi_encode(), ok),
        (
            ADMIN,
            z,
            setOperatorCall {
                operator: OPERATOR,
                enabled: false,
            }
            .abi_encode(),
            any,
        ),
        (
            ADMIN2,
            z,
            setOperatorCall {
                operator: OPERATOR,
                enabled: false,
            }
            .abi_encode(),
            ok,
        ),
        (
            OPERATOR,
            z,
            consumeCreditsCall {
                batchId: id(5),
                records: vec![rec(ALICE, 1, 1)],
            }
            .abi_encode(),
            any,
        ),
    ];
    let n = steps.len();
    let reverts = differential(u(RATE), steps);
    // The scenario exercises both paths.
    assert!(
        reverts > 20 && reverts < n - 15,
        "{reverts} of {n} steps reverted"
    );
}

#[test]
fn deploy_errors_are_the_same() {
    for (admin, rate) in [(Address::ZERO, u(1)), (ADMIN, U256::ZERO)] {
        let (_, s) = Stylus::deploy(admin, rate);
        let (_, t) = Twin::deploy(admin, rate);
        assert!(!s.ok);
        assert_eq!(s, t);
    }
}

#[test]
fn malformed_calls_revert_on_both() {
    let (mut stylus, _) = Stylus::deploy(ADMIN, u(RATE));
    let (mut twin, _) = Twin::deploy(ADMIN, u(RATE));
    let set_op = setOperatorCall {
        operator: OPERATOR,
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
    ];
    for (what, value, data) in cases {
        // Revert data may differ here (the SDK and solc word their decoding errors differently).
        let s = stylus.call(ADMIN, value, &data);
        let t = twin.call(ADMIN, value, &data);
        assert!(!s.ok && !t.ok, "{what}: Stylus {s:?}, twin {t:?}");
        assert!(s.logs.is_empty() && t.logs.is_empty());
    }
    // Both still work afterwards, and nothing was set.
    let is_op = isOperatorCall { account: OPERATOR }.abi_encode();
    assert_eq!(
        stylus.call(ADMIN, U256::ZERO, &is_op),
        twin.call(ADMIN, U256::ZERO, &is_op)
    );
    assert_eq!(stylus.call(ADMIN, U256::ZERO, &is_op).data, vec![0u8; 32]);
}
