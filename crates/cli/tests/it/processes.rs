//! The five services as separate `modelhub serve` processes on free ports, with certificates
//! from `modelhub certs`, driven by the `modelhub` client commands: the split into services is
//! real, not only in-process, and so is the mutual TLS between them.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

pub(crate) struct Service {
    pub child: Child,
    pub addr: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn modelhub() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_modelhub"));
    c.env("RUST_LOG", "warn");
    c
}

/// Runs `cmd` to its end and fails the test, with its stderr, unless it succeeded.
pub(crate) fn succeed(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Starts `modelhub serve <svc> --listen 127.0.0.1:0 ARGS` and reads the bound address it prints.
pub(crate) fn serve(svc: &str, args: &[&str]) -> Service {
    serve_on(svc, "127.0.0.1:0", args)
}

/// Starts `modelhub serve <svc> --listen LISTEN ARGS` and reads the bound address it prints.
pub(crate) fn serve_on(svc: &str, listen: &str, args: &[&str]) -> Service {
    let mut child = modelhub()
        .args(["serve", svc, "--listen", listen])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn modelhub serve");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the listening line");
    let addr = line
        .trim()
        .strip_prefix(&format!("modelhub {svc} listening on "))
        .unwrap_or_else(|| panic!("{svc} printed {line:?}"))
        .to_string();
    Service { child, addr }
}

/// A loopback `host:port` free right now (for a process that must keep its port across
/// restarts).
pub(crate) fn free_loopback_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// `modelhub up` as a process (killed when dropped), started on `http` with `data`; its `addr`
/// is the gateway URL.
pub(crate) fn up(data: &std::path::Path, http: &str) -> Service {
    use std::io::BufRead;
    let mut child = modelhub()
        .args(["up", "--http", http, "--data-dir"])
        .arg(data)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn modelhub up");
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut child = Service {
        child,
        addr: String::new(),
    };
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "modelhub up ended early"
        );
        if let Some(url) = line.trim().strip_prefix("gateway:") {
            let url = url.trim().to_owned();
            // Keep reading its output so it never blocks on a full pipe.
            std::thread::spawn(move || for _ in stdout.lines() {});
            child.addr = url;
            return child;
        }
    }
}

/// Runs a client command and parses the JSON it prints.
pub(crate) fn client(url: &str, key_file: &Path, args: &[&str]) -> Value {
    let out = modelhub()
        .args(args)
        .args(["--url", url, "--key-file"])
        .arg(key_file)
        .output()
        .expect("run modelhub");
    assert!(
        out.status.success(),
        "modelhub {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

#[test]
fn separate_service_processes_serve_an_upload_and_a_signed_predict() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    let kek = d("kek");
    modelhub_core::crypto::Kek::load_or_generate(Path::new(&kek)).unwrap();
    let tls = d("tls");
    let out = modelhub().args(["certs", "--out", &tls]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(made["identities"].as_array().unwrap().len(), 6, "{made}");

    let mut registry = serve(
        "registry",
        &[
            "--data-dir",
            &d("registry"),
            "--kek-file",
            &kek,
            "--mtls-dir",
            &tls,
        ],
    );
    let storage = serve(
        "storage",
        &[
            "--data-dir",
            &d("storage"),
            "--kek-file",
            &kek,
            "--mtls-dir",
            &tls,
        ],
    );
    let storage_url = format!("https://{}", storage.addr);
    let inference = serve(
        "inference",
        &["--storage", &storage_url, "--mtls-dir", &tls],
    );
    let registry_url = format!("https://{}", registry.addr);
    let inference_url = format!("https://{}", inference.addr);
    let gateway = serve(
        "gateway",
        &[
            "--registry",
            &registry_url,
            "--storage",
            &storage_url,
            "--inference",
            &inference_url,
            "--mtls-dir",
            &tls,
        ],
    );
    let url = format!("http://{}", gateway.addr);

    let admin_file = dir.path().join("admin-key.json");
    succeed(
        modelhub()
            .args(["admin", "bootstrap", "--registry", &registry_url, "--out"])
            .arg(&admin_file)
            .args(["--mtls-dir", &tls]),
    );

    let account = client(&url, &admin_file, &["accounts", "create", "carol"]);
    let account_id = account["account_id"].as_str().unwrap();
    let carol_file = dir.path().join("carol.json");
    let key = client(
        &url,
        &admin_file,
        &[
            "keys",
            "create",
            "--account",
            account_id,
            "--out",
            &carol_file.to_string_lossy(),
        ],
    );
    assert_eq!(key["account_id"], account_id);
    let granted = client(&url, &admin_file, &["credits", "grant", account_id, "7"]);
    assert_eq!(granted["credits"], 7);

    let model = modelhub_testkit::test_model("digits_mlp.onnx");
    let record = client(
        &url,
        &carol_file,
        &[
            "models",
            "upload",
            &model.to_string_lossy(),
            "--name",
            "digits",
            "--version",
            "1",
            "--price",
            "2",
        ],
    );
    let model_id = record["model_id"].as_str().unwrap();
    let listed = client(&url, &carol_file, &["models", "list"]);
    assert_eq!(listed[0]["model_id"], model_id);

    let expected = modelhub_testkit::digits_expected();
    let input = serde_json::json!([{ "name": "X", "shape": [1, 64], "datatype": "FP32", "data": expected["cases"][3]["input"] }]);
    let input_file = dir.path().join("input.json");
    std::fs::write(&input_file, input.to_string()).unwrap();
    let answer = client(
        &url,
        &carol_file,
        &[
            "predict",
            model_id,
            "--input",
            &format!("@{}", input_file.display()),
        ],
    );
    let label = answer["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "label")
        .unwrap();
    assert_eq!(label["data"][0], expected["cases"][3]["label"]);
    assert_eq!(answer["receipt"]["credits_charged"], 2);

    let me = client(&url, &carol_file, &["account"]);
    assert_eq!(me["credits"], 5);
    assert_eq!(me["earnings"], 2, "carol owns the model she paid for");

    // `modelhub serve` stops gracefully on SIGTERM (what Kubernetes and `docker stop` send).
    let kill = Command::new("kill")
        .args(["-TERM", &registry.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = modelhub_testkit::eventually(
        "modelhub serve registry exits on SIGTERM",
        std::time::Duration::from_secs(15),
        || registry.child.try_wait().unwrap(),
    );
    assert!(status.success(), "exit status {status:?}");
}

/// `modelhub up` stops every service gracefully on SIGTERM and exits 0; its first start made
/// the internal certificates, keys private.
#[test]
fn up_stops_gracefully_on_sigterm() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut child = modelhub()
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .args(["up", "--http", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn modelhub up");
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
            .join("\n")
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("Model Hub is up") {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "modelhub up ended before it was up"
        );
    }
    let key_mode = |f: &str| {
        std::fs::metadata(dir.path().join("tls").join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(key_mode("registry.key"), 0o600);
    assert_eq!(key_mode("ca.key"), 0o600);

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = modelhub_testkit::eventually(
        "modelhub up exits on SIGTERM",
        std::time::Duration::from_secs(30),
        || child.try_wait().unwrap(),
    );
    let log = log.join().unwrap();
    assert!(status.success(), "exit status {status:?}\n{log}");
    for want in [
        "signal=\"SIGTERM\"",
        "registry stopped",
        "storage stopped",
        "inference stopped",
        "prover stopped",
        "gateway stopped",
    ] {
        assert!(log.contains(want), "no {want:?} in the log:\n{log}");
    }
}
