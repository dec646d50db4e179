//! ONNX → float model: a minimal hand-written prost subset of `onnx.proto` and the graph walk
//! that turns a chain of supported ops into layers: linear (dense or convolution, each
//! optionally followed by a ReLU), max pooling, and elementwise sigmoid / tanh.
//!
//! Supported: `Gemm` (transA = 0, alpha = beta = 1, either transB), `MatMul` with a constant
//! right operand, `Add` of a constant bias, `Relu`, `Conv` (2-d, group 1, no dilation, explicit
//! pads), `AveragePool` (no ceil mode; pads only with count_include_pad) and
//! `GlobalAveragePool` (as depthwise convolutions), `MaxPool` (2-d, explicit pads smaller than
//! the kernel, no dilation, no ceil mode, storage order 0, no `Indices` output; a `Relu` right
//! after it is moved before it, as they commute), `GlobalMaxPool` (as a `MaxPool` whose kernel
//! is the whole map), `Sigmoid`, `Tanh`, and the shape ops
//! `Flatten`, `Reshape` (to a constant shape), `Identity`, `Cast` (to float). Batch dimension 1; convolutions need the
//! input's `[1, C, H, W]` shape (from the graph input or a `Reshape`). A classifier head that
//! starts with `Softmax` (then only `Identity`, `ArgMax`, `ArrayFeatureExtractor`, `Reshape`,
//! `Cast`, `ZipMap`) is not proved: the proof covers the logits that feed the `Softmax` (same
//! argmax and order). Anything else is [`ZkError::Unsupported`] with the op and the reason.

use std::collections::HashMap;

use prost::Message;

use crate::ZkError;
use crate::shape::{ConvShape, LayerKind};

/// `onnx.ModelProto` (subset).
#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    #[prost(string, tag = "2")]
    pub producer_name: String,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
}

/// `onnx.OperatorSetIdProto`.
#[derive(Clone, PartialEq, Message)]
pub struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(int64, tag = "2")]
    pub version: i64,
}

/// `onnx.GraphProto` (subset).
#[derive(Clone, PartialEq, Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
}

/// `onnx.ValueInfoProto` (name only).
#[derive(Clone, PartialEq, Message)]
pub struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

/// `onnx.TypeProto` (tensors only).
#[derive(Clone, PartialEq, Message)]
pub struct TypeProto {
    #[prost(message, optional, tag = "1")]
    pub tensor_type: Option<TensorTypeProto>,
}

/// `onnx.TypeProto.Tensor`.
#[derive(Clone, PartialEq, Message)]
pub struct TensorTypeProto {
    #[prost(int32, tag = "1")]
    pub elem_type: i32,
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

/// `onnx.TensorShapeProto`.
#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<Dimension>,
}

/// `onnx.TensorShapeProto.Dimension`.
#[derive(Clone, PartialEq, Message)]
pub struct Dimension {
    #[prost(int64, tag = "1")]
    pub dim_value: i64,
    #[prost(string, tag = "2")]
    pub dim_param: String,
}

impl ValueInfoProto {
    /// The element type, if declared.
    fn elem_type(&self) -> Option<i32> {
        Some(self.r#type.as_ref()?.tensor_type.as_ref()?.elem_type)
    }

    /// The dimensions after the batch dimension, if all are known.
    fn sample_shape(&self) -> Option<Vec<usize>> {
        let dims = &self
            .r#type
            .as_ref()?
            .tensor_type
            .as_ref()?
            .shape
            .as_ref()?
            .dim;
        if dims.len() < 2 {
            return None;
        }
        dims[1..]
            .iter()
            .map(|d| usize::try_from(d.dim_value).ok().filter(|&v| v > 0))
            .collect()
    }
}

/// `onnx.NodeProto` (subset).
#[derive(Clone, PartialEq, Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(string, tag = "4")]
    pub op_type: String,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
    #[prost(string, tag = "7")]
    pub domain: String,
}

/// `onnx.AttributeProto` (subset).
#[derive(Clone, PartialEq, Message)]
pub struct AttributeProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(float, tag = "2")]
    pub f: f32,
    #[prost(int64, tag = "3")]
    pub i: i64,
    #[prost(bytes = "vec", tag = "4")]
    pub s: Vec<u8>,
    #[prost(float, repeated, tag = "7")]
    pub floats: Vec<f32>,
    #[prost(int64, repeated, tag = "8")]
    pub ints: Vec<i64>,
    #[prost(int32, tag = "20")]
    pub r#type: i32,
}

/// `onnx.TensorProto` (subset).
#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(float, repeated, tag = "4")]
    pub float_data: Vec<f32>,
    #[prost(int64, repeated, tag = "7")]
    pub int64_data: Vec<i64>,
    #[prost(string, tag = "8")]
    pub name: String,
    #[prost(bytes = "vec", tag = "9")]
    pub raw_data: Vec<u8>,
    #[prost(int32, tag = "14")]
    pub data_location: i32,
}

/// `TensorProto.DataType.FLOAT`.
pub const DATA_TYPE_FLOAT: i32 = 1;
/// `TensorProto.DataType.INT64` (shapes).
pub const DATA_TYPE_INT64: i32 = 7;

/// The oldest default-domain opset the compiler reads: from 7 on, `Gemm` has no `broadcast`,
/// `Cast` takes its target as an integer, `Reshape` its shape as an input, and `AveragePool`
/// knows `count_include_pad`.
pub const MIN_OPSET: i64 = 7;
/// The newest default-domain opset whose definitions of the supported ops were checked (up to
/// 23 they add types and attributes; the attributes that change an op's meaning are refused
/// by name); a newer model is refused rather than read under older meanings.
pub const MAX_OPSET: i64 = 23;

/// The most values any tensor of a provable model can have: each value takes at least one row
/// of the largest circuit (`2^MAX_K`). Every size derived from the model is computed with
/// checked arithmetic and bounded by this before anything is allocated for it.
pub const MAX_VALUES: usize = 1 << crate::quant::MAX_K;

/// The most weights (and biases) of a provable model: every one takes a cell of a weight
/// column, and no layout has more than `8 · 2^18 = 64 · 2^15` of them.
pub const MAX_WEIGHTS: usize = 8 << crate::quant::MAX_K;

/// The ONNX name of a tensor data type, for messages.
fn type_name(t: i32) -> String {
    const NAMES: [&str; 17] = [
        "UNDEFINED",
        "FLOAT",
        "UINT8",
        "INT8",
        "UINT16",
        "INT16",
        "INT32",
        "INT64",
        "STRING",
        "BOOL",
        "FLOAT16",
        "DOUBLE",
        "UINT32",
        "UINT64",
        "COMPLEX64",
        "COMPLEX128",
        "BFLOAT16",
    ];
    usize::try_from(t)
        .ok()
        .and_then(|i| NAMES.get(i))
        .map_or_else(|| format!("type {t}"), |n| (*n).to_string())
}

/// The product of `dims`, if it is at most [`MAX_VALUES`].
fn bounded_product(dims: &[usize]) -> Option<usize> {
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= MAX_VALUES)
}

