//! Times the proving pipeline: `cargo run -p modelhub-zk --example bench [digits|mnist|all]`.
//!
//! digits: the test models' digits_mlp.onnx (64 → 16 → 10, sklearn), calibrated on the bundled
//! digits; mnist: a random-weight 784 → 128 → 10 MLP built in Rust. Prints one JSON line per
//! model: k, params load, keygen, keys read from a key file (what a restart costs instead of
//! keygen) and the file's size, commit, prove, verify (first, with VK rebuild, and cached),
//! proof and link sizes.
//!
//! `bench file NAME MODEL.onnx DATA.json [PROVES]` (used by scripts/bench/prover) does the same
//! for any ONNX file, with the data from DATA.json: `{"calibration": [[f32]], "test_inputs":
//! [[f32]], "float_argmax": [usize]}` (the float argmax from ONNX Runtime). It also times a
//! fresh params generation, proves the first PROVES (default 5) test rows for real (checking
//! each proved output against the native reference), reports the share of all test rows whose
//! quantized argmax (native reference, bit-exact with the circuit) equals the float argmax, and
//! the process's peak resident memory (`VmHWM`).
//!
//! `BENCH_LANES=8` (or 16, 32) lays the model out with that many lanes instead of the one the
//! compiler picks (`QuantizedModel::with_lanes`), to compare layouts in one build.

use std::time::Instant;

use modelhub_zk::onnx::{FloatLayer, mlp_onnx, random_dense};
use modelhub_zk::{Keys, ModelDigest, Params, QuantizedModel, commit, compile, prove, verify};

/// The compiled model, relaid with `BENCH_LANES` lanes if set.
fn compile_bench(onnx: &[u8], samples: &[Vec<f32>]) -> anyhow::Result<QuantizedModel> {
    let model = compile(onnx, samples)?;
    Ok(match std::env::var("BENCH_LANES") {
        Ok(l) => model.with_lanes(l.parse()?)?,
        Err(_) => model,
    })
}

/// A dense layer of random weights (weights in ±1/(2√inputs)).
fn layer(inputs: usize, outputs: usize, relu: bool, seed: u64) -> FloatLayer {
    random_dense(inputs, outputs, relu, seed, 1.0)
}

fn digits_samples() -> Vec<Vec<f32>> {
    let text = include_str!("../tests/data/digits.json");
    let v: serde_json::Value = serde_json::from_str(text).expect("digits.json");
    v["train"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            r.as_str()
                .expect("row")
                .bytes()
                .map(|b| f32::from(b - b'a') / 16.0)
                .collect()
        })
        .collect()
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn run(name: &str, onnx: &[u8], samples: &[Vec<f32>]) -> anyhow::Result<()> {
    let model = compile_bench(onnx, samples)?;
    let dir = modelhub_testkit::workspace_root().join("target/zk-params");
    let t = Instant::now();
    let params = Params::load_or_create(&dir, model.spec.k)?;
    let params_ms = ms(t);
    let t = Instant::now();
    let keys = Keys::new(&params, &model.spec)?;
    let keygen_ms = ms(t);
    let (keys_load_ms, key_file_bytes) = keys_from_disk(&params, &keys)?;
    let (vk_keygen_ms, vk_load_ms) = vk_from_disk(&params, &keys)?;
    let t = Instant::now();
    let (c, o) = commit(&model, &params)?;
    let commit_ms = ms(t);
    let mut prove_ms = Vec::new();
    let mut bundle = None;
    for (i, x) in samples.iter().enumerate().take(3) {
        let t = Instant::now();
        bundle = Some(prove(
            &params,
            &keys,
            &model,
            &c,
            &o,
            x,
            &format!("job-{i}"),
        )?);
        prove_ms.push(ms(t));
    }
    let bundle = bundle.expect("proved");
    let t = Instant::now();
    verify(&params, &bundle, &ModelDigest::of(&model.spec, &c))?;
    let verify_first_ms = ms(t);
    let mut verify_ms = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        verify(&params, &bundle, &ModelDigest::of(&model.spec, &c))?;
        verify_ms.push(ms(t));
    }
    prove_ms.sort_by(f64::total_cmp);
    verify_ms.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "model": name, "k": model.spec.k, "lanes": model.spec.lanes, "params_ms": params_ms, "keygen_ms": keygen_ms,
            "keys_load_ms": keys_load_ms, "key_file_bytes": key_file_bytes,
            "vk_keygen_ms": vk_keygen_ms, "vk_load_ms": vk_load_ms,
            "commit_ms": commit_ms, "prove_ms_median": prove_ms[1],
            "verify_first_ms": verify_first_ms, "verify_ms_median": verify_ms[2],
            "proof_bytes": bundle.proof.len(), "link_bytes": bundle.link.len(),
            "bundle_json_bytes": serde_json::to_vec(&bundle)?.len(),
        })
    );
    Ok(())
}

