//! The digits MLP: signature, outputs against onnxruntime (Python), batches, bad bytes.

use modelhub_core::{DataType, ErrorCode, Tensor, TensorSpec};
use modelhub_testkit::{digits_expected, test_model};

fn digits_bytes() -> Vec<u8> {
    crate::setup();
    std::fs::read(test_model("digits_mlp.onnx")).expect("read digits model")
}

fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn i64s(t: &Tensor) -> Vec<i64> {
    assert_eq!(t.datatype, DataType::Int64);
    t.data
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-5, "element {i}: got {g}, want {w}");
    }
}

#[test]
fn signature_is_read_from_the_graph() {
    crate::setup();
    let threads: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(modelhub_onnx::init))
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    modelhub_onnx::init().unwrap();
    let (inputs, outputs) = modelhub_onnx::inspect(&digits_bytes()).unwrap();
    assert_eq!(
        inputs,
        vec![TensorSpec {
            name: "X".into(),
            datatype: DataType::Fp32,
            shape: vec![-1, 64]
        }]
    );
    assert_eq!(
        outputs,
        vec![
            TensorSpec {
                name: "label".into(),
                datatype: DataType::Int64,
                shape: vec![-1]
            },
            TensorSpec {
                name: "probabilities".into(),
                datatype: DataType::Fp32,
                shape: vec![-1, 10]
            },
        ]
    );
    let model = modelhub_onnx::load(&digits_bytes(), 1).unwrap();
    assert_eq!(model.inputs(), inputs.as_slice());
    assert_eq!(model.outputs(), outputs.as_slice());
}

#[test]
fn each_row_matches_onnxruntime() {
    let expected = digits_expected();
    let mut model = modelhub_onnx::load(&digits_bytes(), 1).unwrap();
    let cases = expected["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    for case in cases {
        let x = Tensor::from_f32("X", vec![1, 64], &f32s(&case["input"])).unwrap();
        let out = model.run(&[x]).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].name, "label");
        assert_eq!(out[0].shape, vec![1]);
        assert_eq!(i64s(&out[0]), vec![case["label"].as_i64().unwrap()]);
        assert_eq!(out[1].name, "probabilities");
        assert_eq!(out[1].shape, vec![1, 10]);
        assert_close(&out[1].as_f32().unwrap(), &f32s(&case["probabilities"]));
    }
}

#[test]
fn a_batch_matches_onnxruntime() {
    let expected = &digits_expected()["batch"];
    let mut model = modelhub_onnx::load(&digits_bytes(), 2).unwrap();
    let x = Tensor::from_f32("X", vec![8, 64], &f32s(&expected["input"])).unwrap();
    let out = model.run(&[x]).unwrap();
    let labels: Vec<i64> = expected["label"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(i64s(&out[0]), labels);
    assert_eq!(out[1].shape, vec![8, 10]);
    assert_close(&out[1].as_f32().unwrap(), &f32s(&expected["probabilities"]));
}

#[test]
fn bad_inputs_are_bad_requests() {
    let mut model = modelhub_onnx::load(&digits_bytes(), 1).unwrap();
    let wrong_shape = Tensor::from_f32("X", vec![1, 3], &[0.0; 3]).unwrap();
    let e = model.run(&[wrong_shape]).unwrap_err();
    assert_eq!(e.code(), ErrorCode::BadRequest);
    assert!(e.to_string().contains("expected shape"), "{e}");
    let wrong_type = Tensor::new("X", vec![1, 64], DataType::Fp64, vec![0; 512]).unwrap();
    let e = model.run(&[wrong_type]).unwrap_err();
    assert_eq!(e.code(), ErrorCode::BadRequest);
    let short = Tensor {
        name: "X".into(),
        shape: vec![1, 64],
        datatype: DataType::Fp32,
        data: vec![0; 10],
    };
    let e = model.run(&[short]).unwrap_err();
    assert_eq!(e.code(), ErrorCode::BadRequest);
    assert!(e.to_string().contains("needs 256 bytes"), "{e}");
}

#[test]
fn bytes_that_are_not_a_model_are_unprocessable() {
    let junk = std::fs::read(test_model("not_onnx.bin")).unwrap();
    let e = modelhub_onnx::inspect(&junk).unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unprocessable);
    assert!(
        e.to_string().starts_with("not a loadable ONNX model: "),
        "{e}"
    );

    let bytes = digits_bytes();
    for cut in [0, 1, 10, bytes.len() / 2, bytes.len() - 1] {
        let e = modelhub_onnx::load(&bytes[..cut], 1).unwrap_err();
        assert_eq!(e.code(), ErrorCode::Unprocessable, "cut at {cut}: {e}");
        assert!(!e.to_string().contains('/'), "{e}");
    }
}

#[test]
fn every_generated_test_model_passes_the_untrusted_check() {
    let dir = modelhub_testkit::test_models();
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "onnx") {
            let bytes = std::fs::read(&path).unwrap();
            modelhub_onnx::check_untrusted(&bytes)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} models");
}
