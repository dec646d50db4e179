//! The check every uploaded model passes before ONNX Runtime (or any other parser) sees it:
//! [`check_untrusted`] walks the ONNX protobuf and refuses what would let a model reach outside
//! its own bytes or outside the standard operator sets.
//!
//! Refused:
//! - any tensor whose data lives outside the model (`data_location = EXTERNAL`, or any
//!   `external_data` entry): graph initializers, sparse initializers, and tensor-valued
//!   attributes (`TENSOR`, `TENSORS`, `SPARSE_TENSOR`, `SPARSE_TENSORS`, e.g. `Constant`),
//!   in the main graph, in every subgraph (`If`, `Loop`, `Scan` bodies: `GRAPH` and `GRAPHS`
//!   attributes), in model-local functions and in training-info graphs;
//! - any operator domain outside [`ALLOWED_DOMAINS`], in nodes, opset imports and functions;
//! - bytes that are not an ONNX model, or nest deeper than the protobuf decoder allows.
//!
//! The schema below is the subset of `onnx.proto` the check needs; fields it does not name
//! (weights, names, shapes) are skipped by the decoder without being copied. Every decode
//! error refuses the model: the check fails closed.

use prost::Message;

use wire::{AttributeProto, GraphProto, ModelProto, NodeProto, SparseTensorProto, TensorProto};

/// Operator domains an uploaded model may use: the default domain (`""`, also spelled
/// `ai.onnx`) and `ai.onnx.ml`. Contributed and custom domains (`com.microsoft`, …) are
/// refused: their kernels are outside the standard's review and some read files.
pub const ALLOWED_DOMAINS: [&str; 3] = ["", "ai.onnx", "ai.onnx.ml"];

/// Longest piece of model-provided text (a tensor or node name, a domain) quoted in an error.
const QUOTE_CHARS: usize = 64;

/// Why an uploaded model was refused. Messages quote only what the model itself says (names,
/// domains, shortened), never anything about this machine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UntrustedModel {
    /// The bytes do not decode as an ONNX `ModelProto`.
    #[error("the bytes are not an ONNX model")]
    NotOnnx,
    /// The model has no graph.
    #[error("the model has no graph")]
    NoGraph,
    /// A tensor keeps its data in a file outside the model.
    #[error(
        "{what} {name:?} refers to external data; Model Hub accepts only models that carry all their data inside"
    )]
    ExternalData { what: &'static str, name: String },
    /// A node, opset import or function names an operator domain outside the allow-list.
    #[error(
        "{what} uses operator domain {domain:?}; only the standard domains (\"\", ai.onnx, ai.onnx.ml) are allowed"
    )]
    Domain { what: String, domain: String },
}

/// Refuses a model that refers to external data or to an operator domain outside
/// [`ALLOWED_DOMAINS`] (see the module docs). Needs no ONNX Runtime; takes only the bytes.
pub fn check_untrusted(bytes: &[u8]) -> Result<(), UntrustedModel> {
    let model = ModelProto::decode(bytes).map_err(|_| UntrustedModel::NotOnnx)?;
    for opset in &model.opset_import {
        allowed_domain(&opset.domain, || "an opset import".to_owned())?;
    }
    let graph = model.graph.as_ref().ok_or(UntrustedModel::NoGraph)?;
    check_graph(graph)?;
    for function in &model.functions {
        allowed_domain(&function.domain, || {
            format!("function {:?}", quote(&function.name))
        })?;
        for opset in &function.opset_import {
            allowed_domain(&opset.domain, || {
                format!("an opset import of function {:?}", quote(&function.name))
            })?;
        }
        for node in &function.node {
            check_node(node)?;
        }
        for attribute in &function.attribute_proto {
            check_attribute(attribute)?;
        }
    }
    for info in &model.training_info {
        for graph in [&info.initialization, &info.algorithm]
            .into_iter()
            .flatten()
        {
            check_graph(graph)?;
        }
    }
    Ok(())
}