/// One layer in float: linear `y = W x + b`, then ReLU if `relu`; or, with no weights, a max
/// pooling or an elementwise sigmoid / tanh ([`LayerKind`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FloatLayer {
    pub kind: LayerKind,
    pub inputs: usize,
    pub outputs: usize,
    /// Ordered as [`LayerKind`] says (row-major `[outputs][inputs]` when dense).
    pub weights: Vec<f32>,
    /// One per output.
    pub bias: Vec<f32>,
    pub relu: bool,
}

/// A float MLP read from ONNX.
#[derive(Debug, Clone, PartialEq)]
pub struct FloatModel {
    pub input_name: String,
    /// The tensor whose value the proof covers (the logits, for a model with a Softmax head).
    pub output_name: String,
    pub layers: Vec<FloatLayer>,
}

impl FloatModel {
    /// The float forward pass (batch 1), for calibration and accuracy comparisons.
    pub fn forward(&self, input: &[f32]) -> Vec<f32> {
        let mut x = input.to_vec();
        for layer in &self.layers {
            if !layer.kind.is_linear() {
                x = (0..layer.outputs)
                    .map(|o| match layer.kind {
                        LayerKind::Sigmoid => 1.0 / (1.0 + (-x[o]).exp()),
                        LayerKind::Tanh => x[o].tanh(),
                        _ => layer
                            .kind
                            .connections(layer.inputs, o)
                            .iter()
                            .map(|&(i, _)| x[i])
                            .fold(f32::NEG_INFINITY, f32::max),
                    })
                    .collect();
                continue;
            }
            let mut y = layer.bias.clone();
            for (o, yo) in y.iter_mut().enumerate() {
                *yo += layer
                    .kind
                    .connections(layer.inputs, o)
                    .iter()
                    .map(|&(i, w)| layer.weights[w] * x[i])
                    .sum::<f32>();
                if layer.relu {
                    *yo = yo.max(0.0);
                }
            }
            x = y;
        }
        x
    }
}

const HEAD_OPS: &[&str] = &[
    "Identity",
    "ArgMax",
    "ArrayFeatureExtractor",
    "Reshape",
    "Cast",
    "ZipMap",
    "Softmax",
];

/// A float constant read from an initializer.
struct Constant {
    dims: Vec<usize>,
    data: Vec<f32>,
}

fn constant(t: &TensorProto) -> Result<Constant, ZkError> {
    // Only FLOAT is read: any other type (INT32 raw bytes read as f32 bit patterns, DOUBLE,
    // FLOAT16…) would make the circuit another model than the one ONNX Runtime runs.
    if t.data_type != DATA_TYPE_FLOAT {
        return Err(ZkError::unsupported(
            "initializer",
            format!(
                "tensor {} has data type {}; the circuit compiler reads FLOAT weights only",
                t.name,
                type_name(t.data_type)
            ),
        ));
    }
    if t.data_location != 0 {
        return Err(ZkError::unsupported(
            "initializer",
            format!("tensor {} uses external data", t.name),
        ));
    }
    let dims: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| ZkError::unsupported("initializer", "negative dimension"))?;
    let len = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| ZkError::unsupported("initializer", "tensor too large"))?;
    let data: Vec<f32> = if !t.float_data.is_empty() {
        t.float_data.clone()
    } else {
        if t.raw_data.len() != len.saturating_mul(4) {
            return Err(ZkError::unsupported(
                "initializer",
                format!(
                    "tensor {} has {} raw bytes for {len} floats",
                    t.name,
                    t.raw_data.len()
                ),
            ));
        }
        t.raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    if data.len() != len {
        return Err(ZkError::unsupported(
            "initializer",
            format!(
                "tensor {} has {} values for shape {dims:?}",
                t.name,
                data.len()
            ),
        ));
    }
    if data.iter().any(|v| !v.is_finite()) {
        return Err(ZkError::unsupported(
            "initializer",
            format!("tensor {} holds a non-finite value", t.name),
        ));
    }
    Ok(Constant { dims, data })
}

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

