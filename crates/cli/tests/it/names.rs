//! Model names belong to their owners (`handle/name@version`), published versions are
//! immutable, and the CLI says whose model (and at what price) a name resolved to.

use std::process::{Command, Output};

use modelhub_cli::client::{Client, ModelUpload};
use serde_json::{Value, json};

use crate::harness::*;

/// Runs `modelhub predict MODEL --input … [extra]` as `client`.
fn cli_predict(client: &Client, dir: &std::path::Path, model: &str, extra: &[&str]) -> Output {
    let key_file = dir.join(format!("{}.json", client.key().key_id));
    if !key_file.exists() {
        client.key().write_new(&key_file).unwrap();
    }
    let input = dir.join("input.json");
    std::fs::write(&input, digits_input(0).to_string()).unwrap();
    Command::new(env!("CARGO_BIN_EXE_modelhub"))
        .args(["predict", model, "--input"])
        .arg(format!("@{}", input.display()))
        .args(["--url", client.base_url(), "--key-file"])
        .arg(&key_file)
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_belong_to_owners_and_published_versions_are_immutable() {
    let cluster = Cluster::start().await;
    let alice = cluster.user_with_handle("Alice", Some("alice"), 0).await;
    let mallory = cluster
        .user_with_handle("Mallory", Some("mallory"), 0)
        .await;
    let user = cluster.user("user", 100).await;

    // Nobody else can take a handle.
    let taken = cluster
        .admin
        .post("/v1/accounts", &json!({ "name": "Eve", "handle": "alice" }))
        .await
        .unwrap();
    assert_error(&taken, 409, "conflict", "handle");
    let bad = cluster
        .admin
        .post(
            "/v1/accounts",
            &json!({ "name": "Eve", "handle": "Alice/x" }),
        )
        .await
        .unwrap();
    assert_error(&bad, 400, "bad_request", "handle");
    assert_eq!(account(&alice).await["handle"], "alice");

    // Alice publishes digits@1 at 2 and digits@2 at 2; Mallory publishes her own digits@2 at
    // 500 beside it: another model in another namespace, not a clash and not a swap.
    let upload = |owner: &Client, version: &str, price: u64| {
        let owner = owner.clone();
        let query = ModelUpload::new("digits", version, price);
        async move { owner.upload(&query, digits_bytes()).await.unwrap() }
    };
    let a1 = upload(&alice, "1", 2).await;
    assert_eq!(a1.status, 201, "{:?}", a1.body);
    assert_eq!(a1.body["full_name"], "alice/digits@1");
    assert_eq!(a1.body["owner_handle"], "alice");
    let m2 = upload(&mallory, "2", 500).await;
    assert_eq!(m2.status, 201, "{:?}", m2.body);
    assert_eq!(m2.body["full_name"], "mallory/digits@2");

    // A published version is immutable: deleted and uploaded again at another price, it is
    // refused (and nothing is stored for the refused upload).
    let a1_id = a1.body["model_id"].as_str().unwrap();
    let deleted = alice.delete(&format!("/v1/models/{a1_id}")).await.unwrap();
    assert_eq!(deleted.status, 204);
    let again = upload(&alice, "1", 50).await;
    assert_error(&again, 409, "conflict", "immutable");
    let a2 = upload(&alice, "2", 2).await;
    assert_eq!(a2.status, 201, "{:?}", a2.body);
    let a2_id = a2.body["model_id"].as_str().unwrap().to_owned();
    let listed = user.get("/v1/models").await.unwrap().ok().unwrap();
    let mut names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["full_name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["alice/digits@2", "mallory/digits@2"]);

    // The CLI resolves a name in its owner's namespace and says whose model it is and what
    // it costs; a bare name is one of the caller's own, never a stranger's.
    let dir = tempfile::tempdir().unwrap();
    let out = cli_predict(&user, dir.path(), "alice/digits@2", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("alice/digits@2 is {a2_id}"))
            && stderr(&out).contains("price 2 credits"),
        "{}",
        stderr(&out)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_matches_onnxruntime(&answer, 0);
    assert_eq!(account(&user).await["credits"], 98);

    let out = cli_predict(&user, dir.path(), "digits@2", &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no model digits version 2 in your account")
            && stderr(&out).contains("alice/digits@2, mallory/digits@2"),
        "{}",
        stderr(&out)
    );
    let out = cli_predict(&user, dir.path(), "nobody/digits@2", &[]);
    assert!(!out.status.success(), "{}", stderr(&out));

    // --max-price: a stranger's expensive model is refused before anything is charged.
    let out = cli_predict(&user, dir.path(), "mallory/digits@2", &["--max-price", "2"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("max_price"), "{}", stderr(&out));
    assert_eq!(account(&user).await["credits"], 98, "nothing was charged");
    assert_eq!(account(&mallory).await["earnings"], 0);
    cluster.stop().await;
}
