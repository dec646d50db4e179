//! Model Hub's one door to ONNX Runtime (`ort`): it loads the runtime library once per process,
//! opens sessions from model bytes held in memory, reads their signatures as
//! [`modelhub_core::TensorSpec`]s, and converts [`modelhub_core::Tensor`]s (raw little-endian
//! bytes) to `ort` values and back.
//!
//! Nothing else in the workspace names `ort`, so a change of runtime version stays here.
//!
//! Models are untrusted: [`load`] (and so [`inspect`]) first runs [`check_untrusted`] (module
//! [`untrusted`]: no external data, no operator domain outside the standard ones), and opens
//! sessions with ONNX Runtime's external-data folder pointed at an empty private directory,
//! so a model that slipped past the check still finds no file to read. ONNX Runtime's own
//! error text never reaches a client: it is logged, and the client gets a fixed reason.
//!
//! Runs are bounded ([`RunLimits`]): a deadline (module `deadline`: ONNX Runtime's terminate
//! flag, set by a watchdog thread), a memory budget shared by every run of the process (module
//! `arena`: one capped CPU arena that all sessions allocate from, set by [`init_with`]), and a
//! bound on the bytes of the outputs, checked before they are copied out. Outputs that are not
//! finite numbers are refused.

mod arena;
mod deadline;
pub mod untrusted;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use half::f16;
use modelhub_core::{ApiError, DataType, ErrorCode, Tensor, TensorSpec};
use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{RunOptions, Session};
use ort::value::{DynValue, TensorElementType, ValueType};

pub use untrusted::{UntrustedModel, check_untrusted};

/// The variable naming the ONNX Runtime shared library.
pub const DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// Errors of this crate; each maps to an [`ErrorCode`] through [`OnnxError::code`].
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// The runtime library could not be loaded or initialised.
    #[error("ONNX Runtime is not available: {reason}")]
    Runtime { reason: String },
    /// The bytes are not a model ONNX Runtime can open (or its signature is not supported).
    #[error("not a loadable ONNX model: {reason}")]
    NotLoadable { reason: String },
    /// The model failed [`check_untrusted`].
    #[error("{}", untrusted_message(.0))]
    Untrusted(#[from] UntrustedModel),
    /// The request tensors do not fit the model.
    #[error("{message}")]
    BadInput { message: String },
    /// Running the model failed.
    #[error("inference failed: {reason}")]
    Run { reason: String },
    /// The run went past one of its limits; the message names the limit.
    #[error("{message}")]
    Limit { message: String },
    /// An output holds NaN or an infinity.
    #[error("output {name:?} holds a value that is not a finite number")]
    NotFinite { name: String },
    /// The model produced an output this service cannot carry.
    #[error("output {name:?}: {reason}")]
    Output { name: String, reason: String },
}

impl OnnxError {
    /// The public error code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            OnnxError::NotLoadable { .. }
            | OnnxError::Untrusted(_)
            | OnnxError::Limit { .. }
            | OnnxError::NotFinite { .. } => ErrorCode::Unprocessable,
            OnnxError::BadInput { .. } => ErrorCode::BadRequest,
            OnnxError::Runtime { .. } | OnnxError::Run { .. } | OnnxError::Output { .. } => {
                ErrorCode::Internal
            }
        }
    }

    /// The error as a client may see it: internal details are replaced by a generic message.
    pub fn to_api(&self) -> ApiError {
        match self.code() {
            ErrorCode::Internal => ApiError::internal(),
            code => ApiError::new(code, self.to_string()),
        }
    }
}

impl From<OnnxError> for ApiError {
    fn from(e: OnnxError) -> Self {
        e.to_api()
    }
}

fn untrusted_message(e: &UntrustedModel) -> String {
    match e {
        UntrustedModel::NotOnnx | UntrustedModel::NoGraph => {
            format!("not a loadable ONNX model: {e}")
        }
        _ => format!("model refused: {e}"),
    }
}

