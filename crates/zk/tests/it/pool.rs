//! Spec version 2 end to end: a CNN with `MaxPool` and MLPs with `Sigmoid` / `Tanh` on the
//! digits (random weights, built as ONNX from Rust): compile, prove, verify, tamper, and
//! out-of-range inputs.

use modelhub_zk::onnx::{
    self, Dimension, FloatLayer, ModelProto, NodeProto, TensorShapeProto, TensorTypeProto,
    TypeProto, mlp_onnx,
};
use modelhub_zk::quant::{SPEC_VERSION, TABLE_OUTPUT_SCALE};
use modelhub_zk::{
    LayerKind, Params, ZkError, commit, compile, dequantize_output, prove, quantize_input,
    reference, verify,
};
use prost::Message;

use crate::cnn::cnn_onnx_with;
use crate::common::{argmax, digits, params_dir};

/// Share of test digits whose quantized argmax equals the float argmax.
fn agreement(model: &modelhub_zk::QuantizedModel, float: &onnx::FloatModel) -> (usize, usize) {
    let d = digits();
    let same = d
        .test
        .iter()
        .filter(|x| {
            let q = reference(model, &quantize_input(&model.spec, x).unwrap()).unwrap();
            argmax(&dequantize_output(&model.spec, &q)) == argmax(&float.forward(x))
        })
        .count();
    (same, d.test.len())
}

/// Proves `x` for real, verifies, and checks that a tampered output or spec is rejected.
fn prove_and_verify(model: &modelhub_zk::QuantizedModel, x: &[f32], job: &str) {
    let spec = &model.spec;
    let params = Params::load_or_create(&params_dir(), spec.k).unwrap();
    let keys = crate::common::stored_keys(&params, spec);
    let (c, o) = commit(model, &params).unwrap();
    let t = std::time::Instant::now();
    let bundle = prove(&params, &keys, model, &c, &o, x, job).unwrap();
    eprintln!("{job}: k = {}, prove {:?}", spec.k, t.elapsed());
    let honest = bundle.public.model_digest;
    verify(&params, &bundle, &honest).unwrap();
    assert_eq!(
        bundle.public.output,
        reference(model, &bundle.public.input).unwrap()
    );
    // The JSON file round-trips (the spec keeps its kinds and tables) and still verifies.
    let back: modelhub_zk::ProofBundle =
        serde_json::from_str(&serde_json::to_string(&bundle).unwrap()).unwrap();
    assert_eq!(back.spec, bundle.spec);
    verify(&params, &back, &honest).unwrap();
    let mut b = bundle.clone();
    b.public.output[0] += 1;
    assert!(matches!(
        crate::common::refused(&params, &b, &honest),
        ZkError::Verification(_)
    ));
    let mut b = bundle.clone();
    b.public.input[10] += 1;
    crate::common::refused(&params, &b, &honest);
    // Another table (one entry changed) or pooling shape: invalid spec or another key.
    let mut b = bundle;
    let layer = b
        .spec
        .layers
        .iter_mut()
        .find(|l| !l.kind.is_linear())
        .unwrap();
    match &mut layer.kind {
        LayerKind::MaxPool(s) => s.stride = [1, 2],
        _ => layer.table[130] += 1,
    }
    assert!(matches!(
        crate::common::refused(&params, &b, &honest),
        ZkError::Verification(_)
    ));
}

#[test]
fn cnn_with_max_pool_compiles_proves_and_verifies() {
    let bytes = cnn_onnx_with("MaxPool", [1, 1, 0, 0], false);
    let float = onnx::parse(&bytes).unwrap();
    assert_eq!(float.layers.len(), 3);
    assert!(matches!(&float.layers[1].kind, LayerKind::MaxPool(s) if s.depthwise));
    assert!(float.layers[0].relu);
    // Relu after MaxPool is the same model (they commute): the ReLU moves onto the conv.
    assert_eq!(
        onnx::parse(&cnn_onnx_with("MaxPool", [1, 1, 0, 0], true)).unwrap(),
        float
    );

    let d = digits();
    let model = compile(&bytes, &d.train).unwrap();
    assert_eq!(model.spec.version, SPEC_VERSION);
    let pool = &model.spec.layers[1];
    assert_eq!(
        (pool.input_scale, pool.output_scale, pool.outputs),
        (model.spec.layers[0].output_scale, pool.input_scale, 36)
    );
    let (same, n) = agreement(&model, &float);
    eprintln!("maxpool cnn: quantized argmax = float argmax on {same}/{n}");
    assert!(same * 100 >= n * 95, "{same}/{n}");
    let json = serde_json::to_string(&model.spec).unwrap();
    assert!(json.contains("\"max_pool\""), "{json}");
    prove_and_verify(&model, &d.test[2], "maxpool-job");
}

/// The test CNN with a `GlobalMaxPool`: 4 channels of 6×6 pooled to one value each, then 4 → 10.
pub fn global_max_cnn() -> Vec<u8> {
    let mut model = ModelProto::decode(cnn_onnx_with("MaxPool", [0; 4], false).as_slice()).unwrap();
    let graph = model.graph.as_mut().unwrap();
    let pool = graph
        .node
        .iter_mut()
        .find(|n| n.op_type == "MaxPool")
        .unwrap();
    pool.op_type = "GlobalMaxPool".into();
    pool.attribute.clear();
    let gw = graph
        .initializer
        .iter_mut()
        .find(|i| i.name == "gw")
        .unwrap();
    *gw = crate::cnn::floats("gw", &[10, 4], 13, 1.0);
    model.encode_to_vec()
}

