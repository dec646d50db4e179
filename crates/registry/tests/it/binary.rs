//! The `modelhub-registry` binary: flags, start on a free port, serve, stop on SIGINT.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use modelhub_proto::registry::v1 as pb;
use modelhub_proto::registry::v1::registry_client::RegistryClient;

const BIN: &str = env!("CARGO_BIN_EXE_modelhub-registry");

#[test]
fn help_lists_the_settings_and_their_env_vars() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "--listen",
        "MODELHUB_REGISTRY_LISTEN",
        "--data-dir",
        "MODELHUB_REGISTRY_DATA_DIR",
        "--kek-file",
        "MODELHUB_REGISTRY_KEK_FILE",
        "--mongodb-uri",
        "MODELHUB_REGISTRY_MONGODB_URI",
        "--mongodb-timeout-ms",
        "MODELHUB_REGISTRY_MONGODB_TIMEOUT_MS",
        "127.0.0.1:50051",
    ] {
        assert!(text.contains(want), "--help lacks {want}:\n{text}");
    }
}

/// The port in a log line such as `... registry listening addr=127.0.0.1:40123`.
fn port_in(line: &str) -> Option<u16> {
    let rest = &line[line.find("127.0.0.1:")? + "127.0.0.1:".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[tokio::test]
async fn binary_serves_and_stops_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(port) = line.contains("registry listening").then(|| port_in(&line)) {
                let _ = tx.send(port);
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the binary logs its address")
        .expect("the log line holds a port");

    let mut client = RegistryClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    let account = client
        .create_account(pb::CreateAccountRequest {
            name: "bin".into(),
            admin: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(account.account_id.starts_with("acct_"));
    drop(client);

    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status =
        modelhub_testkit::eventually_async("the binary exits", Duration::from_secs(15), || {
            std::future::ready(child.try_wait().unwrap())
        })
        .await;
    assert!(status.success(), "exit status {status:?}");
    assert!(data.join("registry.redb").exists());
    assert!(data.join("kek").exists());
}
