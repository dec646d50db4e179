//! The prover service over real gRPC, with a real storage service: compile at upload, proofs
//! streamed in, fetched, verified; state that survives a restart.

use modelhub_core::{ApiError, ErrorCode, Tensor, TensorSpec};
use modelhub_mtls::Identity;
use modelhub_proto::common::v1::ModelRef;
use modelhub_proto::prover::v1 as pb;
use modelhub_proto::prover::v1::proof_state::Status;
use modelhub_proto::prover::v1::prover_client::ProverClient;
use modelhub_proto::storage::v1::storage_client::StorageClient;
use modelhub_testkit::grpc::{Server, put_model};
use modelhub_testkit::tls::TestPki;
use serde_json::Value;
use tonic::transport::Channel;

struct Setup {
    storage: Server,
    prover: Server,
    client: ProverClient<Channel>,
    model: ModelRef,
    inputs: Vec<modelhub_proto::common::v1::TensorSpec>,
    dir: tempfile::TempDir,
}

async fn start_prover(dir: &std::path::Path, storage_url: &str) -> (Server, ProverClient<Channel>) {
    let settings = modelhub_prover::Settings {
        kek_file: Some(dir.join("kek")),
        mtls_dir: TestPki::shared().dir().to_path_buf(),
        ..modelhub_prover::Settings::for_test(&dir.join("prover"), storage_url)
    };
    let server = Server::start(|l, stop| modelhub_prover::run(settings, l, stop)).await;
    let client = ProverClient::new(server.channel(Identity::Gateway, Identity::Prover));
    (server, client)
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let storage_settings = modelhub_storage::Settings {
        kek_file: Some(dir.path().join("kek")),
        mtls_dir: TestPki::shared().dir().to_path_buf(),
        ..modelhub_storage::Settings::for_test(&dir.path().join("storage"))
    };
    let storage = Server::start(|l, stop| modelhub_storage::run(storage_settings, l, stop)).await;
    let mut storage_client =
        StorageClient::new(storage.channel(Identity::Gateway, Identity::Storage));
    let bytes = std::fs::read(modelhub_testkit::test_model("digits_mlp_logits.onnx")).unwrap();
    let (model, put) = put_model(&mut storage_client, "mdl_logits", &bytes)
        .await
        .unwrap();
    let (prover, client) = start_prover(dir.path(), &storage.url).await;
    Setup {
        storage,
        prover,
        client,
        model,
        inputs: put.inputs,
        dir,
    }
}

