//! Model blobs on IPFS: a node that goes away makes uploads fail cleanly while cached models
//! keep answering; `modelhub storage export --to-ipfs` and `storage verify` reconcile stores.

use std::process::Command;

use modelhub_cli::client::ModelUpload;
use serde_json::Value;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipfs_down_fails_uploads_with_503_and_cached_models_keep_answering() {
    let cluster = Cluster::start_on(Backend::Ipfs).await;
    let creator = cluster.user("creator", 0).await;
    let user = cluster.user("user", 10).await;
    let record = upload_digits(&creator, "digits", 1).await;
    let model_id = record["model_id"].as_str().unwrap();
    user.predict(model_id, digits_input(0))
        .await
        .unwrap()
        .ok()
        .unwrap();

    cluster.stop_servers();
    let answer = creator
        .upload(&ModelUpload::new("digits", "2", 1), digits_bytes())
        .await
        .unwrap();
    assert_error(&answer, 503, "unavailable", "IPFS");
    let models = creator.get("/v1/models").await.unwrap().ok().unwrap();
    assert_eq!(
        models.as_array().unwrap().len(),
        1,
        "a failed upload leaves no registry record"
    );

    let answer = user
        .predict(model_id, digits_input(1))
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_matches_onnxruntime(&answer, 1);
    assert_eq!(account(&user).await["credits"], 8);
    cluster.stop().await;
}

/// Deleting a model removes its record and its blob (on IPFS: the pin).
async fn deleting_a_model_removes_its_blob(backend: Backend) {
    let cluster = Cluster::start_on(backend).await;
    let creator = cluster.user("creator", 0).await;
    let other = cluster.user("other", 0).await;
    let record = upload_digits(&creator, "digits", 1).await;
    let model_id = record["model_id"].as_str().unwrap();
    let cid = record["cid"].as_str().unwrap();
    let held = || async {
        match cluster.ipfs_api() {
            Some(api) => {
                let node = modelhub_storage::IpfsBlobStore::new(api, Default::default()).unwrap();
                node.pins().await.unwrap().contains(cid)
            }
            None => cluster.data_dir().join("storage/blobs").join(cid).exists(),
        }
    };
    assert!(held().await);

    let answer = other
        .delete(&format!("/v1/models/{model_id}"))
        .await
        .unwrap();
    assert_error(&answer, 403, "forbidden", "owner");
    assert!(held().await);

    let answer = creator
        .delete(&format!("/v1/models/{model_id}"))
        .await
        .unwrap();
    assert_eq!(answer.status, 204, "{:?}", answer.body);
    assert!(!held().await, "the blob is gone (unpinned on IPFS)");
    let answer = creator
        .get(&format!("/v1/models/{model_id}"))
        .await
        .unwrap();
    assert_error(&answer, 404, "not_found", "");
    let answer = creator
        .delete(&format!("/v1/models/{model_id}"))
        .await
        .unwrap();
    assert_error(&answer, 404, "not_found", "");
    // The version stays taken (versions are immutable); a new version is fine.
    let again = creator
        .upload(&ModelUpload::new("digits", "1", 1), digits_bytes())
        .await
        .unwrap();
    assert_error(&again, 409, "conflict", "immutable");
    let next = creator
        .upload(&ModelUpload::new("digits", "2", 1), digits_bytes())
        .await
        .unwrap();
    assert_eq!(next.status, 201, "{:?}", next.body);
    cluster.stop().await;
}

crate::on_every_backend!(deleting_a_model_removes_its_blob);

fn modelhub(args: &[&str]) -> (bool, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_modelhub"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_store_exports_to_ipfs_with_the_same_cids() {
    let cluster = Cluster::start().await;
    let creator = cluster.user("creator", 0).await;
    let record = upload_digits(&creator, "digits", 1).await;
    let cid = record["cid"].as_str().unwrap().to_string();
    let url = cluster.admin.base_url().to_string();
    let admin_key = cluster.data_dir().join("admin-key.json");
    let storage_dir = cluster.data_dir().join("storage");
    let (url, key, dir) = (
        url.as_str(),
        admin_key.to_str().unwrap(),
        storage_dir.to_str().unwrap(),
    );

    let (ok, report) = modelhub(&[
        "storage",
        "verify",
        "--storage-dir",
        dir,
        "--url",
        url,
        "--key-file",
        key,
    ]);
    assert!(ok, "{report}");
    assert_eq!(report["clean"], true);
    assert_eq!(report["ok"], 1);

    let node = modelhub_testkit::ScriptServer::start("ipfs");
    let (ok, report) = modelhub(&[
        "storage",
        "verify",
        "--ipfs-api",
        &node.uri,
        "--url",
        url,
        "--key-file",
        key,
    ]);
    assert!(!ok, "the node does not hold the blob yet: {report}");
    assert_eq!(report["missing"], serde_json::json!([cid]));

    let (ok, report) = modelhub(&[
        "storage",
        "export",
        "--to-ipfs",
        &node.uri,
        "--storage-dir",
        dir,
    ]);
    assert!(ok, "{report}");
    assert_eq!(
        report["copied"],
        serde_json::json!([cid]),
        "the node names the blob by the same CID"
    );

    let (ok, report) = modelhub(&[
        "storage",
        "verify",
        "--contents",
        "--ipfs-api",
        &node.uri,
        "--url",
        url,
        "--key-file",
        key,
    ]);
    assert!(ok, "{report}");
    assert_eq!(report["clean"], true);
    cluster.stop().await;
}

