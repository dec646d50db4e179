//! Upload a model and get predictions from it that match onnxruntime's.

use serde_json::json;

use crate::harness::*;

async fn upload_then_predict_matches_onnxruntime(backend: Backend) {
    let cluster = Cluster::start_on(backend).await;
    let creator = cluster.user("creator", 0).await;
    let user = cluster.user("user", 1000).await;

    let record = upload_digits(&creator, "digits", 2).await;
    let bytes = digits_bytes();
    assert_eq!(record["owner"], creator.key().account_id.as_str());
    assert_eq!(record["name"], "digits");
    assert_eq!(record["version"], "1");
    assert_eq!(record["price"], 2);
    assert_eq!(record["size"], bytes.len());
    assert_eq!(record["sha256"], modelhub_core::signing::sha256_hex(&bytes));
    assert!(
        record["cid"].as_str().unwrap().starts_with("bafk"),
        "CIDv1 of the ciphertext: {}",
        record["cid"]
    );
    // Its MLP compiles into a circuit (the proof covers the logits under the Softmax head).
    assert!(
        record["commitment"].as_str().is_some_and(|c| !c.is_empty()),
        "{record}"
    );
    assert!(record["circuit_spec"]["k"].is_u64(), "{record}");
    assert_eq!(record["zk_note"], serde_json::Value::Null);
    assert_eq!(
        record["inputs"],
        json!([{ "name": "X", "datatype": "FP32", "shape": [-1, 64] }])
    );
    assert_eq!(
        record["outputs"],
        json!([
            { "name": "label", "datatype": "INT64", "shape": [-1] },
            { "name": "probabilities", "datatype": "FP32", "shape": [-1, 10] }
        ])
    );
    assert!(
        record.get("wrapped_dek").is_none(),
        "the wrapped key never leaves the services"
    );

    let model_id = record["model_id"].as_str().unwrap();
    let listed = user.get("/v1/models").await.unwrap().ok().unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["model_id"] == model_id)
    );
    let fetched = user
        .get(&format!("/v1/models/{model_id}"))
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(fetched, record);

    for case in 0..8 {
        let answer = user
            .predict(model_id, digits_input(case))
            .await
            .unwrap()
            .ok()
            .unwrap();
        assert_matches_onnxruntime(&answer, case);
        assert_eq!(answer["receipt"]["credits_charged"], 2);
        assert_eq!(answer["proof_job"], serde_json::Value::Null);
    }

    // A batch of all eight rows at once.
    let expected = modelhub_testkit::digits_expected();
    let batch = &expected["batch"];
    let answer = user
        .predict(model_id, json!([{ "name": "X", "shape": batch["shape"], "datatype": "FP32", "data": batch["input"] }]))
        .await
        .unwrap()
        .ok()
        .unwrap();
    let label = answer["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "label")
        .unwrap();
    assert_eq!(label["data"], batch["label"]);
    assert_eq!(label["shape"], json!([8]));
    cluster.stop().await;
}

async fn the_ciphertext_is_stored_not_the_model(backend: Backend) {
    let cluster = Cluster::start_on(backend).await;
    let creator = cluster.user("creator", 0).await;
    let record = upload_digits(&creator, "digits", 1).await;
    let cid = record["cid"].as_str().unwrap();
    let plain = digits_bytes();
    let probe = &plain[plain.len() / 2..plain.len() / 2 + 64];
    let mut found = false;
    for entry in walk(&cluster.data_dir()) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes.windows(64).any(|w| w == probe),
            "plaintext model bytes found on disk in {}",
            entry.display()
        );
        if entry.file_name().is_some_and(|n| n == cid) {
            found = true;
            assert!(bytes.starts_with(b"MHE1"), "blob is in the envelope format");
        }
    }
    if let Some(api) = cluster.ipfs_api() {
        use futures::TryStreamExt;
        use modelhub_storage::BlobStore;
        assert!(!found, "with IPFS nothing is stored locally");
        let node = modelhub_storage::IpfsBlobStore::new(api, Default::default()).unwrap();
        assert!(
            node.pins().await.unwrap().contains(cid),
            "the blob is pinned on the node"
        );
        let chunks: Vec<bytes::Bytes> = node.get(cid).await.unwrap().try_collect().await.unwrap();
        let bytes = chunks.concat();
        assert!(
            bytes.starts_with(b"MHE1"),
            "the node holds the envelope, not the model"
        );
        assert!(!bytes.windows(64).any(|w| w == probe));
    } else {
        assert!(found, "a blob named by its CID exists");
    }
    cluster.stop().await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

crate::on_every_backend!(
    upload_then_predict_matches_onnxruntime,
    the_ciphertext_is_stored_not_the_model
);

/// The Python client of docs/examples (standard library only) signs a keyed predict the
/// gateway accepts and charges once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_python_client_predicts() {
    let cluster = Cluster::start().await;
    let creator = cluster.user("creator", 0).await;
    let user = cluster.user("user", 10).await;
    let record = upload_digits(&creator, "digits", 2).await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key.json");
    user.key().write_new(&key_file).unwrap();
    let script = modelhub_testkit::workspace_root().join("docs/examples/predict.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .arg(user.base_url())
        .arg(&key_file)
        .arg(record["model_id"].as_str().unwrap())
        .arg(digits_input(2).to_string())
        .output()
        .await
        .expect("python3 runs (scripts/ need it too)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_matches_onnxruntime(&answer, 2);
    assert_eq!(answer["receipt"]["credits_charged"], 2);
    assert_eq!(account(&user).await["credits"], 8);
    cluster.stop().await;
}