fn check_graph(graph: &GraphProto) -> Result<(), UntrustedModel> {
    for tensor in &graph.initializer {
        check_tensor(tensor, "initializer")?;
    }
    for sparse in &graph.sparse_initializer {
        check_sparse(sparse, "sparse initializer")?;
    }
    for node in &graph.node {
        check_node(node)?;
    }
    Ok(())
}

fn check_node(node: &NodeProto) -> Result<(), UntrustedModel> {
    allowed_domain(&node.domain, || format!("node {:?}", quote(&node.op_type)))?;
    for attribute in &node.attribute {
        check_attribute(attribute)?;
    }
    Ok(())
}

fn check_attribute(attribute: &AttributeProto) -> Result<(), UntrustedModel> {
    const WHAT: &str = "tensor attribute";
    if let Some(t) = &attribute.t {
        check_tensor(t, WHAT)?;
    }
    for t in &attribute.tensors {
        check_tensor(t, WHAT)?;
    }
    if let Some(s) = &attribute.sparse_tensor {
        check_sparse(s, WHAT)?;
    }
    for s in &attribute.sparse_tensors {
        check_sparse(s, WHAT)?;
    }
    for g in attribute.g.iter().chain(&attribute.graphs) {
        check_graph(g)?;
    }
    Ok(())
}

fn check_sparse(sparse: &SparseTensorProto, what: &'static str) -> Result<(), UntrustedModel> {
    for t in [&sparse.values, &sparse.indices].into_iter().flatten() {
        check_tensor(t, what)?;
    }
    Ok(())
}

fn check_tensor(tensor: &TensorProto, what: &'static str) -> Result<(), UntrustedModel> {
    // Any value but DEFAULT (0) is refused, including values this schema does not know.
    if tensor.data_location != 0 || !tensor.external_data.is_empty() {
        return Err(UntrustedModel::ExternalData {
            what,
            name: quote(&tensor.name),
        });
    }
    Ok(())
}

fn allowed_domain(domain: &str, what: impl FnOnce() -> String) -> Result<(), UntrustedModel> {
    if ALLOWED_DOMAINS.contains(&domain) {
        Ok(())
    } else {
        Err(UntrustedModel::Domain {
            what: what(),
            domain: quote(domain),
        })
    }
}

