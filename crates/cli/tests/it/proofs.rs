//! Verifiable predictions: a proof for a predict, fetched through the gateway and verified
//! offline by `modelhub proofs verify`; tampered proofs fail; unsupported graphs still upload.

use std::process::Command;

use modelhub_cli::client::ModelUpload;
use serde_json::{Value, json};

use crate::harness::*;

fn logits_model() -> Vec<u8> {
    std::fs::read(modelhub_testkit::test_model("digits_mlp_logits.onnx")).unwrap()
}

fn logits_case(case: usize) -> Value {
    let text = std::fs::read_to_string(modelhub_testkit::test_model("digits_logits_expected.json"))
        .unwrap();
    let expected: Value = serde_json::from_str(&text).unwrap();
    expected["cases"][case].clone()
}

/// The first test row's digits pixels as the scanner gives them, 0..16, instead of scaled to
/// [0, 1]: outside the default calibration range.
fn raw_pixels() -> Value {
    let raw: Vec<f64> = logits_case(0)["input"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() * 16.0)
        .collect();
    assert!(raw.iter().any(|v| *v > 8.0));
    json!([{ "name": "input", "shape": [1, 64], "datatype": "FP32", "data": raw }])
}

fn verify_file(path: &std::path::Path, params: &std::path::Path) -> std::process::Output {
    // The digest the file names (a tampered file keeps the honest one).
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap_or_default();
    let digest = file["public"]["model_digest"]
        .as_str()
        .unwrap_or("")
        .to_string();
    Command::new(env!("CARGO_BIN_EXE_modelhub"))
        .args(["proofs", "verify"])
        .arg(path)
        .arg("--digest")
        .arg(digest)
        .arg("--params-dir")
        .arg(params)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proved_prediction_verifies_offline_and_tampering_fails() {
    let cluster = Cluster::start().await;
    let creator = cluster.user("creator", 0).await;
    let user = cluster.user("user", 10).await;
    let other = cluster.user("other", 0).await;

    let answer = creator
        .upload(&ModelUpload::new("digits-logits", "1", 1), logits_model())
        .await
        .unwrap();
    assert_eq!(answer.status, 201, "{:?}", answer.body);
    let commitment = answer.body["commitment"]
        .as_str()
        .expect("a supported graph gets a commitment");
    assert!(!commitment.is_empty());
    let model_id = answer.body["model_id"].as_str().unwrap();

    let case = logits_case(0);
    let inputs =
        json!([{ "name": "input", "shape": [1, 64], "datatype": "FP32", "data": case["input"] }]);
    let (predicted, proof) = predict_with_proof(&user, model_id, &inputs).await;
    let job = predicted["proof_job"].as_str().unwrap();
    let logits = predicted["outputs"][0]["data"].as_array().unwrap();
    for (got, want) in logits.iter().zip(case["logits"].as_array().unwrap()) {
        assert!((got.as_f64().unwrap() - want.as_f64().unwrap()).abs() < 1e-4);
    }
    assert_eq!(proof["status"], "done", "{proof}");
    assert_eq!(proof["public"]["commitment"], commitment);
    assert_eq!(proof["public"]["job_id"], job);
    assert_eq!(
        proof["float_outputs"][0]["data"],
        predicted["outputs"][0]["data"]
    );
    // The proved quantized output agrees with the float output on the class.
    let proved: Vec<f64> = proof["proved_output_dequantized"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let float: Vec<f64> = logits.iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(argmax(&proved), argmax(&float));

    // Only the account that asked can read it; to anyone else, waiting or not, it is exactly
    // a job that does not exist.
    let answer = other.get(&format!("/v1/proofs/{job}")).await.unwrap();
    assert_error(&answer, 404, "not_found", "");
    let waited = other
        .get(&format!("/v1/proofs/{job}?wait=60"))
        .await
        .unwrap();
    let missing_job = format!("{}0", &job[..job.len() - 1]);
    let missing_job = if missing_job == job {
        format!("{}1", &job[..job.len() - 1])
    } else {
        missing_job
    };
    let missing = other
        .get(&format!("/v1/proofs/{missing_job}?wait=60"))
        .await
        .unwrap();
    assert_eq!(waited.status, 404);
    assert_eq!(
        waited.body["error"]["message"]
            .as_str()
            .unwrap()
            .replace(job, "JOB"),
        missing.body["error"]["message"]
            .as_str()
            .unwrap()
            .replace(&missing_job, "JOB"),
        "{waited:?} {missing:?}"
    );

    // Offline verification from the file alone.
    let dir = tempfile::tempdir().unwrap();
    let params = dir.path().join("params");
    let file = dir.path().join("proof.json");
    std::fs::write(&file, serde_json::to_vec(&proof["proof"]).unwrap()).unwrap();
    let out = verify_file(&file, &params);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verdict: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verdict["valid"], true);
    // The verifier made the verifying key once and keeps it beside the params; every later
    // verification below (each its own process) reads it instead of running keygen.
    let vk_files: Vec<_> = std::fs::read_dir(params.join("keys"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        vk_files.len() == 1 && vk_files[0].starts_with("vk-"),
        "{vk_files:?}"
    );
    let vk_file = params.join("keys").join(&vk_files[0]);
    let vk_written = std::fs::metadata(&vk_file).unwrap().modified().unwrap();

    // Any change to the public instance breaks it.
    let tampers: Vec<(&str, Tamper)> = vec![
        (
            "output",
            Box::new(|p: &mut Value| {
                let o = p["public"]["output"][0].as_i64().unwrap();
                p["public"]["output"][0] = json!(o + 1);
            }),
        ),
        (
            "input",
            Box::new(|p: &mut Value| {
                let i = p["public"]["input"][10].as_i64().unwrap();
                p["public"]["input"][10] = json!(i + 1);
            }),
        ),
        (
            "job id",
            Box::new(|p: &mut Value| p["public"]["job_id"] = json!("job_someone_else")),
        ),
    ];
    for (what, tamper) in tampers {
        let mut bad = proof["proof"].clone();
        tamper(&mut bad);
        std::fs::write(&file, serde_json::to_vec(&bad).unwrap()).unwrap();
        let out = verify_file(&file, &params);
        assert!(
            !out.status.success(),
            "a proof with a changed {what} must not verify"
        );
    }
    assert_eq!(
        std::fs::metadata(&vk_file).unwrap().modified().unwrap(),
        vk_written,
        "the stored verifying key was read, not made again"
    );

    // The prover service verifies the same way (gRPC), and rejects the tampered file.
    assert_eq!(
        account(&user).await["credits"],
        10 - 1 - proof["receipt"]["credits_charged"].as_u64().unwrap(),
        "one charged prediction and the delivery of its proof"
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_graphs_upload_without_a_commitment_and_refuse_proofs() {
    let cluster = Cluster::start().await;
    let creator = cluster.user("creator", 0).await;
    let user = cluster.user("user", 10).await;
    let exp = std::fs::read(modelhub_testkit::test_model("exp.onnx")).unwrap();
    let answer = creator
        .upload(&ModelUpload::new("exp", "1", 1), exp)
        .await
        .unwrap();
    assert_eq!(answer.status, 201, "{:?}", answer.body);
    let record = answer.body;
    assert_eq!(record["commitment"], Value::Null);
    assert_eq!(record["circuit_spec"], Value::Null);
    assert!(
        record["zk_note"].as_str().unwrap().contains("Exp"),
        "the reason names the op: {record}"
    );
    let model_id = record["model_id"].as_str().unwrap();
    let inputs = json!([{ "name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.0, 1.0, 2.0, -1.0] }]);
    let answer = user
        .post(
            &format!("/v1/models/{model_id}/predict"),
            &json!({ "inputs": inputs, "proof": true }),
        )
        .await
        .unwrap();
    assert_error(&answer, 400, "bad_request", "no circuit");
    assert_eq!(
        account(&user).await["credits"],
        10,
        "a refused proof request is not charged"
    );
    // Without a proof it predicts as usual.
    let out = user.predict(model_id, inputs).await.unwrap().ok().unwrap();
    let y = out["outputs"][0]["data"][1].as_f64().unwrap();
    assert!((y - std::f64::consts::E).abs() < 1e-5);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_input_range_calibrates_the_proofs() {
    let cluster = Cluster::start().await;
    let creator = cluster.user("creator", 0).await;
    let user = cluster.user("user", 10).await;
    let inputs = raw_pixels();
    let proved = async |model_id: &str| predict_with_proof(&user, model_id, &inputs).await;

    // Uploaded without a range, the model is calibrated for inputs in [0, 1]: the prediction
    // is answered, but its proof fails with the reason.
    let plain = creator
        .upload(&ModelUpload::new("digits-raw", "1", 1), logits_model())
        .await
        .unwrap();
    assert_eq!(plain.status, 201, "{:?}", plain.body);
    let (_, proof) = proved(plain.body["model_id"].as_str().unwrap()).await;
    assert_eq!(proof["status"], "failed", "{proof}");
    assert!(
        proof["error"].as_str().unwrap().contains("range"),
        "{proof}"
    );

    // Declared 0..16 at upload: calibrated on that range, proved, and the proof verifies.
    let mut upload = ModelUpload::new("digits-raw", "2", 1);
    upload.input_range = Some(modelhub_core::InputRange::new(0.0, 16.0).unwrap());
    let ranged = creator.upload(&upload, logits_model()).await.unwrap();
    assert_eq!(ranged.status, 201, "{:?}", ranged.body);
    assert_ne!(ranged.body["circuit_spec"], plain.body["circuit_spec"]);
    let (predicted, proof) = proved(ranged.body["model_id"].as_str().unwrap()).await;
    assert_eq!(proof["status"], "done", "{proof}");
    let float: Vec<f64> = predicted["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let quantized: Vec<f64> = proof["proved_output_dequantized"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(argmax(&quantized), argmax(&float));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proof.json");
    std::fs::write(&file, serde_json::to_vec(&proof["proof"]).unwrap()).unwrap();
    let out = verify_file(&file, &dir.path().join("params"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A bad range is refused before anything is stored.
    for (query, message) in [
        ("&input_min=0", "go together"),
        ("&input_min=3&input_max=1", "input range"),
        ("&input_min=0&input_max=inf", "input range"),
    ] {
        let path = format!(
            "{}{query}",
            ModelUpload::new("digits-raw", "3", 1).path_and_query()
        );
        let request = creator
            .prepare(reqwest::Method::POST, &path, logits_model())
            .unwrap();
        let answer = creator.send(request).await.unwrap();
        assert_error(&answer, 400, "bad_request", message);
    }
    let listed = creator.get("/v1/models").await.unwrap().ok().unwrap();
    assert!(
        !listed.to_string().contains("\"version\":\"3\""),
        "nothing stored: {listed}"
    );
    cluster.stop().await;
}

/// A change to a proof file.
type Tamper = Box<dyn Fn(&mut Value)>;

fn argmax(v: &[f64]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap()
}

/// The owner checks, on their own machine, that the registered commitment is the one of their
/// weights: the ONNX file and the opening the upload answered recompute the registry's digest;
/// another file, another input range or another opening do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_recomputes_the_registered_digest_from_the_file_and_the_opening() {
    let cluster = Cluster::start().await;
    let creator = cluster.user("creator", 0).await;
    let upload = creator
        .upload(&ModelUpload::new("digits-logits", "1", 1), logits_model())
        .await
        .unwrap();
    assert_eq!(upload.status, 201, "{:?}", upload.body);
    let dir = tempfile::tempdir().unwrap();
    let answer_file = dir.path().join("upload.json");
    std::fs::write(&answer_file, upload.body.to_string()).unwrap();
    let key_file = dir.path().join("key.json");
    creator.key().write_new(&key_file).unwrap();
    let model_path = modelhub_testkit::test_model("digits_mlp_logits.onnx");
    let check = |file: &std::path::Path, opening: &std::path::Path, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_modelhub"))
            .args(["models", "check-commitment"])
            .arg(file)
            .arg("--opening")
            .arg(opening)
            .args([
                "--model",
                "digits-logits@1",
                "--url",
                creator.base_url(),
                "--key-file",
            ])
            .arg(&key_file)
            .arg("--params-dir")
            .arg(dir.path().join("params"))
            .args(extra)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };

    let out = check(&model_path, &answer_file, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["matches"], true, "{report}");
    assert_eq!(report["registered_digest"], upload.body["digest"]);

    // Another opening (the blinds in another order) makes another commitment.
    let mut swapped = upload.body["zk_opening"].clone();
    swapped["blinds"].as_array_mut().unwrap().swap(0, 1);
    let swapped_file = dir.path().join("swapped.json");
    std::fs::write(&swapped_file, swapped.to_string()).unwrap();
    let out = check(&model_path, &swapped_file, &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("commitment made with this opening differs"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another input range compiles another circuit; another file, other weights.
    let out = check(&model_path, &answer_file, &["--input-range", "0,16"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("differs from the registered spec"));
    // A twin: the same graph with one weight of its largest initializer raised by 1.
    let twin = dir.path().join("twin.onnx");
    let mut model =
        <modelhub_zk::onnx::ModelProto as prost::Message>::decode(logits_model().as_slice())
            .unwrap();
    let graph = model.graph.as_mut().unwrap();
    let w = graph
        .initializer
        .iter_mut()
        .max_by_key(|t| t.raw_data.len() + 4 * t.float_data.len())
        .unwrap();
    if w.float_data.is_empty() {
        let v = f32::from_le_bytes(w.raw_data[..4].try_into().unwrap()) + 1.0;
        w.raw_data[..4].copy_from_slice(&v.to_le_bytes());
    } else {
        w.float_data[0] += 1.0;
    }
    std::fs::write(&twin, prost::Message::encode_to_vec(&model)).unwrap();
    let out = check(&twin, &answer_file, &[]);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    cluster.stop().await;
}

/// `proofs verify` checks a proof against the model the caller names, through the gateway: the
/// right model and input pass; the same weights registered as another model (a twin, with
/// its own commitment), another input, or no expected model at all are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_verifies_only_for_its_model_and_its_input() {
    let cluster = Cluster::start().await;
    let creator = cluster.user("creator", 0).await;
    let user = cluster.user("user", 10).await;
    let mut ids = Vec::new();
    for name in ["digits-logits", "twin"] {
        let answer = creator
            .upload(&ModelUpload::new(name, "1", 1), logits_model())
            .await
            .unwrap();
        assert_eq!(answer.status, 201, "{:?}", answer.body);
        ids.push(answer.body["model_id"].as_str().unwrap().to_owned());
    }
    let case = logits_case(4);
    let inputs =
        json!([{ "name": "input", "shape": [1, 64], "datatype": "FP32", "data": case["input"] }]);
    let (_, proof) = predict_with_proof(&user, &ids[0], &inputs).await;
    assert_eq!(proof["status"], "done", "{proof}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proof.json");
    std::fs::write(&file, serde_json::to_vec(&proof["proof"]).unwrap()).unwrap();
    let key_file = dir.path().join("key.json");
    user.key().write_new(&key_file).unwrap();
    let input = |name: &str, data: &Value| {
        let path = dir.path().join(name);
        std::fs::write(&path, json!({ "data": data }).to_string()).unwrap();
        path
    };
    let mine = input("mine.json", &case["input"]);
    let other = input("other.json", &logits_case(5)["input"]);
    let verify = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_modelhub"))
            .args(["proofs", "verify"])
            .arg(&file)
            .args(["--url", user.base_url(), "--key-file"])
            .arg(&key_file)
            .arg("--params-dir")
            .arg(dir.path().join("params"))
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // The user names the creator's model in the creator's namespace.
    let ns = &creator.key().account_id;
    let out = verify(&["--model", "digits-logits@1"]);
    assert!(
        !out.status.success(),
        "a bare name is the caller's own model, and the user has none"
    );
    let out = verify(&[
        "--model",
        &format!("{ns}/digits-logits@1"),
        "--input",
        mine.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let verdict: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (verdict["valid"].clone(), verdict["model_id"].clone()),
        (json!(true), json!(ids[0]))
    );

    let out = verify(&["--model", &format!("{ns}/twin@1")]);
    assert!(!out.status.success(), "a twin's digest must not accept it");
    let out = verify(&["--model", &ids[0], "--input", other.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("input mismatch"), "{}", stderr(&out));
    let out = verify(&[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("say which model"), "{}", stderr(&out));
    cluster.stop().await;
}

/// A proof is paid for when it is delivered: the model's proof price (set at upload, or the
/// default proportional to the circuit's size), charged once on the first read of the finished
/// proof, on a receipt of its own; a later read shows the same receipt; an account short of
/// it gets 402 until it has the credits; a proof that fails is never charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_is_paid_once_when_delivered_and_never_when_it_fails() {
    let cluster = Cluster::start().await;
    let creator = cluster.user("creator", 0).await;
    let user = cluster.user("user", 7).await;
    let mut upload = ModelUpload::new("digits-logits", "1", 2);
    upload.proof_price = Some(3);
    let priced = creator.upload(&upload, logits_model()).await.unwrap();
    assert_eq!(priced.status, 201, "{:?}", priced.body);
    let model_id = priced.body["model_id"].as_str().unwrap();
    let shown = user
        .get(&format!("/v1/models/{model_id}"))
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(
        (&shown["price"], &shown["proof_price"]),
        (&json!(2), &json!(3))
    );

    // Without a proof price, the default: a credit per 65,536 cells of the circuit.
    let default = creator
        .upload(&ModelUpload::new("digits-logits", "2", 2), logits_model())
        .await
        .unwrap();
    let spec = &default.body["circuit_spec"];
    let cells = (1u64 << spec["k"].as_u64().unwrap()) * spec["lanes"].as_u64().unwrap_or(8);
    assert_eq!(
        default.body["proof_price"],
        json!(cells.div_ceil(65_536).max(1)),
        "{spec}"
    );

    let inputs = json!([{ "name": "input", "shape": [1, 64], "datatype": "FP32", "data": logits_case(0)["input"] }]);
    let (predicted, proof) = predict_with_proof(&user, model_id, &inputs).await;
    assert_eq!(predicted["receipt"]["charge"], "prediction", "{predicted}");
    assert_eq!(predicted["receipt"]["credits_charged"], 2);
    assert_eq!(proof["status"], "done", "{proof}");
    let receipt = &proof["receipt"];
    assert_eq!(
        (&receipt["charge"], &receipt["credits_charged"]),
        (&json!("proof"), &json!(3))
    );
    assert_ne!(receipt["id"], predicted["receipt"]["id"]);
    assert_eq!(account(&user).await["credits"], 2);
    assert_eq!(account(&creator).await["earnings"], 5);
    // Read again: the same receipt, nothing charged twice.
    let job = predicted["proof_job"].as_str().unwrap();
    let again = user
        .get(&format!("/v1/proofs/{job}"))
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(again["receipt"], *receipt);
    assert_eq!(account(&user).await["credits"], 2);

    // Short of the proof price: the proof waits for the credits.
    let predicted = predict_asking_for_proof(&user, model_id, &inputs).await;
    let job = predicted["proof_job"].as_str().unwrap();
    let short = user
        .get(&format!("/v1/proofs/{job}?wait=60"))
        .await
        .unwrap();
    assert_error(&short, 402, "payment_required", "insufficient credits");
    assert_eq!(account(&user).await["credits"], 0);
    let granted = cluster
        .admin
        .post(
            "/v1/credits/grant",
            &json!({ "account_id": user.key().account_id, "amount": 4 }),
        )
        .await
        .unwrap();
    assert_eq!(granted.status, 200, "{:?}", granted.body);
    let paid = user
        .get(&format!("/v1/proofs/{job}"))
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(paid["status"], "done", "{paid}");
    assert_eq!(paid["receipt"]["credits_charged"], 3);
    assert_eq!(account(&user).await["credits"], 1);

    // A proof that fails (an input outside the calibrated range) is not charged.
    let cheap = {
        let mut upload = ModelUpload::new("digits-logits", "3", 0);
        upload.proof_price = Some(1);
        let answer = creator.upload(&upload, logits_model()).await.unwrap();
        answer.body["model_id"].as_str().unwrap().to_owned()
    };
    let (_, failed) = predict_with_proof(&user, &cheap, &raw_pixels()).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["receipt"], Value::Null, "{failed}");
    assert_eq!(account(&user).await["credits"], 1);
    cluster.stop().await;
}
