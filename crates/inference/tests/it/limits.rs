//! Limits of a prediction over gRPC: run-time bombs, deadlines, non-finite outputs, the cap on
//! an account's predictions in flight and the fair share of the compute threads.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use modelhub_core::{ApiError, ErrorCode, Tensor};
use modelhub_onnx::untrusted::proto::*;

use crate::harness::{assert_code, digits, predict, predict_as, start_with, upload};

/// Bound on the growth of the process's peak resident memory while the bombs run: each asks
/// for more than the whole budget at once, so the runtime refuses before taking anything.
const PEAK_GROWTH: u64 = 256 << 20;

fn vm_hwm() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// Polls `f` until it holds, failing after 20 s.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "{what} never happened");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `Y = op(X, K)` with `K` an int64 initializer.
fn with_shape_operand(op: &str, k: &[i64]) -> Vec<u8> {
    model_bytes(GraphProto {
        node: vec![node(op, &["X", "K"], &["Y"])],
        name: op.into(),
        initializer: vec![tensor_i64("K", &[k.len() as i64], k)],
        input: vec![value_info("X", FLOAT, &[1, 1])],
        output: vec![value_info("Y", FLOAT, &[-1, -1])],
        ..Default::default()
    })
}

/// `Y = ConstantOfShape(K)` (the shape a constant) plus `X`.
fn constant_of_shape(k: &[i64]) -> Vec<u8> {
    let mut fill = node("ConstantOfShape", &["K"], &["C"]);
    fill.attribute
        .push(attr_tensor("value", tensor_f32("v", &[1], &[1.0])));
    model_bytes(GraphProto {
        node: vec![fill, node("Add", &["X", "C"], &["Y"])],
        name: "cos".into(),
        initializer: vec![tensor_i64("K", &[k.len() as i64], k)],
        input: vec![value_info("X", FLOAT, &[1, 1])],
        output: vec![value_info("Y", FLOAT, &[-1, -1])],
        ..Default::default()
    })
}

/// `Y = Loop(trips, X)`, each iteration adding 1 to `X` (`[1, 1]`).
fn counting_loop(trips: i64) -> Vec<u8> {
    let body = GraphProto {
        node: vec![
            node("Identity", &["cond_in"], &["cond_out"]),
            node("Add", &["v_in", "one"], &["v_out"]),
        ],
        name: "body".into(),
        initializer: vec![tensor_f32("one", &[1], &[1.0])],
        input: vec![
            value_info("i", INT64, &[]),
            value_info("cond_in", 9, &[]),
            value_info("v_in", FLOAT, &[1, 1]),
        ],
        output: vec![
            value_info("cond_out", 9, &[]),
            value_info("v_out", FLOAT, &[1, 1]),
        ],
        ..Default::default()
    };
    let mut looped = node("Loop", &["M", "", "X"], &["Y"]);
    looped.attribute.push(attr_graph("body", body));
    model_bytes(GraphProto {
        node: vec![looped],
        name: "loop".into(),
        initializer: vec![tensor_i64("M", &[], &[trips])],
        input: vec![value_info("X", FLOAT, &[1, 1])],
        output: vec![value_info("Y", FLOAT, &[1, 1])],
        ..Default::default()
    })
}

fn x() -> Tensor {
    Tensor::from_f32("X", vec![1, 1], &[0.0]).unwrap()
}

fn assert_limit(e: &ApiError, what: &str) {
    assert_code(e, ErrorCode::Unprocessable);
    assert!(e.message.contains(what), "{}", e.message);
    for leak in ["onnxruntime", "/", "bfc", "Available memory"] {
        assert!(!e.message.contains(leak), "{leak:?} in {}", e.message);
    }
}

