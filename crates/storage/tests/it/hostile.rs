//! Hostile uploads: models that point at files of the server or use custom operator domains
//! are refused before ONNX Runtime sees them, with a clean message, and nothing is stored.

use modelhub_core::ErrorCode;
use modelhub_onnx::untrusted::proto::*;

use crate::harness::{code, put, start, upload};

fn entry(k: &str, v: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: k.into(),
        value: v.into(),
    }
}

/// `Y = X + W`, `W` read from the file `location`.
fn external_weights(location: &str) -> Vec<u8> {
    model_bytes(add_graph(external("W", location)))
}

/// A `Loop` whose body's `Constant` reads the file `location`.
fn external_in_loop_body(location: &str) -> Vec<u8> {
    let c = TensorProto {
        dims: vec![1, 16],
        data_type: FLOAT,
        name: "C".into(),
        external_data: vec![entry("location", location)],
        data_location: 1,
        ..Default::default()
    };
    let mut constant = node("Constant", &[], &["c"]);
    constant.attribute.push(attr_tensor("value", c));
    let body = GraphProto {
        node: vec![
            constant,
            node("Identity", &["cond_in"], &["cond_out"]),
            node("Add", &["v_in", "c"], &["v_out"]),
        ],
        name: "body".into(),
        input: vec![
            value_info("i", INT64, &[]),
            value_info("cond_in", 9, &[]),
            value_info("v_in", FLOAT, &[1, 16]),
        ],
        output: vec![
            value_info("cond_out", 9, &[]),
            value_info("v_out", FLOAT, &[1, 16]),
        ],
        ..Default::default()
    };
    let mut looped = node("Loop", &["M", "", "X"], &["Y"]);
    looped.attribute.push(attr_graph("body", body));
    model_bytes(GraphProto {
        node: vec![looped],
        name: "g".into(),
        initializer: vec![tensor_i64("M", &[], &[1])],
        input: vec![value_info("X", FLOAT, &[1, 16])],
        output: vec![value_info("Y", FLOAT, &[1, 16])],
        ..Default::default()
    })
}

#[tokio::test]
async fn external_data_and_custom_domains_are_refused_and_nothing_is_stored() {
    let mut s = start(|_| {}).await;
    // The service's working directory is the crate's: Cargo.toml is in reach of a relative path.
    let mut custom = add_graph(tensor_f32("W", &[1, 4], &[0.5; 4]));
    custom.node[0].domain = "com.microsoft".into();
    let cases = [
        ("relative", external_weights("Cargo.toml")),
        ("parent", external_weights("../../Cargo.toml")),
        ("absolute", external_weights("/etc/hostname")),
        ("subgraph", external_in_loop_body("Cargo.toml")),
        ("domain", model_bytes(custom)),
    ];
    for (i, (what, bytes)) in cases.iter().enumerate() {
        let status = put(&mut s.client, upload(&format!("mdl_h{i}"), "1", bytes, 100))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{what}");
        assert_eq!(code(&status), ErrorCode::Unprocessable, "{what}");
        let message = status.message();
        assert!(message.starts_with("model refused: "), "{what}: {message}");
        for leak in ["Cargo", "hostname", "file_length", "/", "16"] {
            assert!(!message.contains(leak), "{what}: {leak:?} in {message}");
        }
        assert!(s.blob_files().is_empty(), "{what}: something was stored");
    }
    // The same graph with its weights inside is stored.
    let clean = model_bytes(add_graph(tensor_f32("W", &[1, 4], &[0.5; 4])));
    put(&mut s.client, upload("mdl_clean", "1", &clean, 100))
        .await
        .unwrap();
    assert_eq!(s.blob_files().len(), 1);
    s.stop().await;
}