/// Model-provided text, shortened for an error message.
fn quote(text: &str) -> String {
    let mut out: String = text.chars().take(QUOTE_CHARS).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

// What the check decodes: the subset of `onnx.proto` (IR version 10) that can hold tensors,
// subgraphs or domains, without any data field, so weights are skipped, not copied.
mod wire {
    use prost::Message;

    pub use super::proto::OperatorSetIdProto;

    #[derive(Clone, PartialEq, Message)]
    pub struct ModelProto {
        #[prost(message, optional, tag = "7")]
        pub graph: Option<GraphProto>,
        #[prost(message, repeated, tag = "8")]
        pub opset_import: Vec<OperatorSetIdProto>,
        #[prost(message, repeated, tag = "20")]
        pub training_info: Vec<TrainingInfoProto>,
        #[prost(message, repeated, tag = "25")]
        pub functions: Vec<FunctionProto>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct TrainingInfoProto {
        #[prost(message, optional, tag = "1")]
        pub initialization: Option<GraphProto>,
        #[prost(message, optional, tag = "2")]
        pub algorithm: Option<GraphProto>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct FunctionProto {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, repeated, tag = "7")]
        pub node: Vec<NodeProto>,
        #[prost(message, repeated, tag = "9")]
        pub opset_import: Vec<OperatorSetIdProto>,
        #[prost(string, tag = "10")]
        pub domain: String,
        #[prost(message, repeated, tag = "11")]
        pub attribute_proto: Vec<AttributeProto>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct GraphProto {
        #[prost(message, repeated, tag = "1")]
        pub node: Vec<NodeProto>,
        #[prost(message, repeated, tag = "5")]
        pub initializer: Vec<TensorProto>,
        #[prost(message, repeated, tag = "15")]
        pub sparse_initializer: Vec<SparseTensorProto>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct NodeProto {
        #[prost(string, tag = "4")]
        pub op_type: String,
        #[prost(message, repeated, tag = "5")]
        pub attribute: Vec<AttributeProto>,
        #[prost(string, tag = "7")]
        pub domain: String,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct AttributeProto {
        #[prost(message, optional, tag = "5")]
        pub t: Option<TensorProto>,
        #[prost(message, optional, tag = "6")]
        pub g: Option<GraphProto>,
        #[prost(message, repeated, tag = "10")]
        pub tensors: Vec<TensorProto>,
        #[prost(message, repeated, tag = "11")]
        pub graphs: Vec<GraphProto>,
        #[prost(message, optional, tag = "22")]
        pub sparse_tensor: Option<SparseTensorProto>,
        #[prost(message, repeated, tag = "23")]
        pub sparse_tensors: Vec<SparseTensorProto>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct TensorProto {
        #[prost(string, tag = "8")]
        pub name: String,
        /// Counted, never read.
        #[prost(message, repeated, tag = "13")]
        pub external_data: Vec<Empty>,
        #[prost(int32, tag = "14")]
        pub data_location: i32,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct SparseTensorProto {
        #[prost(message, optional, tag = "1")]
        pub values: Option<TensorProto>,
        #[prost(message, optional, tag = "2")]
        pub indices: Option<TensorProto>,
    }

    /// Any message, its fields skipped.
    #[derive(Clone, PartialEq, Message)]
    pub struct Empty {}
}

/// A subset of `onnx.proto` (IR version 10) with the standard's field numbers, enough to write
/// small models in Rust: tests (here and in other crates) build hostile models with it.
pub mod proto {
    use prost::Message;

    /// `onnx.ModelProto` (subset).
    #[derive(Clone, PartialEq, Message)]
    pub struct ModelProto {
        #[prost(int64, tag = "1")]
        pub ir_version: i64,
        #[prost(message, optional, tag = "7")]
        pub graph: Option<GraphProto>,
        #[prost(message, repeated, tag = "8")]
        pub opset_import: Vec<OperatorSetIdProto>,
        #[prost(message, repeated, tag = "20")]
        pub training_info: Vec<TrainingInfoProto>,
        #[prost(message, repeated, tag = "25")]
        pub functions: Vec<FunctionProto>,
    }

    /// `onnx.OperatorSetIdProto`.
    #[derive(Clone, PartialEq, Message)]
    pub struct OperatorSetIdProto {
        #[prost(string, tag = "1")]
        pub domain: String,
        #[prost(int64, tag = "2")]
        pub version: i64,
    }

    /// `onnx.TrainingInfoProto` (its graphs).
    #[derive(Clone, PartialEq, Message)]
    pub struct TrainingInfoProto {
        #[prost(message, optional, tag = "1")]
        pub initialization: Option<GraphProto>,
        #[prost(message, optional, tag = "2")]
        pub algorithm: Option<GraphProto>,
    }

    /// `onnx.FunctionProto` (subset).
    #[derive(Clone, PartialEq, Message)]
    pub struct FunctionProto {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, repeated, tag = "7")]
        pub node: Vec<NodeProto>,
        #[prost(message, repeated, tag = "9")]
        pub opset_import: Vec<OperatorSetIdProto>,
        #[prost(string, tag = "10")]
        pub domain: String,
        #[prost(message, repeated, tag = "11")]
        pub attribute_proto: Vec<AttributeProto>,
    }

    /// `onnx.GraphProto` (subset; inputs and outputs are carried so tests can build runnable
    /// models).
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
        #[prost(message, repeated, tag = "15")]
        pub sparse_initializer: Vec<SparseTensorProto>,
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
        #[prost(message, optional, tag = "5")]
        pub t: Option<TensorProto>,
        #[prost(message, optional, tag = "6")]
        pub g: Option<GraphProto>,
        #[prost(int64, repeated, tag = "8")]
        pub ints: Vec<i64>,
        #[prost(message, repeated, tag = "10")]
        pub tensors: Vec<TensorProto>,
        #[prost(message, repeated, tag = "11")]
        pub graphs: Vec<GraphProto>,
        /// `AttributeType`: FLOAT 1, INT 2, TENSOR 4, GRAPH 5, INTS 7, TENSORS 9, GRAPHS 10,
        /// SPARSE_TENSOR 11, SPARSE_TENSORS 12.
        #[prost(int32, tag = "20")]
        pub r#type: i32,
        #[prost(message, optional, tag = "22")]
        pub sparse_tensor: Option<SparseTensorProto>,
        #[prost(message, repeated, tag = "23")]
        pub sparse_tensors: Vec<SparseTensorProto>,
    }

    /// `onnx.TensorProto` (subset: no typed data fields; `raw_data` only so tests can build
    /// tensors).
    #[derive(Clone, PartialEq, Message)]
    pub struct TensorProto {
        #[prost(int64, repeated, tag = "1")]
        pub dims: Vec<i64>,
        /// `TensorProto.DataType`: FLOAT 1, INT64 7, …
        #[prost(int32, tag = "2")]
        pub data_type: i32,
        #[prost(string, tag = "8")]
        pub name: String,
        #[prost(bytes = "vec", tag = "9")]
        pub raw_data: Vec<u8>,
        #[prost(message, repeated, tag = "13")]
        pub external_data: Vec<StringStringEntryProto>,
        /// `DataLocation`: DEFAULT 0, EXTERNAL 1.
        #[prost(int32, tag = "14")]
        pub data_location: i32,
    }

    /// `onnx.SparseTensorProto`.
    #[derive(Clone, PartialEq, Message)]
    pub struct SparseTensorProto {
        #[prost(message, optional, tag = "1")]
        pub values: Option<TensorProto>,
        #[prost(message, optional, tag = "2")]
        pub indices: Option<TensorProto>,
        #[prost(int64, repeated, tag = "3")]
        pub dims: Vec<i64>,
    }

    /// `onnx.StringStringEntryProto`.
    #[derive(Clone, PartialEq, Message)]
    pub struct StringStringEntryProto {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    /// `onnx.ValueInfoProto` (subset).
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

    /// `onnx.TensorShapeProto.Dimension` (a value or a symbolic name).
    #[derive(Clone, PartialEq, Message)]
    pub struct Dimension {
        #[prost(int64, tag = "1")]
        pub dim_value: i64,
        #[prost(string, tag = "2")]
        pub dim_param: String,
    }

    /// `TensorProto.DataType` FLOAT.
    pub const FLOAT: i32 = 1;
    /// `TensorProto.DataType` INT64.
    pub const INT64: i32 = 7;

    /// A float tensor of `dims` filled from `values` (raw little-endian data).
    pub fn tensor_f32(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
        TensorProto {
            dims: dims.to_vec(),
            data_type: FLOAT,
            name: name.into(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        }
    }

    /// An int64 tensor of `dims` filled from `values`.
    pub fn tensor_i64(name: &str, dims: &[i64], values: &[i64]) -> TensorProto {
        TensorProto {
            dims: dims.to_vec(),
            data_type: INT64,
            name: name.into(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        }
    }

    /// A tensor input or output; a negative dimension is symbolic (`"n"`).
    pub fn value_info(name: &str, elem_type: i32, dims: &[i64]) -> ValueInfoProto {
        ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                tensor_type: Some(TensorTypeProto {
                    elem_type,
                    shape: Some(TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|&d| Dimension {
                                dim_value: d.max(0),
                                dim_param: if d < 0 { "n".into() } else { String::new() },
                            })
                            .collect(),
                    }),
                }),
            }),
        }
    }

    /// A node of the default domain.
    pub fn node(op_type: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name: format!("{op_type}_{}", outputs.first().copied().unwrap_or("")),
            op_type: op_type.into(),
            ..Default::default()
        }
    }

    /// An integer attribute.
    pub fn attr_int(name: &str, value: i64) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            i: value,
            r#type: 2,
            ..Default::default()
        }
    }

    /// A tensor attribute (`Constant`'s `value`, `ConstantOfShape`'s `value`).
    pub fn attr_tensor(name: &str, value: TensorProto) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            t: Some(value),
            r#type: 4,
            ..Default::default()
        }
    }

    /// A graph attribute (`If` branches, `Loop` and `Scan` bodies).
    pub fn attr_graph(name: &str, value: GraphProto) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            g: Some(value),
            r#type: 5,
            ..Default::default()
        }
    }

    /// A `[1, 4]` float tensor whose data the model says lives in the file `location` (ONNX
    /// external data, 16 bytes from offset 0): what [`check_untrusted`](super::check_untrusted)
    /// refuses.
    pub fn external(name: &str, location: &str) -> TensorProto {
        let entry = |k: &str, v: &str| StringStringEntryProto {
            key: k.into(),
            value: v.into(),
        };
        TensorProto {
            dims: vec![1, 4],
            data_type: FLOAT,
            name: name.into(),
            external_data: vec![
                entry("location", location),
                entry("offset", "0"),
                entry("length", "16"),
            ],
            data_location: 1,
            ..Default::default()
        }
    }

    /// `Y = X + W` over `[1, 4]` floats, with `W` given: the smallest model a tensor can hide in.
    pub fn add_graph(w: TensorProto) -> GraphProto {
        GraphProto {
            node: vec![node("Add", &["X", "W"], &["Y"])],
            name: "g".into(),
            initializer: vec![w],
            input: vec![value_info("X", FLOAT, &[1, 4])],
            output: vec![value_info("Y", FLOAT, &[1, 4])],
            ..Default::default()
        }
    }

    /// A model of IR version 8 importing the default opset 17, encoded.
    pub fn model_bytes(graph: GraphProto) -> Vec<u8> {
        ModelProto {
            ir_version: 8,
            graph: Some(graph),
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            ..Default::default()
        }
        .encode_to_vec()
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::proto::*;
    use super::{UntrustedModel, check_untrusted};

    /// `Y = X + C` with `C` from a `Constant` node.
    fn constant_graph(c: TensorProto) -> GraphProto {
        let mut constant = node("Constant", &[], &["C"]);
        constant.attribute.push(attr_tensor("value", c));
        GraphProto {
            node: vec![constant, node("Add", &["X", "C"], &["Y"])],
            name: "g".into(),
            input: vec![value_info("X", FLOAT, &[1, 4])],
            output: vec![value_info("Y", FLOAT, &[1, 4])],
            ..Default::default()
        }
    }

    fn refused_for_external(bytes: &[u8]) {
        let e = check_untrusted(bytes).unwrap_err();
        assert!(matches!(e, UntrustedModel::ExternalData { .. }), "{e}");
        let text = e.to_string();
        for leak in ["Cargo", "passwd", "..", "/", "length", "16"] {
            assert!(!text.contains(leak), "{leak:?} in {text}");
        }
    }

    #[test]
    fn a_model_with_its_data_inside_passes() {
        let w = tensor_f32("W", &[1, 4], &[1.0, 2.0, 3.0, 4.0]);
        check_untrusted(&model_bytes(add_graph(w.clone()))).unwrap();
        check_untrusted(&model_bytes(constant_graph(w))).unwrap();
    }

    #[test]
    fn external_initializers_are_refused_wherever_they_point() {
        for location in [
            "Cargo.toml",
            "modelhub-data/kek",
            "../../etc/passwd",
            "/etc/passwd",
        ] {
            refused_for_external(&model_bytes(add_graph(external("W", location))));
        }
        // Either marker alone is enough.
        let mut only_entries = external("W", "Cargo.toml");
        only_entries.data_location = 0;
        refused_for_external(&model_bytes(add_graph(only_entries)));
        let mut only_location = external("W", "Cargo.toml");
        only_location.external_data.clear();
        refused_for_external(&model_bytes(add_graph(only_location)));
        let mut unknown_location = tensor_f32("W", &[1, 4], &[0.0; 4]);
        unknown_location.data_location = 7;
        refused_for_external(&model_bytes(add_graph(unknown_location)));
    }

    #[test]
    fn external_tensors_in_attributes_and_sparse_initializers_are_refused() {
        refused_for_external(&model_bytes(constant_graph(external("C", "Cargo.toml"))));

        let mut g = add_graph(tensor_f32("W", &[1, 4], &[0.0; 4]));
        g.node[0].attribute.push(AttributeProto {
            name: "values".into(),
            tensors: vec![
                tensor_f32("ok", &[1], &[0.0]),
                external("bad", "/etc/passwd"),
            ],
            r#type: 9,
            ..Default::default()
        });
        refused_for_external(&model_bytes(g));

        let mut g = add_graph(tensor_f32("W", &[1, 4], &[0.0; 4]));
        g.sparse_initializer.push(SparseTensorProto {
            values: Some(external("S", "../secret")),
            indices: Some(tensor_i64("S_idx", &[1], &[0])),
            dims: vec![1, 4],
        });
        refused_for_external(&model_bytes(g));

        let mut g = constant_graph(tensor_f32("C", &[1, 4], &[0.0; 4]));
        g.node[0].attribute[0] = AttributeProto {
            name: "sparse_value".into(),
            sparse_tensor: Some(SparseTensorProto {
                values: Some(tensor_f32("v", &[1], &[1.0])),
                indices: Some(external("i", "Cargo.toml")),
                dims: vec![1, 4],
            }),
            r#type: 11,
            ..Default::default()
        };
        refused_for_external(&model_bytes(g));
    }

    #[test]
    fn external_tensors_in_subgraphs_are_refused_at_any_depth() {
        // If → then_branch → Loop → body → Constant with external data.
        let inner = constant_graph(external("deep", "Cargo.toml"));
        let mut looped = node("Loop", &["M", "", "X"], &["Z"]);
        looped.attribute.push(attr_graph("body", inner));
        let then_branch = GraphProto {
            node: vec![looped],
            name: "then".into(),
            ..Default::default()
        };
        let mut branch = node("If", &["cond"], &["Y"]);
        branch
            .attribute
            .push(attr_graph("then_branch", then_branch));
        branch.attribute.push(attr_graph(
            "else_branch",
            add_graph(tensor_f32("W", &[1, 4], &[0.0; 4])),
        ));
        let g = GraphProto {
            node: vec![branch],
            name: "g".into(),
            ..Default::default()
        };
        refused_for_external(&model_bytes(g));

        // A Scan body given in a GRAPHS list.
        let mut scan = node("Scan", &["X"], &["Y"]);
        scan.attribute.push(AttributeProto {
            name: "bodies".into(),
            graphs: vec![add_graph(external("W", "/etc/passwd"))],
            r#type: 10,
            ..Default::default()
        });
        let g = GraphProto {
            node: vec![scan],
            name: "g".into(),
            ..Default::default()
        };
        refused_for_external(&model_bytes(g));
    }

    #[test]
    fn external_tensors_in_functions_and_training_graphs_are_refused() {
        let mut model = ModelProto::decode(
            model_bytes(add_graph(tensor_f32("W", &[1, 4], &[0.0; 4]))).as_slice(),
        )
        .unwrap();
        let mut with_function = model.clone();
        let mut constant = node("Constant", &[], &["C"]);
        constant
            .attribute
            .push(attr_tensor("value", external("C", "Cargo.toml")));
        with_function.functions.push(FunctionProto {
            name: "f".into(),
            node: vec![constant],
            domain: "ai.onnx".into(),
            ..Default::default()
        });
        refused_for_external(&with_function.encode_to_vec());

        model.training_info.push(TrainingInfoProto {
            initialization: Some(add_graph(external("W", "Cargo.toml"))),
            algorithm: None,
        });
        refused_for_external(&model.encode_to_vec());
    }

    #[test]
    fn domains_outside_the_allow_list_are_refused() {
        let clean = add_graph(tensor_f32("W", &[1, 4], &[0.0; 4]));

        let mut g = clean.clone();
        g.node[0].domain = "com.microsoft".into();
        let e = check_untrusted(&model_bytes(g)).unwrap_err();
        assert!(matches!(e, UntrustedModel::Domain { .. }), "{e}");
        assert!(e.to_string().contains("\"com.microsoft\""), "{e}");

        // A custom op inside a Loop body.
        let mut inner = clean.clone();
        inner.node[0].domain = "my.evil.ops".into();
        let mut looped = node("Loop", &["M", "", "X"], &["Z"]);
        looped.attribute.push(attr_graph("body", inner));
        let g = GraphProto {
            node: vec![looped],
            ..Default::default()
        };
        assert!(matches!(
            check_untrusted(&model_bytes(g)).unwrap_err(),
            UntrustedModel::Domain { .. }
        ));

        let mut model = ModelProto::decode(model_bytes(clean.clone()).as_slice()).unwrap();
        model.opset_import.push(OperatorSetIdProto {
            domain: "com.microsoft".into(),
            version: 1,
        });
        assert!(matches!(
            check_untrusted(&model.encode_to_vec()).unwrap_err(),
            UntrustedModel::Domain { .. }
        ));

        let mut model = ModelProto::decode(model_bytes(clean.clone()).as_slice()).unwrap();
        model.functions.push(FunctionProto {
            name: "f".into(),
            domain: "custom".into(),
            ..Default::default()
        });
        assert!(matches!(
            check_untrusted(&model.encode_to_vec()).unwrap_err(),
            UntrustedModel::Domain { .. }
        ));

        // The standard domains pass, by either spelling.
        let mut model = ModelProto::decode(model_bytes(clean).as_slice()).unwrap();
        model.opset_import.push(OperatorSetIdProto {
            domain: "ai.onnx.ml".into(),
            version: 3,
        });
        model.graph.as_mut().unwrap().node[0].domain = "ai.onnx".into();
        check_untrusted(&model.encode_to_vec()).unwrap();
    }

    #[test]
    fn what_is_not_a_model_is_refused() {
        assert_eq!(check_untrusted(b""), Err(UntrustedModel::NoGraph));
        assert_eq!(
            check_untrusted(&[0xff, 0xff, 0xff, 0xff]),
            Err(UntrustedModel::NotOnnx)
        );
        // Nesting past the decoder's recursion limit fails closed.
        let mut g = add_graph(tensor_f32("W", &[1, 4], &[0.0; 4]));
        for _ in 0..200 {
            let mut n = node("If", &["c"], &["y"]);
            n.attribute.push(attr_graph("then_branch", g));
            g = GraphProto {
                node: vec![n],
                ..Default::default()
            };
        }
        assert_eq!(
            check_untrusted(&model_bytes(g)),
            Err(UntrustedModel::NotOnnx)
        );
    }

    #[test]
    fn long_names_are_shortened() {
        let e =
            check_untrusted(&model_bytes(add_graph(external(&"w".repeat(1000), "x")))).unwrap_err();
        assert!(e.to_string().len() < 300, "{e}");
    }
}
