//! The internal services authenticate every caller by its client certificate and let it call
//! only what its identity may: every RPC of every service, taken from the generated descriptor
//! set (so a new RPC can't be forgotten), is called on a running `modelhub up`
//! - over TLS without a client certificate → `UNAUTHENTICATED`;
//! - with each certificate the service's table does not list for it → `PERMISSION_DENIED`;
//! - in plain text (h2c) → no answer at all;
//! - with each listed certificate → past the authorization (the handler answers, usually
//!   `INVALID_ARGUMENT` for the empty message).

use std::time::Duration;

use modelhub_cli::up::{self, UpSettings};
use modelhub_mtls::{Identity, policy};
use modelhub_proto::registry::v1 as reg;
use modelhub_testkit::tls::TestPki;
use prost::Message;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Sends an empty message and ignores what comes back: enough to see who answers.
#[derive(Debug, Clone, Copy, Default)]
struct Empty;

impl Codec for Empty {
    type Encode = ();
    type Decode = ();
    type Encoder = Empty;
    type Decoder = Empty;
    fn encoder(&mut self) -> Empty {
        Empty
    }
    fn decoder(&mut self) -> Empty {
        Empty
    }
}

impl Encoder for Empty {
    type Item = ();
    type Error = tonic::Status;
    fn encode(&mut self, _: (), _: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        Ok(())
    }
}

impl Decoder for Empty {
    type Item = ();
    type Error = tonic::Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        use bytes::Buf;
        let n = buf.remaining();
        buf.advance(n);
        Ok(Some(()))
    }
}

/// Calls `/{service}/{method}` with an empty message; the status it ends with (OK included).
async fn call(channel: Channel, service: &str, method: &str) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    let path: tonic::codegen::http::uri::PathAndQuery =
        format!("/{service}/{method}").parse().unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(20), async {
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        grpc.unary(tonic::Request::new(()), path, Empty).await
    })
    .await
    .unwrap_or_else(|_| panic!("{service}/{method} hung"));
    match answer {
        Ok(_) => tonic::Status::ok(""),
        Err(status) => status,
    }
}

/// The RPCs of each Model Hub service, from the generated descriptor set.
fn rpcs() -> Vec<(String, Vec<String>)> {
    let set = prost_types::FileDescriptorSet::decode(modelhub_proto::FILE_DESCRIPTOR_SET).unwrap();
    set.file
        .iter()
        .flat_map(|f| {
            f.service.iter().map(move |s| {
                (
                    format!("{}.{}", f.package(), s.name()),
                    s.method.iter().map(|m| m.name().to_owned()).collect(),
                )
            })
        })
        .collect()
}

/// A channel over TLS that trusts `dir`'s CA and presents no certificate.
fn anonymous(dir: &std::path::Path, server: Identity, url: &str) -> Channel {
    let ca = std::fs::read(dir.join("ca.pem")).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(server.name());
    modelhub_mtls::lazy_channel(
        &Endpoint::from_shared(url.to_owned())
            .unwrap()
            .tls_config(tls)
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_of_every_service_checks_the_callers_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let running = up::start(UpSettings::for_test(dir.path())).await.unwrap();
    let tls = running.mtls_dir.clone();
    let as_ = |caller: Identity, server: Identity, url: &str| {
        modelhub_mtls::lazy_channel(
            &modelhub_mtls::TlsDir::load(&tls, caller)
                .unwrap()
                .endpoint(server, url)
                .unwrap(),
        )
    };
    let e = &running.endpoints;
    let services = [
        (&policy::REGISTRY, Identity::Registry, &e.registry),
        (&policy::STORAGE, Identity::Storage, &e.storage),
        (&policy::INFERENCE, Identity::Inference, &e.inference),
        (&policy::PROVER, Identity::Prover, &e.prover),
    ];

    let rpcs = rpcs();
    assert_eq!(
        rpcs.len(),
        services.len(),
        "a service without a row here: {rpcs:?}"
    );
    let mut checked = 0;
    for (service, methods) in &rpcs {
        let (policy, server, url) = services
            .iter()
            .find(|(p, ..)| p.service == service)
            .unwrap_or_else(|| panic!("{service} is not served by `modelhub up` here"));
        for method in methods {
            let allowed = policy.callers(method);
            assert!(!allowed.is_empty(), "{service}/{method} has no caller");

            let s = call(anonymous(&tls, *server, url), service, method).await;
            assert_eq!(s.code(), Code::Unauthenticated, "{service}/{method}: {s:?}");
            assert!(s.message().contains("client certificate"), "{s:?}");

            let s = call(TestPki::plaintext_channel(url), service, method).await;
            assert_ne!(s.code(), Code::Ok, "{service}/{method} answered h2c");

            for caller in Identity::ALL {
                let s = call(as_(caller, *server, url), service, method).await;
                if allowed.contains(&caller) {
                    assert_ne!(
                        s.code(),
                        Code::Unauthenticated,
                        "{caller} {service}/{method}"
                    );
                    assert!(
                        !s.message().contains("may not call"),
                        "{caller} is allowed {service}/{method}: {s:?}"
                    );
                } else {
                    assert_eq!(
                        s.code(),
                        Code::PermissionDenied,
                        "{caller} {service}/{method}: {s:?}"
                    );
                    assert_eq!(
                        s.message(),
                        format!("{caller} may not call {service}/{method}")
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 6 * 24, "{checked} calls");

    // Health: any authenticated identity, nobody without a certificate.
    for (_, server, url) in &services {
        for caller in Identity::ALL {
            let s = call(as_(caller, *server, url), "grpc.health.v1.Health", "Check").await;
            assert_eq!(s.code(), Code::Ok, "{caller} health of {server}: {s:?}");
        }
        let s = call(
            anonymous(&tls, *server, url),
            "grpc.health.v1.Health",
            "Check",
        )
        .await;
        assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    }

    // A representative real call: the admin tool and the gateway create accounts, nobody
    // else (the reproduced attack: CreateAccount{admin: true} from any local process).
    let request = || reg::CreateAccountRequest {
        name: "mallory".into(),
        admin: true,
        ..Default::default()
    };
    for caller in [Identity::Admin, Identity::Gateway] {
        let mut c =
            reg::registry_client::RegistryClient::new(as_(caller, Identity::Registry, &e.registry));
        let account = c.create_account(request()).await.unwrap().into_inner();
        assert!(account.account_id.starts_with("acct_"));
    }
    for caller in [Identity::Inference, Identity::Prover, Identity::Storage] {
        let mut c =
            reg::registry_client::RegistryClient::new(as_(caller, Identity::Registry, &e.registry));
        let s = c.create_account(request()).await.unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    }
    let mut c =
        reg::registry_client::RegistryClient::new(anonymous(&tls, Identity::Registry, &e.registry));
    let s = c.create_account(request()).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");

    // A certificate from another CA is refused at the handshake.
    let other = TestPki::new();
    let mut c = reg::registry_client::RegistryClient::new(other.channel(
        Identity::Gateway,
        Identity::Registry,
        &e.registry,
    ));
    assert!(c.create_account(request()).await.is_err());

    running.stop().await;
}
