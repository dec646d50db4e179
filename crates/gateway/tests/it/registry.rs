//! The account, key and model-reading routes against the real registry (storage and inference
//! are not needed by these routes and point at a closed port).

use std::net::SocketAddr;
use std::time::Duration;

use modelhub_core::signing;
use modelhub_gateway::{Settings, run};
use modelhub_proto::registry::v1 as pb;
use modelhub_proto::registry::v1::registry_client::RegistryClient;
use serde_json::{Value, json};
use tokio::sync::oneshot;

pub(crate) fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("https://{}", l.local_addr().unwrap())
}

/// A key as `POST /v1/keys` answers it.
#[derive(Clone, Debug)]
pub(crate) struct Key {
    pub key_id: String,
    pub secret: Vec<u8>,
    pub account_id: String,
}

impl Key {
    fn from_json(v: &Value) -> Key {
        Key {
            key_id: v["key_id"].as_str().unwrap().into(),
            secret: signing::decode_secret(v["secret"].as_str().unwrap()).unwrap(),
            account_id: v["account_id"].as_str().unwrap().into(),
        }
    }
}

pub(crate) struct Stack {
    _dir: tempfile::TempDir,
    pub gateway: SocketAddr,
    /// The registry's gRPC URL, for more gateways.
    pub registry: String,
    pub admin: Key,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    http: reqwest::Client,
}

impl Stack {
    pub async fn start() -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let registry_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let registry = format!("https://{}", registry_l.local_addr().unwrap());
        let pki = modelhub_testkit::tls::TestPki::shared();
        let (stop_r, stopped_r) = oneshot::channel::<()>();
        let registry_task = tokio::spawn(modelhub_registry::run(
            modelhub_registry::Settings {
                mtls_dir: pki.dir().to_path_buf(),
                ..modelhub_registry::Settings::for_test(dir.path())
            },
            registry_l,
            async {
                let _ = stopped_r.await;
            },
        ));

        let gateway_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gateway = gateway_l.local_addr().unwrap();
        let (stop_g, stopped_g) = oneshot::channel::<()>();
        let settings = Settings {
            mtls_dir: pki.dir().to_path_buf(),
            ..Settings::for_test(registry.clone(), closed_port(), closed_port())
        };
        let gateway_task = tokio::spawn(run(settings, gateway_l, async {
            let _ = stopped_g.await;
        }));

