//! The `modelhub-registry` binary: flags, start on a free port, serve over mutual TLS, stop
//! gracefully on SIGINT and SIGTERM, refuse to start without certificates or with a KEK file
//! others can read.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use modelhub_mtls::Identity;
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
        "--mtls-dir",
        "MODELHUB_REGISTRY_MTLS_DIR",
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

/// A started `modelhub-registry` process and the log lines it has written so far.
struct Running {
    child: std::process::Child,
    port: u16,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// Starts the binary on a free port with the shared test certificates and waits for its
/// "listening" log line.
fn start(data: &std::path::Path, extra: &[&std::ffi::OsStr]) -> Running {
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .args(extra)
        .arg("--mtls-dir")
        .arg(modelhub_testkit::tls::TestPki::shared().dir())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let lines = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(port) = line.contains("registry listening").then(|| port_in(&line)) {
                let _ = tx.send(port);
            }
            lines.lock().unwrap().push(line);
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the binary logs its address")
        .expect("the log line holds a port");
    Running { child, port, log }
}

/// Sends `signal` to the process and checks that it exits 0 after logging its stop.
async fn stops_gracefully_on(signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Running {
        mut child,
        port,
        log,
    } = start(&data, &[]);

    let channel = modelhub_testkit::tls::TestPki::shared()
        .identity(Identity::Admin)
        .endpoint(Identity::Registry, &format!("https://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = RegistryClient::new(channel);
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
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status =
        modelhub_testkit::eventually_async("the binary exits", Duration::from_secs(15), || {
            std::future::ready(child.try_wait().unwrap())
        })
        .await;
    assert!(status.success(), "exit status {status:?}");
    let log = modelhub_testkit::eventually("the stop in the log", Duration::from_secs(5), || {
        let log = log.lock().unwrap().join("\n");
        log.contains("registry stopped").then_some(log)
    });
    assert!(log.contains(&format!("signal=\"SIG{signal}\"")), "{log}");
    assert!(data.join("registry.redb").exists());
    assert!(data.join("kek").exists());
}

#[tokio::test]
async fn binary_serves_and_stops_on_sigint() {
    stops_gracefully_on("INT").await;
}

#[tokio::test]
async fn binary_stops_gracefully_on_sigterm() {
    stops_gracefully_on("TERM").await;
}

/// Runs the binary expecting it to refuse to start; returns its stderr.
fn refuses(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn refuses_to_start_without_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    let stderr = refuses(&[
        "--data-dir".as_ref(),
        dir.path().join("data").as_os_str(),
        "--mtls-dir".as_ref(),
        tls.as_os_str(),
    ]);
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("ca.pem") && stderr.contains("modelhub certs"),
        "{stderr}"
    );
}

#[test]
fn refuses_a_kek_file_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // Outside the data folder, as docs/OPERATIONS.md recommends.
    let kek = dir.path().join("secrets").join("kek");
    modelhub_core::crypto::Kek::load_or_generate(&kek).unwrap();
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o644)).unwrap();
    let stderr = refuses(&[
        "--data-dir".as_ref(),
        dir.path().join("data").as_os_str(),
        "--kek-file".as_ref(),
        kek.as_os_str(),
        "--mtls-dir".as_ref(),
        modelhub_testkit::tls::TestPki::shared().dir().as_os_str(),
    ]);
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("chmod 600"), "{stderr}");

    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    let data = dir.path().join("data");
    let mut running = start(&data, &["--kek-file".as_ref(), kek.as_os_str()]);
    let _ = running.child.kill();
    let _ = running.child.wait();
    assert!(
        !data.join("kek").exists(),
        "the KEK stays where --kek-file says"
    );
}
