//! Latency of a warm, signed, charged predict through the gateway (digits model, batch 1),
//! one request at a time: starts `modelhub up` in-process on a temporary data folder, uploads
//! the model, warms up, then times N sequential requests end to end (client signing included).
//!
//! `scripts/bench/predict-latency [N]` runs it in release mode.

use std::time::Instant;

use modelhub_cli::client::{Client, ModelUpload};
use modelhub_cli::up::{self, UpSettings};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(2000);
    let model_path = std::env::var("MODELHUB_BENCH_MODEL")
        .unwrap_or_else(|_| ".cache/test-models/digits_mlp.onnx".into());
    let dir = tempfile::tempdir()?;
    let running = up::start(UpSettings::for_test(dir.path())).await?;
    let admin = Client::new(&running.gateway_url, running.admin_key.clone())?;

    let user = admin.new_account("bench", (n + 100) as u64).await?;
    let record = user
        .upload(
            &ModelUpload::new("digits", "1", 1),
            std::fs::read(&model_path)?,
        )
        .await?
        .ok()?;
    let model_id = record["model_id"].as_str().unwrap_or_default().to_string();
    let inputs =
        json!([{ "name": "X", "shape": [1, 64], "datatype": "FP32", "data": vec![0.5f32; 64] }]);

    for _ in 0..50 {
        user.predict(&model_id, inputs.clone()).await?.ok()?;
    }
    let mut micros = Vec::with_capacity(n);
    let started = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        user.predict(&model_id, inputs.clone()).await?.ok()?;
        micros.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let total = started.elapsed().as_secs_f64();
    micros.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| micros[((micros.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "signed predict, digits MLP, batch 1, sequential: n={n} p50={:.0}us p90={:.0}us p99={:.0}us max={:.0}us ({:.0} req/s)",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        micros[micros.len() - 1],
        n as f64 / total
    );
    let me = user.get("/v1/account").await?.ok()?;
    anyhow::ensure!(
        me["credits"] == json!(100 - 50),
        "charged once per predict: {me}"
    );
    running.stop().await;
    Ok(())
}