static ENV: OnceLock<Environment> = OnceLock::new();
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// Default memory budget of all model runs of a process: 2 GiB.
pub const DEFAULT_MEMORY_BUDGET: u64 = 2 << 30;

static MEMORY_BUDGET: OnceLock<u64> = OnceLock::new();

/// Loads ONNX Runtime from `ORT_DYLIB_PATH` and creates the process-wide environment, with the
/// memory budget of [`init_with`] if it was called first, else [`DEFAULT_MEMORY_BUDGET`]. Safe
/// to call from any thread any number of times; only the first successful call does the work.
pub fn init() -> Result<(), OnnxError> {
    environment().map(|_| ())
}

/// [`init`] with the memory budget of every model run of this process together: the bytes
/// ONNX Runtime may hold for tensors (weights, intermediate values, outputs) at once. The
/// first call of the process sets it; a later call with another value is refused.
pub fn init_with(memory_budget: u64) -> Result<(), OnnxError> {
    let set = *MEMORY_BUDGET.get_or_init(|| memory_budget);
    if set != memory_budget {
        return Err(OnnxError::Runtime {
            reason: format!(
                "the ONNX Runtime memory budget is already {set} bytes in this process; \
                 it can't change to {memory_budget}"
            ),
        });
    }
    init()
}

/// The memory budget in force (or that will be, once the runtime is loaded).
pub fn memory_budget() -> u64 {
    *MEMORY_BUDGET.get_or_init(|| DEFAULT_MEMORY_BUDGET)
}

fn environment() -> Result<&'static Environment, OnnxError> {
    if let Some(env) = ENV.get() {
        return Ok(env);
    }
    let _guard = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(env) = ENV.get() {
        return Ok(env);
    }
    let path = dylib_path(std::env::var_os(DYLIB_ENV))?;
    let builder = ort::init_from(&path).map_err(|e| OnnxError::Runtime {
        reason: format!("{DYLIB_ENV}={}: {e}", path.display()),
    })?;
    let env = builder
        .with_name("modelhub")
        .with_telemetry(false)
        .build()
        .map_err(|e| OnnxError::Runtime {
            reason: e.to_string(),
        })?;
    let budget = memory_budget();
    let max_mem = usize::try_from(budget).unwrap_or(usize::MAX);
    arena::register_cpu_arena(&env, max_mem).map_err(|reason| OnnxError::Runtime {
        reason: format!("registering the memory arena: {reason}"),
    })?;
    tracing::info!(path = %path.display(), memory_budget = budget, "onnx runtime loaded");
    Ok(ENV.get_or_init(|| env))
}

/// Checks the value of `ORT_DYLIB_PATH`: set, and naming an existing file.
fn dylib_path(value: Option<std::ffi::OsString>) -> Result<std::path::PathBuf, OnnxError> {
    let path = value
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from)
        .ok_or_else(|| OnnxError::Runtime {
            reason: format!(
                "{DYLIB_ENV} is not set; point it at libonnxruntime.so (1.31 or later)"
            ),
        })?;
    if !path.is_file() {
        return Err(OnnxError::Runtime {
            reason: format!(
                "{DYLIB_ENV}={} does not name an existing file",
                path.display()
            ),
        });
    }
    Ok(path)
}

/// An open ONNX Runtime session with its signature.
#[derive(Debug)]
pub struct Model {
    session: Session,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
}

/// Opens a model held in memory, with `intra_threads` threads inside each operator (0 lets the
/// runtime choose) and every graph optimisation on. The model must pass [`check_untrusted`]
/// first.
pub fn load(bytes: &[u8], intra_threads: usize) -> Result<Model, OnnxError> {
    check_untrusted(bytes)?;
    open_session(bytes, intra_threads, no_external_data_dir()?)
}

/// The ONNX Runtime config key naming the folder external data of a model loaded from memory
/// is read from (by default the process's working directory).
const EXTERNAL_DATA_FOLDER: &str = "session.model_external_initializers_file_folder_path";

