//! Secrets stay out of the logs: a whole scenario against a real `modelhub up` process logging
//! at debug level for every crate (accounts and keys, an upload, a proved prediction, a bad
//! signature, a revoked key), then every line it wrote is searched for every secret the test
//! can know, in every encoding a log could carry it in: the API secrets and the KEK (base64url,
//! base64, hex), the commitment's opening blinds, and windows of the model's plaintext bytes.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use modelhub_cli::client::{Client, KeyFile, ModelUpload};
use serde_json::{Value, json};

use crate::harness::{digits_bytes, digits_input};
use crate::processes::{Service, free_loopback_addr, modelhub};

/// The forms a secret of `bytes` could take in a log line.
fn encodings(bytes: &[u8]) -> Vec<String> {
    let hex = hex::encode(bytes);
    let debug = format!("{bytes:?}");
    vec![
        URL_SAFE_NO_PAD.encode(bytes),
        STANDARD.encode(bytes),
        hex.to_ascii_uppercase(),
        hex,
        // `{:?}` of a byte slice, without its brackets.
        debug[1..debug.len() - 1].to_owned(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_even_at_debug_level() {
    let data = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (logs.path().join("stdout"), logs.path().join("stderr"));
    let http = free_loopback_addr();
    let child = modelhub()
        .env("RUST_LOG", "debug")
        .args(["up", "--http", &http, "--data-dir"])
        .arg(data.path())
        .stdout(Stdio::from(std::fs::File::create(&out_path).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&err_path).unwrap()))
        .spawn()
        .unwrap();
    let mut up = Service {
        child,
        addr: String::new(),
    };
    up.addr = modelhub_testkit::eventually(
        "modelhub up prints its gateway",
        Duration::from_secs(60),
        || {
            let file = std::fs::File::open(&out_path).ok()?;
            BufReader::new(file)
                .lines()
                .map_while(Result::ok)
                .find_map(|l| {
                    l.trim()
                        .strip_prefix("gateway:")
                        .map(|u| u.trim().to_owned())
                })
        },
    );
    let admin_key = KeyFile::read(&data.path().join("admin-key.json")).unwrap();
    let admin = Client::new(&up.addr, admin_key.clone()).unwrap();

    // The scenario.
    let account = admin
        .post(
            "/v1/accounts",
            &json!({ "name": "alice", "handle": "alice" }),
        )
        .await
        .unwrap()
        .ok()
        .unwrap();
    let account_id = account["account_id"].as_str().unwrap();
    admin
        .post(
            "/v1/credits/grant",
            &json!({ "account_id": account_id, "amount": 50 }),
        )
        .await
        .unwrap()
        .ok()
        .unwrap();
    let new_key = async || -> KeyFile {
        let made = admin
            .post("/v1/keys", &json!({ "account_id": account_id }))
            .await
            .unwrap()
            .ok()
            .unwrap();
        serde_json::from_value(made).unwrap()
    };
    let key = new_key().await;
    let alice = admin.with_key(key.clone());
    let upload = alice
        .upload(&ModelUpload::new("digits", "1", 1), digits_bytes())
        .await
        .unwrap();
    assert_eq!(upload.status, 201, "{:?}", upload.body);
    let model_id = upload.body["model_id"].as_str().unwrap().to_owned();
    let (predicted, proof) =
        crate::harness::predict_with_proof(&alice, &model_id, &digits_input(0)).await;
    assert_eq!(proof["status"], "done", "{proof}");
    assert!(predicted["receipt"]["id"].is_string());
    // A request signed with a wrong secret, and one with a revoked key.
    let forged = admin.with_key(KeyFile {
        secret: URL_SAFE_NO_PAD.encode([7u8; 32]),
        ..key.clone()
    });
    assert_eq!(forged.get("/v1/account").await.unwrap().status, 401);
    let second = new_key().await;
    let revoked = admin
        .delete(&format!("/v1/keys/{}", second.key_id))
        .await
        .unwrap();
    assert!(revoked.status < 300, "{:?}", revoked.body);
    let answer = admin
        .with_key(second.clone())
        .get("/v1/account")
        .await
        .unwrap();
    assert_eq!(answer.status, 401);

    // Stop it, so every line is written.
    std::process::Command::new("kill")
        .args(["-TERM", &up.child.id().to_string()])
        .status()
        .unwrap();
    let _ = up.child.wait();
    let text =
        std::fs::read_to_string(&out_path).unwrap() + &std::fs::read_to_string(&err_path).unwrap();
    assert!(
        text.lines().count() > 100 && text.contains("DEBUG"),
        "the scenario logged at debug level ({} lines)",
        text.lines().count()
    );
    // The logs do talk about these requests: the search below looks where secrets would be.
    for public in [&model_id, &key.key_id, &second.key_id] {
        assert!(
            text.contains(public.as_str()),
            "{public} is not in the logs"
        );
    }

    let mut secrets: Vec<(String, String)> = Vec::new();
    for (who, k) in [("admin", &admin_key), ("alice", &key), ("revoked", &second)] {
        let raw = URL_SAFE_NO_PAD.decode(&k.secret).unwrap();
        for e in encodings(&raw) {
            secrets.push((format!("{who}'s API secret"), e));
        }
    }
    let kek_text = std::fs::read_to_string(data.path().join("kek")).unwrap();
    let kek = URL_SAFE_NO_PAD.decode(kek_text.trim()).unwrap();
    for e in encodings(&kek) {
        secrets.push(("the KEK".into(), e));
    }
    let blinds = upload.body["zk_opening"]["blinds"].as_array().unwrap();
    for b in blinds {
        let b = match b {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        secrets.push(("an opening blind".into(), b));
    }
    // Windows of the plaintext model, past its header (names and shapes are not secret).
    let model = digits_bytes();
    for at in [model.len() / 3, model.len() / 2, model.len() - 40] {
        for e in encodings(&model[at..at + 24]) {
            secrets.push(("the model's plaintext".into(), e));
        }
    }
    for (what, secret) in &secrets {
        if let Some(line) = text.lines().find(|l| l.contains(secret.as_str())) {
            panic!("{what} is in the logs:\n{line}");
        }
    }
}