#[test]
fn cnn_with_global_max_pool_proves_and_verifies() {
    let bytes = global_max_cnn();

    let float = onnx::parse(&bytes).unwrap();
    let LayerKind::MaxPool(s) = &float.layers[1].kind else {
        panic!("{:?}", float.layers[1].kind)
    };
    assert_eq!((s.kernel, float.layers[1].outputs), ([6, 6], 4));
    let d = digits();
    let model = compile(&bytes, &d.train).unwrap();
    let (same, n) = agreement(&model, &float);
    eprintln!("global max pool cnn: quantized argmax = float argmax on {same}/{n}");
    assert!(same * 100 >= n * 95, "{same}/{n}");
    prove_and_verify(&model, &d.test[6], "global-maxpool-job");
}

/// 64 → 24 → `act` → 10 with random weights (input "input", output "output").
pub fn act_mlp(act: &str) -> Vec<u8> {
    let layer = |inputs: usize, outputs: usize, seed: u64| {
        let mut s = seed;
        let mut next = move || {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 6.0 / (inputs as f32).sqrt()
        };
        FloatLayer {
            kind: LayerKind::Dense,
            inputs,
            outputs,
            weights: (0..inputs * outputs).map(|_| next()).collect(),
            bias: (0..outputs).map(|_| next() * 0.3).collect(),
            relu: false,
        }
    };
    let bytes = mlp_onnx(&[layer(64, 24, 21), layer(24, 10, 22)]);
    let mut model = ModelProto::decode(bytes.as_slice()).unwrap();
    let graph = model.graph.as_mut().unwrap();
    graph.node.insert(
        1,
        NodeProto {
            input: vec!["gemm0".into()],
            output: vec!["act".into()],
            name: "act".into(),
            op_type: act.into(),
            ..Default::default()
        },
    );
    graph.node[2].input[0] = "act".into();
    // Typed input and output, so that onnxruntime loads it (tests/data/check_cnn.py).
    let float_type = |dims: &[i64]| {
        Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: 1,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension {
                            dim_value: d,
                            dim_param: String::new(),
                        })
                        .collect(),
                }),
            }),
        })
    };
    graph.input[0].r#type = float_type(&[1, 64]);
    graph.output[0].r#type = float_type(&[1, 10]);
    model.encode_to_vec()
}

#[test]
fn sigmoid_mlp_proves_and_verifies_and_fails_cleanly_out_of_range() {
    let bytes = act_mlp("Sigmoid");
    let float = onnx::parse(&bytes).unwrap();
    assert_eq!(float.layers[1].kind, LayerKind::Sigmoid);
    let d = digits();
    let model = compile(&bytes, &d.train).unwrap();
    let spec = &model.spec;
    assert_eq!(spec.version, SPEC_VERSION);
    let sig = &spec.layers[1];
    assert_eq!(
        (sig.output_scale, sig.table.len()),
        (TABLE_OUTPUT_SCALE, 256)
    );
    assert_eq!(spec.layers[2].input_scale, TABLE_OUTPUT_SCALE);
    let (same, n) = agreement(&model, &float);
    eprintln!("sigmoid mlp: quantized argmax = float argmax on {same}/{n}");
    assert!(same * 100 >= n * 90, "{same}/{n}");
    prove_and_verify(&model, &d.test[4], "sigmoid-job");

    // Far from the calibration data, aligned with a hidden neuron's weights: the
    // pre-activation leaves the table's domain, a clean OutOfRange (never a panic or a proof).
    let w0 = &float.layers[0].weights[..64];
    let big: Vec<f32> = w0
        .iter()
        .map(|w| if *w > 0.0 { 1.9 } else { -1.9 })
        .collect();
    let x = quantize_input(spec, &big).unwrap();
    let err = reference(&model, &x).unwrap_err();
    assert!(matches!(err, ZkError::OutOfRange { .. }), "{err}");
    assert_eq!(err.code(), modelhub_core::ErrorCode::BadRequest);
    let params = Params::load_or_create(&params_dir(), spec.k).unwrap();
    let keys = crate::common::stored_keys(&params, spec);
    let (c, o) = commit(&model, &params).unwrap();
    let err = prove(&params, &keys, &model, &c, &o, &big, "j").unwrap_err();
    assert!(matches!(err, ZkError::OutOfRange { .. }), "{err}");
    let mut x = d.test[0].clone();
    x[3] = 1e6;
    let err = prove(&params, &keys, &model, &c, &o, &x, "j").unwrap_err();
    assert!(matches!(err, ZkError::OutOfRange { .. }), "{err}");
}

#[test]
fn tanh_mlp_keeps_the_argmax_and_its_spec_validates() {
    let bytes = act_mlp("Tanh");
    let float = onnx::parse(&bytes).unwrap();
    let model = compile(&bytes, &digits().train).unwrap();
    assert_eq!(model.spec.layers[1].kind, LayerKind::Tanh);
    model.spec.validate().unwrap();
    let (same, n) = agreement(&model, &float);
    eprintln!("tanh mlp: quantized argmax = float argmax on {same}/{n}");
    assert!(same * 100 >= n * 90, "{same}/{n}");
    // A spec whose table does not match its function and scales is refused.
    let mut spec = model.spec.clone();
    spec.layers[1].table[0] += 1;
    assert!(matches!(spec.validate(), Err(ZkError::Verification(_))));
    let mut spec = model.spec.clone();
    spec.version = 1;
    assert!(matches!(spec.validate(), Err(ZkError::Verification(_))));
}
