//! The IPFS blob store against a real node started by `scripts/ipfs` (npm ipfs@0.66.1, the
//! kubo RPC API): round trips and CID equality with the embedded store, pins, export, a node
//! that stops or hangs, and the gRPC service storing models on IPFS.
//!
//! When the node can't start these tests print a notice and pass, except under `CI=true`,
//! where they fail.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use modelhub_core::ErrorCode;
use modelhub_mtls::Identity;
use modelhub_proto::storage::v1::storage_client::StorageClient;
use modelhub_storage::blob::{BlobStore, LocalBlobStore};
use modelhub_storage::reconcile::{export, prune, verify, verify_contents};
use modelhub_storage::unixfs::{CHUNK_SIZE, cid_of_bytes};
use modelhub_storage::{IpfsBlobStore, IpfsOptions, StorageError};

use crate::harness::{self, code, digits, get, model_ref, put, upload};

/// A node running in a temporary folder, stopped on drop.
struct Node {
    dir: tempfile::TempDir,
    api: String,
}

fn script() -> PathBuf {
    modelhub_testkit::workspace_root().join("scripts/ipfs")
}

/// Runs `scripts/ipfs CMD DIR`: its stdout, or its stderr as the error.
fn run_script(cmd: &str, dir: &Path) -> Result<String, String> {
    let out = Command::new("bash")
        .arg(script())
        .arg(cmd)
        .arg(dir)
        .output()
        .map_err(|e| format!("running scripts/ipfs: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

impl Node {
    /// Starts a node; `None` (after a notice) when it can't start outside CI.
    fn start() -> Option<Node> {
        let dir = tempfile::tempdir().unwrap();
        match run_script("start", dir.path()) {
            Ok(api) => {
                assert!(api.starts_with("http://127.0.0.1:"), "{api}");
                Some(Node { dir, api })
            }
            Err(why) if modelhub_testkit::is_ci() => {
                panic!("CI=true and the IPFS node did not start:\n{why}")
            }
            Err(why) => {
                eprintln!("SKIPPED: the IPFS node did not start (CI=true fails instead):\n{why}");
                None
            }
        }
    }

    fn store(&self, options: IpfsOptions) -> IpfsBlobStore {
        IpfsBlobStore::new(&self.api, options).unwrap()
    }

    fn stop(&self) {
        run_script("stop", self.dir.path()).unwrap();
    }

    /// Starts it again on the same repository; the API URL may change.
    fn restart(&mut self) {
        self.api = run_script("start", self.dir.path()).unwrap();
    }

    fn pid(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ipfs.pid"))
            .unwrap()
            .trim()
            .to_owned()
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // A node left stopped by a failed test must be able to take SIGTERM.
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("ipfs.pid")) {
            let _ = Command::new("kill").arg("-CONT").arg(pid.trim()).status();
        }
        if let Err(e) = run_script("stop", self.dir.path()) {
            eprintln!("stopping the IPFS node: {e}");
        }
    }
}

/// Deterministic bytes that don't repeat within a chunk.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn read_all(store: &dyn BlobStore, cid: &str) -> Result<Vec<u8>, StorageError> {
    let pieces: Vec<Bytes> = store.get(cid).await?.try_collect().await?;
    Ok(pieces.concat())
}

fn short() -> IpfsOptions {
    IpfsOptions {
        timeout: Duration::from_millis(1500),
        first_byte_timeout: Duration::from_millis(1500),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_round_trip_with_the_embedded_cids_and_unpin_on_remove() {
    let Some(node) = Node::start() else { return };
    let ipfs = node.store(IpfsOptions::default());
    assert!(ipfs.check().await.unwrap().starts_with('0'));
    let local_dir = tempfile::tempdir().unwrap();
    let local = LocalBlobStore::open(local_dir.path()).unwrap();

    let sizes = [
        0,
        1,
        CHUNK_SIZE - 1,
        CHUNK_SIZE,
        CHUNK_SIZE + 1,
        10 * 1024 * 1024,
    ];
    let mut cids = Vec::new();
    for (i, &len) in sizes.iter().enumerate() {
        let bytes = data(len, i as u64 + 1);
        let embedded = local.put(Bytes::from(bytes.clone())).await.unwrap();
        assert_eq!(embedded, cid_of_bytes(&bytes).to_string());
        let on_node = ipfs.put(Bytes::from(bytes.clone())).await.unwrap();
        assert_eq!(on_node, embedded, "CID of {len} bytes, node vs embedded");
        assert!(ipfs.contains(&on_node).await.unwrap(), "{len} bytes pinned");
        assert_eq!(
            read_all(&ipfs, &on_node).await.unwrap(),
            bytes,
            "{len} bytes back"
        );
        // Streamed in uneven pieces: the same CID.
        let pieces: Vec<Result<Bytes, StorageError>> = bytes
            .chunks(100_003)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let streamed = ipfs
            .put_stream(futures::stream::iter(pieces).boxed())
            .await
            .unwrap();
        assert_eq!(streamed, embedded);
        cids.push(on_node);
    }
    assert_eq!(
        cids[0],
        "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
    );

    let mut pins = ipfs.list().await.unwrap();
    pins.sort();
    let mut want = cids.clone();
    want.sort();
    assert_eq!(pins, want, "exactly the blobs put are pinned");
    let report = verify_contents(&ipfs, &cids).await.unwrap();
    assert_eq!(report.ok, cids);
    assert!(report.is_clean() && report.unexpected.is_empty());

    // Remove unpins; verify sees it.
    assert!(ipfs.remove(&cids[2]).await.unwrap());
    assert!(!ipfs.remove(&cids[2]).await.unwrap());
    assert!(!ipfs.contains(&cids[2]).await.unwrap());
    let report = verify(&ipfs, &cids).await.unwrap();
    assert_eq!(report.missing, [cids[2].clone()]);
    assert_eq!(report.ok.len(), cids.len() - 1);
    // A pin nothing expects is reported too.
    let report = verify(&ipfs, &cids[..3]).await.unwrap();
    assert_eq!(report.unexpected.len(), 3);
    // Prune unpins exactly those.
    let mut pruned = prune(&ipfs, &cids[..3]).await.unwrap();
    pruned.sort();
    let mut want = cids[3..].to_vec();
    want.sort();
    assert_eq!(pruned, want);
    let mut left = ipfs.list().await.unwrap();
    left.sort();
    let mut want = cids[..2].to_vec();
    want.sort();
    assert_eq!(left, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_copies_an_embedded_store_into_the_node_with_identical_cids() {
    let Some(node) = Node::start() else { return };
    let ipfs = node.store(IpfsOptions::default());
    let local_dir = tempfile::tempdir().unwrap();
    let local = LocalBlobStore::open(local_dir.path()).unwrap();
    let blobs = [data(10, 7), data(700_000, 8), data(3 * CHUNK_SIZE, 9)];
    let mut cids = Vec::new();
    for b in &blobs {
        cids.push(local.put(Bytes::from(b.clone())).await.unwrap());
    }
    // A local file that is not the bytes its name says is reported, not exported.
    let liar = cid_of_bytes(b"the real bytes").to_string();
    std::fs::write(local.dir().join(&liar), b"other bytes").unwrap();

    let report = export(&local, &ipfs).await.unwrap();
    let mut copied = report.copied.clone();
    copied.sort();
    let mut want = cids.clone();
    want.sort();
    assert_eq!(copied, want);
    assert_eq!(
        report.bytes,
        blobs.iter().map(|b| b.len() as u64).sum::<u64>()
    );
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, liar);
    for (cid, bytes) in cids.iter().zip(&blobs) {
        assert_eq!(&read_all(&ipfs, cid).await.unwrap(), bytes);
    }
    let mut pins = ipfs.list().await.unwrap();
    pins.sort();
    assert_eq!(pins, want, "nothing pinned for the mismatched file");
    assert!(verify(&ipfs, &cids).await.unwrap().is_clean());

    // Running it again copies nothing new and changes nothing.
    let again = export(&local, &ipfs).await.unwrap();
    assert_eq!(again.bytes, 0);
    assert_eq!(again.copied.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_mid_upload_is_unavailable_and_pins_nothing() {
    let Some(mut node) = Node::start() else {
        return;
    };
    let ipfs = node.store(short());
    let dir = node.dir.path().to_path_buf();
    // 4 MiB go out, then the node stops, then the upload goes on.
    let pieces = futures::stream::iter(0..12u64).then(move |i| {
        let dir = dir.clone();
        async move {
            if i == 4 {
                tokio::task::spawn_blocking(move || run_script("stop", &dir).unwrap())
                    .await
                    .unwrap();
            }
            Ok(Bytes::from(data(1024 * 1024, 100 + i)))
        }
    });
    let e = ipfs.put_stream(pieces.boxed()).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unavailable, "{e:?}");
    assert_eq!(e.to_api().message, "IPFS node unavailable");

    // While it is down, every call is unavailable.
    let e = ipfs.list().await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unavailable);

    node.restart();
    let ipfs = node.store(short());
    assert!(
        ipfs.list().await.unwrap().is_empty(),
        "the aborted upload left no pin"
    );
    let cid = ipfs.put(Bytes::from_static(b"after")).await.unwrap();
    assert_eq!(read_all(&ipfs, &cid).await.unwrap(), b"after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_node_times_out_as_unavailable() {
    let Some(node) = Node::start() else { return };
    let ipfs = node.store(short());
    let bytes = data(600_000, 3);
    let cid = ipfs.put(Bytes::from(bytes.clone())).await.unwrap();

    // A CID the node never had: it hangs on cat, the pins say it isn't there.
    let unknown = cid_of_bytes(b"never stored").to_string();
    let e = ipfs.get(&unknown).await.err().unwrap();
    assert_eq!(e.code(), ErrorCode::NotFound, "{e:?}");

    // A frozen node: every call times out.
    node.signal("STOP");
    let e = ipfs.get(&cid).await.err().unwrap();
    assert_eq!(e.code(), ErrorCode::Unavailable, "{e:?}");
    let e = ipfs.put(Bytes::from_static(b"x")).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unavailable, "{e:?}");
    let e = ipfs.remove(&cid).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unavailable, "{e:?}");
    node.signal("CONT");

    assert_eq!(read_all(&ipfs, &cid).await.unwrap(), bytes);
    assert!(ipfs.contains(&cid).await.unwrap());
}

#[tokio::test]
async fn a_server_that_never_answers_is_unavailable() {
    // Needs no node: a listener that accepts and stays silent.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = listener.accept().await {
            conns.push(c);
        }
    });
    let ipfs = IpfsBlobStore::new(
        &format!("http://{addr}"),
        IpfsOptions {
            timeout: Duration::from_millis(300),
            first_byte_timeout: Duration::from_millis(300),
        },
    )
    .unwrap();
    let e = ipfs
        .put(Bytes::from(data(3 * 1024 * 1024, 1)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unavailable, "{e:?}");
    let e = ipfs.put(Bytes::from_static(b"small")).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unavailable, "{e:?}");
    let e = ipfs
        .get(&cid_of_bytes(b"x").to_string())
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), ErrorCode::Unavailable, "{e:?}");
    let e = ipfs.list().await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unavailable, "{e:?}");
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_storage_service_keeps_models_on_ipfs() {
    let Some(node) = Node::start() else { return };
    let api = node.api.clone();
    let mut s = harness::start(|settings| {
        settings.ipfs_api = Some(api);
        settings.ipfs_timeout_ms = 2000;
        settings.ipfs_first_byte_timeout_ms = 2000;
    })
    .await;
    let bytes = digits();
    let stored = put(&mut s.client, upload("mdl_ipfs", "1", &bytes, 1000))
        .await
        .unwrap();
    let back = get(&mut s.reader, model_ref("mdl_ipfs", "1", &stored))
        .await
        .unwrap();
    assert_eq!(back, bytes);
    // The blob is on the node, pinned, under the embedded store's CID; nothing local.
    let ipfs = node.store(IpfsOptions::default());
    assert!(ipfs.contains(&stored.cid).await.unwrap());
    let blob = read_all(&ipfs, &stored.cid).await.unwrap();
    assert_eq!(&blob[..4], b"MHE1");
    assert_eq!(cid_of_bytes(&blob).to_string(), stored.cid);
    assert!(!s.blob_dir().exists() || s.blob_files().is_empty());

    // The node goes away: uploads are 503, with nothing pinned once it is back.
    node.stop();
    let status = put(&mut s.client, upload("mdl_ipfs", "2", &bytes, 1000))
        .await
        .unwrap_err();
    assert_eq!(code(&status), ErrorCode::Unavailable);
    assert_eq!(status.message(), "IPFS node unavailable");
    let status = get(&mut s.reader, model_ref("mdl_ipfs", "1", &stored))
        .await
        .unwrap_err();
    assert_eq!(code(&status), ErrorCode::Unavailable);
    s.stop().await;
}

