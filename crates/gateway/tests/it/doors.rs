//! The doors of issue "First: the doors": a signed request works once across gateways and
//! restarts (the nonce store is the registry's), only the hosts a gateway serves are signed
//! for, unsigned requests are refused before their body is read, and slow or greedy clients
//! can't keep another client's signed request from being answered.

use std::net::SocketAddr;
use std::time::Duration;

use modelhub_core::signing;
use modelhub_gateway::{Settings, run};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;

use crate::registry::{Key, Stack, closed_port};

/// A gateway of its own on `registry`.
struct Gateway {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Gateway {
    fn start(registry: &str, edit: impl FnOnce(&mut Settings)) -> Gateway {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut settings = Settings {
            mtls_dir: modelhub_testkit::tls::TestPki::shared().dir().to_path_buf(),
            ..Settings::for_test(registry.to_owned(), closed_port(), closed_port())
        };
        edit(&mut settings);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(settings, listener, async {
            let _ = stopped.await;
        }));
        Gateway { addr, stop, task }
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("gateway stops")
            .unwrap()
            .unwrap();
    }
}

/// The headers of one signed request, fixed once: sending them again is a replay.
fn signed(key: &Key, method: &str, path: &str, host: &str, body: &[u8]) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = signing::sign(
        &key.key_id,
        &key.secret,
        method,
        path,
        "",
        host,
        &signing::sha256_hex(body),
        modelhub_core::id::unix_now(),
        &signing::new_nonce(),
    )
    .into_iter()
    .map(|(n, v)| (n.to_owned(), v))
    .collect();
    headers.push(("host".into(), host.into()));
    headers
}

async fn send(
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> (u16, serde_json::Value) {
    let client = reqwest::Client::new();
    let mut req = client
        .request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            format!("http://{to}{path}"),
        )
        .body(body.to_vec());
    for (n, v) in headers {
        req = req.header(n, v);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let bytes = res.bytes().await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_request_works_once_across_gateways_and_restarts() {
    let s = Stack::start().await;
    // Two gateways behind one public name, as behind a load balancer.
    let public = "api.modelhub.test";
    let serve_public = |st: &mut Settings| st.allowed_hosts = vec![public.to_owned()];
    let a = Gateway::start(&s.registry, serve_public);
    let b = Gateway::start(&s.registry, serve_public);

    // A captured `POST /v1/keys` makes a key once, whichever gateway it is sent to.
    let body = format!(r#"{{"account_id":"{}"}}"#, s.admin.account_id);
    let captured = signed(&s.admin, "POST", "/v1/keys", public, body.as_bytes());
    let (status, first) = send(a.addr, "POST", "/v1/keys", &captured, body.as_bytes()).await;
    assert_eq!(status, 201, "{first}");
    let (status, again) = send(b.addr, "POST", "/v1/keys", &captured, body.as_bytes()).await;
    assert_eq!(status, 401, "{again}");
    assert_eq!(again["error"]["message"], "nonce was already used");

    // And after a restart of the gateway that accepted it.
    let read = signed(&s.admin, "GET", "/v1/account", public, b"");
    assert_eq!(send(a.addr, "GET", "/v1/account", &read, b"").await.0, 200);
    a.stop().await;
    let a = Gateway::start(&s.registry, serve_public);
    let (status, body) = send(a.addr, "GET", "/v1/account", &read, b"").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthenticated"))
    );

    // A request signed for a host the gateways don't serve is refused.
    let elsewhere = signed(&s.admin, "GET", "/v1/account", "evil.example:1", b"");
    let (status, body) = send(a.addr, "GET", "/v1/account", &elsewhere, b"").await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("host"),
        "{body}"
    );
    a.stop().await;
    b.stop().await;
    s.stop().await;
}

/// Opens a connection from `from` and sends `head` (request line and headers) plus `body`.
async fn open(from: &str, to: SocketAddr, head: &str, body: &[u8]) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(to).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    stream
}

/// The status of the answer on `stream`, or `None` when none came within `wait`.
async fn status_within(stream: &mut TcpStream, wait: Duration) -> Option<u16> {
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(wait, stream.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf[..n]);
    text.split_whitespace().nth(1)?.parse().ok()
}