/// What a restarted prover pays for its keys instead of keygen: the keys written in the key
/// file format and read back (median of 3 reads, checked to be the same keys). Returns the
/// read time in ms and the file size in bytes.
fn keys_from_disk(params: &Params, keys: &Keys) -> anyhow::Result<(f64, usize)> {
    let bytes = keys.to_bytes()?;
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let read = Keys::read(params, keys.spec(), &bytes)?;
        times.push(ms(t));
        anyhow::ensure!(read.fingerprint() == keys.fingerprint(), "keys read differ");
    }
    Ok((median(&mut times), bytes.len()))
}

/// What an offline verifier pays for the verifying key: keygen the first time (stored as a
/// verifying key file), then a read of that file (median of 3). Returns both in ms.
fn vk_from_disk(params: &Params, keys: &Keys) -> anyhow::Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let t = Instant::now();
    modelhub_zk::keys::verifying_key(params, keys.spec(), dir.path())?;
    let first = ms(t);
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let (vk, source) = modelhub_zk::keys::verifying_key(params, keys.spec(), dir.path())?;
        times.push(ms(t));
        anyhow::ensure!(source == modelhub_zk::KeySource::Disk, "not read from disk");
        anyhow::ensure!(modelhub_zk::keys::fingerprint(&vk) == keys.fingerprint());
    }
    Ok((first, median(&mut times)))
}

/// First index of the largest value (numpy's argmax).
fn argmax<T: PartialOrd>(v: &[T]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// Peak resident set size of this process in KiB (Linux `VmHWM`), if readable.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time (user + system, all threads) of this process in ms, from `/proc/self/stat`
/// (clock ticks of 10 ms, the Linux default `CLK_TCK` of 100).
fn cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // After the command name: state is field 3, utime 14 and stime 15 (1-based).
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) * 10.0
}

