//! The memory budget of model runs: one CPU arena, registered in the ONNX Runtime environment
//! with a hard `max_mem`, that every session uses (`session.use_env_allocators`). A run whose
//! tensors would push the arena past the budget gets an allocation failure from the runtime
//! before the memory is taken, and fails cleanly (see [`crate::OnnxError::Limit`]).
//!
//! `ort` has no safe call for this, so this module makes the three C API calls itself; it is
//! the one place in the workspace with `unsafe` code.

#![allow(unsafe_code)]

use std::ffi::{CStr, c_char};
use std::ptr;

use ort::AsPointer;
use ort::environment::Environment;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};

/// Turns a status returned by the C API into `Err(message)` (and frees it).
fn status(api: &ort::sys::OrtApi, status: ort::sys::OrtStatusPtr) -> Result<(), String> {
    if status.0.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null status from the API is a valid `OrtStatus` until released; its
    // message is a NUL-terminated string owned by the status.
    let message = unsafe {
        let m = (api.GetErrorMessage)(status.0);
        let text = if m.is_null() {
            String::from("unknown error")
        } else {
            CStr::from_ptr(m).to_string_lossy().into_owned()
        };
        (api.ReleaseStatus)(status.0);
        text
    };
    Err(message)
}

/// Registers a CPU arena of at most `max_bytes` in `env`; it grows by what is asked (no
/// power-of-two rounding), so the budget is close to what runs really hold.
pub(crate) fn register_cpu_arena(env: &Environment, max_bytes: usize) -> Result<(), String> {
    let api = ort::api();
    let memory_info = MemoryInfo::new(
        AllocationDevice::CPU,
        0,
        AllocatorType::Arena,
        MemoryType::Default,
    )
    .map_err(|e| e.to_string())?;
    let keys: [*const c_char; 2] = [c"max_mem".as_ptr(), c"arena_extend_strategy".as_ptr()];
    // arena_extend_strategy 1 = kSameAsRequested.
    let values: [usize; 2] = [max_bytes, 1];
    let mut cfg: *mut ort::sys::OrtArenaCfg = ptr::null_mut();
    // SAFETY: `keys` and `values` have the stated length and live across the call; `cfg` is an
    // out-pointer the API fills on success.
    status(api, unsafe {
        (api.CreateArenaCfgV2)(keys.as_ptr(), values.as_ptr(), keys.len(), &mut cfg)
    })?;
    // SAFETY: `env` and `memory_info` are live objects of this runtime; the API copies what it
    // needs from `cfg`, which is released right after.
    let registered = status(api, unsafe {
        (api.CreateAndRegisterAllocator)(env.ptr().cast_mut(), memory_info.ptr(), cfg)
    });
    // SAFETY: `cfg` came from `CreateArenaCfgV2` and is released once.
    unsafe { (api.ReleaseArenaCfg)(cfg) };
    registered
}