fn head_of(method: &str, path: &str, headers: &[(String, String)], length: usize) -> String {
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str(&format!("content-length: {length}\r\n\r\n"));
    head
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_cannot_keep_a_signed_request_from_being_answered() {
    let s = Stack::start().await;
    let gw = Gateway::start(&s.registry, |st| st.max_requests_per_client = 8);
    let host = gw.addr.to_string();

    // Unsigned requests that promise a large body are refused before it is read.
    let unsigned =
        format!("POST /v1/accounts HTTP/1.1\r\nhost: {host}\r\ncontent-length: 1000000\r\n\r\n");
    let mut refused = Vec::new();
    for _ in 0..200 {
        refused.push(open("127.0.0.1", gw.addr, &unsigned, b"x").await);
    }
    for stream in &mut refused {
        assert_eq!(
            status_within(stream, Duration::from_secs(10)).await,
            Some(401)
        );
    }
    drop(refused);

    // Signed requests whose bodies trickle: eight are held (until the body deadline), the
    // rest from that address are answered 429 at once.
    let body_len = 1_000_000;
    let mut slow = Vec::new();
    for _ in 0..20 {
        let headers = signed(
            &s.admin,
            "POST",
            "/v1/accounts",
            &host,
            b"never sent in full",
        );
        let head = head_of("POST", "/v1/accounts", &headers, body_len);
        slow.push(open("127.0.0.1", gw.addr, &head, b"{").await);
    }
    let mut held = Vec::new();
    let mut too_many = 0;
    for mut stream in slow {
        match status_within(&mut stream, Duration::from_millis(500)).await {
            Some(429) => too_many += 1,
            None => held.push(stream),
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!((held.len(), too_many), (8, 12));

    // Meanwhile another client's signed request is answered.
    let client = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let headers = signed(&s.admin, "GET", "/v1/account", &host, b"");
    let mut req = client.get(format!("http://{host}/v1/account"));
    for (n, v) in &headers {
        req = req.header(n, v);
    }
    assert_eq!(req.send().await.unwrap().status().as_u16(), 200);

    // The trickling bodies are cut (408) once they fall below the minimum rate.
    for stream in &mut held {
        assert_eq!(
            status_within(stream, Duration::from_secs(30)).await,
            Some(408)
        );
    }
    gw.stop().await;
    s.stop().await;
}

/// A self-signed certificate for `localhost`, written as PEM files `<name>.crt` and
/// `<name>.key` in `dir`: (cert, key, its DER).
fn localhost_certificate(
    dir: &std::path::Path,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    (cert, key, made.cert.der().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_port_speaks_https_with_the_given_certificate() {
    let s = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = localhost_certificate(dir.path(), "gateway");
    let g = Gateway::start(&s.registry, |st| {
        st.tls_cert = Some(cert.clone());
        st.tls_key = Some(key.clone());
    });
    let host = format!("localhost:{}", g.addr.port());
    let https = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_der(&der).unwrap()])
        .resolve("localhost", g.addr)
        .build()
        .unwrap();

    // A signed request over TLS, for the host the certificate names.
    let headers = signed(&s.admin, "GET", "/v1/account", &host, b"");
    let mut req = https.get(format!("https://{host}/v1/account"));
    for (n, v) in headers.iter().filter(|(n, _)| n != "host") {
        req = req.header(n, v);
    }
    let res =
        modelhub_testkit::eventually_async("the gateway answers", Duration::from_secs(10), || {
            let req = req.try_clone().unwrap();
            async move { req.send().await.ok() }
        })
        .await;
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["account_id"], s.admin.account_id.as_str());

    // Plain HTTP on the TLS port gets no HTTP answer; a client that doesn't trust the
    // certificate is refused at the handshake.
    let plain = reqwest::get(format!("http://{}/v1/health", g.addr)).await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    let untrusting = reqwest::Client::builder()
        .tls_certs_only([])
        .resolve("localhost", g.addr)
        .build()
        .unwrap();
    let refused = untrusting
        .get(format!("https://{host}/v1/health"))
        .send()
        .await;
    assert!(refused.is_err(), "{refused:?}");
    g.stop().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_served_only_on_loopback_or_behind_a_tls_proxy() {
    let public = || {
        let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let settings = Settings {
            mtls_dir: modelhub_testkit::tls::TestPki::shared().dir().to_path_buf(),
            allowed_hosts: vec!["api.modelhub.test".into()],
            ..Settings::for_test(closed_port(), closed_port(), closed_port())
        };
        (l, settings)
    };
    let (l, settings) = public();
    let e = run(settings, l, std::future::pending()).await.unwrap_err();
    assert!(format!("{e:#}").contains("--tls-cert"), "{e:#}");

    // Behind a proxy the operator says so, and it serves.
    let (l, mut settings) = public();
    settings.behind_tls_proxy = true;
    let addr = l.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run(settings, l, async {
        let _ = stopped.await;
    }));
    let url = format!("http://127.0.0.1:{}/v1/health", addr.port());
    let status = modelhub_testkit::eventually_async("it serves", Duration::from_secs(10), || {
        let url = url.clone();
        async move { reqwest::get(url).await.ok().map(|r| r.status().as_u16()) }
    })
    .await;
    assert_eq!(status, 200);
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();

    // Certificate files that are missing or not a pair are refused at start.
    let dir = tempfile::tempdir().unwrap();
    let (cert, _key, _) = localhost_certificate(dir.path(), "gateway");
    let (_, other_key, _) = localhost_certificate(dir.path(), "other");
    for (cert, key, says) in [
        (
            cert.clone(),
            dir.path().join("missing.key"),
            "TLS private key",
        ),
        (cert.clone(), other_key, "don't make a usable pair"),
        (
            dir.path().join("missing.crt"),
            cert.clone(),
            "certificate chain",
        ),
    ] {
        let (l, mut settings) = public();
        settings.tls_cert = Some(cert);
        settings.tls_key = Some(key);
        let e = run(settings, l, std::future::pending()).await.unwrap_err();
        assert!(format!("{e:#}").contains(says), "{e:#}");
    }
}
