//! Starts a marketplace for one test and gives typed helpers around it.

use std::path::PathBuf;

use modelhub_cli::client::{Answer, Client, KeyFile, ModelUpload};
use modelhub_cli::up::{self, Running, UpSettings};
use serde_json::{Value, json};

/// Where the marketplace keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `modelhub up`'s defaults: redb metadata, local blobs.
    Embedded,
    /// The registry's metadata in a real MongoDB-wire server (`scripts/mongo`).
    MongoDb,
    /// Model blobs on a real IPFS node (`scripts/ipfs`).
    Ipfs,
}

/// Runs a scenario `async fn name(backend: Backend)` once per back end, as tests
/// `name::embedded`, `name::mongodb` and `name::ipfs`.
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name($crate::harness::Backend::Embedded).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mongodb() {
                super::$name($crate::harness::Backend::MongoDb).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ipfs() {
                super::$name($crate::harness::Backend::Ipfs).await
            }
        }
    )*};
}

pub struct Cluster {
    pub running: Option<Running>,
    pub dir: tempfile::TempDir,
    pub admin: Client,
    pub backend: Backend,
    settings: UpSettings,
    /// Real servers this cluster uses; they outlive restarts of the marketplace.
    _servers: Vec<modelhub_testkit::ScriptServer>,
}

impl Cluster {
    pub async fn start() -> Cluster {
        Cluster::start_on(Backend::Embedded).await
    }

    pub async fn start_on(backend: Backend) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut settings = UpSettings::for_test(dir.path());
        let mut servers = Vec::new();
        match backend {
            Backend::Embedded => {}
            Backend::MongoDb => {
                let server = modelhub_testkit::ScriptServer::start("mongo");
                settings.mongodb_uri = Some(format!("{}/modelhub_e2e", server.uri));
                servers.push(server);
            }
            Backend::Ipfs => {
                let server = modelhub_testkit::ScriptServer::start("ipfs");
                settings.ipfs_api = Some(server.uri.clone());
                servers.push(server);
            }
        }
        Cluster::start_in(dir, backend, settings, servers).await
    }

    /// A marketplace with these settings (and these real servers kept alive beside it).
    pub async fn start_with(
        dir: tempfile::TempDir,
        settings: UpSettings,
        servers: Vec<modelhub_testkit::ScriptServer>,
    ) -> Cluster {
        Cluster::start_in(dir, Backend::Embedded, settings, servers).await
    }

    async fn start_in(
        dir: tempfile::TempDir,
        backend: Backend,
        settings: UpSettings,
        servers: Vec<modelhub_testkit::ScriptServer>,
    ) -> Cluster {
        let running = up::start(settings.clone())
            .await
            .expect("start the marketplace");
        let admin = Client::new(&running.gateway_url, running.admin_key.clone()).expect("client");
        Cluster {
            running: Some(running),
            dir,
            admin,
            backend,
            settings,
            _servers: servers,
        }
    }

    /// Stops the real servers (MongoDB, IPFS) under the running marketplace.
    pub fn stop_servers(&self) {
        self._servers
            .iter()
            .for_each(modelhub_testkit::ScriptServer::stop);
    }

    /// The IPFS node's API URL, when blobs live there.
    pub fn ipfs_api(&self) -> Option<&str> {
        self.settings.ipfs_api.as_deref()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Stops every service and starts them again on the same data folder.
    pub async fn restart(mut self) -> Cluster {
        self.running.take().expect("running").stop().await;
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        let servers = std::mem::take(&mut self._servers);
        Cluster::start_in(dir, self.backend, self.settings.clone(), servers).await
    }

    pub async fn stop(mut self) -> tempfile::TempDir {
        self.running.take().expect("running").stop().await;
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"))
    }

    /// A new account with its own key and `credits` granted by the admin.
    pub async fn user(&self, name: &str, credits: u64) -> Client {
        self.user_with_handle(name, None, credits).await
    }

    /// [`user`](Self::user), with a public handle when given.
    pub async fn user_with_handle(&self, name: &str, handle: Option<&str>, credits: u64) -> Client {
        let account = self
            .admin
            .post("/v1/accounts", &json!({ "name": name, "handle": handle }))
            .await
            .unwrap()
            .ok()
            .unwrap();
        let account_id = account["account_id"].as_str().unwrap().to_string();
        let key = self
            .admin
            .post("/v1/keys", &json!({ "account_id": account_id }))
            .await
            .unwrap()
            .ok()
            .unwrap();
        let key: KeyFile = serde_json::from_value(key).unwrap();
        assert_eq!(key.account_id, account_id);
        if credits > 0 {
            let granted = self
                .admin
                .post(
                    "/v1/credits/grant",
                    &json!({ "account_id": account_id, "amount": credits }),
                )
                .await
                .unwrap()
                .ok()
                .unwrap();
            assert_eq!(granted["credits"], credits);
        }
        self.admin.with_key(key)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            // Best effort for a test that panicked before stopping; tasks end with the runtime.
            drop(running);
        }
    }
}

