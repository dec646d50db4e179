//! A minimal Stylus host for the differential test: runs the contract's release WASM (the
//! program `cargo stylus` would deploy) on `wasmi`, linking the `vm_hooks` imports it uses, with
//! storage, balances, logs and block time kept in plain Rust.
//!
//! Semantics follow the Stylus hostios as the SDK (`stylus-sdk` 0.10.10, `src/hostio.rs`)
//! documents them: each call gets a fresh instance (fresh memory), `read_args` /
//! `write_result` carry calldata and return data, `user_entrypoint(len)` returns 0 (success)
//! or 1 (revert); storage writes go to a cache that `storage_flush_cache` persists; a revert or
//! a trap (a panic: the release profile aborts) drops the call's storage writes, logs and
//! value transfers. `call_contract` only pays ether to accounts without code (all the contract
//! ever calls: `transfer_eth`); gas and ink are not metered; `msg_reentrant` is always false.
//! Other imports (static and delegate calls) are linked to trap, so using one fails loudly.

use std::collections::HashMap;

use alloy_primitives::{keccak256, Address, B256, U256};
use wasmi::{Caller, Engine, Error, Linker, Memory, Module, Store};

/// The chain state the host keeps between calls.
#[derive(Clone, Default)]
pub struct Chain {
    pub storage: HashMap<B256, B256>,
    pub balances: HashMap<Address, U256>,
    pub timestamp: u64,
}

/// What the program sees and does during one call.
struct Frame {
    chain: Chain,
    /// Written with `storage_cache_bytes32`, not flushed yet.
    cache: HashMap<B256, B256>,
    contract: Address,
    sender: Address,
    value: U256,
    args: Vec<u8>,
    result: Vec<u8>,
    logs: Vec<(Vec<B256>, Vec<u8>)>,
    return_data: Vec<u8>,
    memory: Option<Memory>,
}

/// The result of one call: success or revert, the return or revert data, the logs (none after
/// a revert).
pub struct CallResult {
    pub ok: bool,
    pub data: Vec<u8>,
    pub logs: Vec<(Vec<B256>, Vec<u8>)>,
}

/// A deployed Stylus program and the chain it lives on.
pub struct WasmHost {
    engine: Engine,
    module: Module,
    linker: Linker<Frame>,
    pub chain: Chain,
    pub contract: Address,
}

fn memory(caller: &Caller<'_, Frame>) -> Memory {
    caller
        .data()
        .memory
        .expect("memory is set before the entry point runs")
}

fn read(caller: &Caller<'_, Frame>, ptr: i32, len: usize) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; len];
    memory(caller)
        .read(caller, ptr as u32 as usize, &mut buf)
        .map_err(|e| Error::new(format!("read out of bounds: {e}")))?;
    Ok(buf)
}

fn read32(caller: &Caller<'_, Frame>, ptr: i32) -> Result<B256, Error> {
    Ok(B256::from_slice(&read(caller, ptr, 32)?))
}

fn write(caller: &mut Caller<'_, Frame>, ptr: i32, bytes: &[u8]) -> Result<(), Error> {
    let mem = memory(caller);
    mem.write(caller, ptr as u32 as usize, bytes)
        .map_err(|e| Error::new(format!("write out of bounds: {e}")))
}

