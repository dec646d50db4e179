//! Fixed-point quantization: the public [`CircuitSpec`], calibration, and the native integer
//! reference that the circuit reproduces bit for bit.
//!
//! Numbers are power-of-two fixed point: a real `v` at scale `s` is the integer `round(v·2^s)`.
//! Inputs and hidden activations are 8-bit signed (`[-128, 127]`); the outputs too when the last
//! layer ends in a ReLU, otherwise 16-bit (`output_range`, checked by the verifier). Weights are
//! int8 with a per-layer scale chosen from `max |w|`; a layer accumulates `acc = b + Σ w·x`
//! exactly (in the field, no overflow: `|acc| < 2^40` for any supported size), with the bias at
//! the accumulator scale plus `2^(shift-1)` so that the rescale rounds to nearest; the rescale is
//! the floor division `q = ⌊acc / 2^shift⌋` with remainder `r ∈ [0, 2^shift)` (range-checked in
//! the circuit, `shift ≤ 16`); `q` must lie in its range (checked by lookup, also on ReLU layers
//! before the ReLU) and the layer output is `max(q, 0)` or `q`. Calibration picks the scales so
//! that the calibration samples use at most `1 / (1 + MARGIN)` of each range; an input that
//! still leaves a range at proving time is [`ZkError::OutOfRange`].

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ZkError;
use crate::onnx::{FloatLayer, FloatModel};
use crate::shape::{Block, LayerKind, plan};

/// Version of the circuit layout; bump on any change that alters the verifying key.
pub const SPEC_VERSION: u32 = 1;
/// Neuron lanes per row (weight columns).
pub const LANES: usize = 8;
/// Range of inputs and layer outputs.
pub const ACT_MIN: i64 = -128;
pub const ACT_MAX: i64 = 127;
/// Range of the outputs of a last layer without ReLU (range-checked by the verifier).
pub const WIDE_MIN: i64 = -32_768;
pub const WIDE_MAX: i64 = 32_767;
/// Bits of one remainder limb (the byte lookup table); remainders have two limbs.
pub const LIMB_BITS: u32 = 8;
/// Largest rescale shift (two limbs).
pub const MAX_SHIFT: u32 = 2 * LIMB_BITS;
/// Headroom left by calibration: samples use at most `1/(1+MARGIN)` of a range.
pub const MARGIN: f64 = 0.25;
/// Smallest and largest circuit size (`2^k` rows).
pub const MIN_K: u32 = 9;
pub const MAX_K: u32 = 18;
/// Rows at the end of every column that halo2 fills with blinding values
/// (`blinding_factors() + 1` of the constraint system; checked by a test).
pub const UNUSABLE_ROWS: usize = 7;
const MAX_SCALE: i32 = 30;
const MIN_SCALE: i32 = -30;

/// One linear layer of the circuit: `y = act(⌊(W x + b) / 2^shift⌋)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerSpec {
    /// Dense (the default, omitted in JSON) or a convolution shape.
    #[serde(default, skip_serializing_if = "LayerKind::is_dense")]
    pub kind: LayerKind,
    pub inputs: u32,
    pub outputs: u32,
    pub relu: bool,
    /// Scale of the input vector (`x_q = round(x·2^input_scale)`).
    pub input_scale: i32,
    /// Scale of the int8 weights.
    pub weight_scale: i32,
    /// `output_scale = input_scale + weight_scale - shift`.
    pub output_scale: i32,
    pub shift: u32,
}

/// The public description of a circuit: everything the verifying key depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CircuitSpec {
    pub version: u32,
    /// The circuit has `2^k` rows.
    pub k: u32,
    pub lanes: u32,
    /// ONNX input tensor name.
    pub input_name: String,
    /// ONNX tensor whose value is proved (the logits, for a classifier with a Softmax head).
    pub output_name: String,
    /// Inclusive range of quantized inputs and hidden activations.
    pub activation_range: [i64; 2],
    /// Inclusive range of the quantized outputs (wider when the last layer has no ReLU).
    pub output_range: [i64; 2],
    /// Bits per remainder limb (size of the byte range table).
    pub limb_bits: u32,
    pub input_scale: i32,
    pub layers: Vec<LayerSpec>,
}

