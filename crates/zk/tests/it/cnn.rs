//! A small CNN (Reshape → Conv 3×3 → Relu → AveragePool 2×2 → Flatten → Gemm) on the digits,
//! built as ONNX from Rust with random weights: compile, prove, verify, tamper.

use modelhub_zk::onnx::{
    AttributeProto, Dimension, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TensorTypeProto, TypeProto, ValueInfoProto,
};
use modelhub_zk::{
    LayerKind, Params, commit, compile, dequantize_output, onnx, prove, quantize_input, reference,
    verify,
};
use prost::Message;

use crate::common::{argmax, digits, params_dir};

pub fn floats(name: &str, dims: &[i64], seed: u64, scale: f32) -> TensorProto {
    let n: i64 = dims.iter().product();
    let mut s = seed;
    let data = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect();
    TensorProto {
        dims: dims.to_vec(),
        data_type: 1,
        float_data: data,
        name: name.into(),
        ..Default::default()
    }
}

pub fn ints_attr(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: v.to_vec(),
        r#type: 7,
        ..Default::default()
    }
}

pub fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: output.into(),
        op_type: op.into(),
        attribute,
        domain: String::new(),
    }
}

/// The CNN as ONNX bytes (input "X" `[1, 64]`, output "logits" `[1, 10]`).
pub fn cnn_onnx() -> Vec<u8> {
    cnn_onnx_with("AveragePool", [0; 4], false)
}

/// The CNN with `pool` ("AveragePool" or "MaxPool") as its pooling (with `pads`: a 6×6 map
/// padded `[1, 1, 0, 0]` still pools to 3×3), and the `Relu` after the pooling instead of
/// before it if `relu_after_pool`.
pub fn cnn_onnx_with(pool: &str, pads: [i64; 4], relu_after_pool: bool) -> Vec<u8> {
    let pool_node = |input: &str, output: &str| {
        node(
            pool,
            &[input],
            output,
            vec![
                ints_attr("kernel_shape", &[2, 2]),
                ints_attr("strides", &[2, 2]),
                ints_attr("pads", &pads),
            ],
        )
    };
    let body = if relu_after_pool {
        [
            pool_node("conv", "pooled"),
            node("Relu", &["pooled"], "pool", vec![]),
        ]
    } else {
        [
            node("Relu", &["conv"], "relu", vec![]),
            pool_node("relu", "pool"),
        ]
    };
    let shape = TensorProto {
        dims: vec![4],
        data_type: 7,
        int64_data: vec![1, 1, 8, 8],
        name: "shape".into(),
        ..Default::default()
    };
    let graph = GraphProto {
        node: vec![
            node("Reshape", &["X", "shape"], "img", vec![]),
            node(
                "Conv",
                &["img", "cw", "cb"],
                "conv",
                vec![
                    ints_attr("kernel_shape", &[3, 3]),
                    ints_attr("pads", &[0, 0, 0, 0]),
                ],
            ),
            body[0].clone(),
            body[1].clone(),
            node("Flatten", &["pool"], "flat", vec![]),
            node(
                "Gemm",
                &["flat", "gw", "gb"],
                "logits",
                vec![AttributeProto {
                    name: "transB".into(),
                    i: 1,
                    r#type: 2,
                    ..Default::default()
                }],
            ),
        ],
        name: "cnn".into(),
        initializer: vec![
            shape,
            floats("cw", &[4, 1, 3, 3], 11, 1.0),
            floats("cb", &[4], 12, 0.2),
            floats("gw", &[10, 36], 13, 1.0),
            floats("gb", &[10], 14, 0.2),
        ],
        input: vec![ValueInfoProto {
            name: "X".into(),
            r#type: Some(TypeProto {
                tensor_type: Some(TensorTypeProto {
                    elem_type: 1,
                    shape: Some(TensorShapeProto {
                        dim: vec![
                            Dimension {
                                dim_value: 1,
                                dim_param: String::new(),
                            },
                            Dimension {
                                dim_value: 64,
                                dim_param: String::new(),
                            },
                        ],
                    }),
                }),
            }),
        }],
        output: vec![ValueInfoProto {
            name: "logits".into(),
            r#type: None,
        }],
    };
    ModelProto {
        ir_version: 8,
        producer_name: "modelhub-zk-tests".into(),
        graph: Some(graph),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
    }
    .encode_to_vec()
}

