//! Throughput and latency of signed, charged predicts under concurrency, beside the same
//! gateway's bare `GET /v1/health`: the Model Hub half of `scripts/bench/serve`.
//!
//! Starts `modelhub up` (embedded back ends) on a temporary data folder in its own runtime
//! (the gateway's worker threads, as `modelhub up` runs them), then drives it from a
//! one-thread client runtime: for each concurrency `c`, `c` loops each send a predict signed
//! with a fresh nonce (no idempotency key, as a plain client) for `--secs` seconds, spread over
//! `ACCOUNTS` accounts. Prints one JSON line per run (`server`, `what`, `c`, `requests`,
//! `errors`, `rps`, `p50_us`, `p99_us`) and checks afterwards that every account was charged
//! exactly once per successful predict.
//!
//! With `--url URL --name NAME` it instead posts the same body, unsigned, to another server
//! (FastAPI, KServe) at `URL` and labels its lines `NAME`.
//!
//! `cargo run --release -p modelhub-cli --example serve_load -- --model FILE --body FILE
//! [--secs S] [--concurrency 1,16,64] [--url URL --name NAME] [--mongodb-uri URI]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use modelhub_cli::client::{Client, KeyFile, ModelUpload};
use modelhub_cli::up::{self, UpSettings};
use serde_json::json;

/// Accounts the load is spread over (each with its own key), so per-account rows are not the
/// only thing measured.
const ACCOUNTS: usize = 4;

struct Args {
    model: String,
    /// A predict body (`{"inputs": [...]}`), also valid OIP v2 `infer` JSON.
    body: String,
    secs: f64,
    concurrency: Vec<usize>,
    /// A peer server to load instead of Model Hub: its predict URL and its label.
    peer: Option<(String, String)>,
    /// The registry on this MongoDB server instead of the embedded store (lines labelled
    /// `modelhub-mongodb`).
    mongodb_uri: Option<String>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        model: ".cache/test-models/digits_mlp.onnx".into(),
        body: ".cache/test-models/digits_input.json".into(),
        secs: 5.0,
        concurrency: vec![1, 16, 64],
        peer: None,
        mongodb_uri: None,
    };
    let (mut url, mut name) = (None, None);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => a.model = value,
            "--body" => a.body = value,
            "--url" => url = Some(value),
            "--name" => name = Some(value),
            "--mongodb-uri" => a.mongodb_uri = Some(value),
            "--secs" => a.secs = value.parse()?,
            "--concurrency" => {
                a.concurrency = value.split(',').map(str::parse).collect::<Result<_, _>>()?
            }
            _ => anyhow::bail!("unknown flag {flag}"),
        }
    }
    a.peer = match (url, name) {
        (Some(url), Some(name)) => Some((url, name)),
        (None, None) => None,
        _ => anyhow::bail!("--url and --name go together"),
    };
    Ok(a)
}

/// What one run measured.
struct Run {
    requests: u64,
    errors: u64,
    elapsed: f64,
    micros: Vec<u32>,
}

impl Run {
    fn print(&self, server: &str, what: &str, c: usize) {
        let mut m = self.micros.clone();
        m.sort_unstable();
        let pct = |p: f64| m.get(((m.len().max(1) - 1) as f64 * p) as usize).copied();
        println!(
            "{}",
            json!({
                "server": server,
                "what": what,
                "c": c,
                "requests": self.requests,
                "errors": self.errors,
                "rps": (self.requests as f64 / self.elapsed).round(),
                "p50_us": pct(0.5),
                "p99_us": pct(0.99),
            })
        );
    }
}

/// Runs `c` loops of `send` for `secs` seconds.
async fn drive<F, Fut>(c: usize, secs: f64, send: F) -> Run
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let send = Arc::new(send);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let tasks: Vec<_> = (0..c)
        .map(|i| {
            let send = send.clone();
            tokio::spawn(async move {
                let (mut ok, mut bad, mut micros) = (0u64, 0u64, Vec::new());
                while Instant::now() < deadline {
                    let t = Instant::now();
                    if send(i).await {
                        ok += 1;
                        micros.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    } else {
                        bad += 1;
                    }
                }
                (ok, bad, micros)
            })
        })
        .collect();
    let mut run = Run {
        requests: 0,
        errors: 0,
        elapsed: 0.0,
        micros: Vec::new(),
    };
    for t in tasks {
        let (ok, bad, micros) = t.await.expect("load task");
        run.requests += ok;
        run.errors += bad;
        run.micros.extend(micros);
    }
    run.elapsed = started.elapsed().as_secs_f64();
    run
}