/// Parses an ONNX model and walks its graph into a float MLP.
pub fn parse(bytes: &[u8]) -> Result<FloatModel, ZkError> {
    let model = ModelProto::decode(bytes)
        .map_err(|_| ZkError::unsupported("model", "not a valid ONNX ModelProto"))?;
    let opset = model
        .opset_import
        .iter()
        .filter(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .max()
        .ok_or_else(|| ZkError::unsupported("model", "the model imports no ONNX opset"))?;
    if !(MIN_OPSET..=MAX_OPSET).contains(&opset) {
        return Err(ZkError::unsupported(
            "model",
            format!("opset {opset} (the circuit compiler reads opsets {MIN_OPSET} to {MAX_OPSET})"),
        ));
    }
    let graph = model
        .graph
        .ok_or_else(|| ZkError::unsupported("model", "the model has no graph"))?;
    let mut constants: HashMap<&str, &TensorProto> = HashMap::new();
    for t in &graph.initializer {
        constants.insert(t.name.as_str(), t);
    }
    let inputs: Vec<&ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| !constants.contains_key(i.name.as_str()))
        .collect();
    let [input] = inputs.as_slice() else {
        return Err(ZkError::unsupported(
            "graph",
            format!("expected exactly one graph input, found {}", inputs.len()),
        ));
    };
    if input.elem_type() != Some(DATA_TYPE_FLOAT) {
        return Err(ZkError::unsupported(
            "graph",
            format!(
                "input {} is {}; proofs take a FLOAT input",
                input.name,
                input
                    .elem_type()
                    .map_or_else(|| "untyped".into(), type_name)
            ),
        ));
    }
    let mut current = input.name.clone();
    // Shape of the running tensor without the batch dimension, when known.
    let mut shape: Option<Vec<usize>> = input.sample_shape();
    if let Some(s) = &shape
        && bounded_product(s).is_none()
    {
        return Err(too_large("graph", format!("input {}", input.name)));
    }
    let mut layers: Vec<FloatLayer> = Vec::new();
    // Whether the last layer can still take a bias (`Add`) or a `Relu`.
    let mut last_is_open = false;
    let mut head_from: Option<String> = None;

    for node in &graph.node {
        let op = node.op_type.as_str();
        if let Some(logits) = &head_from {
            if !HEAD_OPS.contains(&op) {
                return Err(ZkError::unsupported(
                    op,
                    format!("only a classifier head may follow Softmax (on {logits})"),
                ));
            }
            continue;
        }
        if !node.domain.is_empty() && node.domain != "ai.onnx" {
            return Err(ZkError::unsupported(
                op,
                format!("op domain {} is not supported", node.domain),
            ));
        }
        let first = node.input.first().map(String::as_str).unwrap_or("");
        let out = node
            .output
            .first()
            .cloned()
            .ok_or_else(|| ZkError::unsupported(op, "node without output"))?;
        let on_current = first == current;
        match op {
            "Reshape" if on_current => {
                if attr(node, "allowzero").is_some_and(|a| a.i != 0) {
                    return Err(ZkError::unsupported(op, "allowzero is not supported"));
                }
                let target = node
                    .input
                    .get(1)
                    .and_then(|n| constants.get(n.as_str()))
                    .ok_or_else(|| ZkError::unsupported(op, "the shape must be a constant"))?;
                shape = reshape_target(target, shape.as_deref())?;
                current = out;
            }
            "Flatten" if on_current => {
                // Batch 1: output [prod(dims[..axis]), prod(dims[axis..])], a flat vector only
                // for axis 0 or 1 (negative axes count from the end, opset 11 on).
                let axis = attr(node, "axis").map_or(1, |a| a.i);
                let axis = match (axis, &shape) {
                    (a, _) if a >= 0 => a,
                    (a, Some(s)) if opset >= 11 => a + 1 + s.len() as i64,
                    _ => -1,
                };
                if !(0..=1).contains(&axis) {
                    return Err(ZkError::unsupported(
                        op,
                        "only a Flatten to one row (axis 0 or 1) is supported",
                    ));
                }
                shape = shape.map(|s| vec![s.iter().product()]);
                current = out;
            }
            "Conv" | "AveragePool" | "GlobalAveragePool" if on_current => {
                let Some([c, h, w]) = shape
                    .as_deref()
                    .map(|s| s.to_vec())
                    .as_deref()
                    .map(|s| <[usize; 3]>::try_from(s).unwrap_or([0, 0, 0]))
                else {
                    return Err(ZkError::unsupported(
                        op,
                        "needs a known [1, C, H, W] input shape",
                    ));
                };
                if c == 0 {
                    return Err(ZkError::unsupported(
                        op,
                        "needs a known [1, C, H, W] input shape",
                    ));
                }
                let layer = conv_layer(node, &constants, [c, h, w])?;
                let LayerKind::Conv(cs) = &layer.kind else {
                    return Err(ZkError::Internal("conv layer".into()));
                };
                shape = Some(vec![
                    cs.out_channels as usize,
                    cs.out_h() as usize,
                    cs.out_w() as usize,
                ]);
                layers.push(layer);
                last_is_open = true;
                current = out;
            }
            "MaxPool" | "GlobalMaxPool" if on_current => {
                let Some(&[c, h, w]) = shape.as_deref() else {
                    return Err(ZkError::unsupported(
                        op,
                        "needs a known [1, C, H, W] input shape",
                    ));
                };
                let layer = max_pool_layer(node, [c, h, w])?;
                let LayerKind::MaxPool(ps) = &layer.kind else {
                    return Err(ZkError::Internal("max pool layer".into()));
                };
                shape = Some(vec![c, ps.out_h() as usize, ps.out_w() as usize]);
                layers.push(layer);
                last_is_open = false;
                current = out;
            }
            "Sigmoid" | "Tanh" if on_current => {
                let width = match (&shape, layers.last()) {
                    (Some(s), _) => s.iter().product::<usize>(),
                    (None, Some(l)) => l.outputs,
                    (None, None) => {
                        return Err(ZkError::unsupported(op, "needs a known input size"));
                    }
                };
                if width == 0 {
                    return Err(ZkError::unsupported(op, "needs a known input size"));
                }
                layers.push(FloatLayer {
                    kind: if op == "Sigmoid" {
                        LayerKind::Sigmoid
                    } else {
                        LayerKind::Tanh
                    },
                    inputs: width,
                    outputs: width,
                    weights: Vec::new(),
                    bias: Vec::new(),
                    relu: false,
                });
                last_is_open = false;
                current = out;
            }
            "Identity" | "Cast" if on_current => {
                if op == "Cast" && attr(node, "to").is_some_and(|a| a.i != DATA_TYPE_FLOAT as i64) {
                    return Err(ZkError::unsupported(
                        op,
                        "only a cast to float is supported",
                    ));
                }
                current = out;
            }
            "Softmax" if on_current => {
                if layers.is_empty() {
                    return Err(ZkError::unsupported(op, "Softmax before any dense layer"));
                }
                head_from = Some(current.clone());
            }
            "Gemm" if on_current => {
                let get = |n: &str, d: f32| attr(node, n).map(|a| a.f).unwrap_or(d);
                let geti = |n: &str| attr(node, n).map(|a| a.i).unwrap_or(0);
                if get("alpha", 1.0) != 1.0 || get("beta", 1.0) != 1.0 {
                    return Err(ZkError::unsupported(op, "alpha and beta must be 1"));
                }
                if geti("transA") != 0 {
                    return Err(ZkError::unsupported(op, "transA is not supported"));
                }
                let b = node
                    .input
                    .get(1)
                    .and_then(|n| constants.get(n.as_str()))
                    .ok_or_else(|| ZkError::unsupported(op, "the weight must be a constant"))?;
                let mut layer = dense(op, &constant(b)?, geti("transB") != 0)?;
                flat_input(op, &mut shape, &layer)?;
                if let Some(c) = node.input.get(2).filter(|n| !n.is_empty()) {
                    let c = constants
                        .get(c.as_str())
                        .ok_or_else(|| ZkError::unsupported(op, "the bias must be a constant"))?;
                    add_bias(op, &mut layer, &constant(c)?)?;
                }
                layers.push(layer);
                last_is_open = true;
                current = out;
            }
            "MatMul" if on_current => {
                let b = node
                    .input
                    .get(1)
                    .and_then(|n| constants.get(n.as_str()))
                    .ok_or_else(|| {
                        ZkError::unsupported(op, "the right operand must be a constant")
                    })?;
                let layer = dense(op, &constant(b)?, false)?;
                flat_input(op, &mut shape, &layer)?;
                layers.push(layer);
                last_is_open = true;
                current = out;
            }
            "Add" => {
                let other = match (node.input.first(), node.input.get(1)) {
                    (Some(a), Some(b)) if *a == current => b,
                    (Some(a), Some(b)) if *b == current => a,
                    _ => return Err(ZkError::unsupported(op, "Add must take the running tensor")),
                };
                let c = constants
                    .get(other.as_str())
                    .ok_or_else(|| ZkError::unsupported(op, "only a constant bias can be added"))?;
                let layer = match layers.last_mut() {
                    Some(l) if last_is_open && !l.relu => l,
                    _ => return Err(ZkError::unsupported(op, "Add must follow Gemm or MatMul")),
                };
                add_bias(op, layer, &constant(c)?)?;
                current = out;
            }
            "Relu" if on_current => {
                let n = layers.len();
                match layers.as_mut_slice() {
                    [.., l] if last_is_open => l.relu = true,
                    // max(relu(x)) = relu(max(x)): apply the ReLU before the pooling.
                    [.., l, pool]
                        if matches!(pool.kind, LayerKind::MaxPool(_)) && l.kind.is_linear() =>
                    {
                        l.relu = true;
                    }
                    _ => {
                        return Err(ZkError::unsupported(
                            op,
                            format!("Relu must follow a dense layer (layer {n})"),
                        ));
                    }
                }
                current = out;
            }
            "Identity" | "Flatten" | "Reshape" | "Cast" | "Softmax" | "Gemm" | "MatMul"
            | "Relu" | "Conv" | "AveragePool" | "GlobalAveragePool" | "MaxPool"
            | "GlobalMaxPool" | "Sigmoid" | "Tanh" => {
                return Err(ZkError::unsupported(
                    op,
                    "the graph must be a single chain from its input",
                ));
            }
            other => {
                return Err(ZkError::unsupported(
                    other,
                    "not supported in proofs yet (supported: Gemm, MatMul, Add, Relu, Sigmoid, Tanh, Conv, AveragePool, GlobalAveragePool, MaxPool, GlobalMaxPool, Flatten, Reshape, Identity)",
                ));
            }
        }
    }
    if layers.is_empty() {
        return Err(ZkError::unsupported(
            "graph",
            "the graph has no dense layer",
        ));
    }
    for pair in layers.windows(2) {
        if pair[0].outputs != pair[1].inputs {
            return Err(ZkError::unsupported(
                "graph",
                format!(
                    "layer sizes {} and {} do not chain",
                    pair[0].outputs, pair[1].inputs
                ),
            ));
        }
    }
    check_limits(&layers)?;
    let output_name = head_from.unwrap_or(current);
    Ok(FloatModel {
        input_name: input.name.clone(),
        output_name,
        layers,
    })
}

