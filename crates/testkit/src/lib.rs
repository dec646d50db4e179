//! Test harness shared by the integration tests: the generated test models, the workspace
//! root, polling with a deadline (never sleeps to wait for things), certificates for the
//! mutual TLS of the internal services ([`tls::TestPki`]).
//!
//! The in-process cluster itself lives in `modelhub_cli::up`, which is what `modelhub up` runs;
//! tests start it on `127.0.0.1:0` listeners.

pub mod grpc;
pub mod tls;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The repository root.
pub fn workspace_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .nth(2)
            .expect("crates/testkit is two levels below the root")
            .to_path_buf()
    })
}

/// Whether this run is CI, where a missing dependency is a failure, never a skip.
pub fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The folder of generated test models (`scripts/test-models`), made on first use.
pub fn test_models() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let script = workspace_root().join("scripts/test-models");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "scripts/test-models failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// Path of one generated test model file, e.g. `test_model("digits_mlp.onnx")`.
pub fn test_model(name: &str) -> PathBuf {
    let path = test_models().join(name);
    assert!(
        path.exists(),
        "test model {} was not generated",
        path.display()
    );
    path
}

/// The expected outputs that onnxruntime (Python) gave for the digits model.
pub fn digits_expected() -> serde_json::Value {
    let text = std::fs::read_to_string(test_model("digits_expected.json")).expect("read expected");
    serde_json::from_str(&text).expect("parse expected")
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Async form of [`eventually`].
pub async fn eventually_async<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real server started by one of the project's scripts (`scripts/mongo`, `scripts/ipfs`:
/// `start DIR` prints its address, `stop DIR` stops it), stopped when dropped.
#[derive(Debug)]
pub struct ScriptServer {
    script: &'static str,
    dir: tempfile::TempDir,
    /// What `start` printed: the server's URI.
    pub uri: String,
}

impl ScriptServer {
    /// Starts the server in a fresh folder. A server that can't start fails the test: under
    /// `CI=true` that is the rule; elsewhere too, with the reason, since the scripts install
    /// what they need from the package registries.
    pub fn start(script: &'static str) -> ScriptServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = workspace_root().join("scripts").join(script);
        let out = Command::new("bash")
            .arg(&path)
            .arg("start")
            .arg(dir.path())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", path.display()));
        assert!(
            out.status.success(),
            "scripts/{script} start failed (CI={}):\n{}",
            is_ci(),
            String::from_utf8_lossy(&out.stderr)
        );
        let uri = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string();
        assert!(!uri.is_empty(), "scripts/{script} start printed no address");
        ScriptServer { script, dir, uri }
    }
}

impl ScriptServer {
    /// Stops the server now (it stays stopped; dropping it later is harmless).
    pub fn stop(&self) {
        let _ = Command::new("bash")
            .arg(workspace_root().join("scripts").join(self.script))
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}

impl Drop for ScriptServer {
    fn drop(&mut self) {
        self.stop();
    }
}