#[test]
fn cnn_compiles_proves_and_verifies() {
    let bytes = cnn_onnx();
    let float = onnx::parse(&bytes).unwrap();
    assert_eq!(float.layers.len(), 3);
    assert!(matches!(float.layers[0].kind, LayerKind::Conv(_)));
    assert!(matches!(&float.layers[1].kind, LayerKind::Conv(c) if c.depthwise));
    assert_eq!(
        (float.layers[0].outputs, float.layers[1].outputs),
        (144, 36)
    );

    let d = digits();
    let model = compile(&bytes, &d.train).unwrap();
    let spec = &model.spec;
    // The quantized CNN keeps the float CNN's argmax on nearly all test digits.
    let same = d
        .test
        .iter()
        .filter(|x| {
            let q = reference(&model, &quantize_input(spec, x).unwrap()).unwrap();
            argmax(&dequantize_output(spec, &q)) == argmax(&float.forward(x))
        })
        .count();
    eprintln!(
        "cnn: k = {}, quantized argmax = float argmax on {same}/{}",
        spec.k,
        d.test.len()
    );
    assert!(same * 100 >= d.test.len() * 95, "{same}");

    let params = Params::load_or_create(&params_dir(), spec.k).unwrap();
    let keys = crate::common::stored_keys(&params, spec);
    let (c, o) = commit(&model, &params).unwrap();
    let t = std::time::Instant::now();
    let bundle = prove(&params, &keys, &model, &c, &o, &d.test[1], "cnn-job").unwrap();
    eprintln!("cnn prove {:?}", t.elapsed());
    let honest = bundle.public.model_digest;
    verify(&params, &bundle, &honest).unwrap();
    let json = serde_json::to_string(&bundle).unwrap();
    assert!(json.contains("\"conv\""), "the spec names the conv shape");

    let mut b = bundle.clone();
    b.public.output[0] += 1;
    crate::common::refused(&params, &b, &honest);
    let mut b = bundle.clone();
    b.public.input[30] += 1;
    crate::common::refused(&params, &b, &honest);
    let mut b = bundle;
    if let LayerKind::Conv(cs) = &mut b.spec.layers[0].kind {
        cs.stride = [1, 2];
    }
    crate::common::refused(&params, &b, &honest);
}

/// Writes the test models for a cross-check of the float forward pass against onnxruntime
/// (see tests/data/check_cnn.py): the CNN, the CNN with a padded MaxPool, and the Sigmoid and
/// Tanh MLPs of the `pool` tests.
#[test]
#[ignore = "writes target/zk-*.onnx and their float outputs for a manual cross-check"]
fn write_cnn_for_onnxruntime() {
    let root = modelhub_testkit::workspace_root();
    let models = [
        ("zk-cnn", cnn_onnx()),
        (
            "zk-cnn-maxpool",
            cnn_onnx_with("MaxPool", [1, 1, 0, 0], false),
        ),
        ("zk-cnn-global-maxpool", crate::pool::global_max_cnn()),
        ("zk-mlp-sigmoid", crate::pool::act_mlp("Sigmoid")),
        ("zk-mlp-tanh", crate::pool::act_mlp("Tanh")),
    ];
    for (name, bytes) in models {
        std::fs::write(root.join(format!("target/{name}.onnx")), &bytes).unwrap();
        let float = onnx::parse(&bytes).unwrap();
        let out: Vec<Vec<f32>> = digits().test[..5]
            .iter()
            .map(|x| float.forward(x))
            .collect();
        let json = serde_json::json!({"inputs": &digits().test[..5], "outputs": out});
        std::fs::write(root.join(format!("target/{name}.json")), json.to_string()).unwrap();
    }
}