impl CircuitSpec {
    pub fn input_len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.inputs as usize)
    }

    pub fn output_len(&self) -> usize {
        self.layers.last().map_or(0, |l| l.outputs as usize)
    }

    pub fn output_scale(&self) -> i32 {
        self.layers.last().map_or(0, |l| l.output_scale)
    }

    /// Whether layer `li`'s quotients are range-checked by lookup (all but a last layer
    /// without ReLU, whose outputs the verifier checks against `output_range`).
    pub fn checked(&self, li: usize) -> bool {
        li + 1 < self.layers.len() || self.layers.get(li).is_some_and(|l| l.relu)
    }

    fn expected_output_range(&self) -> [i64; 2] {
        if self.checked(self.layers.len().saturating_sub(1)) {
            [ACT_MIN, ACT_MAX]
        } else {
            [WIDE_MIN, WIDE_MAX]
        }
    }

    /// SHA-256 of the canonical JSON of the spec.
    pub fn hash(&self) -> [u8; 32] {
        let json = serde_json::to_vec(self).unwrap_or_default();
        Sha256::digest(&json).into()
    }

    /// Checks that the spec describes a circuit this version builds (bundles come from clients).
    pub fn validate(&self) -> Result<(), ZkError> {
        let bad = |m: String| Err(ZkError::Verification(format!("invalid circuit spec: {m}")));
        if self.version != SPEC_VERSION {
            return bad(format!(
                "version {} (supported: {SPEC_VERSION})",
                self.version
            ));
        }
        if self.lanes as usize != LANES
            || self.activation_range != [ACT_MIN, ACT_MAX]
            || self.limb_bits != LIMB_BITS
        {
            return bad("lanes, activation range or limb bits differ from this version".into());
        }
        if !(MIN_K..=MAX_K).contains(&self.k) {
            return bad(format!("k = {}", self.k));
        }
        if self.layers.is_empty() {
            return bad("no layers".into());
        }
        if self.output_range != self.expected_output_range() {
            return bad("output range".into());
        }
        let mut scale = self.input_scale;
        let mut width = self.layers[0].inputs;
        for (i, l) in self.layers.iter().enumerate() {
            if l.inputs == 0 || l.outputs == 0 || l.inputs != width {
                return bad(format!("layer {i} sizes"));
            }
            if let LayerKind::Conv(c) = &l.kind
                && (!c.is_valid()
                    || c.inputs() != l.inputs as usize
                    || c.outputs() != l.outputs as usize)
            {
                return bad(format!("layer {i} convolution shape"));
            }
            if l.input_scale != scale
                || l.shift > MAX_SHIFT
                || i64::from(l.input_scale) + i64::from(l.weight_scale) - i64::from(l.shift)
                    != i64::from(l.output_scale)
            {
                return bad(format!("layer {i} scales"));
            }
            scale = l.output_scale;
            width = l.outputs;
        }
        // Sizes must fit in 2^k rows; checked without overflow for hostile values.
        let bound = Layout::rows_bound(self)
            .ok_or_else(|| ZkError::Verification("invalid circuit spec: too large".into()))?;
        if bound > 1usize << (MAX_K + 2) {
            return bad("too large".into());
        }
        let rows = Layout::new(self).rows;
        if rows + UNUSABLE_ROWS > 1usize << self.k {
            return bad(format!("{rows} rows do not fit k = {}", self.k));
        }
        Ok(())
    }
}

/// Row positions of the circuit, derived from the spec alone.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub layers: Vec<LayerLayout>,
    pub rows: usize,
}

