//! The registry over gRPC: error codes arrive as the right `ErrorCode`, keys round-trip, the
//! ledger works end to end, and data survives a restart of the service.

use std::time::Duration;

use modelhub_core::{ApiError, ErrorCode, signing};
use modelhub_mtls::Identity;
use modelhub_proto::common::v1 as common;
use modelhub_proto::registry::v1 as pb;
use modelhub_proto::registry::v1::registry_client::RegistryClient;
use modelhub_registry::{Settings, run};
use tokio::sync::oneshot;
use tonic::transport::Channel;

struct Server {
    url: String,
    client: RegistryClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Starts the registry with the shared test certificates; the client calls as the gateway.
    async fn start(mut settings: Settings) -> Server {
        let pki = modelhub_testkit::tls::TestPki::shared();
        settings.mtls_dir = pki.dir().to_path_buf();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(settings, listener, async {
            let _ = stopped.await;
        }));
        let url = format!("https://{addr}");
        let endpoint = pki
            .identity(Identity::Gateway)
            .endpoint(Identity::Registry, &url)
            .unwrap();
        let client = modelhub_testkit::eventually_async(
            "registry accepts connections",
            Duration::from_secs(10),
            || {
                let endpoint = endpoint.clone();
                async move { endpoint.connect().await.ok().map(RegistryClient::new) }
            },
        )
        .await;
        Server {
            url,
            client,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        drop(self.client);
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("registry stops after shutdown")
            .expect("registry task")
            .expect("registry run");
    }
}

fn err<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> ApiError {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(status) => ApiError::from_status(&status),
    }
}

fn model_request(owner: &str, name: &str, version: &str, price: u64) -> pb::CreateModelRequest {
    pb::CreateModelRequest {
        model_id: String::new(),
        owner: owner.to_owned(),
        name: name.to_owned(),
        version: version.to_owned(),
        price,
        cid: "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi".to_owned(),
        sha256: "ab".repeat(32),
        size: 4096,
        wrapped_dek: vec![1; 61],
        circuit_spec: None,
        zk_note: None,
        inputs: vec![common::TensorSpec {
            name: "X".into(),
            datatype: common::DataType::Fp32 as i32,
            shape: vec![-1, 64],
        }],
        outputs: vec![common::TensorSpec {
            name: "label".into(),
            datatype: common::DataType::Int64 as i32,
            shape: vec![-1],
        }],
        commitment: Some("0xabc".into()),
        digest: Some("ab".repeat(32)),
        proof_price: 0,
        max_rows: 0,
        calls_per_minute: 0,
    }
}

