//! `run`: serving, JSON errors over real HTTP, gRPC channels from the worker threads, and a
//! graceful stop that lets an in-flight request finish.

use std::net::SocketAddr;
use std::time::Duration;

use modelhub_core::signing;
use modelhub_gateway::{Settings, run};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// An address where nothing listens.
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("https://{}", l.local_addr().unwrap())
}

struct Gateway {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Gateway {
    fn start() -> Gateway {
        let settings = Settings {
            mtls_dir: modelhub_testkit::tls::TestPki::shared().dir().to_path_buf(),
            ..Settings::for_test(closed_port(), closed_port(), closed_port())
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(settings, listener, async {
            let _ = stopped.await;
        }));
        Gateway {
            addr,
            stop: Some(stop),
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("run returns after shutdown")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_health_and_json_errors_and_stops() {
    let gw = Gateway::start();
    let http = reqwest::Client::new();

    let res = http.get(gw.url("/v1/health")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"status": "ok"}));

    let res = http.get(gw.url("/nope")).send().await.unwrap();
    assert_eq!(res.status(), 404);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");

    let res = http.get(gw.url("/v1/account")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthenticated");

    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_request_reaches_the_registry_from_a_worker_thread() {
    let gw = Gateway::start();
    let http = reqwest::Client::new();
    let host = gw.addr.to_string();
    // Several requests, so both workers' channels are used.
    for _ in 0..4 {
        let headers = signing::sign(
            "mhk_someone",
            b"secret",
            "GET",
            "/v1/account",
            "",
            &host,
            &signing::sha256_hex(b""),
            modelhub_core::id::unix_now(),
            &signing::new_nonce(),
        );
        let mut req = http.get(gw.url("/v1/account"));
        for (name, value) in headers {
            req = req.header(name, value);
        }
        let res = req.send().await.unwrap();
        // The key lookup goes to the registry, which is down.
        assert_eq!(res.status(), 503);
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unavailable");
    }
    gw.stop().await;
}

/// Reads one HTTP/1.1 response with a `content-length` from `stream`.
async fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "connection closed early: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                let status = head.split(' ').nth(1).unwrap().parse().unwrap();
                return (status, body[..len].to_string());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_finishes_after_shutdown_is_asked() {
    let gw = Gateway::start();
    let mut conn = TcpStream::connect(gw.addr).await.unwrap();
    // A first request proves a worker holds the connection.
    conn.write_all(b"GET /v1/health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut conn).await.0, 200);
    // A request that waits for its body: once "100 Continue" is back, the request is in a
    // worker's hands. Then shutdown, then the body.
    conn.write_all(
        b"POST /v1/accounts HTTP/1.1\r\nhost: x\r\ncontent-length: 12\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut continued = Vec::new();
    while !continued.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(
            conn.read(&mut byte).await.unwrap(),
            1,
            "connection closed early"
        );
        continued.push(byte[0]);
    }
    assert!(continued.starts_with(b"HTTP/1.1 100"), "{continued:?}");
    let Gateway { stop, task, .. } = gw;
    stop.unwrap().send(()).unwrap();
    conn.write_all(b"{\"name\":\"a\"}").await.unwrap();
    let (status, body) = read_response(&mut conn).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("missing authorization header"), "{body}");
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("run returns after shutdown")
        .unwrap()
        .unwrap();
}