/// The whole model against the circuit limits, before calibration allocates anything per
/// layer: every layer's width at most [`MAX_VALUES`], all weights together at most
/// [`MAX_WEIGHTS`].
fn check_limits(layers: &[FloatLayer]) -> Result<(), ZkError> {
    let mut weights = 0usize;
    for (i, l) in layers.iter().enumerate() {
        if l.inputs > MAX_VALUES || l.outputs > MAX_VALUES {
            return Err(too_large("graph", format!("layer {i}")));
        }
        weights = weights
            .checked_add(l.weights.len())
            .and_then(|w| w.checked_add(l.bias.len()))
            .filter(|&w| w <= MAX_WEIGHTS)
            .ok_or_else(|| {
                ZkError::unsupported(
                    "graph",
                    format!("more than {MAX_WEIGHTS} weights, more than any circuit holds"),
                )
            })?;
    }
    Ok(())
}

/// A dense layer reads a flat vector: checks a known running shape and sets the new one.
fn flat_input(op: &str, shape: &mut Option<Vec<usize>>, layer: &FloatLayer) -> Result<(), ZkError> {
    if let Some(s) = shape.as_ref()
        && s.iter().product::<usize>() != layer.inputs
    {
        return Err(ZkError::unsupported(
            op,
            format!(
                "input shape {s:?} does not match {} weight rows",
                layer.inputs
            ),
        ));
    }
    *shape = Some(vec![layer.outputs]);
    Ok(())
}

/// The target shape of a `Reshape` (without the batch dimension; `None` if the running shape
/// is unknown). The batch dimension must stay 1; a `0` copies the input's dimension
/// (`allowzero` is refused by the caller).
fn reshape_target(
    t: &TensorProto,
    current: Option<&[usize]>,
) -> Result<Option<Vec<usize>>, ZkError> {
    let bad = |m: String| Err(ZkError::unsupported("Reshape", m));
    if t.data_type != DATA_TYPE_INT64 {
        return bad(format!(
            "shape tensor {} has data type {}; INT64 expected",
            t.name,
            type_name(t.data_type)
        ));
    }
    let dims: Vec<i64> = if !t.int64_data.is_empty() {
        t.int64_data.clone()
    } else {
        if !t.raw_data.len().is_multiple_of(8) {
            return bad(format!("shape tensor {} has a partial value", t.name));
        }
        t.raw_data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect()
    };
    let [batch, rest @ ..] = dims.as_slice() else {
        return bad("the target shape has no batch dimension".into());
    };
    if !matches!(batch, -1..=1) {
        return bad(format!("the batch dimension must stay 1, not {batch}"));
    }
    if rest.iter().any(|&d| d < -1) || rest.iter().filter(|&&d| d == -1).count() > 1 {
        return bad(format!("invalid target shape {dims:?}"));
    }
    let Some(current) = current else {
        return Ok(None);
    };
    let Some(total) = bounded_product(current) else {
        return Err(too_large("Reshape", "the input".into()));
    };
    let mut out: Vec<Option<usize>> = Vec::with_capacity(rest.len());
    for (i, &d) in rest.iter().enumerate() {
        out.push(match d {
            0 => Some(*current.get(i).ok_or_else(|| {
                ZkError::unsupported("Reshape", "a 0 beyond the input's dimensions")
            })?),
            -1 => None,
            d => Some(
                usize::try_from(d)
                    .ok()
                    .filter(|&d| d <= MAX_VALUES)
                    .ok_or_else(|| too_large("Reshape", "the target shape".into()))?,
            ),
        });
    }
    let known = bounded_product(&out.iter().flatten().copied().collect::<Vec<_>>())
        .ok_or_else(|| too_large("Reshape", "the target shape".into()))?;
    let out: Vec<usize> = out
        .into_iter()
        .map(|d| d.unwrap_or(total.checked_div(known).unwrap_or(0)))
        .collect();
    if bounded_product(&out) != Some(total) {
        return bad(format!(
            "target shape {dims:?} does not hold the input's {total} values"
        ));
    }
    Ok(Some(out))
}

/// A model too large for any circuit (`what` names the tensor).
fn too_large(op: &str, what: String) -> ZkError {
    ZkError::unsupported(
        op,
        format!("{what} has more than {MAX_VALUES} values, more than any circuit holds"),
    )
}