/// Peak and current resident memory of a process, in MiB, from `/proc/PID/status`.
fn memory_mib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap()
            / 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Measures the storage process's memory for a large model round trip, stored on IPFS and
/// on local disk: `MODELHUB_BIG_MODEL=/path/to/model.onnx cargo test -p modelhub-storage
/// --test it big_model -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs MODELHUB_BIG_MODEL (a large ONNX file); prints memory figures"]
async fn big_model_round_trip_memory() {
    use sha2::{Digest, Sha256};
    use tokio::io::AsyncReadExt;
    let path = PathBuf::from(std::env::var("MODELHUB_BIG_MODEL").expect("MODELHUB_BIG_MODEL"));
    let size = std::fs::metadata(&path).unwrap().len();
    let want = hex::encode(Sha256::digest(std::fs::read(&path).unwrap()));
    let Some(node) = Node::start() else { return };
    for on_ipfs in [true, false] {
        let data = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_modelhub-storage"));
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data.path())
            .arg("--mtls-dir")
            .arg(modelhub_testkit::tls::TestPki::shared().dir())
            .stdout(std::process::Stdio::null());
        if on_ipfs {
            cmd.arg("--ipfs-api").arg(&node.api);
        }
        let child = KillOnDrop(cmd.spawn().unwrap());
        let pid = child.0.id();
        let pki = modelhub_testkit::tls::TestPki::shared();
        let url = format!("https://127.0.0.1:{port}");
        let mut client =
            StorageClient::new(pki.channel(Identity::Gateway, Identity::Storage, &url));
        let mut reader =
            modelhub_storage::client::connect_lazy(&pki.identity(Identity::Inference), &url)
                .unwrap();
        modelhub_testkit::eventually_async("storage up", Duration::from_secs(20), || async move {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ())
        })
        .await;
        let idle = memory_mib(pid);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let file_path = path.clone();
        tokio::spawn(async move {
            let _ = tx.send(harness::header("mdl_big", "1")).await;
            let mut f = tokio::fs::File::open(file_path).await.unwrap();
            loop {
                let mut buf = vec![0u8; 1024 * 1024];
                let n = f.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                let _ = tx.send(harness::chunk(&buf)).await;
            }
            let _ = tx.send(harness::finish()).await;
        });
        let started = std::time::Instant::now();
        let stored = client
            .put_model(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let put_time = started.elapsed();
        assert_eq!(stored.size, size);
        let after_put = memory_mib(pid);
        // Reset the peak, so the next figure is the read's own.
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
        let started = std::time::Instant::now();
        let mut stream = reader
            .get_model(modelhub_proto::storage::v1::GetModelRequest {
                model: Some(model_ref("mdl_big", "1", &stored)),
            })
            .await
            .unwrap()
            .into_inner();
        let mut hasher = Sha256::new();
        let mut got = 0u64;
        while let Some(chunk) = stream.message().await.unwrap() {
            got += chunk.data.len() as u64;
            hasher.update(&chunk.data);
        }
        let get_time = started.elapsed();
        assert_eq!(got, size);
        assert_eq!(hex::encode(hasher.finalize()), want);
        let after_get = memory_mib(pid);
        println!(
            "{} MiB model, storage on {}: RSS idle {} MiB; put {:.1} s, peak {} MiB (now {}); \
             get {:.1} s, peak {} MiB (now {})",
            size >> 20,
            if on_ipfs { "IPFS" } else { "local disk" },
            idle.1,
            put_time.as_secs_f64(),
            after_put.0,
            after_put.1,
            get_time.as_secs_f64(),
            after_get.0,
            after_get.1
        );
        drop(child);
    }
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