fn main() -> anyhow::Result<()> {
    let args = args()?;
    let body =
        Bytes::from(std::fs::read(&args.body).with_context(|| format!("reading {}", args.body))?);
    if let Some((url, name)) = &args.peer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        return rt.block_on(load_peer(&args, url, name, body));
    }
    let dir = tempfile::tempdir()?;
    // The server in its own runtime, with as many workers as `modelhub up` would use.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("server")
        .build()?;
    let settings = UpSettings {
        mongodb_uri: args.mongodb_uri.clone(),
        ..UpSettings::for_test(dir.path())
    };
    let running = server_rt.block_on(up::start(settings))?;
    let gateway = running.gateway_url.clone();
    let admin_key = running.admin_key.clone();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("load")
        .build()?;
    let outcome = client_rt.block_on(load(&args, &gateway, admin_key, body));
    server_rt.block_on(running.stop());
    outcome
}

/// How Model Hub's lines are labelled: by the registry's store.
fn server_name(args: &Args) -> &'static str {
    if args.mongodb_uri.is_some() {
        "modelhub-mongodb"
    } else {
        "modelhub"
    }
}

/// Unsigned POSTs of `body` to a peer server's predict URL.
async fn load_peer(args: &Args, url: &str, name: &str, body: Bytes) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let post = {
        let url = url.to_owned();
        move |_| {
            let (http, url, body) = (http.clone(), url.clone(), body.clone());
            async move {
                let sent = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                    _ => false,
                }
            }
        }
    };
    let warm = drive(4, 1.0, post.clone()).await;
    anyhow::ensure!(warm.requests > 0, "{name} at {url} answered no predict");
    for &c in &args.concurrency {
        drive(c, args.secs, post.clone())
            .await
            .print(name, "predict", c);
    }
    Ok(())
}

async fn load(args: &Args, gateway: &str, admin_key: KeyFile, body: Bytes) -> anyhow::Result<()> {
    let admin = Client::new(gateway, admin_key)?;
    // Enough credits for any run on this machine; checked exactly afterwards.
    const GRANT: u64 = 1 << 40;
    let mut users = Vec::new();
    for i in 0..ACCOUNTS {
        users.push(admin.new_account(&format!("load{i}"), GRANT).await?);
    }
    let bytes = std::fs::read(&args.model).with_context(|| format!("reading {}", args.model))?;
    let model = users[0]
        .upload(&ModelUpload::new("bench", "1", 1), bytes)
        .await?
        .ok()?;
    let model_id = model["model_id"].as_str().unwrap_or_default().to_owned();
    let path = format!("/v1/models/{model_id}/predict");
    let users = Arc::new(users);
    let predict = {
        let (users, path, body) = (users.clone(), path.clone(), body.clone());
        move |i: usize| {
            let user = &users[i % ACCOUNTS];
            let req = user.prepare(reqwest::Method::POST, &path, body.clone());
            let user = user.clone();
            async move {
                match req {
                    Ok(req) => matches!(user.send_raw(req).await, Ok((200, _))),
                    Err(_) => false,
                }
            }
        }
    };
    // Warm up: connections, caches, the model in the worker.
    let mut ok = drive(4, 1.0, predict.clone()).await.requests;
    for &c in &args.concurrency {
        let run = drive(c, args.secs, predict.clone()).await;
        ok += run.requests;
        run.print(server_name(args), "predict", c);
    }
    let c = *args.concurrency.iter().max().unwrap_or(&64);
    let health = {
        let http = reqwest::Client::new();
        let url = format!("{gateway}/v1/health");
        move |_| {
            let (http, url) = (http.clone(), url.clone());
            async move { matches!(http.get(&url).send().await, Ok(r) if r.status().is_success()) }
        }
    };
    drive(c, args.secs, health)
        .await
        .print(server_name(args), "health", c);
    // Money: every successful predict was charged once (price 1), warm-up included.
    let mut spent = 0u64;
    for user in users.iter() {
        let me = user.get("/v1/account").await?.ok()?;
        spent += GRANT - me["credits"].as_u64().context("credits")?;
        anyhow::ensure!(
            me["held"].as_u64().unwrap_or(0) == 0,
            "credits left held: {me}"
        );
    }
    anyhow::ensure!(
        spent == ok,
        "charged {spent} credits for {ok} successful predicts"
    );
    eprintln!("charged {spent} credits for {ok} successful predicts: once each");
    Ok(())
}
