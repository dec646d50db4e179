//! Predictions end to end: accuracy against onnxruntime, input checks, the session cache,
//! storage outages.

use modelhub_core::{DataType, ErrorCode, Tensor};
use modelhub_testkit::digits_expected;

use crate::harness::{assert_code, digits, predict, start, upload};

fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn labels(t: &Tensor) -> Vec<i64> {
    assert_eq!((t.name.as_str(), t.datatype), ("label", DataType::Int64));
    t.data
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn assert_close(got: &Tensor, want: &[f32]) {
    assert_eq!(got.name, "probabilities");
    let got = got.as_f32().unwrap();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-5, "element {i}: got {g}, want {w}");
    }
}

#[tokio::test]
async fn predictions_match_onnxruntime_and_hit_the_cache() {
    let mut c = start().await;
    let model = upload(&mut c.storage, "mdl_digits", &digits()).await;
    let expected = digits_expected();

    for case in expected["cases"].as_array().unwrap() {
        let x = Tensor::from_f32("X", vec![1, 64], &f32s(&case["input"])).unwrap();
        let out = predict(&mut c.inference, &model, vec![x]).await.unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(labels(&out[0]), vec![case["label"].as_i64().unwrap()]);
        assert_eq!(out[1].shape, vec![1, 10]);
        assert_close(&out[1], &f32s(&case["probabilities"]));
    }

    let batch = &expected["batch"];
    let x = Tensor::from_f32("X", vec![8, 64], &f32s(&batch["input"])).unwrap();
    let out = predict(&mut c.inference, &model, vec![x]).await.unwrap();
    let want: Vec<i64> = batch["label"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(labels(&out[0]), want);
    assert_eq!(out[1].shape, vec![8, 10]);
    assert_close(&out[1], &f32s(&batch["probabilities"]));

    let stats = c.service.cache_stats().await;
    assert_eq!(
        stats.loads, 1,
        "the model was fetched and opened once: {stats:?}"
    );
    assert_eq!(
        stats.hits, 8,
        "every predict after the first hit the cache: {stats:?}"
    );
    assert_eq!(stats.entries, 1);
    assert_eq!(stats.weighted_bytes, digits().len() as u64);

    c.inference_server.stop().await;
    c.storage_server.stop().await;
}

#[tokio::test]
async fn concurrent_first_predicts_load_the_model_once() {
    let c = start().await;
    let mut storage = c.storage.clone();
    let model = upload(&mut storage, "mdl_flight", &digits()).await;
    let x = Tensor::from_f32("X", vec![1, 64], &[0.5; 64]).unwrap();
    let calls = (0..6).map(|_| {
        let mut client = c.inference.clone();
        let (model, x) = (model.clone(), x.clone());
        async move { predict(&mut client, &model, vec![x]).await }
    });
    for r in futures::future::join_all(calls).await {
        assert_eq!(r.unwrap().len(), 2);
    }
    assert_eq!(c.service.cache_stats().await.loads, 1);
}

#[tokio::test]
async fn bad_inputs_are_bad_requests_that_name_the_problem() {
    let mut c = start().await;
    let model = upload(&mut c.storage, "mdl_bad", &digits()).await;

    let wrong_name = Tensor::from_f32("x", vec![1, 64], &[0.0; 64]).unwrap();
    let e = predict(&mut c.inference, &model, vec![wrong_name])
        .await
        .unwrap_err();
    assert_code(&e, ErrorCode::BadRequest);
    assert!(e.message.contains("unknown input \"x\""), "{}", e.message);

    let wrong_shape = Tensor::from_f32("X", vec![1, 63], &[0.0; 63]).unwrap();
    let e = predict(&mut c.inference, &model, vec![wrong_shape])
        .await
        .unwrap_err();
    assert_code(&e, ErrorCode::BadRequest);
    assert!(
        e.message.contains("expected shape [-1, 64]"),
        "{}",
        e.message
    );

    let wrong_type = Tensor::new("X", vec![1, 64], DataType::Fp64, vec![0; 512]).unwrap();
    let e = predict(&mut c.inference, &model, vec![wrong_type])
        .await
        .unwrap_err();
    assert_code(&e, ErrorCode::BadRequest);
    assert!(
        e.message.contains("expected datatype FP32, got FP64"),
        "{}",
        e.message
    );

    let e = predict(&mut c.inference, &model, vec![]).await.unwrap_err();
    assert_code(&e, ErrorCode::BadRequest);
    assert!(e.message.contains("missing input \"X\""), "{}", e.message);

    // A tensor whose bytes do not fit its shape never reaches the model.
    let raw = modelhub_proto::common::v1::Tensor {
        name: "X".into(),
        shape: vec![1, 64],
        datatype: DataType::Fp32.to_proto() as i32,
        data: vec![0; 7],
    };
    let status = c
        .inference
        .predict(modelhub_proto::inference::v1::PredictRequest {
            model: Some(model.clone()),
            inputs: vec![raw],
            ..Default::default()
        })
        .await
        .unwrap_err();
    let e = modelhub_core::ApiError::from_status(&status);
    assert_code(&e, ErrorCode::BadRequest);
    assert!(e.message.contains("needs 256 bytes"), "{}", e.message);
}

#[tokio::test]
async fn without_storage_only_cached_models_answer() {
    let mut c = start().await;
    let cached = upload(&mut c.storage, "mdl_cached", &digits()).await;
    let uncached = upload(&mut c.storage, "mdl_uncached", &digits()).await;
    let x = Tensor::from_f32("X", vec![1, 64], &[0.25; 64]).unwrap();
    let before = predict(&mut c.inference, &cached, vec![x.clone()])
        .await
        .unwrap();

    c.storage_server.stop().await;

    let e = predict(&mut c.inference, &uncached, vec![x.clone()])
        .await
        .unwrap_err();
    assert_code(&e, ErrorCode::Unavailable);
    let after = predict(&mut c.inference, &cached, vec![x]).await.unwrap();
    assert_eq!(after, before);
    assert_eq!(c.service.cache_stats().await.loads, 1);
}

#[tokio::test]
async fn a_model_reference_storage_rejects_is_not_cached() {
    let mut c = start().await;
    let mut model = upload(&mut c.storage, "mdl_wrongkey", &digits()).await;
    model.wrapped_dek[20] ^= 1;
    let x = Tensor::from_f32("X", vec![1, 64], &[0.0; 64]).unwrap();
    let e = predict(&mut c.inference, &model, vec![x])
        .await
        .unwrap_err();
    assert_code(&e, ErrorCode::Internal);
    let stats = c.service.cache_stats().await;
    assert_eq!((stats.loads, stats.entries), (0, 0));
}