#[derive(Debug, Clone)]
pub(crate) struct LayerLayout {
    /// Blocks of up to `LANES` output neurons: a bias row, one multiply-accumulate row per
    /// input, and a result row that is the next block's bias row.
    pub blocks: Vec<Block>,
    /// Row of each output neuron's rescale (4 rows each).
    pub requant: Vec<usize>,
}

/// Row of the job-id cell.
pub(crate) const JOB_ROW: usize = 0;

impl Layout {
    pub fn new(spec: &CircuitSpec) -> Layout {
        let mut row = JOB_ROW + 1;
        let mut layers = Vec::with_capacity(spec.layers.len());
        for l in &spec.layers {
            let (n, m) = (l.inputs as usize, l.outputs as usize);
            let (blocks, next) = plan(&l.kind, n, m, row);
            row = next;
            let requant = (0..m).map(|o| row + 4 * o).collect();
            row += 4 * m;
            layers.push(LayerLayout { blocks, requant });
        }
        Layout { layers, rows: row }
    }

    /// An upper bound of the rows, computed without overflow.
    fn rows_bound(spec: &CircuitSpec) -> Option<usize> {
        let mut row = JOB_ROW + 1;
        for l in &spec.layers {
            let (mut n, m) = (l.inputs as usize, l.outputs as usize);
            let mut nb = m.div_ceil(LANES);
            if let LayerKind::Conv(c) = &l.kind {
                n = (c.in_channels as usize)
                    .checked_mul(c.kernel[0] as usize)?
                    .checked_mul(c.kernel[1] as usize)?;
                nb = (c.out_h() as usize)
                    .checked_mul(c.out_w() as usize)?
                    .checked_mul((c.out_channels as usize).div_ceil(LANES))?;
            }
            row = row
                .checked_add(nb.checked_mul(n.checked_add(1)?)?)?
                .checked_add(1)?
                .checked_add(m.checked_mul(4)?)?;
        }
        Some(row)
    }
}

/// A quantized layer: int8 weights (ordered as [`LayerKind`] says) and the accumulator-scale
/// bias of every output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QLayer {
    pub weights: Vec<i64>,
    pub bias: Vec<i64>,
}

/// A compiled model: the public spec and the private quantized weights (not in `Debug`).
#[derive(Clone, PartialEq, Eq)]
pub struct QuantizedModel {
    pub spec: CircuitSpec,
    pub(crate) layers: Vec<QLayer>,
}

impl std::fmt::Debug for QuantizedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizedModel")
            .field("spec", &self.spec)
            .field("parameters", &self.parameter_count())
            .finish_non_exhaustive()
    }
}

impl QuantizedModel {
    /// Number of weights and biases (the private witness).
    pub fn parameter_count(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.weights.len() + l.bias.len())
            .sum()
    }
}

fn round_scaled(v: f64, scale: i32) -> i64 {
    (v * 2f64.powi(scale)).round() as i64
}

/// Largest scale `s` with `max_abs·2^s·(1+margin) ≤ limit`.
fn fit_scale(max_abs: f64, margin: f64, limit: i64) -> i32 {
    if max_abs <= 0.0 || !max_abs.is_finite() {
        return 0;
    }
    let s = ((limit as f64) / (max_abs * (1.0 + margin))).log2().floor();
    (s as i32).clamp(MIN_SCALE, MAX_SCALE)
}

/// Default calibration inputs when the uploader gives none: deterministic pseudo-random
/// values in `[0, 1]` (pixel-like inputs).
fn default_samples(n: usize) -> Vec<Vec<f32>> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..64)
        .map(|_| {
            (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    (state >> 40) as f32 / (1u64 << 24) as f32
                })
                .collect()
        })
        .collect()
}