/// A list of non-negative integer attributes, `None` if absent. A negative value is refused,
/// never clamped: ONNX Runtime would not run the op as the compiler would read it.
fn ints(node: &NodeProto, name: &str) -> Result<Option<Vec<u32>>, ZkError> {
    let Some(a) = attr(node, name) else {
        return Ok(None);
    };
    a.ints
        .iter()
        .map(|&v| {
            u32::try_from(v).map_err(|_| {
                ZkError::unsupported(
                    node.op_type.as_str(),
                    format!("{name} must not be negative or huge ({v})"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// A 2-d window op's `pads` (4 values, default none) and `strides` (2 values, default 1).
fn pads_and_strides(node: &NodeProto) -> Result<([u32; 4], [u32; 2]), ZkError> {
    let op = node.op_type.as_str();
    let pads = match ints(node, "pads")? {
        Some(p) if p.len() == 4 => [p[0], p[1], p[2], p[3]],
        Some(_) => return Err(ZkError::unsupported(op, "pads must have 4 values")),
        None => [0; 4],
    };
    let stride = match ints(node, "strides")? {
        Some(s) if s.len() == 2 && s.iter().all(|&v| v > 0) => [s[0], s[1]],
        Some(_) => {
            return Err(ZkError::unsupported(
                op,
                "strides must be 2 positive values",
            ));
        }
        None => [1, 1],
    };
    Ok((pads, stride))
}

/// `Conv`, `AveragePool` and `GlobalAveragePool` as convolution layers.
fn conv_layer(
    node: &NodeProto,
    constants: &HashMap<&str, &TensorProto>,
    [c, h, w]: [usize; 3],
) -> Result<FloatLayer, ZkError> {
    let op = node.op_type.as_str();
    if attr(node, "auto_pad").is_some_and(|a| !a.s.is_empty() && a.s != b"NOTSET") {
        return Err(ZkError::unsupported(
            op,
            "auto_pad is not supported (use pads)",
        ));
    }
    if ints(node, "dilations")?.is_some_and(|d| d.iter().any(|&v| v != 1)) {
        return Err(ZkError::unsupported(op, "dilations are not supported"));
    }
    if attr(node, "ceil_mode").is_some_and(|a| a.i != 0) {
        return Err(ZkError::unsupported(op, "ceil_mode is not supported"));
    }
    let dim = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    let (pads, stride) = pads_and_strides(node)?;
    let (shape, weights, bias) = if op == "Conv" {
        if attr(node, "group").is_some_and(|a| a.i != 1) {
            return Err(ZkError::unsupported(
                op,
                "grouped convolutions are not supported",
            ));
        }
        let wt = node
            .input
            .get(1)
            .and_then(|n| constants.get(n.as_str()))
            .ok_or_else(|| ZkError::unsupported(op, "the weight must be a constant"))?;
        let wt = constant(wt)?;
        let [co, ci, kh, kw] = wt.dims.as_slice() else {
            return Err(ZkError::unsupported(
                op,
                "only 2-d convolutions are supported",
            ));
        };
        if *ci != c {
            return Err(ZkError::unsupported(
                op,
                format!("{ci} input channels for {c}"),
            ));
        }
        let shape = ConvShape {
            in_channels: dim(c),
            in_h: dim(h),
            in_w: dim(w),
            out_channels: dim(*co),
            kernel: [dim(*kh), dim(*kw)],
            stride,
            pads,
            depthwise: false,
        };
        let bias = match node.input.get(2).filter(|n| !n.is_empty()) {
            Some(b) => {
                let b = constants
                    .get(b.as_str())
                    .ok_or_else(|| ZkError::unsupported(op, "the bias must be a constant"))?;
                let b = constant(b)?;
                if b.data.len() != *co {
                    return Err(ZkError::unsupported(op, "bias size differs from channels"));
                }
                b.data
            }
            None => vec![0.0; *co],
        };
        (shape, wt.data, bias)
    } else {
        let kernel = if op == "GlobalAveragePool" {
            [dim(h), dim(w)]
        } else {
            match ints(node, "kernel_shape")? {
                Some(k) if k.len() == 2 => [k[0], k[1]],
                _ => return Err(ZkError::unsupported(op, "kernel_shape must have 2 values")),
            }
        };
        let include_pad = attr(node, "count_include_pad").is_some_and(|a| a.i != 0);
        if pads.iter().any(|&p| p != 0) && !include_pad {
            return Err(ZkError::unsupported(
                op,
                "padding without count_include_pad",
            ));
        }
        let shape = ConvShape {
            in_channels: dim(c),
            in_h: dim(h),
            in_w: dim(w),
            out_channels: dim(c),
            kernel,
            stride: if op == "GlobalAveragePool" {
                [1, 1]
            } else {
                stride
            },
            pads: if op == "GlobalAveragePool" {
                [0; 4]
            } else {
                pads
            },
            depthwise: true,
        };
        // Bounded before the averaging weights are allocated.
        check_window(op, &shape)?;
        let k = kernel[0] as usize * kernel[1] as usize;
        (shape, vec![1.0 / k as f32; c * k], vec![0.0; c])
    };
    check_window(op, &shape)?;
    let per_channel = shape.out_h() as usize * shape.out_w() as usize;
    let bias = bias
        .iter()
        .flat_map(|&b| std::iter::repeat_n(b, per_channel))
        .collect();
    Ok(FloatLayer {
        inputs: shape.inputs(),
        outputs: shape.outputs(),
        kind: LayerKind::Conv(shape),
        weights,
        bias,
        relu: false,
    })
}

/// A window op's shape is well formed and within the circuit limits ([`MAX_VALUES`] inputs and
/// outputs, [`MAX_WEIGHTS`] weights): checked before anything of its size is allocated.
fn check_window(op: &str, shape: &ConvShape) -> Result<(), ZkError> {
    if !shape.is_valid() {
        return Err(ZkError::unsupported(
            op,
            "unsupported kernel, stride or padding",
        ));
    }
    if shape.inputs() > MAX_VALUES || shape.outputs() > MAX_VALUES {
        return Err(too_large(op, "the input or output".into()));
    }
    if shape.weight_count() > MAX_WEIGHTS {
        return Err(ZkError::unsupported(
            op,
            format!("more than {MAX_WEIGHTS} weights, more than any circuit holds"),
        ));
    }
    Ok(())
}

/// `MaxPool` as a max over depthwise windows (in-bounds elements only: ONNX pads with -inf).
fn max_pool_layer(node: &NodeProto, [c, h, w]: [usize; 3]) -> Result<FloatLayer, ZkError> {
    let op = node.op_type.as_str();
    if node.output.iter().skip(1).any(|o| !o.is_empty()) {
        return Err(ZkError::unsupported(
            op,
            "the Indices output is not supported",
        ));
    }
    if attr(node, "auto_pad").is_some_and(|a| !a.s.is_empty() && a.s != b"NOTSET") {
        return Err(ZkError::unsupported(
            op,
            "auto_pad is not supported (use pads)",
        ));
    }
    if ints(node, "dilations")?.is_some_and(|d| d.iter().any(|&v| v != 1)) {
        return Err(ZkError::unsupported(op, "dilations are not supported"));
    }
    if attr(node, "ceil_mode").is_some_and(|a| a.i != 0) {
        return Err(ZkError::unsupported(op, "ceil_mode is not supported"));
    }
    if attr(node, "storage_order").is_some_and(|a| a.i != 0) {
        return Err(ZkError::unsupported(op, "storage_order 1 is not supported"));
    }
    let (kernel, pads, stride) = if op == "GlobalMaxPool" {
        // No attributes: the kernel is the whole map, one output per channel.
        let whole = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        ([whole(h), whole(w)], [0; 4], [1, 1])
    } else {
        let kernel = match ints(node, "kernel_shape")? {
            Some(k) if k.len() == 2 => [k[0], k[1]],
            _ => {
                return Err(ZkError::unsupported(
                    op,
                    "only 2-d pooling is supported (kernel_shape must have 2 values)",
                ));
            }
        };
        let (pads, stride) = pads_and_strides(node)?;
        (kernel, pads, stride)
    };
    let dim = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    let shape = ConvShape {
        in_channels: dim(c),
        in_h: dim(h),
        in_w: dim(w),
        out_channels: dim(c),
        kernel,
        stride,
        pads,
        depthwise: true,
    };
    if !shape.pads_within_kernel() {
        return Err(ZkError::unsupported(
            op,
            "unsupported kernel, stride or padding (pads must be smaller than the kernel)",
        ));
    }
    check_window(op, &shape)?;
    Ok(FloatLayer {
        inputs: shape.inputs(),
        outputs: shape.outputs(),
        kind: LayerKind::MaxPool(shape),
        weights: Vec::new(),
        bias: Vec::new(),
        relu: false,
    })
}

fn dense(op: &str, b: &Constant, trans_b: bool) -> Result<FloatLayer, ZkError> {
    let [d0, d1] = b.dims.as_slice() else {
        return Err(ZkError::unsupported(op, "the weight must be a 2-d matrix"));
    };
    let (inputs, outputs) = if trans_b { (*d1, *d0) } else { (*d0, *d1) };
    if inputs == 0 || outputs == 0 {
        return Err(ZkError::unsupported(op, "empty weight matrix"));
    }
    if inputs > MAX_VALUES
        || outputs > MAX_VALUES
        || inputs.checked_mul(outputs).is_none_or(|n| n > MAX_WEIGHTS)
    {
        return Err(ZkError::unsupported(
            op,
            format!("a {inputs} × {outputs} weight matrix is larger than any circuit holds"),
        ));
    }
    let mut weights = vec![0f32; inputs * outputs];
    for o in 0..outputs {
        for i in 0..inputs {
            weights[o * inputs + i] = if trans_b {
                b.data[o * inputs + i]
            } else {
                b.data[i * outputs + o]
            };
        }
    }
    Ok(FloatLayer {
        kind: LayerKind::Dense,
        inputs,
        outputs,
        weights,
        bias: vec![0.0; outputs],
        relu: false,
    })
}

fn add_bias(op: &str, layer: &mut FloatLayer, c: &Constant) -> Result<(), ZkError> {
    if c.data.len() == layer.outputs {
        for (b, v) in layer.bias.iter_mut().zip(&c.data) {
            *b += v;
        }
        Ok(())
    } else if c.data.len() == 1 {
        layer.bias.iter_mut().for_each(|b| *b += c.data[0]);
        Ok(())
    } else {
        Err(ZkError::unsupported(
            op,
            format!(
                "bias of {} values for {} outputs",
                c.data.len(),
                layer.outputs
            ),
        ))
    }
}

/// A dense layer with deterministic pseudo-random weights, uniform in `±gain / (2·√inputs)`,
/// and biases a tenth of that (one 64-bit LCG stream from `seed`, weights first). Used by
/// tests and benchmarks, with [`mlp_onnx`], to make models of any size from Rust.
pub fn random_dense(inputs: usize, outputs: usize, relu: bool, seed: u64, gain: f32) -> FloatLayer {
    let mut s = seed;
    let mut next = move || {
        s = s
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) / (inputs as f32).sqrt() * gain
    };
    FloatLayer {
        kind: LayerKind::Dense,
        inputs,
        outputs,
        weights: (0..inputs * outputs).map(|_| next()).collect(),
        bias: (0..outputs).map(|_| next() * 0.1).collect(),
        relu,
    }
}

/// Builds a float MLP ONNX file of `Gemm` (transB = 1) and `Relu` nodes: input "input",
/// output "output". Used by tests and benchmarks to make models from Rust.
pub fn mlp_onnx(layers: &[FloatLayer]) -> Vec<u8> {
    let mut nodes = Vec::new();
    let mut initializer = Vec::new();
    let mut current = "input".to_string();
    for (i, l) in layers.iter().enumerate() {
        let (w, b, y) = (format!("w{i}"), format!("b{i}"), format!("gemm{i}"));
        initializer.push(TensorProto {
            dims: vec![l.outputs as i64, l.inputs as i64],
            data_type: DATA_TYPE_FLOAT,
            raw_data: l.weights.iter().flat_map(|v| v.to_le_bytes()).collect(),
            name: w.clone(),
            ..Default::default()
        });
        initializer.push(TensorProto {
            dims: vec![l.outputs as i64],
            data_type: DATA_TYPE_FLOAT,
            float_data: l.bias.clone(),
            name: b.clone(),
            ..Default::default()
        });
        nodes.push(NodeProto {
            input: vec![current.clone(), w, b],
            output: vec![y.clone()],
            name: format!("Gemm{i}"),
            op_type: "Gemm".into(),
            attribute: vec![AttributeProto {
                name: "transB".into(),
                i: 1,
                r#type: 2,
                ..Default::default()
            }],
            domain: String::new(),
        });
        current = y;
        if l.relu {
            let r = format!("relu{i}");
            nodes.push(NodeProto {
                input: vec![current.clone()],
                output: vec![r.clone()],
                name: format!("Relu{i}"),
                op_type: "Relu".into(),
                ..Default::default()
            });
            current = r;
        }
    }
    nodes.push(NodeProto {
        input: vec![current],
        output: vec!["output".into()],
        name: "Out".into(),
        op_type: "Identity".into(),
        ..Default::default()
    });
    let model = ModelProto {
        ir_version: 8,
        producer_name: "modelhub-zk".into(),
        graph: Some(GraphProto {
            node: nodes,
            name: "mlp".into(),
            initializer,
            input: vec![float_input(
                "input",
                &[-1, layers.first().map_or(0, |l| l.inputs as i64)],
            )],
            output: vec![ValueInfoProto {
                name: "output".into(),
                r#type: None,
            }],
        }),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
    };
    model.encode_to_vec()
}

/// A FLOAT graph input of shape `dims` (`-1`: a named batch dimension).
pub fn float_input(name: &str, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: DATA_TYPE_FLOAT,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension {
                            dim_value: d.max(0),
                            dim_param: if d < 0 { "N".into() } else { String::new() },
                        })
                        .collect(),
                }),
            }),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(i: usize, o: usize, relu: bool) -> FloatLayer {
        FloatLayer {
            kind: LayerKind::Dense,
            inputs: i,
            outputs: o,
            weights: (0..i * o).map(|k| (k as f32 * 0.37).sin() * 0.5).collect(),
            bias: (0..o).map(|k| k as f32 * 0.01).collect(),
            relu,
        }
    }

    #[test]
    fn round_trip_gemm_relu() {
        let layers = vec![layer(5, 4, true), layer(4, 3, false)];
        let m = parse(&mlp_onnx(&layers)).unwrap();
        assert_eq!(m.layers, layers);
        assert_eq!(m.input_name, "input");
        assert_eq!(m.output_name, "output");
        let y = m.forward(&[1.0, 0.5, -0.5, 0.25, 0.0]);
        assert_eq!(y.len(), 3);
    }

    #[test]
    fn rejects_unsupported_and_garbage() {
        let err = parse(b"this is not an onnx model").unwrap_err();
        assert!(matches!(err, ZkError::Unsupported { .. }), "{err}");
        let mut model = ModelProto::decode(mlp_onnx(&[layer(2, 2, false)]).as_slice()).unwrap();
        let graph = model.graph.as_mut().unwrap();
        graph.node.insert(
            1,
            NodeProto {
                input: vec!["gemm0".into()],
                output: vec!["sig".into()],
                op_type: "LeakyRelu".into(),
                ..Default::default()
            },
        );
        graph.node[2].input[0] = "sig".into();
        match parse(&model.encode_to_vec()).unwrap_err() {
            ZkError::Unsupported { op, .. } => assert_eq!(op, "LeakyRelu"),
            other => panic!("{other}"),
        }
        // Sigmoid and Tanh are supported now: the same graph parses into a table layer.
        for (op, kind) in [("Sigmoid", LayerKind::Sigmoid), ("Tanh", LayerKind::Tanh)] {
            let graph = model.graph.as_mut().unwrap();
            graph.node[1].op_type = op.into();
            let m = parse(&model.encode_to_vec()).unwrap();
            assert_eq!(m.layers.len(), 2);
            assert_eq!((m.layers[1].kind.clone(), m.layers[1].outputs), (kind, 2));
            let y = m.forward(&[0.3, -0.2]);
            assert!(y.iter().all(|v| v.abs() <= 1.0));
        }
    }

    fn pool_model(attrs: Vec<AttributeProto>, extra_output: bool) -> Vec<u8> {
        pool_model_with("MaxPool", attrs, extra_output, 8)
    }

    /// `op` on a [1, 2, 3, 3] input, then a dense layer of `pooled` inputs.
    fn pool_model_with(
        op: &str,
        attrs: Vec<AttributeProto>,
        extra_output: bool,
        pooled: usize,
    ) -> Vec<u8> {
        let mut model =
            ModelProto::decode(mlp_onnx(&[layer(pooled, 2, false)]).as_slice()).unwrap();
        let graph = model.graph.as_mut().unwrap();
        graph.input[0].r#type = Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: 1,
                shape: Some(TensorShapeProto {
                    dim: [1, 2, 3, 3]
                        .iter()
                        .map(|&d| Dimension {
                            dim_value: d,
                            dim_param: String::new(),
                        })
                        .collect(),
                }),
            }),
        });
        let mut output = vec!["pool".to_string()];
        if extra_output {
            output.push("indices".into());
        }
        graph.node.insert(
            0,
            NodeProto {
                input: vec!["input".into()],
                output,
                op_type: op.into(),
                attribute: attrs,
                ..Default::default()
            },
        );
        graph.node[1].input[0] = "pool".into();
        model.encode_to_vec()
    }

    fn ints_attr(name: &str, v: &[i64]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            ints: v.to_vec(),
            r#type: 7,
            ..Default::default()
        }
    }

    fn int_attr(name: &str, i: i64) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            i,
            r#type: 2,
            ..Default::default()
        }
    }

    #[test]
    fn max_pool_parses_and_refuses_what_it_does_not_support() {
        let k = || ints_attr("kernel_shape", &[2, 2]);
        let m = parse(&pool_model(vec![k()], false)).unwrap();
        let LayerKind::MaxPool(s) = &m.layers[0].kind else {
            panic!("{:?}", m.layers[0].kind)
        };
        assert_eq!((s.out_h(), s.out_w(), m.layers[0].outputs), (2, 2, 8));
        let x: Vec<f32> = (0..18).map(|i| (i as f32 * 1.7).sin()).collect();
        let pooled: Vec<f32> = (0..8)
            .map(|o| {
                m.layers[0]
                    .kind
                    .connections(18, o)
                    .iter()
                    .map(|c| x[c.0])
                    .fold(f32::MIN, f32::max)
            })
            .collect();
        assert!((pooled[0] - x[0].max(x[1]).max(x[3]).max(x[4])).abs() < 1e-6);
        assert_eq!(m.forward(&x).len(), 2);
        let with_pads = vec![
            k(),
            ints_attr("pads", &[1, 1, 1, 1]),
            ints_attr("strides", &[2, 2]),
        ];
        assert!(parse(&pool_model(with_pads, false)).is_ok());
        let reason =
            |attrs: Vec<AttributeProto>, extra: bool| match parse(&pool_model(attrs, extra)) {
                Err(ZkError::Unsupported { op, reason }) => {
                    assert_eq!(op, "MaxPool");
                    reason
                }
                other => panic!("{other:?}"),
            };
        assert!(reason(vec![k(), ints_attr("dilations", &[2, 2])], false).contains("dilations"));
        assert!(reason(vec![k(), int_attr("ceil_mode", 1)], false).contains("ceil_mode"));
        assert!(reason(vec![k(), int_attr("storage_order", 1)], false).contains("storage_order"));
        assert!(reason(vec![k()], true).contains("Indices"));
        assert!(reason(vec![ints_attr("kernel_shape", &[2])], false).contains("2-d"));
        assert!(reason(vec![k(), ints_attr("pads", &[2, 0, 0, 0])], false).contains("pads"));
    }

    #[test]
    fn global_max_pool_is_a_max_pool_over_the_whole_map() {
        let m = parse(&pool_model_with("GlobalMaxPool", vec![], false, 2)).unwrap();
        let LayerKind::MaxPool(s) = &m.layers[0].kind else {
            panic!("{:?}", m.layers[0].kind)
        };
        assert_eq!(
            (s.kernel, s.out_h(), s.out_w(), m.layers[0].outputs),
            ([3, 3], 1, 1, 2)
        );
        let x: Vec<f32> = (0..18).map(|i| (i as f32 * 1.7).sin()).collect();
        for c in 0..2 {
            let got = m.layers[0]
                .kind
                .connections(18, c)
                .iter()
                .map(|e| x[e.0])
                .fold(f32::MIN, f32::max);
            let want = x[c * 9..c * 9 + 9].iter().copied().fold(f32::MIN, f32::max);
            assert_eq!(got, want, "channel {c}");
        }
        // Its Indices output is refused as MaxPool's is.
        match parse(&pool_model_with("GlobalMaxPool", vec![], true, 2)) {
            Err(ZkError::Unsupported { op, reason }) => {
                assert_eq!(op, "GlobalMaxPool");
                assert!(reason.contains("Indices"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}

/// The compiler reads exactly what ONNX Runtime runs, and refuses the rest (issues 19, 20).
#[cfg(test)]
mod strict_tests {
    use super::*;

    fn model() -> ModelProto {
        let layers = [
            random_dense(4, 3, true, 1, 1.0),
            random_dense(3, 2, false, 2, 1.0),
        ];
        ModelProto::decode(mlp_onnx(&layers).as_slice()).unwrap()
    }

    fn refused(m: &ModelProto, needle: &str) {
        match parse(&m.encode_to_vec()) {
            Err(ZkError::Unsupported { op, reason }) => {
                assert!(
                    reason.contains(needle),
                    "{op}: {reason} (wanted {needle:?})"
                );
            }
            other => panic!("wanted a refusal mentioning {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn initializers_of_other_types_are_refused() {
        parse(&model().encode_to_vec()).unwrap();
        // The same 4-byte values as INT32 (or UINT32): ONNX Runtime reads integers, the old
        // compiler read their bit patterns as floats.
        for (t, name) in [
            (6, "INT32"),
            (12, "UINT32"),
            (11, "DOUBLE"),
            (10, "FLOAT16"),
        ] {
            let mut m = model();
            m.graph.as_mut().unwrap().initializer[0].data_type = t;
            refused(&m, name);
        }
        // A bias given as float_data but typed INT64 too.
        let mut m = model();
        m.graph.as_mut().unwrap().initializer[1].data_type = DATA_TYPE_INT64;
        refused(&m, "INT64");
    }

    #[test]
    fn graph_input_types_are_checked() {
        for (t, name) in [(7, "INT64"), (11, "DOUBLE"), (3, "INT8")] {
            let mut m = model();
            let input = &mut m.graph.as_mut().unwrap().input[0];
            input
                .r#type
                .as_mut()
                .unwrap()
                .tensor_type
                .as_mut()
                .unwrap()
                .elem_type = t;
            refused(&m, name);
        }
        let mut m = model();
        m.graph.as_mut().unwrap().input[0].r#type = None;
        refused(&m, "untyped");
    }

    #[test]
    fn opsets_outside_the_checked_range_are_refused() {
        for (v, ok) in [
            (6, false),
            (7, true),
            (17, true),
            (MAX_OPSET, true),
            (MAX_OPSET + 1, false),
        ] {
            let mut m = model();
            m.opset_import[0].version = v;
            assert_eq!(parse(&m.encode_to_vec()).is_ok(), ok, "opset {v}");
        }
        let mut m = model();
        m.opset_import.clear();
        refused(&m, "no ONNX opset");
    }

    /// A `[1, 2, 3, 3]` input, `op` with `attrs`, then a dense layer of `width` inputs.
    fn windowed(op: &str, attrs: Vec<AttributeProto>, width: usize) -> ModelProto {
        let mut m =
            ModelProto::decode(mlp_onnx(&[random_dense(width, 2, false, 3, 1.0)]).as_slice())
                .unwrap();
        let g = m.graph.as_mut().unwrap();
        g.input[0] = float_input("input", &[1, 2, 3, 3]);
        g.node.insert(
            0,
            NodeProto {
                input: vec!["input".into()],
                output: vec!["mid".into()],
                op_type: op.into(),
                attribute: attrs,
                ..Default::default()
            },
        );
        g.node[1].input[0] = "mid".into();
        m
    }

    fn ints_attr(name: &str, v: &[i64]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            ints: v.to_vec(),
            r#type: 7,
            ..Default::default()
        }
    }

    #[test]
    fn negative_pads_and_strides_are_refused_not_clamped() {
        let k = || ints_attr("kernel_shape", &[2, 2]);
        for op in ["MaxPool", "AveragePool"] {
            parse(&windowed(op, vec![k()], 8).encode_to_vec()).unwrap();
            let m = windowed(op, vec![k(), ints_attr("pads", &[-1, 0, 0, 0])], 8);
            refused(&m, "negative");
            let m = windowed(op, vec![k(), ints_attr("strides", &[-1, 1])], 8);
            refused(&m, "negative");
            let m = windowed(op, vec![k(), ints_attr("strides", &[0, 1])], 8);
            refused(&m, "positive");
            let m = windowed(op, vec![ints_attr("kernel_shape", &[-2, 2])], 8);
            refused(&m, "negative");
        }
    }

    #[test]
    fn flatten_honours_its_axis() {
        let axis = |a: i64| AttributeProto {
            name: "axis".into(),
            i: a,
            r#type: 2,
            ..Default::default()
        };
        // Batch 1: axis 0 and 1 (and -3 on a rank-4 input, opset 11 on) flatten to one row.
        for a in [0, 1, -3] {
            let m = windowed("Flatten", vec![axis(a)], 18);
            let parsed = parse(&m.encode_to_vec()).unwrap();
            assert_eq!(parsed.layers[0].inputs, 18, "axis {a}");
        }
        parse(&windowed("Flatten", vec![], 18).encode_to_vec()).unwrap();
        // Anything else makes a matrix: the dense layer would run once per row.
        for a in [2, 3, -1, -2] {
            refused(&windowed("Flatten", vec![axis(a)], 18), "axis 0 or 1");
        }
        // Negative axes exist from opset 11 only.
        let mut m = windowed("Flatten", vec![axis(-3)], 18);
        m.opset_import[0].version = 10;
        refused(&m, "axis 0 or 1");
    }

    #[test]
    fn shape_bombs_are_refused_without_allocating() {
        // Declared inputs of 2^24, 2^31 and 2^62 values (with a flattening op in front of the
        // dense layer, so nothing but the declared shape says how large the tensor is).
        for dims in [
            vec![1, 1 << 12, 1 << 12],
            vec![1, 1 << 31],
            vec![1, 1 << 20, 1 << 20, 1 << 22],
            vec![1, i64::MAX, 2],
        ] {
            for op in ["Sigmoid", "Flatten", "GlobalAveragePool", "AveragePool"] {
                let mut m = windowed(op, vec![ints_attr("kernel_shape", &[2, 2])], 18);
                m.graph.as_mut().unwrap().input[0] = float_input("input", &dims);
                refused(&m, "more than");
            }
        }
        // A pooling kernel of 2^31 × 2^31 on a small input: refused before its averaging
        // weights would be allocated.
        let m = windowed(
            "AveragePool",
            vec![ints_attr("kernel_shape", &[1 << 31, 1 << 31])],
            8,
        );
        assert!(parse(&m.encode_to_vec()).is_err());
        // A Reshape to a huge target.
        let mut m = windowed("Reshape", vec![], 18);
        let g = m.graph.as_mut().unwrap();
        g.node[0].input.push("shape".into());
        g.initializer.push(TensorProto {
            dims: vec![3],
            data_type: DATA_TYPE_INT64,
            int64_data: vec![1, 1 << 40, 1 << 40],
            name: "shape".into(),
            ..Default::default()
        });
        refused(&m, "more than");
    }

    #[test]
    fn reshape_reads_only_int64_shapes_and_keeps_the_batch() {
        let with_shape = |data_type: i32, dims: Vec<i64>| {
            let mut m = windowed("Reshape", vec![], 18);
            let g = m.graph.as_mut().unwrap();
            g.node[0].input.push("shape".into());
            g.initializer.push(TensorProto {
                dims: vec![dims.len() as i64],
                data_type,
                raw_data: dims.iter().flat_map(|d| d.to_le_bytes()).collect(),
                name: "shape".into(),
                ..Default::default()
            });
            m
        };
        let m = parse(&with_shape(DATA_TYPE_INT64, vec![1, -1]).encode_to_vec()).unwrap();
        assert_eq!(m.layers[0].inputs, 18);
        parse(&with_shape(DATA_TYPE_INT64, vec![1, 0, 9]).encode_to_vec()).unwrap();
        refused(&with_shape(6, vec![1, -1]), "INT32");
        refused(&with_shape(DATA_TYPE_INT64, vec![2, 9]), "batch");
        refused(&with_shape(DATA_TYPE_INT64, vec![1, 5, 5]), "does not hold");
    }

    #[test]
    fn oversized_dense_layers_are_refused_before_copying() {
        // The weight matrix's dims are checked against the circuit limits first.
        let mut m = model();
        let w = &mut m.graph.as_mut().unwrap().initializer[0];
        w.dims = vec![1 << 20, 1 << 20];
        assert!(parse(&m.encode_to_vec()).is_err());
    }
}