/// An empty directory of this process's own (mode 0700), given to ONNX Runtime as the only
/// place external data may come from. It lives as long as the process.
fn no_external_data_dir() -> Result<&'static Path, OnnxError> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("modelhub-no-external-data-")
            .tempdir()
            .map(|d| d.keep())
            .map_err(|e| format!("creating an empty directory for ONNX Runtime: {e}"))
    })
    .as_deref()
    .map_err(|reason| OnnxError::Runtime {
        reason: reason.clone(),
    })
}

/// Opens a session without [`check_untrusted`]: external data, if any, is looked up in
/// `external_data_dir` only.
fn open_session(
    bytes: &[u8],
    intra_threads: usize,
    external_data_dir: &Path,
) -> Result<Model, OnnxError> {
    let env = environment()?;
    let runtime = |e: ort::Error<ort::session::builder::SessionBuilder>| OnnxError::Runtime {
        reason: e.to_string(),
    };
    let folder = external_data_dir
        .to_str()
        .ok_or_else(|| OnnxError::Runtime {
            reason: "the external-data directory is not valid UTF-8".into(),
        })?;
    let mut builder = Session::builder(env)
        .map_err(|e| OnnxError::Runtime {
            reason: e.to_string(),
        })?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(runtime)?
        // Constant folding evaluates nodes at load time, outside the memory budget: a
        // `ConstantOfShape` of a constant [2^15, 2^15] would take 4 GiB while storage merely
        // inspects the upload. Without it those nodes run at run time, within the budget.
        .with_disabled_optimizers("ConstantFolding")
        .map_err(runtime)?
        .with_intra_threads(intra_threads)
        .map_err(runtime)?
        .with_inter_threads(1)
        .map_err(runtime)?
        .with_config_entry(EXTERNAL_DATA_FOLDER, folder)
        .map_err(runtime)?
        // Every tensor comes from the environment's capped arena (see `arena`).
        .with_env_allocators()
        .map_err(runtime)?;
    let session = builder.commit_from_memory(bytes).map_err(|e| {
        // ONNX Runtime's text may name files and sizes of this machine: it stays in the log.
        tracing::info!(error = e.message(), "onnx runtime could not load a model");
        OnnxError::NotLoadable {
            reason: load_failure(e.message()).to_owned(),
        }
    })?;
    let inputs = specs(session.inputs(), "input")?;
    let outputs = specs(session.outputs(), "output")?;
    Ok(Model {
        session,
        inputs,
        outputs,
    })
}

/// A fixed, safe reason for a load failure, chosen from ONNX Runtime's message.
fn load_failure(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.contains("protobuf parsing failed") || m.contains("no graph was found") {
        "the bytes are not a valid ONNX model"
    } else if m.contains("opset") || m.contains("ir_version") || m.contains("ir version") {
        "the model's IR or opset version is not supported"
    } else if m.contains("no op registered")
        || m.contains("could not find an implementation")
        || m.contains("not a registered function")
    {
        "the model uses an operator the runtime has no kernel for"
    } else if m.contains("inference") || m.contains("type error") || m.contains("shape") {
        "the model failed type and shape checks"
    } else {
        "the model could not be loaded"
    }
}

/// Reads the signature of a model without keeping it open: `(inputs, outputs)`.
pub fn inspect(bytes: &[u8]) -> Result<(Vec<TensorSpec>, Vec<TensorSpec>), OnnxError> {
    let model = load(bytes, 1)?;
    Ok((model.inputs, model.outputs))
}

/// Drops anything that looks like a file system path from a runtime message.
fn safe_reason(message: &str) -> String {
    let cleaned: Vec<&str> = message
        .split_whitespace()
        .map(|word| {
            if word.contains('/') || word.contains('\\') {
                "<path>"
            } else {
                word
            }
        })
        .collect();
    let text = cleaned.join(" ");
    let text = text.trim();
    if text.is_empty() {
        "the runtime gave no reason".to_owned()
    } else {
        text.chars().take(300).collect()
    }
}