async fn account(c: &mut RegistryClient<Channel>, name: &str, admin: bool) -> pb::Account {
    c.create_account(pb::CreateAccountRequest {
        name: name.into(),
        admin,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

#[tokio::test]
async fn key_round_trip_and_revocation() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Settings::for_test(dir.path())).await;
    let mut c = server.client.clone();
    let admin = account(&mut c, "root", true).await;
    assert!(admin.account_id.starts_with("acct_"));

    let created = c
        .create_key(pb::CreateKeyRequest {
            account_id: admin.account_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.key_id.starts_with("mhk_"));
    assert_eq!(created.account_id, admin.account_id);
    let raw = signing::decode_secret(&created.secret).expect("base64url secret");
    assert_eq!(raw.len(), 32);
    assert!(!created.secret.contains('='), "no padding");

    let info = c
        .lookup_key(pb::LookupKeyRequest {
            key_id: created.key_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.secret, raw);
    assert_eq!(info.account_id, admin.account_id);
    assert!(info.admin);
    assert!(!info.revoked);

    // A second key has another secret; a non-admin account's key says so.
    let user = account(&mut c, "user", false).await;
    let other = c
        .create_key(pb::CreateKeyRequest {
            account_id: user.account_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(other.secret, created.secret);
    let info = c
        .lookup_key(pb::LookupKeyRequest {
            key_id: other.key_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!info.admin);
    assert_eq!(info.secret, signing::decode_secret(&other.secret).unwrap());

    c.revoke_key(pb::RevokeKeyRequest {
        key_id: created.key_id.clone(),
    })
    .await
    .unwrap();
    let info = c
        .lookup_key(pb::LookupKeyRequest {
            key_id: created.key_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(info.revoked);
    assert_eq!(info.secret, raw);

    let e = err(c
        .revoke_key(pb::RevokeKeyRequest {
            key_id: "mhk_missing".into(),
        })
        .await);
    assert_eq!(e.code, ErrorCode::NotFound);
    let e = err(c
        .lookup_key(pb::LookupKeyRequest {
            key_id: "mhk_missing".into(),
        })
        .await);
    assert_eq!(e.code, ErrorCode::NotFound);
    let e = err(c
        .create_key(pb::CreateKeyRequest {
            account_id: "acct_missing".into(),
        })
        .await);
    assert_eq!(e.code, ErrorCode::NotFound);

    // The secret is sealed at rest: the raw bytes are nowhere in the database file.
    server.stop().await;
    let file = std::fs::read(dir.path().join("registry.redb")).unwrap();
    assert!(!file.windows(raw.len()).any(|w| w == raw.as_slice()));
    assert!(
        !file
            .windows(created.secret.len())
            .any(|w| w == created.secret.as_bytes())
    );
    assert!(dir.path().join("kek").exists());
}

#[tokio::test]
async fn error_codes_cross_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Settings::for_test(dir.path())).await;
    let mut c = server.client.clone();

    // NotFound
    let e = err(c
        .get_account(pb::GetAccountRequest {
            account_id: "acct_missing".into(),
        })
        .await);
    assert_eq!(e.code, ErrorCode::NotFound);
    let e = err(c
        .get_model(pb::GetModelRequest {
            model_id: "mdl_missing".into(),
        })
        .await);
    assert_eq!(e.code, ErrorCode::NotFound);
    let e = err(c
        .commit(pb::CommitRequest {
            reservation_id: "rsv_missing".into(),
            ..Default::default()
        })
        .await);
    assert_eq!(e.code, ErrorCode::NotFound);

    // BadRequest
    for name in ["", &"x".repeat(65)] {
        let e = err(c
            .create_account(pb::CreateAccountRequest {
                name: name.to_owned(),
                admin: false,
                ..Default::default()
            })
            .await);
        assert_eq!(e.code, ErrorCode::BadRequest, "{name:?}");
    }
    let owner = account(&mut c, &"é".repeat(64), false).await;
    let e = err(c
        .check_model_name(pb::CheckModelNameRequest {
            name: "bad name".into(),
            version: "1".into(),
            owner: owner.account_id.clone(),
        })
        .await);
    assert_eq!(e.code, ErrorCode::BadRequest);
    let e = err(c
        .create_model(model_request(&owner.account_id, "ok", "1/2", 1))
        .await);
    assert_eq!(e.code, ErrorCode::BadRequest);
    let mut no_cid = model_request(&owner.account_id, "ok", "1", 1);
    no_cid.cid.clear();
    assert_eq!(
        err(c.create_model(no_cid).await).code,
        ErrorCode::BadRequest
    );
    c.grant_credits(pb::GrantCreditsRequest {
        account_id: owner.account_id.clone(),
        amount: u64::MAX,
    })
    .await
    .unwrap();
    let e = err(c
        .grant_credits(pb::GrantCreditsRequest {
            account_id: owner.account_id.clone(),
            amount: 1,
        })
        .await);
    assert_eq!(e.code, ErrorCode::BadRequest);
    let e = err(c
        .reserve(pb::ReserveRequest {
            account_id: String::new(),
            model_id: "mdl_x".into(),
            idempotency_key: String::new(),
            ..Default::default()
        })
        .await);
    assert_eq!(e.code, ErrorCode::BadRequest);

    // NotFound for an unknown owner; Conflict for a taken name and version.
    let e = err(c
        .create_model(model_request("acct_missing", "digits", "1.0.0", 1))
        .await);
    assert_eq!(e.code, ErrorCode::NotFound);
    c.check_model_name(pb::CheckModelNameRequest {
        name: "digits".into(),
        version: "1.0.0".into(),
        owner: owner.account_id.clone(),
    })
    .await
    .unwrap();
    let m = c
        .create_model(model_request(&owner.account_id, "digits", "1.0.0", 5))
        .await
        .unwrap()
        .into_inner();
    let e = err(c
        .check_model_name(pb::CheckModelNameRequest {
            name: "digits".into(),
            version: "1.0.0".into(),
            owner: owner.account_id.clone(),
        })
        .await);
    assert_eq!(e.code, ErrorCode::Conflict);
    // Names are per owner: another account may publish its own digits@1.0.0.
    let other = account(&mut c, "other", false).await;
    c.check_model_name(pb::CheckModelNameRequest {
        name: "digits".into(),
        version: "1.0.0".into(),
        owner: other.account_id.clone(),
    })
    .await
    .unwrap();
    // Handles: checked, unique, and copied into the records of the owner's models.
    for bad in ["A", "x", "-ab", "ab-", "a_b", "admin", &"a".repeat(40)] {
        let e = err(c
            .create_account(pb::CreateAccountRequest {
                name: "h".into(),
                handle: bad.to_owned(),
                ..Default::default()
            })
            .await);
        assert_eq!(e.code, ErrorCode::BadRequest, "{bad:?}");
    }
    let alice = c
        .create_account(pb::CreateAccountRequest {
            name: "Alice".into(),
            handle: "alice-ml".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(alice.handle, "alice-ml");
    let e = err(c
        .create_account(pb::CreateAccountRequest {
            name: "Mallory".into(),
            handle: "alice-ml".into(),
            ..Default::default()
        })
        .await);
    assert_eq!(e.code, ErrorCode::Conflict);
    assert!(e.message.contains("handle"), "{}", e.message);
    let hers = c
        .create_model(model_request(&alice.account_id, "digits", "1.0.0", 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hers.owner_handle, "alice-ml");
    assert_eq!(m.owner_handle, "", "an owner without a handle");
    let e = err(c
        .create_model(model_request(&owner.account_id, "digits", "1.0.0", 5))
        .await);
    assert_eq!(e.code, ErrorCode::Conflict);

    // PaymentRequired, with the documented message.
    let buyer = account(&mut c, "buyer", false).await;
    c.grant_credits(pb::GrantCreditsRequest {
        account_id: buyer.account_id.clone(),
        amount: 3,
    })
    .await
    .unwrap();
    let e = err(c
        .reserve(pb::ReserveRequest {
            account_id: buyer.account_id.clone(),
            model_id: m.model_id.clone(),
            idempotency_key: String::new(),
            ..Default::default()
        })
        .await);
    assert_eq!(e.code, ErrorCode::PaymentRequired);
    assert_eq!(e.message, "insufficient credits: balance 3, price 5");

    // Conflict: commit after release.
    c.grant_credits(pb::GrantCreditsRequest {
        account_id: buyer.account_id.clone(),
        amount: 2,
    })
    .await
    .unwrap();
    let r = c
        .reserve(pb::ReserveRequest {
            account_id: buyer.account_id.clone(),
            model_id: m.model_id.clone(),
            idempotency_key: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    c.release(pb::ReleaseRequest {
        reservation_id: r.reservation_id.clone(),
    })
    .await
    .unwrap();
    let e = err(c
        .commit(pb::CommitRequest {
            reservation_id: r.reservation_id.clone(),
            ..Default::default()
        })
        .await);
    assert_eq!(e.code, ErrorCode::Conflict);
    server.stop().await;
}

#[tokio::test]
async fn models_and_ledger_end_to_end_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Settings::for_test(dir.path())).await;
    let mut c = server.client.clone();
    let owner = account(&mut c, "creator", false).await;
    let buyer = account(&mut c, "buyer", false).await;

    let b = c
        .create_model(model_request(&owner.account_id, "b-model", "1.0", 2))
        .await
        .unwrap()
        .into_inner();
    let mut req = model_request(&owner.account_id, "a-model", "2.0", 0);
    req.model_id = "mdl_fixed_id".into();
    req.commitment = None;
    let a = c.create_model(req.clone()).await.unwrap().into_inner();
    assert_eq!(a.model_id, "mdl_fixed_id");
    assert_eq!(a.commitment, None);
    assert_eq!(a.inputs, req.inputs);
    assert_eq!(a.outputs, req.outputs);
    assert_eq!(a.wrapped_dek, req.wrapped_dek);
    assert!(a.created_at > 0);
    let got = c
        .get_model(pb::GetModelRequest {
            model_id: b.model_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, b);
    assert_eq!(got.commitment.as_deref(), Some("0xabc"));
    let listed = c
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(listed, vec![a.clone(), b.clone()]);

    let funded = c
        .grant_credits(pb::GrantCreditsRequest {
            account_id: buyer.account_id.clone(),
            amount: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(funded.credits, 10);
    let reserve = pb::ReserveRequest {
        account_id: buyer.account_id.clone(),
        model_id: b.model_id.clone(),
        idempotency_key: "req-7".into(),
        ..Default::default()
    };
    let r = c.reserve(reserve.clone()).await.unwrap().into_inner();
    assert_eq!(r.amount, 2);
    assert_eq!((r.state.as_str(), r.existing), ("held", false));
    // A retry while the first attempt is in flight names that attempt.
    let in_flight = c.reserve(reserve.clone()).await.unwrap().into_inner();
    assert_eq!(in_flight.reservation_id, r.reservation_id);
    assert_eq!(
        (in_flight.state.as_str(), in_flight.existing),
        ("held", true)
    );
    // The same key for another request is a conflict.
    let e = err(c
        .reserve(pb::ReserveRequest {
            fingerprint: "another request".into(),
            ..reserve.clone()
        })
        .await);
    assert_eq!(e.code, ErrorCode::Conflict, "{e:?}");
    let available = c
        .get_account(pb::GetAccountRequest {
            account_id: buyer.account_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(available.credits, 8, "held credits are not available");
    assert_eq!(available.held, 2, "held credits are shown");

    let receipt = c
        .commit(pb::CommitRequest {
            reservation_id: r.reservation_id.clone(),
            response: b"the first answer".to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        receipt.receipt_id, r.receipt_id,
        "the receipt id was known before"
    );
    assert_eq!(receipt.credits_charged, 2);
    // A retry after the commit gets the kept response, and charges nothing.
    let replay = c.reserve(reserve.clone()).await.unwrap().into_inner();
    assert_eq!(
        (
            replay.state.as_str(),
            replay.existing,
            replay.response.as_slice()
        ),
        ("committed", true, b"the first answer".as_slice())
    );
    let after = c
        .get_account(pb::GetAccountRequest {
            account_id: buyer.account_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((after.credits, after.held), (8, 0));

    // A failed attempt (released: nothing charged) frees its key: the retry runs anew.
    let failing = pb::ReserveRequest {
        idempotency_key: "req-8".into(),
        fingerprint: "fp-8".into(),
        ..reserve.clone()
    };
    let first_try = c.reserve(failing.clone()).await.unwrap().into_inner();
    c.release(pb::ReleaseRequest {
        reservation_id: first_try.reservation_id.clone(),
    })
    .await
    .unwrap();
    let second_try = c.reserve(failing.clone()).await.unwrap().into_inner();
    assert_ne!(second_try.reservation_id, first_try.reservation_id);
    assert_eq!(
        (second_try.state.as_str(), second_try.existing),
        ("held", false)
    );
    let released = c
        .release(pb::ReleaseRequest {
            reservation_id: second_try.reservation_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.state, "released");
    assert_eq!(receipt.owner, owner.account_id);
    assert_eq!(receipt.account_id, buyer.account_id);
    let again = c
        .commit(pb::CommitRequest {
            reservation_id: r.reservation_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, receipt);
    c.release(pb::ReleaseRequest {
        reservation_id: r.reservation_id.clone(),
    })
    .await
    .unwrap();
    server.stop().await;

    // Same data dir, new process-level service: everything is still there.
    let server = Server::start(Settings::for_test(dir.path())).await;
    let mut c = server.client.clone();
    let owner_now = c
        .get_account(pb::GetAccountRequest {
            account_id: owner.account_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(owner_now.earnings, 2);
    let buyer_now = c
        .get_account(pb::GetAccountRequest {
            account_id: buyer.account_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(buyer_now.credits, 8);
    assert_eq!(
        c.list_models(pb::ListModelsRequest {})
            .await
            .unwrap()
            .into_inner()
            .models,
        vec![a, b]
    );
    assert_eq!(
        c.commit(pb::CommitRequest {
            reservation_id: r.reservation_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner(),
        receipt
    );
    server.stop().await;
}

#[tokio::test]
async fn health_reports_serving() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Settings::for_test(dir.path())).await;
    // Any authenticated identity may ask, even one that may call no registry method.
    let channel = modelhub_testkit::tls::TestPki::shared()
        .identity(Identity::Storage)
        .endpoint(Identity::Registry, &server.url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let resp = health
        .check(HealthCheckRequest {
            service: "modelhub.registry.v1.Registry".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.status(), ServingStatus::Serving);
    server.stop().await;
}
