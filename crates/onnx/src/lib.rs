//! Model Hub's one door to ONNX Runtime (`ort`): it loads the runtime library once per process,
//! opens sessions from model bytes held in memory, reads their signatures as
//! [`modelhub_core::TensorSpec`]s, and converts [`modelhub_core::Tensor`]s (raw little-endian
//! bytes) to `ort` values and back.
//!
//! Nothing else in the workspace names `ort`, so a change of runtime version stays here.

use std::sync::{Mutex, OnceLock};

use half::f16;
use modelhub_core::{ApiError, DataType, ErrorCode, Tensor, TensorSpec};
use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, TensorElementType, ValueType};

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
            OnnxError::NotLoadable { .. } => ErrorCode::Unprocessable,
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
/// runtime choose) and every graph optimisation on.
pub fn load(bytes: &[u8], intra_threads: usize) -> Result<Model, OnnxError> {
    let env = environment()?;
    let runtime = |e: ort::Error<ort::session::builder::SessionBuilder>| OnnxError::Runtime {
        reason: e.to_string(),
    };
    let mut builder = Session::builder(env)
        .map_err(|e| OnnxError::Runtime {
            reason: e.to_string(),
        })?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(runtime)?
        .with_intra_threads(intra_threads)
        .map_err(runtime)?
        .with_inter_threads(1)
        .map_err(runtime)?;
    let session = builder
        .commit_from_memory(bytes)
        .map_err(|e| OnnxError::NotLoadable {
            reason: safe_reason(e.message()),
        })?;
    let inputs = specs(session.inputs(), "input")?;
    let outputs = specs(session.outputs(), "output")?;
    Ok(Model {
        session,
        inputs,
        outputs,
    })
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