fn specs(outlets: &[ort::value::Outlet], kind: &str) -> Result<Vec<TensorSpec>, OnnxError> {
    outlets
        .iter()
        .map(|outlet| {
            let name = outlet.name().to_owned();
            let unsupported = |what: String| OnnxError::NotLoadable {
                reason: format!("{kind} {name:?} has {what}, which Model Hub does not support"),
            };
            match outlet.dtype() {
                ValueType::Tensor { ty, shape, .. } => {
                    let datatype = from_element_type(*ty)
                        .ok_or_else(|| unsupported(format!("element type {ty:?}")))?;
                    let shape = shape.iter().map(|&d| if d < 0 { -1 } else { d }).collect();
                    Ok(TensorSpec {
                        name,
                        datatype,
                        shape,
                    })
                }
                ValueType::Sequence(_) => Err(unsupported("a sequence type".into())),
                ValueType::Map { .. } => Err(unsupported("a map type".into())),
                ValueType::Optional(_) => Err(unsupported("an optional type".into())),
            }
        })
        .collect()
}

fn from_element_type(ty: TensorElementType) -> Option<DataType> {
    Some(match ty {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Float16 => DataType::Fp16,
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        _ => return None,
    })
}

impl Model {
    /// The declared inputs; `-1` marks a dynamic dimension.
    pub fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    /// The declared outputs; `-1` marks a dynamic dimension.
    pub fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    /// Runs the model within [`RunLimits::default`]; see [`Model::run_limited`].
    pub fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, OnnxError> {
        self.run_limited(inputs, &RunLimits::default())
    }

    /// Runs the model. Inputs are matched by name (any order); outputs come back in declared
    /// order, named. Inputs should have been checked with
    /// [`modelhub_core::tensor::validate_inputs`]; what slips through is still a `BadRequest`.
    /// A run past `limits.timeout`, past the process's memory budget, or with outputs larger
    /// than `limits.max_output_bytes` is [`OnnxError::Limit`]; an output that is not finite is
    /// [`OnnxError::NotFinite`].
    pub fn run_limited(
        &mut self,
        inputs: &[Tensor],
        limits: &RunLimits,
    ) -> Result<Vec<Tensor>, OnnxError> {
        modelhub_core::tensor::validate_inputs(&self.inputs, inputs)
            .map_err(|e| OnnxError::BadInput { message: e.message })?;
        let mut values: Vec<(String, DynValue)> = Vec::with_capacity(inputs.len());
        for t in inputs {
            values.push((t.name.clone(), to_value(t)?));
        }
        let runtime = |e: ort::Error| OnnxError::Runtime {
            reason: e.to_string(),
        };
        let mut options = RunOptions::new().map_err(runtime)?;
        // Give the arena's free regions back after each run: a run that filled the budget
        // with small pieces (a `Loop` keeping every iteration) must not leave it fragmented
        // for the runs after it.
        options
            .set("memory.enable_memory_arena_shrinkage", "cpu:0")
            .map_err(runtime)?;
        let options = Arc::new(options);
        let watch = deadline::Watch::start(options.clone(), Instant::now() + limits.timeout);
        let result = self.session.run_with_options(values, &options);
        let timed_out = watch.fired();
        drop(watch);
        let outputs = result.map_err(|e| run_failure(e.message(), timed_out, limits))?;
        let mut total: u64 = 0;
        for (name, value) in outputs.iter() {
            let bytes = output_bytes(name, &value)?;
            total = total.saturating_add(bytes);
            if total > limits.max_output_bytes {
                return Err(OnnxError::Limit {
                    message: format!(
                        "the model's outputs are larger than the limit of {} per request",
                        human_bytes(limits.max_output_bytes)
                    ),
                });
            }
        }
        let mut result = Vec::with_capacity(self.outputs.len());
        for (name, value) in outputs.iter() {
            result.push(from_value(name, &value)?);
        }
        Ok(result)
    }
}