fn link(linker: &mut Linker<Frame>) -> Result<(), wasmi::errors::LinkerError> {
    const M: &str = "vm_hooks";
    linker.func_wrap(M, "read_args", |mut c: Caller<'_, Frame>, dest: i32| {
        let args = c.data().args.clone();
        write(&mut c, dest, &args)
    })?;
    linker.func_wrap(
        M,
        "write_result",
        |mut c: Caller<'_, Frame>, ptr: i32, len: i32| {
            c.data_mut().result = read(&c, ptr, len as u32 as usize)?;
            Ok(())
        },
    )?;
    linker.func_wrap(M, "pay_for_memory_grow", |_: Caller<'_, Frame>, _: i32| {})?;
    linker.func_wrap(M, "msg_reentrant", |_: Caller<'_, Frame>| 0i32)?;
    linker.func_wrap(M, "msg_sender", |mut c: Caller<'_, Frame>, dest: i32| {
        let sender = c.data().sender;
        write(&mut c, dest, sender.as_slice())
    })?;
    linker.func_wrap(M, "msg_value", |mut c: Caller<'_, Frame>, dest: i32| {
        let value = c.data().value.to_be_bytes::<32>();
        write(&mut c, dest, &value)
    })?;
    linker.func_wrap(M, "block_timestamp", |c: Caller<'_, Frame>| {
        c.data().chain.timestamp as i64
    })?;
    linker.func_wrap(
        M,
        "storage_load_bytes32",
        |mut c: Caller<'_, Frame>, key: i32, dest: i32| {
            let key = read32(&c, key)?;
            let f = c.data();
            let value = f
                .cache
                .get(&key)
                .or_else(|| f.chain.storage.get(&key))
                .copied()
                .unwrap_or_default();
            write(&mut c, dest, value.as_slice())
        },
    )?;
    linker.func_wrap(
        M,
        "storage_cache_bytes32",
        |mut c: Caller<'_, Frame>, key: i32, value: i32| {
            let (key, value) = (read32(&c, key)?, read32(&c, value)?);
            c.data_mut().cache.insert(key, value);
            Ok(())
        },
    )?;
    linker.func_wrap(
        M,
        "storage_flush_cache",
        |mut c: Caller<'_, Frame>, _clear: i32| {
            // Persisting and forgetting the cache is both `clear` modes: later loads read
            // the same values either way.
            let f = c.data_mut();
            let cache = std::mem::take(&mut f.cache);
            f.chain.storage.extend(cache);
        },
    )?;
    linker.func_wrap(
        M,
        "native_keccak256",
        |mut c: Caller<'_, Frame>, ptr: i32, len: i32, out: i32| {
            let hash = keccak256(read(&c, ptr, len as u32 as usize)?);
            write(&mut c, out, hash.as_slice())
        },
    )?;
    linker.func_wrap(
        M,
        "emit_log",
        |mut c: Caller<'_, Frame>, ptr: i32, len: i32, topics: i32| {
            let bytes = read(&c, ptr, len as u32 as usize)?;
            let n = topics as u32 as usize;
            if n > 4 || bytes.len() < n * 32 {
                return Err(Error::new("emit_log: bad topic count"));
            }
            let (t, data) = bytes.split_at(n * 32);
            let topics = t.chunks(32).map(B256::from_slice).collect();
            c.data_mut().logs.push((topics, data.to_vec()));
            Ok(())
        },
    )?;
    linker.func_wrap(
        M,
        "call_contract",
        |mut c: Caller<'_, Frame>,
         to: i32,
         data: i32,
         data_len: i32,
         value: i32,
         _gas: i64,
         ret_len: i32| {
            let to = Address::from_slice(&read(&c, to, 20)?);
            let calldata = read(&c, data, data_len as u32 as usize)?;
            let value = U256::from_be_bytes(read32(&c, value)?.0);
            if !calldata.is_empty() {
                return Err(Error::new(format!(
                    "call_contract with calldata to {to}: not emulated"
                )));
            }
            let f = c.data_mut();
            let from = f.contract;
            let have = f.chain.balances.get(&from).copied().unwrap_or_default();
            let status = if have < value {
                1i32
            } else {
                f.chain.balances.insert(from, have - value);
                *f.chain.balances.entry(to).or_default() += value;
                0
            };
            f.return_data.clear();
            write(&mut c, ret_len, &0u32.to_le_bytes())?;
            Ok(status)
        },
    )?;
    linker.func_wrap(M, "return_data_size", |c: Caller<'_, Frame>| {
        c.data().return_data.len() as i32
    })?;
    linker.func_wrap(
        M,
        "read_return_data",
        |mut c: Caller<'_, Frame>, dest: i32, offset: i32, size: i32| {
            let data = c.data().return_data.clone();
            let start = (offset as u32 as usize).min(data.len());
            let end = start.saturating_add(size as u32 as usize).min(data.len());
            write(&mut c, dest, &data[start..end])?;
            Ok((end - start) as i32)
        },
    )?;
    linker.func_wrap(
        M,
        "static_call_contract",
        |_: Caller<'_, Frame>, _: i32, _: i32, _: i32, _: i64, _: i32| -> Result<i32, Error> {
            Err(Error::new("static_call_contract: not emulated"))
        },
    )?;
    linker.func_wrap(
        M,
        "delegate_call_contract",
        |_: Caller<'_, Frame>, _: i32, _: i32, _: i32, _: i64, _: i32| -> Result<i32, Error> {
            Err(Error::new("delegate_call_contract: not emulated"))
        },
    )?;
    Ok(())
}

