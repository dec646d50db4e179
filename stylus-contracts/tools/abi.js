#!/usr/bin/env node
// Solidity-side tools for the Marketplace contracts, run by scripts/contracts with solc-js
// (npm solc, installed into .cache/solc; its folder is in $SOLC_MODULES).
//
//   node abi.js compile <Marketplace.sol> <out.json>
//       Compiles the Solidity twin and writes {contractName, compiler, settings, abi, bytecode,
//       deployedBytecode, methodIdentifiers}: a Hardhat-style artifact that alloy's `sol!` reads.
//   node abi.js check <export.sol> <events.sol> <artifact.json>
//       Compiles the Stylus export (functions and errors) with the hand-kept list of events and
//       the argument struct, and compares it with the twin's ABI: function selectors, mutability
//       and return types; event topics, indexed flags and parameter names; error selectors; the
//       constructor's argument types (from the export's last line, `// constructor(...)`, which
//       scripts/contracts appends from `cargo run --features export-abi -- constructor`).
//       Exits 1 on any difference.
//   node abi.js self-test <export.sol> <events.sol> <artifact.json>
//       Proves the check catches differences: mutated copies of the twin's ABI must fail it.
'use strict';

const fs = require('fs');
const path = require('path');

const modules = process.env.SOLC_MODULES;
if (!modules) {
  console.error('abi.js: SOLC_MODULES (the node_modules folder holding solc) is not set');
  process.exit(2);
}
const solc = require(path.join(modules, 'solc'));
const { keccak256 } = require(path.join(modules, 'js-sha3'));

const SETTINGS = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: 'cancun',
  outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object', 'evm.methodIdentifiers'] } },
};

function compile(sources) {
  const input = { language: 'Solidity', sources: {}, settings: SETTINGS };
  for (const [name, content] of Object.entries(sources)) input.sources[name] = { content };
  const out = JSON.parse(solc.compile(JSON.stringify(input)));
  const errors = (out.errors || []).filter((e) => e.severity === 'error');
  for (const e of out.errors || []) {
    if (e.severity === 'error') console.error(e.formattedMessage);
  }
  if (errors.length) throw new Error(`solc: ${errors.length} error(s)`);
  return out.contracts;
}

// ---------------------------------------------------------------- compile

function cmdCompile(src, outPath) {
  const name = path.basename(src);
  const contracts = compile({ [name]: fs.readFileSync(src, 'utf8') });
  const c = contracts[name].Marketplace;
  const artifact = {
    contractName: 'Marketplace',
    sourceName: `solidity/${name}`,
    compiler: `solc-js ${solc.version()}`,
    settings: { optimizer: SETTINGS.optimizer, evmVersion: SETTINGS.evmVersion },
    abi: c.abi,
    bytecode: `0x${c.evm.bytecode.object}`,
    deployedBytecode: `0x${c.evm.deployedBytecode.object}`,
    methodIdentifiers: c.evm.methodIdentifiers,
  };
  fs.writeFileSync(outPath, `${JSON.stringify(artifact, null, 2)}\n`);
  console.error(`compiled ${src} -> ${outPath} (${(c.evm.deployedBytecode.object.length / 2)} bytes of runtime code)`);
}

// ---------------------------------------------------------------- check

function canonicalType(p) {
  if (p.type.startsWith('tuple')) {
    return `(${p.components.map(canonicalType).join(',')})${p.type.slice('tuple'.length)}`;
  }
  return p.type;
}

const sig = (item) => `${item.name}(${item.inputs.map(canonicalType).join(',')})`;
const hash = (s) => keccak256(s);

/// The comparable facts of an ABI, keyed by signature.
function facts(abi) {
  const f = { function: new Map(), event: new Map(), error: new Map(), constructor: null };
  for (const item of abi) {
    if (item.type === 'function') {
      f.function.set(sig(item), {
        selector: `0x${hash(sig(item)).slice(0, 8)}`,
        stateMutability: item.stateMutability,
        outputs: item.outputs.map(canonicalType).join(','),
      });
    } else if (item.type === 'event') {
      f.event.set(sig(item), {
        topic0: `0x${hash(sig(item))}`,
        anonymous: Boolean(item.anonymous),
        params: item.inputs.map((i) => `${canonicalType(i)}${i.indexed ? ' indexed' : ''} ${i.name}`).join(', '),
      });
    } else if (item.type === 'error') {
      f.error.set(sig(item), { selector: `0x${hash(sig(item)).slice(0, 8)}` });
    } else if (item.type === 'constructor') {
      f.constructor = { inputs: item.inputs.map(canonicalType).join(','), stateMutability: item.stateMutability };
    } else {
      // receive/fallback: neither contract has one; any would be a difference.
      f[item.type] = item;
    }
  }
  return f;
}

/// The Stylus side: the export compiled together with the hand-kept events and struct.
function stylusAbi(exportPath, eventsPath) {
  const exported = fs.readFileSync(exportPath, 'utf8');
  const withImport = exported.replace(/(pragma solidity[^;]*;)/, '$1\nimport "MarketplaceEvents.sol";');
  const contracts = compile({ 'MarketplaceEvents.sol': fs.readFileSync(eventsPath, 'utf8'), 'IMarketplace.sol': withImport });
  const abi = [...contracts['IMarketplace.sol'].IMarketplace.abi, ...contracts['MarketplaceEvents.sol'].IMarketplaceEvents.abi];
  // `constructor(address admin, uint256 wei_per_credit)` [payable]
  const m = /^\/\/ constructor\((.*)\)\s*(payable)?\s*$/m.exec(exported);
  if (!m) throw new Error(`no "// constructor(...)" line in ${exportPath}`);
  const inputs = m[1].trim() === '' ? [] : m[1].split(',').map((a) => ({ type: a.trim().split(/\s+/)[0] }));
  abi.push({ type: 'constructor', inputs, stateMutability: m[2] ? 'payable' : 'nonpayable' });
  return abi;
}

