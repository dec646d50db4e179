//! Hostile models at run time: a model in storage that refers to external data or a custom
//! operator domain is refused before a session is built.

use modelhub_core::{ErrorCode, Tensor};
use modelhub_onnx::untrusted::proto::*;

use crate::harness::{assert_code, plant, predict, start, upload};

#[tokio::test]
async fn a_hostile_model_already_in_storage_is_refused_before_a_session_is_built() {
    let mut c = start().await;
    // Storage is up (and has made its KEK) once it has answered an upload.
    let clean = model_bytes(add_graph(tensor_f32("W", &[1, 4], &[1.0; 4])));
    let uploaded = upload(&mut c.storage, "mdl_clean", &clean).await;
    let mut custom = add_graph(tensor_f32("W", &[1, 4], &[1.0; 4]));
    custom.node[0].domain = "com.microsoft".into();
    let x = Tensor::from_f32("X", vec![1, 4], &[0.0; 4]).unwrap();
    for (id, bytes) in [
        (
            "mdl_external",
            model_bytes(add_graph(external("W", "Cargo.toml"))),
        ),
        ("mdl_custom", model_bytes(custom)),
    ] {
        let model = plant(c.data.path(), id, &bytes).await;
        let e = predict(&mut c.inference, &model, vec![x.clone()])
            .await
            .unwrap_err();
        assert_code(&e, ErrorCode::Unprocessable);
        assert!(e.message.starts_with("model refused: "), "{}", e.message);
        assert!(!e.message.contains("Cargo"), "{}", e.message);
    }
    let stats = c.service.cache_stats().await;
    assert_eq!((stats.loads, stats.entries), (0, 0));

    // A clean model planted the same way runs: the refusal is the check's.
    let planted = plant(c.data.path(), "mdl_planted", &clean).await;
    assert_eq!(uploaded.sha256, planted.sha256);
    let y = predict(&mut c.inference, &planted, vec![x]).await.unwrap();
    assert_eq!(y[0].as_f32().unwrap(), vec![1.0; 4]);
}
