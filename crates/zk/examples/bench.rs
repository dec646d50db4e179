//! Times the proving pipeline: `cargo run -p modelhub-zk --example bench [digits|mnist|all]`.
//!
//! digits: the test models' digits_mlp.onnx (64 → 16 → 10, sklearn), calibrated on the bundled
//! digits; mnist: a random-weight 784 → 128 → 10 MLP built in Rust. Prints one JSON line per
//! model: k, params load, keygen, commit, prove, verify (first, with VK rebuild, and cached),
//! proof and link sizes.

use std::time::Instant;

use modelhub_zk::onnx::{FloatLayer, mlp_onnx};
use modelhub_zk::{Keys, LayerKind, Params, commit, compile, prove, verify};

fn layer(inputs: usize, outputs: usize, relu: bool, seed: u64) -> FloatLayer {
    let mut s = seed;
    let mut next = move || {
        s = s
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) / (inputs as f32).sqrt()
    };
    FloatLayer {
        kind: LayerKind::Dense,
        inputs,
        outputs,
        weights: (0..inputs * outputs).map(|_| next()).collect(),
        bias: (0..outputs).map(|_| next() * 0.1).collect(),
        relu,
    }
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
    let model = compile(onnx, samples)?;
    let dir = modelhub_testkit::workspace_root().join("target/zk-params");
    let t = Instant::now();
    let params = Params::load_or_create(&dir, model.spec.k)?;
    let params_ms = ms(t);
    let t = Instant::now();
    let keys = Keys::new(&params, &model.spec)?;
    let keygen_ms = ms(t);
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
    verify(&params, &bundle)?;
    let verify_first_ms = ms(t);
    let mut verify_ms = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        verify(&params, &bundle)?;
        verify_ms.push(ms(t));
    }
    prove_ms.sort_by(f64::total_cmp);
    verify_ms.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "model": name, "k": model.spec.k, "params_ms": params_ms, "keygen_ms": keygen_ms,
            "commit_ms": commit_ms, "prove_ms_median": prove_ms[1],
            "verify_first_ms": verify_first_ms, "verify_ms_median": verify_ms[2],
            "proof_bytes": bundle.proof.len(), "link_bytes": bundle.link.len(),
            "bundle_json_bytes": serde_json::to_vec(&bundle)?.len(),
        })
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".into());
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