fn rows(v: &serde_json::Value, key: &str) -> anyhow::Result<Vec<Vec<f32>>> {
    let rows: Vec<Vec<f32>> = serde_json::from_value(v[key].clone())
        .map_err(|e| anyhow::anyhow!("data file: {key}: {e}"))?;
    Ok(rows)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `bench file NAME MODEL.onnx DATA.json [PROVES]`: see the module docs.
fn run_file(name: &str, onnx_path: &str, data_path: &str, proves: usize) -> anyhow::Result<()> {
    let onnx = std::fs::read(onnx_path)?;
    let data: serde_json::Value = serde_json::from_slice(&std::fs::read(data_path)?)?;
    let calibration = rows(&data, "calibration")?;
    let test = rows(&data, "test_inputs")?;
    let float_argmax: Vec<usize> = serde_json::from_value(data["float_argmax"].clone())?;
    anyhow::ensure!(
        test.len() == float_argmax.len() && test.len() >= proves.max(1),
        "data file: test_inputs and float_argmax must have the same length, at least PROVES"
    );

    let t = Instant::now();
    let model = compile_bench(&onnx, &calibration)?;
    let compile_ms = ms(t);
    let k = model.spec.k;

    // Accuracy over the whole test set, from the native reference (bit-exact with the circuit).
    let mut agree = 0;
    let mut reference_out = Vec::with_capacity(test.len());
    for (x, &want) in test.iter().zip(&float_argmax) {
        let q = modelhub_zk::reference(&model, &modelhub_zk::quantize_input(&model.spec, x)?)?;
        agree += usize::from(argmax(&q) == want);
        reference_out.push(q);
    }

    let t = Instant::now();
    drop(Params::new(k)?);
    let params_new_ms = ms(t);
    let dir = modelhub_testkit::workspace_root().join("target/zk-params");
    let t = Instant::now();
    let params = Params::load_or_create(&dir, k)?;
    let params_load_ms = ms(t);
    let t = Instant::now();
    let keys = Keys::new(&params, &model.spec)?;
    let keygen_ms = ms(t);
    let (keys_load_ms, key_file_bytes) = keys_from_disk(&params, &keys)?;
    let (vk_keygen_ms, vk_load_ms) = vk_from_disk(&params, &keys)?;
    let t = Instant::now();
    let (c, o) = commit(&model, &params)?;
    let commit_ms = ms(t);

    let mut prove_ms = Vec::new();
    let mut prove_cpu_ms = Vec::new();
    let mut proved_agree = 0;
    let mut bundle = None;
    for (i, x) in test.iter().enumerate().take(proves) {
        let (t, cpu) = (Instant::now(), cpu_ms());
        let b = prove(&params, &keys, &model, &c, &o, x, &format!("bench-{i}"))?;
        prove_ms.push(ms(t));
        prove_cpu_ms.push(cpu_ms() - cpu);
        anyhow::ensure!(
            b.public.output == reference_out[i],
            "row {i}: proved output differs from the native reference"
        );
        proved_agree += usize::from(argmax(&b.public.output) == float_argmax[i]);
        bundle = Some(b);
    }
    let bundle = bundle.ok_or_else(|| anyhow::anyhow!("nothing proved"))?;
    let t = Instant::now();
    verify(&params, &bundle, &ModelDigest::of(&model.spec, &c))?;
    let verify_first_ms = ms(t);
    let mut verify_ms = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        verify(&params, &bundle, &ModelDigest::of(&model.spec, &c))?;
        verify_ms.push(ms(t));
    }
    // Profiling aid: `BENCH_VERIFY_LOOP=N` verifies N more times (after the figures above).
    if let Some(n) = std::env::var("BENCH_VERIFY_LOOP")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        let t = Instant::now();
        for _ in 0..n {
            model.spec.validate()?;
        }
        eprintln!("validate: {:.3} ms", ms(t) / n as f64);
        let t = Instant::now();
        for _ in 0..n {
            verify(&params, &bundle, &ModelDigest::of(&model.spec, &c))?;
        }
        eprintln!("verify: {:.3} ms", ms(t) / n as f64);
    }
    let prove_all = prove_ms.clone();
    println!(
        "{}",
        serde_json::json!({
            "model": name, "onnx": onnx_path, "k": k, "lanes": model.spec.lanes,
            "compile_ms": compile_ms,
            "params_new_ms": params_new_ms, "params_load_ms": params_load_ms,
            "keygen_ms": keygen_ms, "keys_load_ms": keys_load_ms, "key_file_bytes": key_file_bytes,
            "vk_keygen_ms": vk_keygen_ms, "vk_load_ms": vk_load_ms,
            "commit_ms": commit_ms,
            "prove_ms": prove_all, "prove_ms_median": median(&mut prove_ms),
            "prove_cpu_ms_median": median(&mut prove_cpu_ms), "process_cpu_ms": cpu_ms(),
            "verify_first_ms": verify_first_ms, "verify_ms_median": median(&mut verify_ms),
            "proof_bytes": bundle.proof.len(), "link_bytes": bundle.link.len(),
            "bundle_json_bytes": serde_json::to_vec(&bundle)?.len(),
            "accuracy": {
                "rows": test.len(), "agree": agree, "share": agree as f64 / test.len() as f64,
                "proved_rows": proves, "proved_agree": proved_agree,
            },
            "peak_rss_kib": peak_rss_kib(),
        })
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("file") {
        let [name, onnx, data] = [2, 3, 4].map(|i| args.get(i).cloned());
        let (Some(name), Some(onnx), Some(data)) = (name, onnx, data) else {
            anyhow::bail!("usage: bench file NAME MODEL.onnx DATA.json [PROVES]");
        };
        let proves = args.get(5).map_or(Ok(5), |p| p.parse())?;
        return run_file(&name, &onnx, &data, proves);
    }
    let which = args.get(1).cloned().unwrap_or_else(|| "all".into());
    if which == "digits" || which == "all" {
        let onnx = std::fs::read(modelhub_testkit::test_model("digits_mlp.onnx"))?;
        run("digits 64-16-10", &onnx, &digits_samples())?;
    }
    if which == "mnist" || which == "all" {
        let onnx = mlp_onnx(&[layer(784, 128, true, 1), layer(128, 10, false, 2)]);
        let samples: Vec<Vec<f32>> = (0..64)
            .map(|i| {
                (0..784)
                    .map(|j| (((i * 31 + j * 7) % 97) as f32) / 96.0)
                    .collect()
            })
            .collect();
        run("mnist-size 784-128-10", &onnx, &samples)?;
    }
    Ok(())
}
