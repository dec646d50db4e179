//! Run-time bombs: models whose few bytes ask for gigabytes or for hours. Each is refused with
//! an error that names the limit, while the process's peak memory grows by less than
//! [`PEAK_GROWTH`] (twice the test budget).

use std::time::Duration;

use modelhub_core::{ErrorCode, Tensor};
use modelhub_onnx::untrusted::proto::*;
use modelhub_onnx::{OnnxError, RunLimits};

use crate::{TEST_MEMORY_BUDGET, setup};

/// Bound on the growth of the process's peak resident memory while the bombs run: twice the
/// budget (the arena's budget, plus outputs copied out and what the other tests of this binary
/// hold meanwhile; measured up to 408 MiB), far below the 4 GiB and more the bombs ask for.
const PEAK_GROWTH: u64 = 2 * TEST_MEMORY_BUDGET;

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Serialises the tests that read the peak, so one does not reset the other's.
static PEAK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Resets the peak (VmHWM) to the current resident size and returns it, in bytes.
fn reset_peak() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    status_kib("VmHWM:") * 1024
}

fn peak() -> u64 {
    status_kib("VmHWM:") * 1024
}

fn limits(timeout_ms: u64) -> RunLimits {
    RunLimits {
        timeout: Duration::from_millis(timeout_ms),
        max_output_bytes: 16 << 20,
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

/// `Y = ConstantOfShape(S)`, `S` given at run time.
fn constant_of_shape() -> Vec<u8> {
    let mut n = node("ConstantOfShape", &["S"], &["Y"]);
    n.attribute
        .push(attr_tensor("value", tensor_f32("v", &[1], &[1.0])));
    model_bytes(GraphProto {
        node: vec![n],
        name: "cos".into(),
        input: vec![value_info("S", INT64, &[2])],
        output: vec![value_info("Y", FLOAT, &[-1, -1])],
        ..Default::default()
    })
}

fn x() -> Tensor {
    Tensor::from_f32("X", vec![1, 1], &[1.0]).unwrap()
}

fn shape(dims: &[i64]) -> Tensor {
    let data = dims.iter().flat_map(|d| d.to_le_bytes()).collect();
    Tensor::new(
        "S",
        vec![dims.len() as i64],
        modelhub_core::DataType::Int64,
        data,
    )
    .unwrap()
}

fn assert_limit(e: &OnnxError, what: &str) {
    assert!(matches!(e, OnnxError::Limit { .. }), "{e:?}");
    assert_eq!(e.code(), ErrorCode::Unprocessable);
    assert!(e.to_string().contains(what), "{e}");
}

/// `Y = Loop(M, X)` whose body adds 1 to a `[width]` vector; with `scan`, every iteration's
/// vector is also kept (a `[M, width]` output that grows while the loop runs).
fn long_loop(trips: i64, width: i64, scan: bool) -> Vec<u8> {
    let mut outputs = vec![
        value_info("cond_out", 9, &[]),
        value_info("v_out", FLOAT, &[width]),
    ];
    let mut nodes = vec![
        node("Identity", &["cond_in"], &["cond_out"]),
        node("Add", &["v_in", "one"], &["v_out"]),
    ];
    if scan {
        nodes.push(node("Identity", &["v_out"], &["s_out"]));
        outputs.push(value_info("s_out", FLOAT, &[width]));
    }
    let body = GraphProto {
        node: nodes,
        name: "body".into(),
        initializer: vec![tensor_f32("one", &[1], &[1.0])],
        input: vec![
            value_info("i", INT64, &[]),
            value_info("cond_in", 9, &[]),
            value_info("v_in", FLOAT, &[width]),
        ],
        output: outputs,
        ..Default::default()
    };
    let loop_outputs: &[&str] = if scan { &["Y", "S"] } else { &["Y"] };
    let mut looped = node("Loop", &["M", "", "X"], loop_outputs);
    looped.attribute.push(attr_graph("body", body));
    let mut graph_outputs = vec![value_info("Y", FLOAT, &[width])];
    if scan {
        graph_outputs.push(value_info("S", FLOAT, &[-1, width]));
    }
    model_bytes(GraphProto {
        node: vec![looped],
        name: "loop".into(),
        initializer: vec![tensor_i64("M", &[], &[trips])],
        input: vec![value_info("X", FLOAT, &[width])],
        output: graph_outputs,
        ..Default::default()
    })
}

#[test]
fn shape_bombs_are_refused_within_the_memory_budget() {
    setup();
    let _serial = PEAK.lock().unwrap_or_else(|e| e.into_inner());
    let before = reset_peak();
    let big = 1i64 << 15; // [2^15, 2^15] floats: 4 GiB
    for op in ["Expand", "Tile"] {
        let mut model = modelhub_onnx::load(&with_shape_operand(op, &[big, big]), 1).unwrap();
        let e = model.run_limited(&[x()], &limits(10_000)).unwrap_err();
        assert_limit(&e, "more memory than the limit of 256 MiB");
    }

    let mut cos = modelhub_onnx::load(&constant_of_shape(), 1).unwrap();
    for dims in [[big, big], [1 << 31, 1 << 31], [1 << 62, 4]] {
        let e = cos
            .run_limited(&[shape(&dims)], &limits(10_000))
            .unwrap_err();
        assert_limit(&e, "more memory than the limit");
    }
    // Small enough to run: the same model answers.
    let y = cos.run_limited(&[shape(&[2, 3])], &limits(10_000)).unwrap();
    assert_eq!(y[0].as_f32().unwrap(), vec![1.0; 6]);

    // A constant shape is not folded at load time (outside the budget) but run within it.
    let mut fill = node("ConstantOfShape", &["K"], &["C"]);
    fill.attribute
        .push(attr_tensor("value", tensor_f32("v", &[1], &[1.0])));
    let folded = model_bytes(GraphProto {
        node: vec![fill, node("Add", &["X", "C"], &["Y"])],
        name: "folded".into(),
        initializer: vec![tensor_i64("K", &[2], &[big, big])],
        input: vec![value_info("X", FLOAT, &[1, 1])],
        output: vec![value_info("Y", FLOAT, &[-1, -1])],
        ..Default::default()
    });
    let mut folded = modelhub_onnx::load(&folded, 1).unwrap();
    let e = folded.run_limited(&[x()], &limits(10_000)).unwrap_err();
    assert_limit(&e, "more memory than the limit");

    // Within the memory budget but past the output limit: refused before it is copied out.
    let mut wide =
        modelhub_onnx::load(&with_shape_operand("Expand", &[1 << 12, 1 << 12]), 1).unwrap();
    let e = wide.run_limited(&[x()], &limits(10_000)).unwrap_err();
    assert_limit(
        &e,
        "outputs are larger than the limit of 16 MiB per request",
    );

    let growth = peak().saturating_sub(before);
    assert!(
        growth < PEAK_GROWTH,
        "peak memory grew by {} MiB",
        growth >> 20
    );
}

#[test]
fn long_loops_stop_at_their_deadline_or_the_memory_budget() {
    setup();
    let _serial = PEAK.lock().unwrap_or_else(|e| e.into_inner());
    let before = reset_peak();
    let mut endless = modelhub_onnx::load(&long_loop(i64::MAX, 4, false), 1).unwrap();
    let input = Tensor::from_f32("X", vec![4], &[0.0; 4]).unwrap();
    let started = std::time::Instant::now();
    let e = endless
        .run_limited(std::slice::from_ref(&input), &limits(300))
        .unwrap_err();
    assert_limit(&e, "took longer than the limit of 300 ms");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // A short loop of the same model shape answers.
    let mut short = modelhub_onnx::load(&long_loop(3, 4, false), 1).unwrap();
    let y = short
        .run_limited(std::slice::from_ref(&input), &limits(10_000))
        .unwrap();
    assert_eq!(y[0].as_f32().unwrap(), vec![3.0; 4]);

    // Keeping 16 KiB per iteration, the loop meets the budget (or the deadline) first.
    let wide = Tensor::from_f32("X", vec![4096], &[0.0; 4096]).unwrap();
    let mut growing = modelhub_onnx::load(&long_loop(i64::MAX, 4096, true), 1).unwrap();
    let e = growing.run_limited(&[wide], &limits(20_000)).unwrap_err();
    assert!(matches!(e, OnnxError::Limit { .. }), "{e:?}");
    // It left the budget whole, not fragmented: a 64 MiB tensor still fits.
    let mut big =
        modelhub_onnx::load(&with_shape_operand("Expand", &[1 << 12, 1 << 12]), 1).unwrap();
    let roomy = RunLimits {
        max_output_bytes: 64 << 20,
        ..limits(10_000)
    };
    let y = big.run_limited(&[x()], &roomy).unwrap();
    assert_eq!(y[0].shape, vec![1 << 12, 1 << 12]);

    let growth = peak().saturating_sub(before);
    assert!(
        growth < PEAK_GROWTH,
        "peak memory grew by {} MiB",
        growth >> 20
    );
}
