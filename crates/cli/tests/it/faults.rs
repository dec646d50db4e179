//! Fault injection (issue "retries users can trust"): the services as separate `modelhub serve`
//! processes on loopback, workers sending signed, keyed predicts, and in the middle of the load
//! a SIGKILL of the gateway, the registry and the inference worker in turn (each restarted on
//! the same address and data), then a SIGTERM of the gateway. Afterwards:
//!
//! - no answer 5xx was charged (retried with the same key, each is charged then: a retry of a
//!   charged request would answer the kept response for free), except a 503 that says the
//!   outcome is unknown, which the retry must then resolve;
//! - every request whose answer was cut (or refused) is answered by a retry with the same key:
//!   with its original receipt when it had been charged, charged once otherwise;
//! - held credits are back to 0 once the registry's sweep has run;
//! - credits are conserved: what the user lost is what the owner earned is the price times the
//!   number of distinct receipts the clients hold, one per key;
//! - answers that were delivered are replayed byte for byte by a same-key retry.
//!
//! `MODELHUB_FAULTS_ROUNDS` (default 1) repeats the fault sequence; `MODELHUB_FAULTS_REPORT`
//! names a file a Markdown table row is appended to (`scripts/faults`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use modelhub_cli::client::{Client, KeyFile};
use serde_json::{Value, json};

use crate::harness::{assert_error, digits_input};
use crate::processes::{Service, free_loopback_addr, modelhub, serve, serve_on, succeed, up};

/// Seconds a hold lives before the registry's sweep returns it.
const HOLD_TIMEOUT_SECS: &str = "2";
const PRICE: u64 = 1;
const WORKERS: usize = 6;

/// The five processes (no prover: these predictions ask for no proofs).
pub(crate) struct Processes {
    pub(crate) _dir: tempfile::TempDir,
    args: BTreeMap<&'static str, Vec<String>>,
    pub(crate) running: BTreeMap<&'static str, Service>,
}