/// Chooses scales and shifts from calibration samples and quantizes the weights.
pub fn calibrate(model: &FloatModel, samples: &[Vec<f32>]) -> Result<QuantizedModel, ZkError> {
    let n_in = model.layers[0].inputs;
    let defaults;
    let samples = if samples.is_empty() {
        defaults = default_samples(n_in);
        &defaults
    } else {
        samples
    };
    // Fail fast on models too large for the circuit, before calibrating.
    let mut rows = JOB_ROW + 1;
    for l in &model.layers {
        let (_, next) = plan(&l.kind, l.inputs, l.outputs, rows);
        rows = next + 4 * l.outputs;
        if rows > 1usize << MAX_K {
            return Err(ZkError::unsupported(
                "model",
                format!("needs more than the supported 2^{MAX_K} circuit rows"),
            ));
        }
    }
    for s in samples {
        if s.len() != n_in || s.iter().any(|v| !v.is_finite()) {
            return Err(ZkError::unsupported(
                "calibration",
                format!("samples must hold {n_in} finite values"),
            ));
        }
    }
    let max_in = samples
        .iter()
        .flat_map(|s| s.iter())
        .fold(0f64, |m, v| m.max(f64::from(v.abs())));
    let input_scale = fit_scale(max_in, MARGIN, ACT_MAX);
    let mut xs: Vec<Vec<i64>> = samples
        .iter()
        .map(|s| {
            s.iter()
                .map(|&v| round_scaled(f64::from(v), input_scale))
                .collect()
        })
        .collect();
    let mut scale = input_scale;
    let mut specs = Vec::new();
    let mut layers = Vec::new();
    let last = model.layers.len() - 1;
    for (li, fl) in model.layers.iter().enumerate() {
        let range = if li == last && !fl.relu {
            [WIDE_MIN, WIDE_MAX]
        } else {
            [ACT_MIN, ACT_MAX]
        };
        let (spec, q) = calibrate_layer(li, fl, scale, &xs, range)?;
        xs = xs
            .iter()
            .map(|x| layer_forward(li, &spec, &q, x, range).map(|(_, out)| out))
            .collect::<Result<_, _>>()?;
        scale = spec.output_scale;
        specs.push(spec);
        layers.push(q);
    }
    let mut spec = CircuitSpec {
        version: SPEC_VERSION,
        k: MIN_K,
        lanes: LANES as u32,
        input_name: model.input_name.clone(),
        output_name: model.output_name.clone(),
        activation_range: [ACT_MIN, ACT_MAX],
        output_range: [ACT_MIN, ACT_MAX],
        limb_bits: LIMB_BITS,
        input_scale,
        layers: specs,
    };
    spec.output_range = spec.expected_output_range();
    let rows = Layout::new(&spec).rows + UNUSABLE_ROWS;
    let table = (1usize << LIMB_BITS) + UNUSABLE_ROWS;
    let k = (MIN_K..=MAX_K).find(|k| (1usize << k) >= rows.max(table));
    spec.k = k.ok_or_else(|| {
        ZkError::unsupported(
            "model",
            format!("needs {rows} circuit rows, more than the supported 2^{MAX_K}"),
        )
    })?;
    Ok(QuantizedModel { spec, layers })
}

