//! The soak run behind `scripts/soak`: a `modelhub up` process (embedded back ends, loopback
//! only) under signed predicts at a fixed rate for N minutes, spread over several accounts,
//! with uploads of new model versions and proved predictions mixed in. Samples the process's
//! resident memory (VmRSS) every 2 s into a CSV, and at the end checks:
//!
//! - no answer was a 5xx (and none went unanswered);
//! - credits are conserved: what the users lost is exactly what the creator earned, nothing is
//!   left held;
//! - resident memory levels off: the mean of the last sixth of the samples is within 1.05× the
//!   mean of the sixth before it (memory may grow while caches fill, then must stop: the
//!   registry's page cache is bounded by `--store-cache-mib`, 64 MiB by default, which a run
//!   at 100 predicts/s fills in about 5 minutes; run 10).
//!
//! Prints a JSON summary line; exits non-zero when a check fails.
//!
//! `soak --modelhub target/release/modelhub --minutes M [--rate R] [--out DIR]`

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use modelhub_cli::client::{Client, KeyFile, ModelUpload};
use serde_json::{Value, json};

const ACCOUNTS: usize = 4;
const GRANT: u64 = 1 << 40;
/// Predicts in flight at most; a tick that finds them all busy is counted as late.
const IN_FLIGHT: usize = 128;

struct Args {
    modelhub: String,
    minutes: f64,
    rate: u64,
    out: String,
    model: String,
    body: String,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        modelhub: "target/release/modelhub".into(),
        minutes: 5.0,
        rate: 100,
        out: "target/soak".into(),
        model: ".cache/test-models/digits_mlp.onnx".into(),
        body: ".cache/test-models/digits_input.json".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--modelhub" => a.modelhub = value,
            "--minutes" => a.minutes = value.parse()?,
            "--rate" => a.rate = value.parse()?,
            "--out" => a.out = value,
            "--model" => a.model = value,
            "--body" => a.body = value,
            _ => anyhow::bail!("unknown flag {flag}"),
        }
    }
    Ok(a)
}

/// The `modelhub up` child, killed when dropped.
struct Up(Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    client_errors: AtomicU64,
    server_errors: AtomicU64,
    unanswered: AtomicU64,
    late: AtomicU64,
    proofs_asked: AtomicU64,
    uploads: AtomicU64,
}