/// Bounds of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLimits {
    /// Time the runtime may spend on the run; it stops at the next operator boundary after it.
    pub timeout: Duration,
    /// Bytes all outputs of the run may take together.
    pub max_output_bytes: u64,
}

impl Default for RunLimits {
    /// 30 s, 64 MiB of outputs.
    fn default() -> Self {
        RunLimits {
            timeout: Duration::from_secs(30),
            max_output_bytes: 64 << 20,
        }
    }
}

/// The error of a failed run: a limit when one was hit, else the inputs' fault.
fn run_failure(message: &str, timed_out: bool, limits: &RunLimits) -> OnnxError {
    let m = message.to_ascii_lowercase();
    if timed_out || m.contains("terminate flag") {
        return OnnxError::Limit {
            message: format!(
                "the run took longer than the limit of {} ms",
                limits.timeout.as_millis()
            ),
        };
    }
    if m.contains("failed to allocate memory")
        || m.contains("available memory of")
        || m.contains("bad_alloc")
        || m.contains("size overflow")
        || m.contains("safeint")
    {
        tracing::info!(error = message, "a run went past the memory budget");
        return OnnxError::Limit {
            message: format!(
                "the run needed more memory than the limit of {} for model runs",
                human_bytes(memory_budget())
            ),
        };
    }
    // The runtime checks shapes again (a fixed inner dimension, say); its reason is about the
    // request, but it comes wrapped in source locations and C++ names of the runtime's own,
    // which stay in the log.
    tracing::debug!(error = message, "a run failed");
    OnnxError::BadInput {
        message: format!("the model rejected the inputs: {}", run_reason(message)),
    }
}

/// The part of a run failure's text that is about the request: ONNX Runtime's own wrapping
/// ("… node. Name:'n' Status Message: <file>:<line> <function> <check> was false. <reason>")
/// is dropped; a reason that still names the runtime's internals becomes a generic one.
fn run_reason(message: &str) -> String {
    let m = message.rsplit("Status Message: ").next().unwrap_or(message);
    let m = m.rsplit(" was false. ").next().unwrap_or(m);
    if m.contains("onnxruntime") || m.contains("::") {
        return "the inputs do not fit the model's graph".to_owned();
    }
    safe_reason(m)
}