impl Processes {
    /// The services; with `prover` (its extra arguments), a prover too, which the gateway and
    /// inference use.
    pub(crate) fn start(mongodb_uri: Option<String>, prover: Option<&[&str]>) -> Processes {
        let dir = tempfile::tempdir().unwrap();
        let d = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
        let kek = d("kek");
        modelhub_core::crypto::Kek::load_or_generate(std::path::Path::new(&kek)).unwrap();
        let tls = d("tls");
        let out = modelhub().args(["certs", "--out", &tls]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let storage_dir = d("storage");
        let prover_dir = d("prover");
        let mut registry_args = strings(&[
            "--data-dir",
            &d("registry"),
            "--kek-file",
            &kek,
            "--mtls-dir",
            &tls,
            "--hold-timeout-secs",
            HOLD_TIMEOUT_SECS,
        ]);
        if let Some(uri) = mongodb_uri {
            registry_args.extend(["--mongodb-uri".to_owned(), uri]);
        }
        let mut p = Processes {
            _dir: dir,
            args: BTreeMap::new(),
            running: BTreeMap::new(),
        };
        p.first("registry", registry_args);
        p.first(
            "storage",
            strings(&[
                "--data-dir",
                &storage_dir,
                "--kek-file",
                &kek,
                "--mtls-dir",
                &tls,
            ]),
        );
        let storage = p.url("storage");
        let mut with_prover = Vec::new();
        if let Some(extra) = prover {
            let mut args = strings(&[
                "--data-dir",
                &prover_dir,
                "--kek-file",
                &kek,
                "--storage",
                &storage,
                "--mtls-dir",
                &tls,
            ]);
            args.extend(strings(extra));
            p.first("prover", args);
            with_prover = vec!["--prover".to_owned(), p.url("prover")];
        }
        let mut inference_args = strings(&["--storage", &storage, "--mtls-dir", &tls]);
        inference_args.extend(with_prover.iter().cloned());
        p.first("inference", inference_args);
        let (registry, inference) = (p.url("registry"), p.url("inference"));
        let mut gateway_args = strings(&[
            "--registry",
            &registry,
            "--storage",
            &storage,
            "--inference",
            &inference,
            "--mtls-dir",
            &tls,
        ]);
        gateway_args.extend(with_prover);
        p.first("gateway", gateway_args);
        p
    }

    fn first(&mut self, svc: &'static str, args: Vec<String>) {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.running.insert(svc, serve(svc, &refs));
        self.args.insert(svc, args);
    }

    /// Starts another replica of `svc`, named `name`, with `svc`'s arguments where `change`
    /// says otherwise (a flag and its new value).
    pub(crate) fn replica(
        &mut self,
        name: &'static str,
        svc: &'static str,
        change: &[(&str, &str)],
    ) {
        let mut args = self.args[svc].clone();
        for (flag, value) in change {
            match args.iter().position(|a| a == flag) {
                Some(at) => args[at + 1] = (*value).to_owned(),
                None => args.extend([(*flag).to_owned(), (*value).to_owned()]),
            }
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.running.insert(name, serve(svc, &refs));
        self.args.insert(name, args);
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to `svc`.
    pub(crate) fn signal(&self, svc: &str, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([
                format!("-{signal}"),
                self.running[svc].child.id().to_string(),
            ])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Stops `svc` with SIGKILL, for good.
    fn kill(&mut self, svc: &str) {
        let mut old = self.running.remove(svc).unwrap();
        old.child.kill().unwrap();
        old.child.wait().unwrap();
    }

    pub(crate) fn url(&self, svc: &str) -> String {
        format!("https://{}", self.running[svc].addr)
    }

    pub(crate) fn gateway_url(&self) -> String {
        format!("http://{}", self.running["gateway"].addr)
    }

    /// A client of the gateway (replica) `name` with `key`.
    pub(crate) fn client(&self, name: &str, key: &KeyFile) -> Client {
        Client::new(&format!("http://{}", self.running[name].addr), key.clone()).unwrap()
    }

    pub(crate) fn tls_dir(&self) -> String {
        let args = &self.args["registry"];
        let at = args.iter().position(|a| a == "--mtls-dir").unwrap();
        args[at + 1].clone()
    }

    /// Sends `signal` to `svc`, waits for it to exit (a SIGTERM must exit 0: graceful), and
    /// starts it again on the same address after `pause`. Returns when it listens.
    fn bounce(&mut self, svc: &'static str, signal: &str, pause: Duration) {
        let mut old = self.running.remove(svc).unwrap();
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), old.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exited = modelhub_testkit::eventually(
            &format!("{svc} exits on SIG{signal}"),
            Duration::from_secs(40),
            || old.child.try_wait().unwrap(),
        );
        if signal == "TERM" {
            assert!(exited.success(), "{svc} after SIGTERM: {exited:?}");
        }
        std::thread::sleep(pause);
        let refs: Vec<&str> = self.args[svc].iter().map(String::as_str).collect();
        let new = serve_on(svc, &old.addr, &refs);
        assert_eq!(new.addr, old.addr);
        self.running.insert(svc, new);
    }
}

/// What one attempt got.
#[derive(Debug, Clone)]
enum Got {
    Answer {
        status: u16,
        body: Bytes,
    },
    /// No HTTP answer: a refused or cut connection, or no answer within the client's timeout.
    Cut,
}

#[derive(Debug, Clone)]
struct Sent {
    key: String,
    body: Bytes,
    got: Got,
    /// When it was sent, and when its answer (or failure) came.
    at: Instant,
    done: Instant,
}

fn receipt_of(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap();
    v["receipt"]["id"].as_str().unwrap().to_owned()
}

fn message_of(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or_default();
    v["error"]["message"].as_str().unwrap_or("").to_owned()
}

/// One worker: keyed predicts, one attempt each, until `stop`.
async fn worker(client: Client, path: String, id: usize, stop: Arc<AtomicBool>) -> Vec<Sent> {
    let mut sent = Vec::new();
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("faults-{id}-{i}");
        let body = Bytes::from(json!({ "inputs": digits_input(i % 8) }).to_string());
        i += 1;
        let req = client
            .prepare_keyed(reqwest::Method::POST, &path, body.clone(), Some(&key))
            .unwrap();
        let at = Instant::now();
        let got = match tokio::time::timeout(Duration::from_secs(20), client.send_raw(req)).await {
            Ok(Ok((status, body))) => Got::Answer { status, body },
            Ok(Err(_)) | Err(_) => Got::Cut,
        };
        let done = Instant::now();
        if !matches!(got, Got::Answer { status: 200, .. }) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sent.push(Sent {
            key,
            body,
            got,
            at,
            done,
        });
    }
    sent
}

async fn account(client: &Client) -> Value {
    client.get("/v1/account").await.unwrap().ok().unwrap()
}

/// An admin (bootstrapped as an operator would), a creator who uploaded the digits model at
/// [`PRICE`], and a user with a million credits.
pub(crate) struct Market {
    pub(crate) creator: Client,
    pub(crate) user: Client,
    pub(crate) record: Value,
    /// The model's predict path.
    pub(crate) path: String,
}

impl Market {
    pub(crate) async fn open(p: &Processes) -> Market {
        let admin_file = p._dir.path().join("admin-key.json");
        succeed(
            modelhub()
                .args([
                    "admin",
                    "bootstrap",
                    "--registry",
                    &p.url("registry"),
                    "--out",
                ])
                .arg(&admin_file)
                .args(["--mtls-dir", &p.tls_dir()]),
        );
        let admin = Client::new(&p.gateway_url(), KeyFile::read(&admin_file).unwrap()).unwrap();
        Market::with_admin(&admin).await
    }

    /// The creator, the user and the model, made through the gateway by `admin`.
    async fn with_admin(admin: &Client) -> Market {
        let new_user = async |name: &str, credits: u64| -> Client {
            admin.new_account(name, credits).await.unwrap()
        };
        let creator = new_user("creator", 0).await;
        let user = new_user("user", 1_000_000).await;
        let record = creator
            .upload(
                &modelhub_cli::client::ModelUpload::new("digits", "1", PRICE),
                crate::harness::digits_bytes(),
            )
            .await
            .unwrap()
            .ok()
            .unwrap();
        let path = format!(
            "/v1/models/{}/predict",
            record["model_id"].as_str().unwrap()
        );
        Market {
            creator,
            user,
            record,
            path,
        }
    }
}

async fn faults(mongodb: Option<modelhub_testkit::ScriptServer>) {
    let backend = if mongodb.is_some() {
        "mongodb"
    } else {
        "embedded"
    };
    let rounds: usize = std::env::var("MODELHUB_FAULTS_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let mut p = Processes::start(
        mongodb
            .as_ref()
            .map(|m| format!("{}/modelhub_faults", m.uri)),
        None,
    );
    let Market {
        creator,
        user,
        path,
        ..
    } = Market::open(&p).await;
    let start_credits = account(&user).await["credits"].as_u64().unwrap();

    // The load, and the faults in the middle of it.
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..WORKERS)
        .map(|id| tokio::spawn(worker(user.clone(), path.clone(), id, stop.clone())))
        .collect();
    let schedule = tokio::task::spawn_blocking(move || {
        let mut restarts = Vec::new();
        let settle = Duration::from_millis(1500);
        std::thread::sleep(settle);
        for _ in 0..rounds {
            for (svc, signal) in [
                ("gateway", "KILL"),
                ("registry", "KILL"),
                ("inference", "KILL"),
                ("gateway", "TERM"),
            ] {
                p.bounce(svc, signal, Duration::from_millis(500));
                restarts.push((svc, signal, Instant::now()));
                std::thread::sleep(settle);
            }
        }
        (p, restarts)
    });
    let (p, restarts) = schedule.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    for w in workers {
        sent.extend(w.await.unwrap());
    }

    // Held credits come back once the sweep has run (holds of killed gateways, of reserves
    // whose answer a killed registry never sent; on MongoDB also debits whose reservation a
    // killed registry never wrote). Give every hold made under load time to pass the timeout
    // and a sweep, then they must all be back.
    tokio::time::sleep(Duration::from_secs(
        HOLD_TIMEOUT_SECS.parse::<u64>().unwrap() + 2,
    ))
    .await;
    let held = modelhub_testkit::eventually_async(
        "held credits back to 0",
        Duration::from_secs(30),
        || async {
            let a = user.get("/v1/account").await.ok()?.ok().ok()?;
            (a["held"] == 0).then_some(a)
        },
    )
    .await;
    assert_eq!(held["held"], 0);

    // Every request not answered 200 is retried with its key until it is: first the 5xx
    // ones, then the cut ones. A retry that finds its request charged answers the kept
    // response without a new charge; one that doesn't, charges now. So what each group's
    // retries charge says what its first attempts had been charged.
    let charged = async || start_credits - account(&user).await["credits"].as_u64().unwrap();
    let charged_by_load = charged().await;
    let mut receipts = HashSet::new();
    let (mut ok, mut server_errors, mut said_unknown, mut cut) = (0u64, 0u64, 0u64, 0u64);
    for s in &sent {
        if let Got::Answer { status: 200, body } = &s.got {
            ok += 1;
            assert!(
                receipts.insert(receipt_of(body)),
                "{} shares a receipt",
                s.key
            );
        }
    }
    let mut retry = async |s: &Sent| {
        let answer = user
            .send_retried(&path, s.body.clone(), &s.key)
            .await
            .unwrap();
        assert_eq!(answer.status, 200, "retry of {}: {:?}", s.key, answer.body);
        let receipt = answer.body["receipt"]["id"].as_str().unwrap().to_owned();
        assert!(receipts.insert(receipt), "{} shares a receipt", s.key);
    };
    for s in &sent {
        if let Got::Answer { status, body } = &s.got
            && *status != 200
        {
            let message = message_of(body);
            assert!(*status >= 500, "{} answered {status}: {message}", s.key);
            server_errors += 1;
            said_unknown += u64::from(message.contains("is unknown"));
            retry(s).await;
        }
    }
    let charged_by_5xx_retries = charged().await - charged_by_load;
    // Each 5xx was uncharged, so its retry charged; only an answer that said the outcome was
    // unknown may have been charged (and its retry then recovered it).
    assert!(
        charged_by_5xx_retries + said_unknown >= server_errors,
        "{} of {server_errors} requests answered 5xx had been charged",
        server_errors - charged_by_5xx_retries
    );
    for s in &sent {
        if matches!(s.got, Got::Cut) {
            cut += 1;
            retry(s).await;
        }
    }
    let total = charged().await;
    let charged_by_cut_retries = total - charged_by_load - charged_by_5xx_retries;
    // Cut requests that had been charged, recovered by their retry with the original receipt.
    let recovered = cut - charged_by_cut_retries;
    let charged_5xx = server_errors - charged_by_5xx_retries;
    assert_eq!(charged_by_load, PRICE * (ok + recovered + charged_5xx));

    // Delivered answers are in the store: a same-key retry replays them byte for byte (the
    // ones nearest each fault, where a lost write would show).
    let near_faults = sent.iter().filter(|s| {
        matches!(s.got, Got::Answer { status: 200, .. })
            && restarts.iter().any(|(_, _, at)| {
                s.at.saturating_duration_since(*at) < Duration::from_millis(300)
                    || at.saturating_duration_since(s.at) < Duration::from_millis(300)
            })
    });
    let mut replayed = 0;
    for s in near_faults.take(60) {
        let Got::Answer { body, .. } = &s.got else {
            unreachable!()
        };
        let req = user
            .prepare_keyed(reqwest::Method::POST, &path, s.body.clone(), Some(&s.key))
            .unwrap();
        let (status, again) = user.send_raw(req).await.unwrap();
        assert_eq!((status, &again), (200, body), "replay of {}", s.key);
        replayed += 1;
    }

    // Conservation: one receipt per key, each charged once, all earned by the owner.
    let after = account(&user).await;
    assert_eq!(after["held"], 0);
    assert_eq!(receipts.len(), sent.len());
    assert_eq!(total, PRICE * receipts.len() as u64, "{after}");
    assert_eq!(account(&creator).await["earnings"].as_u64().unwrap(), total);
    assert!(
        ok > 0 && sent.len() as u64 > ok,
        "the faults cut or failed nothing: {ok} of {}",
        sent.len()
    );

    // Recovery: from each restarted process listening again to the first request, sent from
    // then on, that was answered 200 (the worst of all the faults).
    let recovery = restarts
        .iter()
        .map(|(svc, signal, up)| {
            let first = sent
                .iter()
                .filter(|s| s.at >= *up && matches!(s.got, Got::Answer { status: 200, .. }))
                .map(|s| s.done)
                .min()
                .unwrap_or_else(|| panic!("nothing answered 200 after {svc} came back ({signal})"));
            first - *up
        })
        .max()
        .unwrap();
    let row = format!(
        "| {backend} | {rounds} | {} | {ok} | {server_errors} | {cut} | {recovered} | {charged_5xx} | {total} = {} | 0 | {replayed} | {} ms |",
        sent.len(),
        receipts.len(),
        recovery.as_millis()
    );
    println!("{row}");
    if let Ok(report) = std::env::var("MODELHUB_FAULTS_REPORT") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(report)
            .unwrap();
        writeln!(f, "{row}").unwrap();
    }
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_restarted_services_lose_no_money_embedded() {
    faults(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_restarted_services_lose_no_money_mongodb() {
    faults(Some(modelhub_testkit::ScriptServer::start("mongo"))).await;
}

/// `n` predictions asking for proofs, each answered 200; returns their proof job ids.
async fn proved_predictions(user: &Client, model_id: &str, n: usize) -> Vec<String> {
    let mut jobs = Vec::new();
    for case in 0..n {
        let body = json!({ "inputs": digits_input(case % 8), "proof": true });
        let answer = user.predict_body(model_id, &body).await.unwrap();
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        jobs.push(answer.body["proof_job"].as_str().unwrap().to_owned());
    }
    jobs
}

/// Waits for every job's proof: each must be done, for its own job id; returns the answers.
async fn all_proved(user: &Client, jobs: &[String]) -> Vec<Value> {
    let mut states = Vec::new();
    for job in jobs {
        let state = user
            .get(&format!("/v1/proofs/{job}?wait=60"))
            .await
            .unwrap()
            .ok()
            .unwrap();
        assert_eq!(state["status"], "done", "{job}: {state}");
        assert_eq!(state["public"]["job_id"], job.as_str());
        states.push(state);
    }
    states
}

/// Proof jobs are durable: predictions asking for proofs are answered (and charged) once the
/// prover has recorded their jobs; a SIGKILL of the prover with jobs pending loses none: after
/// a restart on the same data every job finishes, for the model's digest and its own job id,
/// and nothing is charged twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proof_jobs_survive_a_killed_prover() {
    const JOBS: usize = 6;
    let mut p = Processes::start(None, Some(&[]));
    let Market { user, record, .. } = Market::open(&p).await;
    let digest = record["digest"].as_str().expect("the model has a circuit");
    let start_credits = account(&user).await["credits"].as_u64().unwrap();

    let model_id = record["model_id"].as_str().unwrap();
    let jobs = proved_predictions(&user, model_id, JOBS).await;
    let mut pending_at_kill = 0;
    for job in &jobs {
        let state = user
            .get(&format!("/v1/proofs/{job}"))
            .await
            .unwrap()
            .ok()
            .unwrap();
        if state["status"] == "pending" {
            pending_at_kill += 1;
            assert!(state["queue_position"].is_u64(), "{state}");
        }
    }
    p.bounce("prover", "KILL", Duration::from_millis(200));

    for state in all_proved(&user, &jobs).await {
        assert_eq!(state["model_digest"], digest);
    }
    let proof_price = record["proof_price"].as_u64().unwrap();
    let charged = start_credits - account(&user).await["credits"].as_u64().unwrap();
    assert_eq!(
        charged,
        (PRICE + proof_price) * JOBS as u64,
        "each prediction and each delivered proof charged once"
    );
    assert!(
        pending_at_kill > 0,
        "the prover finished every job before it was killed; nothing was tested"
    );
    println!("{pending_at_kill} of {JOBS} proof jobs were pending when the prover was killed");
}

/// A full proof queue refuses a prediction that asks for a proof with 503 and `retry-after`,
/// before anything is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_proof_queue_answers_503_and_charges_nothing() {
    let p = Processes::start(None, Some(&["--max-queued", "1"]));
    let Market { user, path, .. } = Market::open(&p).await;
    let start_credits = account(&user).await["credits"].as_u64().unwrap();
    // Sent together: one job fits, the others find the queue full (proving one takes far
    // longer than answering them).
    let sends = (0..4).map(|case| {
        let user = user.clone();
        let path = path.clone();
        async move {
            let body =
                Bytes::from(json!({ "inputs": digits_input(case), "proof": true }).to_string());
            let req = user
                .prepare_keyed(
                    reqwest::Method::POST,
                    &path,
                    body,
                    Some(&format!("full-{case}")),
                )
                .unwrap();
            user.send(req).await.unwrap()
        }
    });
    let answers = futures::future::join_all(sends).await;
    let ok = answers.iter().filter(|a| a.status == 200).count() as u64;
    let full: Vec<_> = answers.iter().filter(|a| a.status == 503).collect();
    assert!(ok >= 1, "{answers:?}");
    assert!(
        !full.is_empty(),
        "no prediction found the queue full: {answers:?}"
    );
    assert_eq!(ok as usize + full.len(), answers.len(), "{answers:?}");
    for a in &full {
        assert!(a.retry_after.is_some(), "{a:?}");
        assert!(a.error_message().contains("queue is full"), "{a:?}");
    }
    let charged = start_credits - account(&user).await["credits"].as_u64().unwrap();
    assert_eq!(
        charged,
        PRICE * ok,
        "only the answered predictions are charged"
    );
    assert_eq!(account(&user).await["held"], 0);
}

/// Pending proof jobs survive a SIGKILL of the whole `modelhub up`: after a restart on the
/// same data every one is proved, and nothing is charged twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proof_jobs_survive_a_killed_modelhub_up() {
    const JOBS: usize = 4;
    let data = tempfile::tempdir().unwrap();
    let http = free_loopback_addr();
    let mut child = up(data.path(), &http);
    let url = child.addr.clone();
    let admin = Client::new(
        &url,
        KeyFile::read(&data.path().join("admin-key.json")).unwrap(),
    )
    .unwrap();
    let Market { user, record, .. } = Market::with_admin(&admin).await;
    let model_id = record["model_id"].as_str().unwrap();
    let start_credits = account(&user).await["credits"].as_u64().unwrap();
    let jobs = proved_predictions(&user, model_id, JOBS).await;
    let last = user
        .get(&format!("/v1/proofs/{}", jobs[JOBS - 1]))
        .await
        .unwrap()
        .ok()
        .unwrap();
    std::process::Command::new("kill")
        .args(["-KILL", &child.child.id().to_string()])
        .status()
        .unwrap();
    child.child.wait().unwrap();
    drop(child);