fn calibrate_layer(
    li: usize,
    fl: &FloatLayer,
    input_scale: i32,
    xs: &[Vec<i64>],
    range: [i64; 2],
) -> Result<(LayerSpec, QLayer), ZkError> {
    let max_w = fl
        .weights
        .iter()
        .fold(0f64, |m, v| m.max(f64::from(v.abs())));
    let conns: Vec<Vec<(usize, usize)>> = (0..fl.outputs)
        .map(|o| fl.kind.connections(fl.inputs, o))
        .collect();
    let mut weight_scale = fit_scale(max_w, 0.0, 127);
    let mut extra_out = 0;
    for _ in 0..64 {
        let acc_scale = input_scale + weight_scale;
        let weights: Vec<i64> = fl
            .weights
            .iter()
            .map(|&w| round_scaled(f64::from(w), weight_scale).clamp(-127, 127))
            .collect();
        let bias0: Vec<i64> = fl
            .bias
            .iter()
            .map(|&b| round_scaled(f64::from(b), acc_scale))
            .collect();
        // Largest |acc| over the samples, in real units.
        let mut max_acc = 0i64;
        for x in xs {
            for (o, c) in conns.iter().enumerate() {
                let acc = bias0[o] + c.iter().map(|&(i, w)| weights[w] * x[i]).sum::<i64>();
                max_acc = max_acc.max(acc.abs());
            }
        }
        let real = max_acc as f64 / 2f64.powi(acc_scale);
        let output_scale = (fit_scale(real, MARGIN, range[1]) - extra_out).min(acc_scale);
        let shift = acc_scale - output_scale;
        if shift > MAX_SHIFT as i32 {
            // Too fine: coarsen the weights so the rescale fits two limbs.
            weight_scale -= shift - MAX_SHIFT as i32;
            continue;
        }
        let shift = shift as u32;
        let half = if shift > 0 { 1i64 << (shift - 1) } else { 0 };
        let bias = bias0.iter().map(|b| b + half).collect();
        let spec = LayerSpec {
            kind: fl.kind.clone(),
            inputs: fl.inputs as u32,
            outputs: fl.outputs as u32,
            relu: fl.relu,
            input_scale,
            weight_scale,
            output_scale,
            shift,
        };
        let q = QLayer { weights, bias };
        if xs
            .iter()
            .all(|x| layer_forward(li, &spec, &q, x, range).is_ok())
        {
            return Ok((spec, q));
        }
        extra_out += 1;
    }
    Err(ZkError::unsupported(
        "calibration",
        format!("no fixed-point scales fit layer {li}"),
    ))
}

/// One layer in integers: returns the accumulators and the outputs.
pub(crate) fn layer_forward(
    li: usize,
    spec: &LayerSpec,
    q: &QLayer,
    x: &[i64],
    [min, max]: [i64; 2],
) -> Result<(Vec<i64>, Vec<i64>), ZkError> {
    let (n, m) = (spec.inputs as usize, spec.outputs as usize);
    let mut accs = Vec::with_capacity(m);
    let mut outs = Vec::with_capacity(m);
    for o in 0..m {
        let acc = q.bias[o]
            + spec
                .kind
                .connections(n, o)
                .iter()
                .map(|&(i, w)| q.weights[w] * x[i])
                .sum::<i64>();
        let rq = requant(acc, spec.shift, spec.relu);
        if !(min..=max).contains(&rq.q) {
            return Err(ZkError::OutOfRange {
                at: format!("layer {li} neuron {o}"),
                value: rq.q,
                min,
                max,
            });
        }
        accs.push(acc);
        outs.push(rq.out);
    }
    Ok((accs, outs))
}

/// The witness of one rescale: `acc = q·2^shift + r0 + 2^8·r1`, `u = r0·f0`, `v = r1·f1`
/// (all four limbs in `[0, 256)`), `h` = the ReLU table's second column for `q`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Requant {
    pub q: i64,
    pub r0: i64,
    pub r1: i64,
    pub u: i64,
    pub v: i64,
    pub h: i64,
    pub out: i64,
}

/// The limb scale factors of a shift: `r0·f0 < 256` and `r1·f1 < 256` force `r < 2^shift`.
pub(crate) fn limb_factors(shift: u32) -> (i64, i64) {
    if shift <= LIMB_BITS {
        (1 << (LIMB_BITS - shift), 1 << LIMB_BITS)
    } else {
        (1, 1 << (MAX_SHIFT - shift))
    }
}

pub(crate) fn requant(acc: i64, shift: u32, relu: bool) -> Requant {
    let q = acc.div_euclid(1 << shift);
    let r = acc.rem_euclid(1 << shift);
    let (r0, r1) = (r & 0xff, r >> LIMB_BITS);
    let (f0, f1) = limb_factors(shift);
    let h = q.max(0);
    Requant {
        q,
        r0,
        r1,
        u: r0 * f0,
        v: r1 * f1,
        h,
        out: if relu { h } else { q },
    }
}