/// Uploads racing for one name and version leave one model, one blob and one prover record:
/// the losers' stored ciphertexts and sealed openings are removed, and `modelhub storage
/// verify` finds no orphan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_uploads_of_one_name_leave_no_orphan_blobs() {
    let cluster = Cluster::start().await;
    let racer = cluster.user("racer", 0).await;
    // Names are per owner, and an owner has two uploads in progress at most: in each round the
    // owner races two uploads of one version. Both pass the name check at once and are
    // compiled; the registry takes one.
    let mut created_ids = Vec::new();
    for version in ["1", "2", "3", "4"] {
        let upload = || async {
            racer
                .upload(&ModelUpload::new("digits", version, 1), digits_bytes())
                .await
                .unwrap()
        };
        let (a, b) = tokio::join!(upload(), upload());
        let mut statuses = [a.status, b.status];
        statuses.sort_unstable();
        assert_eq!(statuses, [201, 409], "{a:?} {b:?}");
        let won = if a.status == 201 { a } else { b };
        created_ids.push(won.body["model_id"].as_str().unwrap().to_owned());
    }

    // The prover keeps a record for each registered model only: a loser's is removed.
    let mut records: Vec<String> = std::fs::read_dir(cluster.data_dir().join("prover/models"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    records.sort_unstable();
    let mut expected: Vec<String> = created_ids.iter().map(|id| format!("{id}.json")).collect();
    expected.sort_unstable();
    assert_eq!(records, expected);

    let url = cluster.admin.base_url().to_string();
    let admin_key = cluster.data_dir().join("admin-key.json");
    let storage_dir = cluster.data_dir().join("storage");
    let (ok, report) = modelhub(&[
        "storage",
        "verify",
        "--storage-dir",
        storage_dir.to_str().unwrap(),
        "--url",
        &url,
        "--key-file",
        admin_key.to_str().unwrap(),
    ]);
    assert!(ok, "{report}");
    assert_eq!(report["clean"], true, "{report}");
    assert_eq!(report["ok"], 4, "{report}");
    assert_eq!(
        report["unexpected"],
        serde_json::json!([]),
        "blobs no model names"
    );
    cluster.stop().await;
}

/// One account may have two uploads in progress: of three sent together with stalled bodies,
/// one is refused at once (429) while two wait for their bodies; another account's upload is
/// not affected, and the two held ones finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_in_progress_are_capped_per_account() {
    use futures::StreamExt;
    let cluster = Cluster::start().await;
    let creator = cluster.user("creator", 0).await;
    let other = cluster.user("other", 0).await;
    let bytes = bytes::Bytes::from(digits_bytes());
    let sha = modelhub_core::signing::sha256_hex(&bytes);
    let (release, released) = tokio::sync::watch::channel(false);
    let mut held = Vec::new();
    for i in 0..3 {
        let (first, rest) = (bytes.slice(..100), bytes.slice(100..));
        let mut released = released.clone();
        let body = futures::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(
            futures::stream::once(async move {
                let _ = released.wait_for(|r| *r).await;
                Ok(rest)
            }),
        );
        let creator = creator.clone();
        let sha = sha.clone();
        held.push(tokio::spawn(async move {
            creator
                .upload_stream(&ModelUpload::new(&format!("held{i}"), "1", 1), &sha, body)
                .await
        }));
    }
    let refused = modelhub_testkit::eventually_async(
        "one of three uploads is refused",
        std::time::Duration::from_secs(30),
        || async { held.iter().position(|h| h.is_finished()) },
    )
    .await;
    let answer = held.remove(refused).await.unwrap();
    // The refusal comes before the body is read; the client may see it, or only the
    // connection closing under its unsent body.
    if let Ok(answer) = answer {
        assert_error(&answer, 429, "too_many_requests", "uploads in progress");
        assert!(answer.retry_after.is_some(), "{answer:?}");
    }
    assert!(
        held.iter().all(|h| !h.is_finished()),
        "two are still in progress"
    );
    let answer = other
        .upload(&ModelUpload::new("others", "1", 1), digits_bytes())
        .await
        .unwrap();
    assert_eq!(answer.status, 201, "{:?}", answer.body);
    release.send(true).unwrap();
    for h in held {
        let answer = h.await.unwrap().unwrap();
        assert_eq!(answer.status, 201, "{:?}", answer.body);
    }
    cluster.stop().await;
}