#[tokio::test]
async fn run_time_bombs_get_a_clean_answer_that_names_the_limit() {
    let mut c = start_with(|s| s.run_timeout_ms = 500).await;
    let big = 1i64 << 15; // [2^15, 2^15] floats: 4 GiB, twice the default budget
    let bombs = [
        ("mdl_expand", with_shape_operand("Expand", &[big, big])),
        ("mdl_tile", with_shape_operand("Tile", &[big, big])),
        ("mdl_cos", constant_of_shape(&[big, big])),
        ("mdl_cos62", constant_of_shape(&[1 << 62, 4])),
    ];
    let mut models = Vec::new();
    for (id, bytes) in &bombs {
        // Uploading is harmless: nothing is evaluated at load time.
        models.push(upload(&mut c.storage, id, bytes).await);
    }
    let endless = upload(&mut c.storage, "mdl_endless", &counting_loop(i64::MAX)).await;
    let before = vm_hwm();
    for model in &models {
        let e = predict(&mut c.inference, model, vec![x()])
            .await
            .unwrap_err();
        assert_limit(&e, "more memory than the limit of 2 GiB");
    }
    let started = Instant::now();
    let e = predict(&mut c.inference, &endless, vec![x()])
        .await
        .unwrap_err();
    assert_limit(&e, "took longer than the limit of 500 ms");
    assert!(started.elapsed() < Duration::from_secs(15));
    let growth = vm_hwm().saturating_sub(before);
    assert!(growth < PEAK_GROWTH, "peak grew by {} MiB", growth >> 20);

    // An output within memory but past the output limit (32 MiB): [2^12, 2^12] floats.
    let wide = upload(
        &mut c.storage,
        "mdl_wide",
        &with_shape_operand("Expand", &[1 << 12, 1 << 12]),
    )
    .await;
    let e = predict(&mut c.inference, &wide, vec![x()])
        .await
        .unwrap_err();
    assert_limit(
        &e,
        "outputs are larger than the limit of 32 MiB per request",
    );

    // The service is fine afterwards.
    let model = upload(&mut c.storage, "mdl_digits", &digits()).await;
    let x = Tensor::from_f32("X", vec![1, 64], &[0.5; 64]).unwrap();
    assert_eq!(
        predict(&mut c.inference, &model, vec![x])
            .await
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn outputs_that_are_not_finite_numbers_are_errors() {
    let mut c = start_with(|_| {}).await;
    let times_ten = model_bytes(GraphProto {
        node: vec![node("Mul", &["X", "ten"], &["Y"])],
        name: "g".into(),
        initializer: vec![tensor_f32("ten", &[1], &[10.0])],
        input: vec![value_info("X", FLOAT, &[1, 2])],
        output: vec![value_info("Y", FLOAT, &[1, 2])],
        ..Default::default()
    });
    let model = upload(&mut c.storage, "mdl_times_ten", &times_ten).await;
    let ok = Tensor::from_f32("X", vec![1, 2], &[1.0, -2.0]).unwrap();
    let y = predict(&mut c.inference, &model, vec![ok]).await.unwrap();
    assert_eq!(y[0].as_f32().unwrap(), vec![10.0, -20.0]);
    let huge = Tensor::from_f32("X", vec![1, 2], &[-3.4e38, 1.0]).unwrap();
    let e = predict(&mut c.inference, &model, vec![huge])
        .await
        .unwrap_err();
    assert_code(&e, ErrorCode::Unprocessable);
    assert_eq!(
        e.message,
        "output \"Y\" holds a value that is not a finite number"
    );
}

#[tokio::test]
async fn a_flooding_account_is_capped_and_does_not_starve_another() {
    // One compute thread, four predictions in flight per account, 2 s per run at most.
    let mut c = start_with(|s| {
        s.compute_threads = 1;
        s.max_in_flight_per_account = 4;
        s.run_timeout_ms = 2_000;
    })
    .await;
    let endless = upload(&mut c.storage, "mdl_endless", &counting_loop(i64::MAX)).await;
    let slow = upload(&mut c.storage, "mdl_slow", &counting_loop(200_000)).await;
    let digits = upload(&mut c.storage, "mdl_digits", &digits()).await;
    let digit = Tensor::from_f32("X", vec![1, 64], &[0.5; 64]).unwrap();
    // Sessions open before the flood, so every request below only waits for the pool.
    predict_as(&mut c.inference, "acc_b", &digits, vec![digit.clone()])
        .await
        .unwrap();
    // (About 0.15 s a run here: long enough that a's next run is still going when b answers.)
    let warm = predict_as(&mut c.inference, "acc_a", &slow, vec![x()]).await;
    assert_eq!(warm.unwrap()[0].as_f32().unwrap(), vec![200_000.0]);

    let a_done = Arc::new(AtomicUsize::new(0));
    let send_a = |model: &modelhub_proto::common::v1::ModelRef| {
        let (mut client, model, done) = (c.inference.clone(), model.clone(), a_done.clone());
        tokio::spawn(async move {
            let r = predict_as(&mut client, "acc_a", &model, vec![x()]).await;
            done.fetch_add(1, Ordering::SeqCst);
            r
        })
    };
    // Account a: one run holding the only thread, then three more queued behind it.
    let first = send_a(&endless);
    until("the first run", || c.service.running() == 1).await;
    let queued: Vec<_> = (0..3).map(|_| send_a(&slow)).collect();
    until("three queued", || c.service.queued() == 3).await;

    // Its fifth is refused at once: RESOURCE_EXHAUSTED, HTTP 429.
    let status = c
        .inference
        .predict(modelhub_proto::inference::v1::PredictRequest {
            model: Some(slow.clone()),
            inputs: vec![x().into_proto()],
            account_id: "acc_a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    let e = ApiError::from_status(&status);
    assert_code(&e, ErrorCode::TooManyRequests);
    assert!(
        e.message.contains("4 predictions in flight"),
        "{}",
        e.message
    );

    // Account b is not capped by a's flood, and its prediction is served right after the
    // next one of a's, not after all of them.
    let b = predict_as(&mut c.inference, "acc_b", &digits, vec![digit])
        .await
        .unwrap();
    assert_eq!(b[1].shape, vec![1, 10]);
    let a_before_b = a_done.load(Ordering::SeqCst);
    assert!(
        a_before_b <= 2,
        "{a_before_b} of a's 4 runs were answered before b's one"
    );

    let e = first.await.unwrap().unwrap_err();
    assert_code(&e, ErrorCode::Unprocessable);
    for q in queued {
        let y = q.await.unwrap().unwrap();
        assert_eq!(y[0].as_f32().unwrap(), vec![200_000.0]);
    }
    assert_eq!(a_done.load(Ordering::SeqCst), 4);
}
