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
    let mut current = input.name.clone();
    // Shape of the running tensor without the batch dimension, when known.
    let mut shape: Option<Vec<usize>> = input.sample_shape();
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
                shape = node
                    .input
                    .get(1)
                    .and_then(|n| constants.get(n.as_str()))
                    .and_then(|t| reshape_target(t, shape.as_deref()));
                current = out;
            }
            "Flatten" if on_current => {
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
    let output_name = head_from.unwrap_or(current);
    Ok(FloatModel {
        input_name: input.name.clone(),
        output_name,
        layers,
    })
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

/// The target shape of a `Reshape` (without the batch dimension).
fn reshape_target(t: &TensorProto, current: Option<&[usize]>) -> Option<Vec<usize>> {
    let dims: Vec<i64> = if !t.int64_data.is_empty() {
        t.int64_data.clone()
    } else {
        t.raw_data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect()
    };
    let total: usize = current?.iter().product();
    let rest = dims.get(1..)?;
    let known: i64 = rest.iter().filter(|&&d| d > 0).product();
    let out: Option<Vec<usize>> = rest
        .iter()
        .map(|&d| match d {
            -1 if known > 0 => Some(total / known as usize),
            d if d > 0 => Some(d as usize),
            _ => None,
        })
        .collect();
    out.filter(|o| o.iter().product::<usize>() == total)
}

fn ints(node: &NodeProto, name: &str) -> Option<Vec<u32>> {
    attr(node, name).map(|a| {
        a.ints
            .iter()
            .map(|&v| u32::try_from(v).unwrap_or(0))
            .collect()
    })
}

/// A 2-d window op's `pads` (4 values, default none) and `strides` (2 values, default 1).
fn pads_and_strides(node: &NodeProto) -> Result<([u32; 4], [u32; 2]), ZkError> {
    let op = node.op_type.as_str();
    let pads = match ints(node, "pads") {
        Some(p) if p.len() == 4 => [p[0], p[1], p[2], p[3]],
        Some(_) => return Err(ZkError::unsupported(op, "pads must have 4 values")),
        None => [0; 4],
    };
    let stride = match ints(node, "strides") {
        Some(s) if s.len() == 2 => [s[0], s[1]],
        Some(_) => return Err(ZkError::unsupported(op, "strides must have 2 values")),
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
    if ints(node, "dilations").is_some_and(|d| d.iter().any(|&v| v != 1)) {
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
            match ints(node, "kernel_shape") {
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
        let k = kernel[0] as usize * kernel[1] as usize;
        (shape, vec![1.0 / k as f32; c * k], vec![0.0; c])
    };
    if !shape.is_valid() {
        return Err(ZkError::unsupported(
            op,
            "unsupported kernel, stride or padding",
        ));
    }
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
    if ints(node, "dilations").is_some_and(|d| d.iter().any(|&v| v != 1)) {
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
        let kernel = match ints(node, "kernel_shape") {
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
    if !shape.is_valid() || !shape.pads_within_kernel() {
        return Err(ZkError::unsupported(
            op,
            "unsupported kernel, stride or padding (pads must be smaller than the kernel)",
        ));
    }
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
            input: vec![ValueInfoProto {
                name: "input".into(),
                r#type: None,
            }],
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