pub fn digits_bytes() -> Vec<u8> {
    std::fs::read(modelhub_testkit::test_model("digits_mlp.onnx")).unwrap()
}

/// Uploads the digits model as `owner` and returns its record: the answer without the
/// commitment's opening, which only the upload's answer carries (checked here).
pub async fn upload_digits(owner: &Client, name: &str, price: u64) -> Value {
    let answer = owner
        .upload(&ModelUpload::new(name, "1", price), digits_bytes())
        .await
        .unwrap();
    assert_eq!(answer.status, 201, "{:?}", answer.body);
    let mut record = answer.body;
    let opening = record
        .as_object_mut()
        .unwrap()
        .remove("zk_opening")
        .expect("the upload answer carries the commitment's opening");
    assert!(record["commitment"].is_string(), "{record}");
    assert!(
        !opening["blinds"].as_array().unwrap().is_empty(),
        "{opening}"
    );
    record
}

/// One digits row as the API's input tensor list.
pub fn digits_input(case: usize) -> Value {
    let expected = modelhub_testkit::digits_expected();
    let row = &expected["cases"][case]["input"];
    json!([{ "name": "X", "shape": [1, 64], "datatype": "FP32", "data": row }])
}

/// `rows` digits rows (the test cases in turn) as one batch input, shape `[rows, 64]`.
pub fn digits_batch(rows: usize) -> Value {
    let expected = modelhub_testkit::digits_expected();
    let cases = expected["cases"].as_array().unwrap();
    let data: Vec<Value> = (0..rows)
        .flat_map(|r| cases[r % cases.len()]["input"].as_array().unwrap().clone())
        .collect();
    json!([{ "name": "X", "shape": [rows, 64], "datatype": "FP32", "data": data }])
}

pub async fn account(client: &Client) -> Value {
    client.get("/v1/account").await.unwrap().ok().unwrap()
}

pub fn assert_error(answer: &Answer, status: u16, code: &str, message_part: &str) {
    assert_eq!(answer.status, status, "{:?}", answer.body);
    assert_eq!(answer.error_code(), Some(code), "{:?}", answer.body);
    assert!(
        answer.error_message().contains(message_part),
        "message {:?} should mention {message_part:?}",
        answer.error_message()
    );
}

/// Checks a predict answer against what onnxruntime (Python) gave for that row.
pub fn assert_matches_onnxruntime(answer: &Value, case: usize) {
    let expected = &modelhub_testkit::digits_expected()["cases"][case];
    let outputs = answer["outputs"].as_array().expect("outputs");
    let label = outputs
        .iter()
        .find(|o| o["name"] == "label")
        .expect("label output");
    assert_eq!(label["datatype"], "INT64");
    assert_eq!(label["data"][0], expected["label"]);
    let probs = outputs
        .iter()
        .find(|o| o["name"] == "probabilities")
        .expect("probabilities");
    assert_eq!(probs["shape"], json!([1, 10]));
    let got: Vec<f64> = probs["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let want: Vec<f64> = expected["probabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(got.len(), 10);
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g - w).abs() < 1e-5,
            "probabilities {got:?} vs onnxruntime {want:?}"
        );
    }
}

/// A predict asking for a proof (200 expected); its answer, with the `proof_job`.
pub async fn predict_asking_for_proof(user: &Client, model_id: &str, inputs: &Value) -> Value {
    user.post(
        &format!("/v1/models/{model_id}/predict"),
        &json!({ "inputs": inputs, "proof": true }),
    )
    .await
    .unwrap()
    .ok()
    .unwrap()
}

/// A predict with `"proof": true`, and its proof job once finished (or failed; waits up to
/// 60 s): the predict answer and the proof answer.
pub async fn predict_with_proof(user: &Client, model_id: &str, inputs: &Value) -> (Value, Value) {
    let predicted = predict_asking_for_proof(user, model_id, inputs).await;
    let job = predicted["proof_job"].as_str().expect("a proof job id");
    let proof = user
        .get(&format!("/v1/proofs/{job}?wait=60"))
        .await
        .unwrap()
        .ok()
        .unwrap();
    (predicted, proof)
}