    let restarted = up(data.path(), &http);
    let url = restarted.addr.clone();
    let user = Client::new(&url, user.key().clone()).unwrap();
    all_proved(&user, &jobs).await;
    let proof_price = record["proof_price"].as_u64().unwrap();
    let charged = start_credits - account(&user).await["credits"].as_u64().unwrap();
    assert_eq!(charged, (PRICE + proof_price) * JOBS as u64);
    assert_eq!(
        last["status"], "pending",
        "the last job was still pending at the kill: {last}"
    );
}

/// Prover replicas share their state (`--mongodb-uri`): jobs are leased, one prover at a time.
/// A prover killed while proving never comes back; a second replica, started afterwards with
/// its own data folder, proves the model from the shared record, takes over the dead one's
/// job once its lease runs out, and finishes every job, each read through a gateway that
/// speaks only to the second replica. Each prediction and each delivered proof is charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_prover_replica_s_jobs_are_finished_by_another() {
    const JOBS: usize = 4;
    let mongo = modelhub_testkit::ScriptServer::start("mongo");
    let uri = format!("{}/modelhub_provers", mongo.uri);
    let mut p = Processes::start(None, Some(&["--mongodb-uri", &uri, "--lease-secs", "2"]));
    let Market { user, record, .. } = Market::open(&p).await;
    let model_id = record["model_id"].as_str().unwrap();
    let start_credits = account(&user).await["credits"].as_u64().unwrap();
    let jobs = proved_predictions(&user, model_id, JOBS).await;
    // The first prover has taken the first job (it proves as soon as a job arrives).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut pending_at_kill = 0;
    for job in &jobs {
        let state = user
            .get(&format!("/v1/proofs/{job}"))
            .await
            .unwrap()
            .ok()
            .unwrap();
        pending_at_kill += usize::from(state["status"] == "pending");
    }
    p.kill("prover");

    let other_data = p
        ._dir
        .path()
        .join("prover-b")
        .to_string_lossy()
        .into_owned();
    p.replica("prover-b", "prover", &[("--data-dir", &other_data)]);
    let other_prover = p.url("prover-b");
    p.replica("gateway-b", "gateway", &[("--prover", &other_prover)]);
    let through_b = p.client("gateway-b", user.key());
    for state in all_proved(&through_b, &jobs).await {
        assert_eq!(state["model_digest"], record["digest"]);
    }
    assert!(
        pending_at_kill > 0,
        "every job was done before the kill; nothing was tested"
    );
    let proof_price = record["proof_price"].as_u64().unwrap();
    let charged = start_credits - account(&through_b).await["credits"].as_u64().unwrap();
    assert_eq!(charged, (PRICE + proof_price) * JOBS as u64);
    drop(p);
    drop(mongo);
}