/// Quantizes an input vector at the spec's input scale.
pub fn quantize_input(spec: &CircuitSpec, input: &[f32]) -> Result<Vec<i64>, ZkError> {
    let n = spec.input_len();
    if input.len() != n {
        return Err(ZkError::OutOfRange {
            at: "input length".into(),
            value: input.len() as i64,
            min: n as i64,
            max: n as i64,
        });
    }
    input
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let scaled = f64::from(v) * 2f64.powi(spec.input_scale);
            if !scaled.is_finite()
                || scaled.round() < ACT_MIN as f64
                || scaled.round() > ACT_MAX as f64
            {
                return Err(ZkError::OutOfRange {
                    at: format!("input[{i}]"),
                    value: if scaled.is_finite() {
                        scaled.round() as i64
                    } else {
                        i64::MAX
                    },
                    min: ACT_MIN,
                    max: ACT_MAX,
                });
            }
            Ok(scaled.round() as i64)
        })
        .collect()
}

/// The native integer model: exactly what the circuit computes.
pub fn reference(model: &QuantizedModel, input_q: &[i64]) -> Result<Vec<i64>, ZkError> {
    Ok(trace(model, input_q)?
        .last()
        .map(|t| t.1.clone())
        .unwrap_or_default())
}

/// One layer's integer input and output.
pub(crate) type LayerIo = (Vec<i64>, Vec<i64>);

/// Per layer: (input, output).
pub(crate) fn trace(model: &QuantizedModel, input_q: &[i64]) -> Result<Vec<LayerIo>, ZkError> {
    let n = model.spec.input_len();
    if input_q.len() != n {
        return Err(ZkError::OutOfRange {
            at: "input length".into(),
            value: input_q.len() as i64,
            min: n as i64,
            max: n as i64,
        });
    }
    if let Some((i, &v)) = input_q
        .iter()
        .enumerate()
        .find(|(_, v)| !(ACT_MIN..=ACT_MAX).contains(*v))
    {
        return Err(ZkError::OutOfRange {
            at: format!("input[{i}]"),
            value: v,
            min: ACT_MIN,
            max: ACT_MAX,
        });
    }
    let mut x = input_q.to_vec();
    let mut out = Vec::new();
    for (li, (spec, q)) in model.spec.layers.iter().zip(&model.layers).enumerate() {
        let range = if model.spec.checked(li) {
            [ACT_MIN, ACT_MAX]
        } else {
            model.spec.output_range
        };
        let (_, y) = layer_forward(li, spec, q, &x, range)?;
        out.push((x, y.clone()));
        x = y;
    }
    Ok(out)
}

/// Quantized outputs back to floats.
pub fn dequantize_output(spec: &CircuitSpec, output_q: &[i64]) -> Vec<f32> {
    let f = 2f64.powi(-spec.output_scale());
    output_q.iter().map(|&v| (v as f64 * f) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requant_matches_floor_division() {
        for shift in 0..=MAX_SHIFT {
            for acc in [-70_000i64, -257, -1, 0, 1, 255, 256, 65_535, 99_999] {
                let r = requant(acc, shift, false);
                let rem = r.r0 + (r.r1 << 8);
                assert_eq!(r.q * (1 << shift) + rem, acc);
                assert!(rem < 1 << shift && (0..256).contains(&r.u) && (0..256).contains(&r.v));
                assert!((0..256).contains(&r.r0) && (0..256).contains(&r.r1));
            }
        }
        assert_eq!(requant(-5, 1, true).out, 0);
        assert_eq!(requant(-5, 1, false).out, -3);
    }

    #[test]
    fn fit_scale_leaves_margin() {
        assert_eq!(fit_scale(1.0, MARGIN, ACT_MAX), 6);
        assert_eq!(fit_scale(16.0, MARGIN, ACT_MAX), 2);
        assert_eq!(fit_scale(0.9, 0.0, ACT_MAX), 7);
    }
}