impl WasmHost {
    /// Loads `wasm` as the program at `contract`; nothing runs yet (see [`WasmHost::call`]).
    pub fn new(wasm: &[u8], contract: Address, chain: Chain) -> WasmHost {
        let engine = Engine::default();
        let module = Module::new(&engine, wasm).expect("a valid WASM module");
        let mut linker = Linker::new(&engine);
        link(&mut linker).expect("the host links");
        WasmHost {
            engine,
            module,
            linker,
            chain,
            contract,
        }
    }

    /// The program's imports, as `module::name`.
    pub fn imports(&self) -> Vec<String> {
        self.module
            .imports()
            .map(|i| format!("{}::{}", i.module(), i.name()))
            .collect()
    }

    /// Calls the program from `sender` with `value` wei and `calldata`, as a transaction
    /// would: on success the state it wrote is kept, on a revert or trap nothing is.
    pub fn call(&mut self, sender: Address, value: U256, calldata: &[u8]) -> CallResult {
        let mut chain = self.chain.clone();
        let have = chain.balances.get(&sender).copied().unwrap_or_default();
        assert!(have >= value, "{sender} can't pay {value}");
        chain.balances.insert(sender, have - value);
        *chain.balances.entry(self.contract).or_default() += value;
        let frame = Frame {
            chain,
            cache: HashMap::new(),
            contract: self.contract,
            sender,
            value,
            args: calldata.to_vec(),
            result: Vec::new(),
            logs: Vec::new(),
            return_data: Vec::new(),
            memory: None,
        };
        let mut store = Store::new(&self.engine, frame);
        let instance = self
            .linker
            .instantiate_and_start(&mut store, &self.module)
            .expect("the program instantiates");
        let mem = instance
            .get_memory(&store, "memory")
            .expect("the program exports its memory");
        store.data_mut().memory = Some(mem);
        let entry = instance
            .get_typed_func::<i32, i32>(&store, "user_entrypoint")
            .expect("the program exports user_entrypoint(len) -> status");
        let status = entry.call(&mut store, calldata.len() as i32);
        let frame = store.into_data();
        match status {
            Ok(0) => {
                self.chain = frame.chain;
                CallResult {
                    ok: true,
                    data: frame.result,
                    logs: frame.logs,
                }
            }
            Ok(1) => CallResult {
                ok: false,
                data: frame.result,
                logs: Vec::new(),
            },
            Ok(other) => panic!("user_entrypoint returned {other}"),
            // A trap (the SDK's panics abort: `unreachable`) reverts with no data; a host
            // error from an unemulated hostio must not pass for one.
            Err(e) if e.as_trap_code().is_some() => CallResult {
                ok: false,
                data: Vec::new(),
                logs: Vec::new(),
            },
            Err(e) => panic!("the host failed: {e}"),
        }
    }
}