/// Every call on the request path has a deadline: a stalled inference (SIGSTOP) or a stalled
/// registry makes a predict answer 503 within the gateway's deadline, a stalled prover a proof
/// read, uncharged, instead of
/// holding the request; once the service runs again (SIGCONT) the next predict is answered and
/// charged once. The first stall comes before the gateway has ever reached inference, so the
/// call also waits for a connection to a peer that accepts but never answers its handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_service_is_a_503_in_time_not_a_hang() {
    let mut p = Processes::start(None, Some(&[]));
    let Market { user, record, .. } = Market::open(&p).await;
    p.replica(
        "gateway-short",
        "gateway",
        &[
            ("--inference-timeout-secs", "2"),
            ("--registry-timeout-secs", "2"),
        ],
    );
    let user = p.client("gateway-short", user.key());
    let model_id = record["model_id"].as_str().unwrap();
    // The guard turns a hang into a failure (a hung predict once held CI for over an hour).
    let path = format!("/v1/models/{model_id}/predict");
    let body = json!({ "inputs": digits_input(0) });
    let predict = async || {
        tokio::time::timeout(Duration::from_secs(60), user.post(&path, &body))
            .await
            .expect("a predict hung instead of answering within the gateway's deadline")
            .unwrap()
    };
    let credits = account(&user).await["credits"].as_u64().unwrap();
    let stall = async |svc: &str| {
        p.signal(svc, "STOP");
        let answer = predict().await;
        p.signal(svc, "CONT");
        assert_error(&answer, 503, "unavailable", "");
        assert_eq!(answer.retry_after.as_deref(), Some("1"), "{svc}");
        assert_eq!(
            account(&user).await["credits"].as_u64().unwrap(),
            credits,
            "a stalled {svc} charges nothing"
        );
    };
    stall("inference").await;
    stall("registry").await;
    stall("inference").await;
    assert_eq!(predict().await.status, 200);
    assert_eq!(
        account(&user).await["credits"].as_u64().unwrap(),
        credits - PRICE
    );

    // A stalled prover: reading a proof answers 503 once the wait asked for (1 s) and the
    // gateway's slack have passed, instead of holding the request.
    let asked = crate::harness::predict_asking_for_proof(&user, model_id, &digits_input(1)).await;
    let read = format!("/v1/proofs/{}?wait=1", asked["proof_job"].as_str().unwrap());
    p.signal("prover", "STOP");
    let answer = tokio::time::timeout(Duration::from_secs(60), user.get(&read)).await;
    p.signal("prover", "CONT");
    let answer = answer
        .expect("a proof read hung on a stalled prover")
        .unwrap();
    assert_error(&answer, 503, "unavailable", "");
    let answer = user.get(&read).await.unwrap();
    assert_eq!(answer.status, 200, "{:?}", answer.body);
}

