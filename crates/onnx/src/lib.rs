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

pub mod untrusted;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use half::f16;
use modelhub_core::{ApiError, DataType, ErrorCode, Tensor, TensorSpec};
use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
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
    /// The model produced an output this service cannot carry.
    #[error("output {name:?}: {reason}")]
    Output { name: String, reason: String },
}

impl OnnxError {
    /// The public error code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            OnnxError::NotLoadable { .. } | OnnxError::Untrusted(_) => ErrorCode::Unprocessable,
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

/// Loads ONNX Runtime from `ORT_DYLIB_PATH` and creates the process-wide environment. Safe to
/// call from any thread any number of times; only the first successful call does the work.
pub fn init() -> Result<(), OnnxError> {
    environment().map(|_| ())
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
    tracing::info!(path = %path.display(), "onnx runtime loaded");
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
        .with_intra_threads(intra_threads)
        .map_err(runtime)?
        .with_inter_threads(1)
        .map_err(runtime)?
        .with_config_entry(EXTERNAL_DATA_FOLDER, folder)
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

    /// Runs the model. Inputs are matched by name (any order); outputs come back in declared
    /// order, named. Inputs should have been checked with
    /// [`modelhub_core::tensor::validate_inputs`]; what slips through is still a `BadRequest`.
    pub fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, OnnxError> {
        modelhub_core::tensor::validate_inputs(&self.inputs, inputs)
            .map_err(|e| OnnxError::BadInput { message: e.message })?;
        let mut values: Vec<(String, DynValue)> = Vec::with_capacity(inputs.len());
        for t in inputs {
            values.push((t.name.clone(), to_value(t)?));
        }
        let outputs = self.session.run(values).map_err(|e| {
            // The runtime checks shapes again (a fixed inner dimension, say); its reason is
            // about the request, not about this machine.
            OnnxError::BadInput {
                message: format!(
                    "the model rejected the inputs: {}",
                    safe_reason(e.message())
                ),
            }
        })?;
        let mut result = Vec::with_capacity(self.outputs.len());
        for (name, value) in outputs.iter() {
            result.push(from_value(name, &value)?);
        }
        Ok(result)
    }
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
    Tensor::new(name, shape, datatype, data).map_err(|e| fail(e.message))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Y = X + W`, `W` a `[1, 4]` float tensor read from the file `location`.
    fn external_weights(location: &str) -> Vec<u8> {
        use untrusted::proto::*;
        let entry = |k: &str, v: &str| StringStringEntryProto {
            key: k.into(),
            value: v.into(),
        };
        let w = TensorProto {
            dims: vec![1, 4],
            data_type: FLOAT,
            name: "W".into(),
            external_data: vec![entry("location", location), entry("length", "16")],
            data_location: 1,
            ..Default::default()
        };
        model_bytes(GraphProto {
            node: vec![node("Add", &["X", "W"], &["Y"])],
            name: "g".into(),
            initializer: vec![w],
            input: vec![value_info("X", untrusted::proto::FLOAT, &[1, 4])],
            output: vec![value_info("Y", untrusted::proto::FLOAT, &[1, 4])],
            ..Default::default()
        })
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