fn human_bytes(n: u64) -> String {
    if n >= 1 << 30 && n.is_multiple_of(1 << 30) {
        format!("{} GiB", n >> 30)
    } else if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

/// The bytes an output takes, from its shape, with checked arithmetic.
fn output_bytes(name: &str, value: &ort::value::Value) -> Result<u64, OnnxError> {
    let fail = |reason: String| OnnxError::Output {
        name: name.to_owned(),
        reason,
    };
    let ValueType::Tensor { ty, shape, .. } = value.dtype() else {
        return Err(fail("is not a tensor".into()));
    };
    let datatype = from_element_type(*ty)
        .ok_or_else(|| fail(format!("element type {ty:?} is not supported")))?;
    let too_large = || OnnxError::Limit {
        message: format!("output {name:?} is too large"),
    };
    shape
        .iter()
        .try_fold(datatype.size() as u64, |acc, &d| {
            u64::try_from(d).ok().and_then(|d| acc.checked_mul(d))
        })
        .ok_or_else(too_large)
}

fn to_value(t: &Tensor) -> Result<DynValue, OnnxError> {
    let bad = |reason: String| OnnxError::BadInput {
        message: format!("input {:?}: {reason}", t.name),
    };
    let expected = modelhub_core::tensor::element_count(&t.name, &t.shape)
        .map_err(|e| OnnxError::BadInput { message: e.message })?
        .checked_mul(t.datatype.size())
        .ok_or_else(|| bad("is too large".into()))?;
    if expected != t.data.len() {
        return Err(bad(format!(
            "shape {:?} of {} needs {expected} bytes, got {}",
            t.shape,
            t.datatype,
            t.data.len()
        )));
    }
    fn make<T, const N: usize>(
        shape: &[i64],
        data: &[u8],
        f: impl Fn([u8; N]) -> T,
    ) -> ort::Result<DynValue>
    where
        T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static,
    {
        let values: Vec<T> = data
            .chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunks_exact yields N bytes")))
            .collect();
        Ok(ort::value::Tensor::from_array((shape.to_vec(), values))?.into_dyn())
    }
    let shape = &t.shape;
    let data = &t.data;
    let value = match t.datatype {
        DataType::Bool => make::<bool, 1>(shape, data, |b| b[0] != 0),
        DataType::Uint8 => make::<u8, 1>(shape, data, |b| b[0]),
        DataType::Int8 => make::<i8, 1>(shape, data, i8::from_le_bytes),
        DataType::Int32 => make::<i32, 4>(shape, data, i32::from_le_bytes),
        DataType::Int64 => make::<i64, 8>(shape, data, i64::from_le_bytes),
        DataType::Fp16 => make::<f16, 2>(shape, data, f16::from_le_bytes),
        DataType::Fp32 => make::<f32, 4>(shape, data, f32::from_le_bytes),
        DataType::Fp64 => make::<f64, 8>(shape, data, f64::from_le_bytes),
    };
    value.map_err(|e| bad(safe_reason(e.message())))
}

fn from_value(name: &str, value: &ort::value::Value) -> Result<Tensor, OnnxError> {
    let fail = |reason: String| OnnxError::Output {
        name: name.to_owned(),
        reason,
    };
    let ty = value
        .dtype()
        .tensor_type()
        .ok_or_else(|| fail("is not a tensor".into()))?;
    let datatype = from_element_type(ty)
        .ok_or_else(|| fail(format!("element type {ty:?} is not supported")))?;
    fn bytes<T, const N: usize>(
        value: &ort::value::Value,
        f: impl Fn(&T) -> [u8; N],
    ) -> ort::Result<(Vec<i64>, Vec<u8>)>
    where
        T: ort::value::PrimitiveTensorElementType,
    {
        let (shape, data) = value.try_extract_tensor::<T>()?;
        Ok((shape.to_vec(), data.iter().flat_map(f).collect()))
    }
    let extracted = match datatype {
        DataType::Bool => bytes::<bool, 1>(value, |b| [u8::from(*b)]),
        DataType::Uint8 => bytes::<u8, 1>(value, |b| [*b]),
        DataType::Int8 => bytes::<i8, 1>(value, |b| b.to_le_bytes()),
        DataType::Int32 => bytes::<i32, 4>(value, |b| b.to_le_bytes()),
        DataType::Int64 => bytes::<i64, 8>(value, |b| b.to_le_bytes()),
        DataType::Fp16 => bytes::<f16, 2>(value, |b| b.to_le_bytes()),
        DataType::Fp32 => bytes::<f32, 4>(value, |b| b.to_le_bytes()),
        DataType::Fp64 => bytes::<f64, 8>(value, |b| b.to_le_bytes()),
    };
    let (shape, data) = extracted.map_err(|e| fail(e.to_string()))?;
    if !all_finite(datatype, &data) {
        return Err(OnnxError::NotFinite {
            name: name.to_owned(),
        });
    }
    Tensor::new(name, shape, datatype, data).map_err(|e| fail(e.message))
}

/// Whether every float of `data` (little-endian elements of `datatype`) is finite.
fn all_finite(datatype: DataType, data: &[u8]) -> bool {
    match datatype {
        DataType::Fp16 => data
            .chunks_exact(2)
            .all(|c| f16::from_le_bytes([c[0], c[1]]).is_finite()),
        DataType::Fp32 => data
            .chunks_exact(4)
            .all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
        DataType::Fp64 => data.chunks_exact(8).all(|c| {
            f64::from_le_bytes(c.try_into().expect("chunks_exact yields 8 bytes")).is_finite()
        }),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Y = X + W`, `W` a `[1, 4]` float tensor read from the file `location`.
    fn external_weights(location: &str) -> Vec<u8> {
        use untrusted::proto::*;
        model_bytes(add_graph(external("W", location)))
    }

    #[test]
    fn external_data_is_refused_before_the_runtime_sees_it() {
        // The working directory of this test holds a Cargo.toml.
        let e = load(&external_weights("Cargo.toml"), 1).unwrap_err();
        assert!(matches!(e, OnnxError::Untrusted(_)), "{e}");
        assert_eq!(e.code(), ErrorCode::Unprocessable);
        assert!(e.to_string().starts_with("model refused: "), "{e}");
    }

    #[test]
    fn the_runtime_reads_external_data_only_from_the_empty_directory() {
        // Past the check (as if it had a hole), the runtime still finds nothing to read: not a
        // file of the working directory, not a path outside, not an absolute path.
        let empty = no_external_data_dir().unwrap();
        assert_eq!(std::fs::read_dir(empty).unwrap().count(), 0);
        assert!(Path::new("Cargo.toml").is_file());
        for location in ["Cargo.toml", "../../Cargo.toml", "/etc/hostname"] {
            let e = open_session(&external_weights(location), 1, empty).unwrap_err();
            assert_eq!(e.code(), ErrorCode::Unprocessable, "{location}: {e}");
            let text = e.to_string();
            assert!(
                !text.contains("file_length") && !text.contains('/'),
                "{text}"
            );
        }
        // Pointed at the working directory (the runtime's default), the same model reads
        // Cargo.toml: the hole the option closes.
        let cwd = std::env::current_dir().unwrap();
        let mut leaky = open_session(&external_weights("Cargo.toml"), 1, &cwd).unwrap();
        let x = Tensor::from_f32("X", vec![1, 4], &[0.0; 4]).unwrap();
        let y = leaky.run(&[x]).unwrap();
        let head = std::fs::read("Cargo.toml").unwrap();
        assert_eq!(y[0].data, head[..16]);
        // And it loads from a directory that holds its file.
        let dir = tempfile::tempdir().unwrap();
        let w: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        std::fs::write(dir.path().join("w.bin"), w).unwrap();
        let mut model = open_session(&external_weights("w.bin"), 1, dir.path()).unwrap();
        let x = Tensor::from_f32("X", vec![1, 4], &[0.5; 4]).unwrap();
        let y = model.run(&[x]).unwrap();
        assert_eq!(y[0].as_f32().unwrap(), vec![1.5, 2.5, 3.5, 4.5]);
    }

    #[test]
    fn outputs_that_are_not_finite_are_refused() {
        use untrusted::proto::*;
        // `Y = X * 10`: -3.4e38 overflows to -inf, 0/0 gives NaN through `Div`.
        let bytes = model_bytes(GraphProto {
            node: vec![
                node("Mul", &["X", "ten"], &["Y"]),
                node("Div", &["X", "X"], &["Z"]),
            ],
            name: "g".into(),
            initializer: vec![tensor_f32("ten", &[1], &[10.0])],
            input: vec![value_info("X", FLOAT, &[1, 2])],
            output: vec![
                value_info("Y", FLOAT, &[1, 2]),
                value_info("Z", FLOAT, &[1, 2]),
            ],
            ..Default::default()
        });
        let mut model = load(&bytes, 1).unwrap();
        let ok = Tensor::from_f32("X", vec![1, 2], &[1.0, 2.0]).unwrap();
        assert_eq!(
            model.run(&[ok]).unwrap()[0].as_f32().unwrap(),
            vec![10.0, 20.0]
        );
        let overflow = Tensor::from_f32("X", vec![1, 2], &[-3.4e38, 1.0]).unwrap();
        let e = model.run(&[overflow]).unwrap_err();
        assert!(
            matches!(&e, OnnxError::NotFinite { name } if name == "Y"),
            "{e:?}"
        );
        assert_eq!(e.to_api().code, ErrorCode::Unprocessable);
        let nan = Tensor::from_f32("X", vec![1, 2], &[0.0, 1.0]).unwrap();
        let e = model.run(&[nan]).unwrap_err();
        assert!(
            matches!(&e, OnnxError::NotFinite { name } if name == "Z"),
            "{e:?}"
        );
        assert!(all_finite(DataType::Int32, &[0xff; 8]));
        assert!(!all_finite(DataType::Fp16, &f16::INFINITY.to_le_bytes()));
        assert!(!all_finite(DataType::Fp64, &f64::NAN.to_le_bytes()));
    }

    #[test]
    fn run_failures_keep_the_reason_and_drop_the_runtime_internals() {
        use untrusted::proto::*;
        // `Y = Reshape(X, [2, 2])` with X of any length: 3 elements can't be reshaped.
        let bytes = model_bytes(GraphProto {
            node: vec![node("Reshape", &["X", "K"], &["Y"])],
            name: "g".into(),
            initializer: vec![tensor_i64("K", &[2], &[2, 2])],
            input: vec![value_info("X", FLOAT, &[-1])],
            output: vec![value_info("Y", FLOAT, &[2, 2])],
            ..Default::default()
        });
        let mut model = load(&bytes, 1).unwrap();
        let x = Tensor::from_f32("X", vec![3], &[1.0, 2.0, 3.0]).unwrap();
        let e = model.run(&[x]).unwrap_err();
        assert_eq!(e.code(), ErrorCode::BadRequest);
        let text = e.to_string();
        assert!(
            text.starts_with("the model rejected the inputs: "),
            "{text}"
        );
        for leak in ["onnxruntime", "::", "/", ".h:", ".cc:"] {
            assert!(!text.contains(leak), "{leak:?} in {text}");
        }
        let x = Tensor::from_f32("X", vec![4], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(model.run(&[x]).unwrap()[0].shape, vec![2, 2]);
    }

    #[test]
    fn load_failures_never_carry_the_runtime_text() {
        let leaky = "Deserialize tensor w failed. External data path: Cargo.toml \
                     given file_length: 1234 offset: 0";
        assert_eq!(load_failure(leaky), "the model could not be loaded");
        assert_eq!(
            load_failure("Load model from memory failed:Protobuf parsing failed."),
            "the bytes are not a valid ONNX model"
        );
    }

    #[test]
    fn paths_never_reach_the_reason() {
        let r =
            safe_reason("Load model from /secret/dir/model.onnx failed: Protobuf parsing failed.");
        assert!(!r.contains("/secret"), "{r}");
        assert!(r.contains("Protobuf parsing failed"), "{r}");
        assert_eq!(safe_reason("  "), "the runtime gave no reason");
    }

    #[test]
    fn a_missing_library_names_the_variable() {
        let e = dylib_path(None).unwrap_err();
        assert!(e.to_string().contains("ORT_DYLIB_PATH is not set"), "{e}");
        let e = dylib_path(Some("".into())).unwrap_err();
        assert!(e.to_string().contains("ORT_DYLIB_PATH"), "{e}");
        let e = dylib_path(Some("/nonexistent/libonnxruntime.so".into())).unwrap_err();
        assert!(e.to_string().contains("ORT_DYLIB_PATH=/nonexistent"), "{e}");
        assert_eq!(e.code(), ErrorCode::Internal);
    }

    #[test]
    fn error_codes_follow_the_kind_of_failure() {
        let e = OnnxError::NotLoadable { reason: "x".into() };
        assert_eq!(e.to_api().code, ErrorCode::Unprocessable);
        assert!(e.to_api().message.starts_with("not a loadable ONNX model"));
        let e = OnnxError::BadInput {
            message: "input \"X\": bad".into(),
        };
        assert_eq!(e.to_api().code, ErrorCode::BadRequest);
        let e = OnnxError::Runtime {
            reason: "ORT_DYLIB_PATH=/opt/lib.so missing".into(),
        };
        assert_eq!(e.to_api(), ApiError::internal());
    }
}