function compare(left, right) {
  const a = facts(left);
  const b = facts(right);
  const diffs = [];
  for (const kind of ['function', 'event', 'error']) {
    for (const [s, fa] of a[kind]) {
      const fb = b[kind].get(s);
      if (!fb) {
        diffs.push(`${kind} ${s} (${fa.selector || fa.topic0}): only in the Stylus contract`);
      } else if (JSON.stringify(fa) !== JSON.stringify(fb)) {
        diffs.push(`${kind} ${s}: Stylus ${JSON.stringify(fa)} != twin ${JSON.stringify(fb)}`);
      }
    }
    for (const [s, fb] of b[kind]) {
      if (!a[kind].has(s)) diffs.push(`${kind} ${s} (${fb.selector || fb.topic0}): only in the Solidity twin`);
    }
  }
  if (JSON.stringify(a.constructor) !== JSON.stringify(b.constructor)) {
    diffs.push(`constructor: Stylus ${JSON.stringify(a.constructor)} != twin ${JSON.stringify(b.constructor)}`);
  }
  for (const kind of ['receive', 'fallback']) {
    if (Boolean(a[kind]) !== Boolean(b[kind])) diffs.push(`${kind}: present on one side only`);
  }
  return { diffs, counts: { functions: a.function.size, events: a.event.size, errors: a.error.size } };
}

function cmdCheck(exportPath, eventsPath, artifactPath) {
  const left = stylusAbi(exportPath, eventsPath);
  const right = JSON.parse(fs.readFileSync(artifactPath, 'utf8')).abi;
  const { diffs, counts } = compare(left, right);
  if (diffs.length) {
    console.error(`abi-check: the Stylus contract and the Solidity twin differ (${diffs.length}):`);
    for (const d of diffs) console.error(`  - ${d}`);
    process.exit(1);
  }
  console.log(
    `abi-check: identical: ${counts.functions} functions, ${counts.events} events, ${counts.errors} errors, constructor`,
  );
}

function cmdSelfTest(exportPath, eventsPath, artifactPath) {
  const left = stylusAbi(exportPath, eventsPath);
  const right = JSON.parse(fs.readFileSync(artifactPath, 'utf8')).abi;
  const clone = () => JSON.parse(JSON.stringify(right));
  const find = (abi, type, name) => abi.find((i) => i.type === type && i.name === name);
  const mutations = {
    'function argument type': (abi) => { find(abi, 'function', 'consumeCredits').inputs[1].components[2].type = 'uint256'; },
    'function mutability': (abi) => { find(abi, 'function', 'buyCredits').stateMutability = 'nonpayable'; },
    'function return type': (abi) => { find(abi, 'function', 'withdraw').outputs[0].type = 'uint128'; },
    'missing function': (abi) => { abi.splice(abi.indexOf(find(abi, 'function', 'acceptAdmin')), 1); },
    'extra function': (abi) => { abi.push({ type: 'function', name: 'unpause', inputs: [], outputs: [], stateMutability: 'nonpayable' }); },
    'event indexed flag': (abi) => { find(abi, 'event', 'CreditsBought').inputs[0].indexed = false; },
    'event parameter name': (abi) => { find(abi, 'event', 'Withdrawn').inputs[1].name = 'amount'; },
    'missing event': (abi) => { abi.splice(abi.indexOf(find(abi, 'event', 'UsageSettled')), 1); },
    'error argument type': (abi) => { find(abi, 'error', 'InsufficientCredits').inputs[0].type = 'bytes32'; },
    'missing error': (abi) => { abi.splice(abi.indexOf(find(abi, 'error', 'EmptyBatch')), 1); },
    'constructor': (abi) => { find(abi, 'constructor').inputs.pop(); },
    'receive': (abi) => { abi.push({ type: 'receive', stateMutability: 'payable' }); },
  };
  if (compare(left, right).diffs.length) throw new Error('self-test: the unmutated ABIs already differ');
  let failed = 0;
  for (const [what, mutate] of Object.entries(mutations)) {
    const abi = clone();
    mutate(abi);
    if (compare(left, abi).diffs.length === 0) {
      console.error(`abi-check self-test: a changed ${what} went unnoticed`);
      failed++;
    }
  }
  if (failed) process.exit(1);
  console.log(`abi-check self-test: all ${Object.keys(mutations).length} mutations caught`);
}

const [cmd, ...args] = process.argv.slice(2);
const commands = { compile: [cmdCompile, 2], check: [cmdCheck, 3], 'self-test': [cmdSelfTest, 3] };
if (!commands[cmd] || args.length !== commands[cmd][1]) {
  console.error('usage: abi.js compile <src.sol> <out.json> | check|self-test <export.sol> <events.sol> <artifact.json>');
  process.exit(2);
}
try {
  commands[cmd][0](...args);
} catch (e) {
  console.error(`abi.js ${cmd}: ${e.message}`);
  process.exit(1);
}