/// `modelhub storage verify` against the processes' blob folder: its JSON report.
fn verify_storage(p: &Processes) -> Value {
    let out = succeed(
        modelhub()
            .args(["storage", "verify", "--storage-dir"])
            .arg(p._dir.path().join("storage"))
            .args(["--url", &p.gateway_url(), "--key-file"])
            .arg(p._dir.path().join("admin-key.json")),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Storage killed (SIGKILL) while an upload's body is partly sent: the uploader gets an error,
/// nothing is registered, and once storage is back `modelhub storage verify` finds no blob
/// that no model names; the same upload then succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_killed_mid_upload_registers_nothing_and_leaves_no_blob() {
    use futures::StreamExt;

    let mut p = Processes::start(None, None);
    let Market { creator, .. } = Market::open(&p).await;
    let before = verify_storage(&p);
    assert_eq!(before["ok"], 1, "the market's own model: {before}");

    // The MNIST-size model (407 KB): its first 300 KB hold a full 256 KiB piece the gateway
    // has passed on to storage when storage dies.
    let bytes = std::fs::read(modelhub_testkit::test_model("mnist_mlp.onnx")).unwrap();
    let sha = modelhub_core::signing::sha256_hex(&bytes);
    let half = 300 * 1024;
    let (first, rest) = (
        Bytes::copy_from_slice(&bytes[..half]),
        Bytes::copy_from_slice(&bytes[half..]),
    );
    let (go_on, wait) = tokio::sync::oneshot::channel::<()>();
    let body = futures::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(
        futures::stream::once(async move {
            let _ = wait.await;
            Ok(rest)
        }),
    );
    let query = modelhub_cli::client::ModelUpload::new("killed", "1", 1);
    let upload = tokio::spawn({
        let (creator, query, sha) = (creator.clone(), query.clone(), sha.clone());
        async move { creator.upload_stream(&query, &sha, body).await }
    });
    // Let the first half reach storage (not a timing assertion: only the moment of the kill).
    tokio::time::sleep(Duration::from_millis(800)).await;
    // On a blocking thread: it waits for the process to exit and to listen again.
    p = tokio::task::spawn_blocking(move || {
        p.bounce("storage", "KILL", Duration::from_millis(200));
        p
    })
    .await
    .unwrap();
    let _ = go_on.send(());
    match upload.await.unwrap() {
        Ok(answer) => assert!(
            answer.status >= 500,
            "an upload cut by a dead storage answered {}: {:?}",
            answer.status,
            answer.body
        ),
        // The gateway may also drop the connection: the client sees no answer.
        Err(e) => eprintln!("the upload got no answer: {e:#}"),
    }
    let models = creator.get("/v1/models").await.unwrap().ok().unwrap();
    assert!(
        !models.to_string().contains("\"killed\""),
        "a cut upload was registered: {models}"
    );
    let after = verify_storage(&p);
    assert_eq!(after["clean"], true, "{after}");
    assert_eq!(after["unexpected"], json!([]), "orphan blobs: {after}");
    assert_eq!(after["ok"], 1, "{after}");

    // The same upload goes through on the restarted storage.
    let again = creator.upload(&query, bytes).await.unwrap();
    assert_eq!(again.status, 201, "{:?}", again.body);
    assert_eq!(verify_storage(&p)["ok"], 2);
}
