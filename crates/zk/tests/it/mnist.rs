//! An MNIST-size MLP (784 → 128 → 10, random weights): size and timing, #[ignore]d.
//! Run: cargo test -p modelhub-zk --test it mnist -- --ignored --nocapture

use std::time::Instant;

use modelhub_zk::onnx::{FloatLayer, mlp_onnx, random_dense};
use modelhub_zk::{Params, commit, compile, prove, verify};

/// A dense layer of random weights (weights in ±1/(2√inputs)).
fn layer(inputs: usize, outputs: usize, relu: bool, seed: u64) -> FloatLayer {
    random_dense(inputs, outputs, relu, seed, 1.0)
}

#[test]
#[ignore = "slow: MNIST-size proving benchmark"]
fn mnist_size_mlp() {
    let onnx = mlp_onnx(&[layer(784, 128, true, 1), layer(128, 10, false, 2)]);
    let samples: Vec<Vec<f32>> = (0..64)
        .map(|i| {
            (0..784)
                .map(|j| (((i * 31 + j * 7) % 97) as f32) / 96.0)
                .collect()
        })
        .collect();
    let model = compile(&onnx, &samples).unwrap();
    eprintln!("k = {}", model.spec.k);
    let t = Instant::now();
    let params = Params::load_or_create(&crate::common::params_dir(), model.spec.k).unwrap();
    eprintln!("params {:?}", t.elapsed());
    let t = Instant::now();
    let keys = crate::common::stored_keys(&params, &model.spec);
    eprintln!("keygen {:?}", t.elapsed());
    let t = Instant::now();
    let (c, o) = commit(&model, &params).unwrap();
    eprintln!("commit {:?}", t.elapsed());
    let t = Instant::now();
    let bundle = prove(&params, &keys, &model, &c, &o, &samples[3], "job").unwrap();
    eprintln!("prove {:?}", t.elapsed());
    let t = Instant::now();
    verify(&params, &bundle, &bundle.public.model_digest).unwrap();
    eprintln!("verify {:?} (with vk rebuild)", t.elapsed());
    let t = Instant::now();
    verify(&params, &bundle, &bundle.public.model_digest).unwrap();
    eprintln!(
        "verify {:?} (cached vk); proof {} B + link {} B",
        t.elapsed(),
        bundle.proof.len(),
        bundle.link.len()
    );
}