/// The one proving key file of the prover (one model, one circuit spec).
fn the_key_file(dir: &std::path::Path) -> std::path::PathBuf {
    let files: Vec<_> = std::fs::read_dir(dir.join("prover/params/keys"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.into_iter().next().unwrap()
}

fn digits_row(case: usize) -> Vec<f32> {
    let text = std::fs::read_to_string(modelhub_testkit::test_model("digits_logits_expected.json"))
        .unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"][case]["input"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn job(id: &str, model: &ModelRef, row: &[f32]) -> pb::ProofJob {
    pb::ProofJob {
        job_id: id.into(),
        account_id: "acct_test".into(),
        model: Some(model.clone()),
        inputs: vec![
            Tensor::from_f32("input", vec![1, row.len() as i64], row)
                .unwrap()
                .into_proto(),
        ],
        outputs: vec![
            Tensor::from_f32("logits", vec![1, 2], &[0.5, 1.5])
                .unwrap()
                .into_proto(),
        ],
    }
}

/// Submits proof jobs as the inference service does (only it may).
async fn submit(prover: &Server, jobs: Vec<pb::ProofJob>) -> u64 {
    let mut client = ProverClient::new(prover.channel(Identity::Inference, Identity::Prover));
    let mut accepted = 0;
    for job in jobs {
        if client.enqueue(job).await.is_ok() {
            accepted += 1;
        }
    }
    accepted
}

async fn wait(client: &mut ProverClient<Channel>, id: &str) -> pb::ProofState {
    client
        .get_proof(pb::GetProofRequest {
            job_id: id.into(),
            wait_ms: 60_000,
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compile_prove_fetch_verify_and_survive_a_restart() {
    let mut s = setup().await;
    let compiled = s
        .client
        .compile(pb::CompileRequest {
            model: Some(s.model.clone()),
            inputs: s.inputs.clone(),
            input_range: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(compiled.supported, "{}", compiled.reason);
    let spec: Value = serde_json::from_str(&compiled.circuit_spec).unwrap();
    assert!(spec["k"].as_u64().unwrap() >= 4);

    let row = digits_row(0);
    let mut bad_row = row.clone();
    bad_row[3] = 1.0e6;
    let accepted = submit(
        &s.prover,
        vec![
            job("job_ok", &s.model, &row),
            job("job_range", &s.model, &bad_row),
            job("bad id!", &s.model, &row),
        ],
    )
    .await;
    assert_eq!(accepted, 2, "a job with a malformed id is dropped");

    let done = wait(&mut s.client, "job_ok").await;
    assert_eq!(done.status, Status::Done as i32, "{}", done.error);
    assert_eq!(done.account_id, "acct_test");
    let proof: Value = serde_json::from_slice(&done.proof).unwrap();
    assert_eq!(proof["format"], "modelhub-proof/2");
    assert_eq!(proof["public"]["model_digest"], compiled.digest.as_str());
    assert_eq!(proof["public"]["commitment"], compiled.commitment.as_str());
    assert_eq!(proof["public"]["job_id"], "job_ok");
    let proved: Vec<f64> = serde_json::from_str(&done.proved_output).unwrap();
    assert_eq!(proved.len(), 10);
    let floats: Value = serde_json::from_str(&done.float_outputs).unwrap();
    assert_eq!(
        floats[0]["data"],
        serde_json::json!([0.5, 1.5]),
        "the float output is kept beside the proof"
    );

    let failed = wait(&mut s.client, "job_range").await;
    assert_eq!(failed.status, Status::Failed as i32);
    assert!(failed.error.contains("range"), "{}", failed.error);

    // Verify over gRPC: the proof, a tampered one, garbage.
    let digest = compiled.digest.clone();
    let verify = |bytes: Vec<u8>| {
        let mut c = s.client.clone();
        let digest = digest.clone();
        async move {
            c.verify(pb::VerifyRequest {
                proof: bytes,
                expected_digest: digest.clone(),
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    assert!(verify(done.proof.clone()).await.valid);
    let mut tampered = proof.clone();
    tampered["public"]["job_id"] = "job_other".into();
    let answer = verify(serde_json::to_vec(&tampered).unwrap()).await;
    assert!(!answer.valid && !answer.reason.is_empty());
    assert!(!verify(b"not json".to_vec()).await.valid);
    let mut huge = proof.clone();
    huge["spec"]["k"] = 40.into();
    assert!(
        !verify(serde_json::to_vec(&huge).unwrap()).await.valid,
        "a circuit size over the limit is refused"
    );

    // Unknown and malformed job ids.
    let err = s
        .client
        .get_proof(pb::GetProofRequest {
            job_id: "job_none".into(),
            wait_ms: 10,
        })
        .await
        .unwrap_err();
    assert_eq!(ApiError::from_status(&err).code, ErrorCode::NotFound);
    let err = s
        .client
        .get_proof(pb::GetProofRequest {
            job_id: "../x".into(),
            wait_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(ApiError::from_status(&err).code, ErrorCode::BadRequest);

    // A restart keeps finished proofs, and proves new jobs with the same commitment (the model
    // is recompiled from storage; the opening comes sealed from disk) with the proving keys
    // stored at upload: the key file is read, not made again.
    let key_file = the_key_file(s.dir.path());
    let stored = (
        std::fs::read(&key_file).unwrap(),
        std::fs::metadata(&key_file).unwrap().modified().unwrap(),
    );
    s.prover.stop().await;
    let (prover, mut client) = start_prover(s.dir.path(), &s.storage.url).await;
    s.prover = prover;
    assert_eq!(
        wait(&mut client, "job_ok").await.status,
        Status::Done as i32
    );
    assert_eq!(
        submit(&s.prover, vec![job("job_after", &s.model, &digits_row(1))]).await,
        1
    );
    let after = wait(&mut client, "job_after").await;
    assert_eq!(after.status, Status::Done as i32, "{}", after.error);
    let after: Value = serde_json::from_slice(&after.proof).unwrap();
    assert_eq!(after["public"]["commitment"], compiled.commitment.as_str());
    let mut c = client.clone();
    assert!(
        c.verify(pb::VerifyRequest {
            proof: serde_json::to_vec(&after).unwrap(),
            expected_digest: compiled.digest.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .valid
    );

    assert_eq!(
        (
            std::fs::read(&key_file).unwrap(),
            std::fs::metadata(&key_file).unwrap().modified().unwrap()
        ),
        stored,
        "keys read from disk, not made and stored again"
    );

    // A key file that went bad is not used: the next start makes the keys again, replaces the
    // file, and proves as before.
    let mut bad = stored.0.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    std::fs::write(&key_file, &bad).unwrap();
    s.prover.stop().await;
    let (prover, mut client) = start_prover(s.dir.path(), &s.storage.url).await;
    s.prover = prover;
    submit(
        &s.prover,
        vec![job("job_rekeyed", &s.model, &digits_row(2))],
    )
    .await;
    let rekeyed = wait(&mut client, "job_rekeyed").await;
    assert_eq!(rekeyed.status, Status::Done as i32, "{}", rekeyed.error);
    assert!(
        client
            .verify(pb::VerifyRequest {
                proof: rekeyed.proof,
                expected_digest: compiled.digest.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .valid
    );
    assert_eq!(std::fs::read(&key_file).unwrap(), stored.0, "file replaced");

    // The opening on disk is sealed: no raw blinds in the record.
    let record =
        std::fs::read_to_string(s.dir.path().join("prover/models/mdl_logits.json")).unwrap();
    assert!(
        record.contains("sealed_opening") && !record.contains("blinds"),
        "{record}"
    );
    s.prover.stop().await;
    s.storage.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_models_and_models_without_a_circuit() {
    let mut s = setup().await;
    // A model with two inputs can't be proved: compile says why instead of failing.
    let two = vec![
        TensorSpec {
            name: "a".into(),
            datatype: modelhub_core::DataType::Fp32,
            shape: vec![-1, 4],
        }
        .to_proto(),
        TensorSpec {
            name: "b".into(),
            datatype: modelhub_core::DataType::Fp32,
            shape: vec![-1, 4],
        }
        .to_proto(),
    ];
    let answer = s
        .client
        .compile(pb::CompileRequest {
            model: Some(s.model.clone()),
            inputs: two,
            input_range: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.supported);
    assert!(answer.reason.contains("one input"), "{}", answer.reason);

    // A declared input range that is not a range is the caller's error.
    for (min, max) in [(2.0, 1.0), (f32::NAN, 1.0)] {
        let err = s
            .client
            .compile(pb::CompileRequest {
                model: Some(s.model.clone()),
                inputs: s.inputs.clone(),
                input_range: Some(pb::InputRange { min, max }),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("input range"), "{}", err.message());
    }

    // A proof job for a model the prover never compiled fails with a clear message.
    submit(
        &s.prover,
        vec![job("job_nocircuit", &s.model, &digits_row(0))],
    )
    .await;
    let state = wait(&mut s.client, "job_nocircuit").await;
    assert_eq!(state.status, Status::Failed as i32);
    assert!(state.error.contains("no circuit"), "{}", state.error);
    s.prover.stop().await;
    s.storage.stop().await;
}

/// Stores `bytes` as `model_id` the way storage does, but without its upload checks: what a
/// model that reached storage some other way looks like to the prover.
async fn plant(dir: &std::path::Path, model_id: &str, bytes: &[u8]) -> ModelRef {
    use modelhub_core::crypto::{Kek, SecretKey, encrypt_all, model_aad};
    use modelhub_storage::BlobStore;
    let kek = Kek::load(&dir.join("kek")).unwrap();
    let dek = SecretKey::generate();
    let ciphertext = encrypt_all(&dek, &model_aad(model_id, "1"), bytes).unwrap();
    let blobs = modelhub_storage::LocalBlobStore::open(&dir.join("storage")).unwrap();
    let cid = blobs.put(ciphertext.into()).await.unwrap();
    ModelRef {
        model_id: model_id.into(),
        version: "1".into(),
        cid,
        wrapped_dek: kek.wrap_dek(&dek, model_id, "1"),
        sha256: modelhub_core::signing::sha256_hex(bytes),
        size: bytes.len() as u64,
    }
}

/// A model that names external data (a file of the server) is refused before the circuit
/// compiler reads it, and nothing is compiled or stored for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_model_in_storage_is_refused_at_compile() {
    use modelhub_onnx::untrusted::proto::*;
    let mut s = setup().await;
    let graph = add_graph(external("W", "Cargo.toml"));
    let model = plant(s.dir.path(), "mdl_external", &model_bytes(graph)).await;
    let inputs = vec![
        TensorSpec {
            name: "X".into(),
            datatype: modelhub_core::DataType::Fp32,
            shape: vec![1, 4],
        }
        .to_proto(),
    ];
    let err = s
        .client
        .compile(pb::CompileRequest {
            model: Some(model),
            inputs,
            input_range: None,
        })
        .await
        .unwrap_err();
    let e = ApiError::from_status(&err);
    assert_eq!(e.code, ErrorCode::BadRequest, "{}", e.message);
    assert!(e.message.starts_with("model refused: "), "{}", e.message);
    assert!(!e.message.contains("Cargo"), "{}", e.message);
    let records = std::fs::read_dir(s.dir.path().join("prover/models"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().to_string_lossy().contains("mdl_external"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(records, 0, "nothing recorded for the refused model");
}

/// The cache of compiled models loads one model at a time per model, not for all: while one
/// model's load is stalled (here the compute pool is held busy), another compiled model is
/// served at once. Before, one lock was held across every load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_model_load_does_not_hold_up_another_model() {
    use std::time::Duration;

    use modelhub_core::crypto::Kek;
    use modelhub_core::pool::ComputePool;
    use modelhub_prover::models::Models;

    let s = setup().await;
    let mut uploader = StorageClient::new(s.storage.channel(Identity::Gateway, Identity::Storage));
    let bytes = std::fs::read(modelhub_testkit::test_model("digits_mlp_logits.onnx")).unwrap();
    let (other, _) = put_model(&mut uploader, "mdl_other", &bytes).await.unwrap();
    let storage_client = StorageClient::new(s.storage.channel(Identity::Prover, Identity::Storage));
    let specs: Vec<TensorSpec> = s
        .inputs
        .iter()
        .cloned()
        .map(|t| TensorSpec::try_from(t).unwrap())
        .collect();
    let kek = || Kek::load_or_generate(&s.dir.path().join("models-kek")).unwrap();
    let open = |pool: ComputePool| {
        Models::new(
            modelhub_prover::models::Records::Dir(s.dir.path().join("models")),
            s.dir.path().join("params"),
            kek(),
            storage_client.clone(),
            pool,
        )
        .unwrap()
    };
    let first = open(ComputePool::new("first", 1).unwrap());
    for m in [&s.model, &other] {
        first
            .compile(m.clone(), &specs, Default::default())
            .await
            .unwrap();
    }
    drop(first);

    // A fresh instance (empty cache) over the same records: `other` is loaded, then the only
    // compute thread is held, so loading `s.model` waits for it.
    let pool = ComputePool::new("second", 1).unwrap();
    let models = std::sync::Arc::new(open(pool.clone()));
    models.get(&other).await.unwrap();
    let (release, held) = std::sync::mpsc::channel::<()>();
    let busy = tokio::spawn({
        let pool = pool.clone();
        async move { pool.run(move || held.recv()).await }
    });
    let stalled = tokio::spawn({
        let models = models.clone();
        let model = s.model.clone();
        async move { models.get(&model).await.map(|_| ()) }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!stalled.is_finished(), "the load waits for the pool");
    tokio::time::timeout(Duration::from_secs(10), models.get(&other))
        .await
        .expect("another model is served while one loads")
        .unwrap();
    release.send(()).unwrap();
    busy.await.unwrap().unwrap().unwrap();
    stalled.await.unwrap().unwrap();
}

/// The circuit compiler reads a graph as ONNX Runtime runs it: on MLPs with and without
/// `Relu`, and behind `Flatten` (axis 0 and 1, opset 18) over a `[1, 2, 4, 4]` input,
/// the compiler's float model (`modelhub_zk::onnx::parse(..).forward`) gives ONNX Runtime's
/// outputs. Graphs it would read otherwise are refused (`Flatten` axis 2 here; the element
/// type cases are unit tests of `crates/zk/src/onnx.rs`).
#[test]
fn the_circuit_compiler_reads_graphs_as_onnx_runtime_runs_them() {
    use modelhub_zk::onnx::{
        AttributeProto, ModelProto, NodeProto, float_input, mlp_onnx, parse, random_dense,
    };
    use prost::Message;

    let typed = |bytes: Vec<u8>, input_dims: &[i64], flatten_axis: Option<i64>| {
        let mut model = ModelProto::decode(bytes.as_slice()).unwrap();
        let graph = model.graph.as_mut().unwrap();
        let outputs = graph.initializer[graph.initializer.len() - 2].dims[0];
        graph.output[0] = float_input("output", &[input_dims[0], outputs]);
        if let Some(axis) = flatten_axis {
            graph.input[0] = float_input("image", input_dims);
            graph.node.insert(
                0,
                NodeProto {
                    input: vec!["image".into()],
                    output: vec!["input".into()],
                    name: "Flatten".into(),
                    op_type: "Flatten".into(),
                    attribute: vec![AttributeProto {
                        name: "axis".into(),
                        i: axis,
                        r#type: 2, // INT
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            );
            model.opset_import[0].version = 18;
        }
        model.encode_to_vec()
    };
    let layers = |relu: bool, seed: u64| {
        vec![
            random_dense(32, 12, relu, seed, 2.0),
            random_dense(12, 5, false, seed + 1, 2.0),
        ]
    };
    let cases = [
        ("MLP", typed(mlp_onnx(&layers(false, 1)), &[1, 32], None)),
        (
            "MLP with Relu",
            typed(mlp_onnx(&layers(true, 3)), &[1, 32], None),
        ),
        (
            "Flatten axis 1",
            typed(mlp_onnx(&layers(true, 5)), &[1, 2, 4, 4], Some(1)),
        ),
        (
            "Flatten axis 0",
            typed(mlp_onnx(&layers(true, 7)), &[1, 2, 4, 4], Some(0)),
        ),
    ];
    for (what, bytes) in &cases {
        let float = parse(bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut ort = modelhub_onnx::load(bytes, 1).unwrap_or_else(|e| panic!("{what}: {e}"));
        let dims: Vec<i64> = if what.starts_with("Flatten") {
            vec![1, 2, 4, 4]
        } else {
            vec![1, 32]
        };
        let name = if what.starts_with("Flatten") {
            "image"
        } else {
            "input"
        };
        for seed in 0..8u32 {
            let x: Vec<f32> = (0..32u32)
                .map(|i| ((i * 7 + seed * 13) % 17) as f32 / 17.0)
                .collect();
            let want = ort
                .run(&[Tensor::from_f32(name, dims.clone(), &x).unwrap()])
                .unwrap()[0]
                .as_f32()
                .unwrap();
            let got = float.forward(&x);
            assert_eq!(got.len(), want.len(), "{what}");
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{what}: {got:?} vs {want:?}"
                );
            }
        }
    }
    // Flatten to a matrix (axis 2) runs in ONNX Runtime but is not what the circuit computes.
    let matrix = typed(mlp_onnx(&layers(true, 9)), &[1, 2, 4, 4], Some(2));
    assert!(parse(&matrix).is_err());
}