impl Counts {
    fn record(&self, answer: &anyhow::Result<modelhub_cli::client::Answer>) {
        match answer {
            Ok(a) if a.is_success() => self.ok.fetch_add(1, Ordering::Relaxed),
            Ok(a) if a.status >= 500 => {
                eprintln!("5xx: {} {:?}", a.status, a.body);
                self.server_errors.fetch_add(1, Ordering::Relaxed)
            }
            Ok(_) => self.client_errors.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                eprintln!("no answer: {e:#}");
                self.unanswered.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    std::fs::create_dir_all(&a.out)?;
    let data = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let up = Up(Command::new(&a.modelhub)
        .args(["up", "--data-dir"])
        .arg(data.path())
        .args(["--http", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", a.modelhub))?);
    let pid = up.0.id();
    let url = format!("http://127.0.0.1:{port}");
    let admin_file = data.path().join("admin-key.json");
    let http = reqwest::Client::new();
    let started = Instant::now();
    loop {
        let healthy = http.get(format!("{url}/v1/health")).send().await;
        if matches!(healthy, Ok(r) if r.status().is_success()) && admin_file.exists() {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "modelhub up did not start"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let admin = Client::new(&url, KeyFile::read(&admin_file)?)?;
    let creator = admin.new_account("creator", 0).await?;
    let mut users = Vec::new();
    for i in 0..ACCOUNTS {
        users.push(admin.new_account(&format!("user{i}"), GRANT).await?);
    }
    let model_bytes = std::fs::read(&a.model)?;
    let record = creator
        .upload(&ModelUpload::new("soak", "1", 1), model_bytes.clone())
        .await?
        .ok()?;
    let model_id = record["model_id"].as_str().unwrap_or_default().to_owned();
    let body: Value = serde_json::from_slice(&std::fs::read(&a.body)?)?;
    let inputs = body["inputs"].clone();

    let counts = Arc::new(Counts::default());
    let users = Arc::new(users);
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let total = Duration::from_secs_f64(a.minutes * 60.0);
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let mut proof_jobs = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / a.rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n: u64 = 0;
    let mut next_sample = Instant::now();
    let mut next_upload = Instant::now() + Duration::from_secs(30);
    let soak_started = Instant::now();
    while soak_started.elapsed() < total {
        tick.tick().await;
        n += 1;
        if Instant::now() >= next_sample {
            if let Some(kib) = rss_kib(pid) {
                samples.push((soak_started.elapsed().as_secs_f64(), kib));
            }
            next_sample += Duration::from_secs(2);
        }
        if Instant::now() >= next_upload {
            next_upload += Duration::from_secs(30);
            let version = (2 + counts.uploads.fetch_add(1, Ordering::Relaxed)).to_string();
            let answer = creator
                .upload(&ModelUpload::new("soak", &version, 1), model_bytes.clone())
                .await;
            counts.record(&answer);
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            counts.late.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let user = users[(n as usize) % ACCOUNTS].clone();
        let (model_id, inputs, counts) = (model_id.clone(), inputs.clone(), counts.clone());
        // One predict in 500 asks for a proof (a second or more of the prover's time each).
        let prove = n.is_multiple_of(500);
        let task = tokio::spawn(async move {
            let _permit = permit;
            let body = json!({ "inputs": inputs, "proof": prove });
            let answer = user.predict_body(&model_id, &body).await;
            counts.record(&answer);
            let job = answer
                .ok()
                .filter(|a| a.is_success())
                .and_then(|a| a.body["proof_job"].as_str().map(|j| (user, j.to_owned())));
            if job.is_some() {
                counts.proofs_asked.fetch_add(1, Ordering::Relaxed);
            }
            job
        });
        if prove {
            proof_jobs.push(task);
        }
    }
    // Let the last predicts finish, then fetch (and pay for) every proof.
    let _ = slots.acquire_many(IN_FLIGHT as u32).await?;
    let mut proofs_done = 0u64;
    for task in proof_jobs {
        if let Some((user, job)) = task.await? {
            let answer = user.get(&format!("/v1/proofs/{job}?wait=60")).await;
            if matches!(&answer, Ok(a) if a.body["status"] == "done") {
                proofs_done += 1;
            }
            counts.record(&answer);
        }
    }

    // Money: what the users lost is what the creator earned; nothing held.
    let mut lost = 0u64;
    let mut held = 0u64;
    for user in users.iter() {
        let me = user.get("/v1/account").await?.ok()?;
        lost += GRANT - me["credits"].as_u64().context("credits")?;
        held += me["held"].as_u64().unwrap_or(0);
    }
    let earned = creator.get("/v1/account").await?.ok()?["earnings"]
        .as_u64()
        .context("earnings")?;

    // Memory: the last sixth of the run against the sixth before it.
    let csv: String = std::iter::once("seconds,rss_kib".to_owned())
        .chain(samples.iter().map(|(t, k)| format!("{t:.1},{k}")))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(format!("{}/rss.csv", a.out), csv + "\n")?;
    let rss: Vec<u64> = samples.iter().map(|s| s.1).collect();
    let sixth = rss.len() / 6;
    let mean = |s: &[u64]| s.iter().sum::<u64>() as f64 / s.len().max(1) as f64;
    let n_rss = rss.len();
    let (before, last) = (
        mean(&rss[n_rss - 2 * sixth..n_rss - sixth]),
        mean(&rss[n_rss - sixth..]),
    );
    let growth = if before > 0.0 {
        last / before
    } else {
        f64::NAN
    };

    let c = |x: &AtomicU64| x.load(Ordering::Relaxed);
    let summary = json!({
        "minutes": a.minutes, "rate": a.rate, "sent": n, "ok": c(&counts.ok),
        "client_errors": c(&counts.client_errors), "server_errors": c(&counts.server_errors),
        "unanswered": c(&counts.unanswered), "late": c(&counts.late),
        "uploads": c(&counts.uploads), "proofs_asked": c(&counts.proofs_asked),
        "proofs_done": proofs_done, "credits_lost_by_users": lost, "earned_by_creator": earned,
        "held": held, "rss_second_last_sixth_mib": before / 1024.0,
        "rss_last_sixth_mib": last / 1024.0, "rss_growth_last_sixth": growth,
        "rss_max_mib": samples.iter().map(|s| s.1).max().unwrap_or(0) as f64 / 1024.0,
    });
    println!("{summary}");
    drop(up);
    anyhow::ensure!(c(&counts.server_errors) == 0, "5xx answers");
    anyhow::ensure!(c(&counts.unanswered) == 0, "unanswered requests");
    anyhow::ensure!(
        lost == earned && held == 0,
        "credits not conserved: {summary}"
    );
    anyhow::ensure!(
        sixth > 0,
        "too short to judge memory (run at least a minute)"
    );
    anyhow::ensure!(
        growth < 1.05,
        "resident memory still grows at the end: {growth:.3}× over the last sixth"
    );
    Ok(())
}