        // The operator's bootstrap: the admin identity may create accounts and keys.
        let channel = pki
            .identity(modelhub_mtls::Identity::Admin)
            .endpoint(modelhub_mtls::Identity::Registry, &registry)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = RegistryClient::new(channel);
        let account = client
            .create_account(pb::CreateAccountRequest {
                name: "admin".into(),
                admin: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let key = client
            .create_key(pb::CreateKeyRequest {
                account_id: account.account_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let admin = Key {
            key_id: key.key_id,
            secret: signing::decode_secret(&key.secret).unwrap(),
            account_id: key.account_id,
        };
        Stack {
            _dir: dir,
            gateway,
            registry,
            admin,
            // the gateway stops first
            stops: vec![stop_g, stop_r],
            tasks: vec![gateway_task, registry_task],
            http: reqwest::Client::new(),
        }
    }

    pub async fn stop(self) {
        for (stop, task) in self.stops.into_iter().zip(self.tasks) {
            stop.send(()).unwrap();
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("service stops")
                .unwrap()
                .unwrap();
        }
    }

    /// A signed request; returns the status and the JSON body (`null` when empty).
    async fn call(
        &self,
        key: &Key,
        method: &str,
        path_and_query: &str,
        body: &[u8],
    ) -> (u16, Value) {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let headers = signing::sign(
            &key.key_id,
            &key.secret,
            method,
            path,
            query,
            &self.gateway.to_string(),
            &signing::sha256_hex(body),
            modelhub_core::id::unix_now(),
            &signing::new_nonce(),
        );
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(method, format!("http://{}{path_and_query}", self.gateway))
            .body(body.to_vec());
        for (n, v) in headers {
            req = req.header(n, v);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let bytes = res.bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, body)
    }

    async fn json(&self, key: &Key, method: &str, path: &str, body: Value) -> (u16, Value) {
        self.call(key, method, path, body.to_string().as_bytes())
            .await
    }
}

fn assert_error((status, body): &(u16, Value), want_status: u16, code: &str, want: &str) {
    assert_eq!(*status, want_status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(want), "{message:?} should say {want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_keys_and_credits_through_the_gateway() {
    let s = Stack::start().await;
    let admin = s.admin.clone();

    // Admin creates an account, a key for it, and grants credits.
    let (status, body) = s
        .json(&admin, "POST", "/v1/accounts", json!({"name": "alice"}))
        .await;
    assert_eq!(status, 201, "{body}");
    let alice_id = body["account_id"].as_str().unwrap().to_string();
    let (status, body) = s
        .json(&admin, "POST", "/v1/keys", json!({"account_id": alice_id}))
        .await;
    assert_eq!(status, 201, "{body}");
    let alice = Key::from_json(&body);
    assert_eq!(alice.account_id, alice_id);
    let (status, body) = s
        .json(
            &admin,
            "POST",
            "/v1/credits/grant",
            json!({"account_id": alice_id, "amount": 7}),
        )
        .await;
    assert_eq!((status, body), (200, json!({"credits": 7})));

    // Alice sees her account, with a query string in the signed URL.
    let (status, body) = s.call(&alice, "GET", "/v1/account?x=1&a=b+c", b"").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"account_id": alice_id, "handle": null, "credits": 7, "held": 0, "earnings": 0,
               "wallet": null,
              "daily_cap": null, "charged_today": 0, "refund_owed": 0})
    );

    // She makes a second key for herself (empty body), then revokes it: refused at once.
    let (status, body) = s.call(&alice, "POST", "/v1/keys", b"").await;
    assert_eq!(status, 201, "{body}");
    let second = Key::from_json(&body);
    assert_eq!(second.account_id, alice_id);
    assert_eq!(s.call(&second, "GET", "/v1/account", b"").await.0, 200);
    let path = format!("/v1/keys/{}", second.key_id);
    assert_eq!(
        s.call(&alice, "DELETE", &path, b"").await,
        (204, Value::Null)
    );
    assert_error(
        &s.call(&second, "GET", "/v1/account", b"").await,
        401,
        "unauthenticated",
        "revoked",
    );

    // Another account can't touch her keys or make keys for her; admin routes stay closed.
    let (_, body) = s
        .json(&admin, "POST", "/v1/accounts", json!({"name": "bob"}))
        .await;
    let bob_id = body["account_id"].as_str().unwrap().to_string();
    let (_, body) = s
        .json(&admin, "POST", "/v1/keys", json!({"account_id": bob_id}))
        .await;
    let bob = Key::from_json(&body);
    // Someone else's key and no key at all answer alike (no probing of key ids).
    let path = format!("/v1/keys/{}", alice.key_id);
    let theirs = s.call(&bob, "DELETE", &path, b"").await;
    assert_error(&theirs, 404, "not_found", "");
    let missing = s
        .call(
            &bob,
            "DELETE",
            "/v1/keys/mhk_00000000000000000000000000000000",
            b"",
        )
        .await;
    assert_eq!(theirs, missing);
    assert_error(
        &s.json(&bob, "POST", "/v1/keys", json!({"account_id": alice_id}))
            .await,
        403,
        "forbidden",
        "",
    );
    assert_error(
        &s.json(
            &bob,
            "POST",
            "/v1/credits/grant",
            json!({"account_id": bob_id, "amount": 1}),
        )
        .await,
        403,
        "forbidden",
        "admin",
    );
    // The admin may revoke anyone's key.
    assert_eq!(
        s.call(&admin, "DELETE", &format!("/v1/keys/{}", bob.key_id), b"")
            .await
            .0,
        204
    );
    assert_error(
        &s.call(&bob, "GET", "/v1/account", b"").await,
        401,
        "unauthenticated",
        "revoked",
    );

    // Unknown keys and replays are refused by the real key lookup too.
    let stranger = Key {
        key_id: "mhk_00000000000000000000000000000000".into(),
        ..alice.clone()
    };
    assert_error(
        &s.call(&stranger, "GET", "/v1/account", b"").await,
        401,
        "unauthenticated",
        "unknown key or signature does not match",
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_reads_and_pre_upload_checks_through_the_gateway() {
    let s = Stack::start().await;
    let admin = s.admin.clone();

    assert_eq!(
        s.call(&admin, "GET", "/v1/models", b"").await,
        (200, json!([]))
    );
    let missing = "/v1/models/mdl_00000000000000000000000000000000";
    assert_error(
        &s.call(&admin, "GET", missing, b"").await,
        404,
        "not_found",
        "",
    );
    let predict = format!("{missing}/predict");
    let body =
        json!({"inputs": [{"name": "X", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]});
    assert_error(
        &s.json(&admin, "POST", &predict, body).await,
        404,
        "not_found",
        "",
    );

    // The registry checks the name before any byte goes to storage.
    let (status, body) = s
        .call(
            &admin,
            "POST",
            "/v1/models?name=bad%20name!&version=1&price=1",
            b"x",
        )
        .await;
    assert_error(&(status, body), 400, "bad_request", "name");
    // A good name gets as far as storage, which is down here.
    let (status, body) = s
        .call(
            &admin,
            "POST",
            "/v1/models?name=digits&version=1&price=1",
            b"x",
        )
        .await;
    assert_error(&(status, body), 503, "unavailable", "");
    s.stop().await;
}
