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
//!
//! Layers without weights (spec version 2): a max pooling outputs the max of the in-bounds
//! values of each window (same scale, so still 8-bit); a `Sigmoid`/`Tanh` layer maps each 8-bit
//! input `x` at its input scale `s` to `table[x + 128] = clamp(round(f(x·2^-s)·2^7), -128, 127)`
//! at scale [`TABLE_OUTPUT_SCALE`]. The table covers the whole activation range, which is the
//! calibrated range of the pre-activation (calibration fits it there); a pre-activation outside
//! it fails the previous layer's range check with [`ZkError::OutOfRange`]. The table is stored in
//! the spec and recomputed by [`CircuitSpec::validate`] with IEEE basic operations only (no
//! libm), so every machine derives the same table and verifying key.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ZkError;
use crate::onnx::{FloatLayer, FloatModel};
use crate::shape::{Block, LayerKind, plan};

/// Version of the circuit layout; bump on any change that alters the verifying key.
///
/// Version 1 is the original circuit (linear layers only); version 2 adds the max-pooling and
/// table-activation chips (more gates, selectors and a lookup table; the same advice columns).
/// [`calibrate`] emits version 1 for a model of linear layers only, so such models keep their
/// spec, verifying key and proofs; version 2 only when a layer needs the new chips.
pub const SPEC_VERSION: u32 = 2;
/// The original circuit: linear layers only.
pub const SPEC_VERSION_LINEAR: u32 = 1;
/// Scale of the output of a table activation (`Sigmoid`, `Tanh`): values in `[-1, 1]` use the
/// 8-bit range.
pub const TABLE_OUTPUT_SCALE: i32 = 7;
/// Entries of an activation table: one per 8-bit input.
pub const TABLE_LEN: usize = 256;
/// Neuron lanes per row (weight columns) of the original layout: a spec with `"lanes": 8`
/// (every spec made before wider layouts existed) keeps its circuit, verifying key and proofs.
pub const LANES: usize = 8;
/// The lane counts a spec may use (`spec.lanes`), narrowest first. [`calibrate`] picks the one
/// with the cheapest verification ([`choose_lanes`]).
pub const LANE_CHOICES: [u32; 4] = [8, 16, 32, 64];

/// Advice columns of a circuit with `lanes` lanes: a weight and an accumulator column per lane,
/// `X`, `Q`, `H`, `R`, and in wider layouts a second limb column `R2` (the rescale then takes 2
/// rows instead of 4): 20, 37, 69 and 133.
pub const fn advice_columns(lanes: usize) -> usize {
    2 * lanes + 4 + if lanes > LANES { 1 } else { 0 }
}

/// Rows of one rescale: 4 in the original layout (its four limbs in `R`), 2 in wider ones
/// (two limbs in `R`, two in `R2`).
pub const fn requant_rows(lanes: usize) -> usize {
    if lanes > LANES { 2 } else { 4 }
}

/// Largest `k` of a layout with `lanes` lanes: its circuit may hold no more advice cells than
/// the largest 8-lane circuit (`20 · 2^MAX_K`), which bounds the prover's memory: 18, 17, 16
/// and 15 for 8, 16, 32 and 64 lanes.
pub const fn max_k(lanes: usize) -> u32 {
    let budget = advice_columns(LANES) << MAX_K;
    let mut k = MAX_K;
    while k > MIN_K && advice_columns(lanes) << k > budget {
        k -= 1;
    }
    k
}
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

/// One layer of the circuit: a linear layer `y = act(⌊(W x + b) / 2^shift⌋)`, or (version 2) a
/// max pooling or a table activation (`weight_scale = shift = 0`, no ReLU).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerSpec {
    /// Dense (the default, omitted in JSON), a convolution shape, a max pooling shape,
    /// `sigmoid` or `tanh`.
    #[serde(default, skip_serializing_if = "LayerKind::is_dense")]
    pub kind: LayerKind,
    pub inputs: u32,
    pub outputs: u32,
    pub relu: bool,
    /// Scale of the input vector (`x_q = round(x·2^input_scale)`).
    pub input_scale: i32,
    /// Scale of the int8 weights.
    pub weight_scale: i32,
    /// `output_scale = input_scale + weight_scale - shift` (linear layers); `input_scale`
    /// (max pooling); [`TABLE_OUTPUT_SCALE`] (table activations).
    pub output_scale: i32,
    pub shift: u32,
    /// Table activations only: output for each input `x ∈ [-128, 127]` at `x + 128` (omitted
    /// in JSON when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub table: Vec<i64>,
}

/// The public description of a circuit: everything the verifying key depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CircuitSpec {
    pub version: u32,
    /// The circuit has `2^k` rows.
    pub k: u32,
    /// Neuron lanes per row: one of [`LANE_CHOICES`] (8 when absent from the JSON). Each lane
    /// is one weight column and one accumulator column; the weight commitment has one point
    /// per lane.
    #[serde(default = "default_lanes")]
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

fn default_lanes() -> u32 {
    LANES as u32
}

impl CircuitSpec {
    /// Lanes as a count (validated specs hold one of [`LANE_CHOICES`]).
    pub fn lane_count(&self) -> usize {
        self.lanes as usize
    }

    pub fn input_len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.inputs as usize)
    }

    pub fn output_len(&self) -> usize {
        self.layers.last().map_or(0, |l| l.outputs as usize)
    }

    pub fn output_scale(&self) -> i32 {
        self.layers.last().map_or(0, |l| l.output_scale)
    }

    /// Whether layer `li`'s quotients are range-checked by lookup (all but a last linear layer
    /// without ReLU, whose outputs the verifier checks against `output_range`). Layers without
    /// weights always output 8-bit values.
    pub fn checked(&self, li: usize) -> bool {
        li + 1 < self.layers.len()
            || self
                .layers
                .get(li)
                .is_some_and(|l| l.relu || !l.kind.is_linear())
    }

    /// Whether the spec needs the version-2 circuit (max pooling or table activations).
    pub fn extended(&self) -> bool {
        self.version != SPEC_VERSION_LINEAR
    }

    /// Rows of the activation lookup table: a zero row and [`TABLE_LEN`] per table layer.
    pub(crate) fn act_table_rows(&self) -> usize {
        1 + TABLE_LEN * self.layers.iter().filter(|l| l.kind.is_table()).count()
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
        if !(SPEC_VERSION_LINEAR..=SPEC_VERSION).contains(&self.version) {
            return bad(format!(
                "version {} (supported: {SPEC_VERSION_LINEAR} to {SPEC_VERSION})",
                self.version
            ));
        }
        if !LANE_CHOICES.contains(&self.lanes)
            || self.activation_range != [ACT_MIN, ACT_MAX]
            || self.limb_bits != LIMB_BITS
        {
            return bad("lanes, activation range or limb bits differ from this version".into());
        }
        if !(MIN_K..=max_k(self.lane_count())).contains(&self.k) {
            return bad(format!("k = {} with {} lanes", self.k, self.lanes));
        }
        if self.layers.is_empty() {
            return bad("no layers".into());
        }
        if self.output_range != self.expected_output_range() {
            return bad("output range".into());
        }
        // The activation tables must fit (checked before recomputing any of them).
        let tables = self.layers.iter().filter(|l| l.kind.is_table()).count();
        if tables > (1usize << self.k) / TABLE_LEN {
            return bad(format!(
                "{tables} activation tables do not fit k = {}",
                self.k
            ));
        }
        let mut scale = self.input_scale;
        let mut width = self.layers[0].inputs;
        for (i, l) in self.layers.iter().enumerate() {
            if l.inputs == 0 || l.outputs == 0 || l.inputs != width {
                return bad(format!("layer {i} sizes"));
            }
            if !l.kind.is_linear() && !self.extended() {
                return bad(format!("layer {i} needs spec version {SPEC_VERSION}"));
            }
            if let LayerKind::Conv(c) | LayerKind::MaxPool(c) = &l.kind
                && (!c.is_valid()
                    || c.inputs() != l.inputs as usize
                    || c.outputs() != l.outputs as usize)
            {
                return bad(format!("layer {i} convolution shape"));
            }
            if let LayerKind::MaxPool(c) = &l.kind
                && (!c.depthwise || !c.pads_within_kernel())
            {
                return bad(format!("layer {i} max pooling shape"));
            }
            if l.input_scale != scale || l.shift > MAX_SHIFT {
                return bad(format!("layer {i} scales"));
            }
            let scales_ok = match &l.kind {
                LayerKind::Dense | LayerKind::Conv(_) => {
                    i64::from(l.input_scale) + i64::from(l.weight_scale) - i64::from(l.shift)
                        == i64::from(l.output_scale)
                        && l.table.is_empty()
                }
                LayerKind::MaxPool(_) => {
                    l.output_scale == l.input_scale
                        && l.weight_scale == 0
                        && l.shift == 0
                        && !l.relu
                        && l.table.is_empty()
                }
                LayerKind::Sigmoid | LayerKind::Tanh => {
                    l.inputs == l.outputs
                        && l.output_scale == TABLE_OUTPUT_SCALE
                        && l.weight_scale == 0
                        && l.shift == 0
                        && !l.relu
                }
            };
            if !scales_ok {
                return bad(format!("layer {i} scales"));
            }
            if l.kind.is_table() && !(MIN_SCALE..=MAX_SCALE).contains(&l.input_scale) {
                return bad(format!("layer {i} scales"));
            }
            if l.kind.is_table()
                && activation_table(&l.kind, l.input_scale, l.output_scale) != l.table
            {
                return bad(format!("layer {i} activation table"));
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
        let rows = Layout::rows(self).max(self.act_table_rows());
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
    /// Rows used (the code uses the cheaper [`Layout::rows`]; tests check they agree).
    #[cfg_attr(not(test), allow(dead_code))]
    pub rows: usize,
}

#[derive(Debug, Clone)]
pub(crate) struct LayerLayout {
    /// Linear layers: blocks of up to `spec.lanes` output neurons: a bias row, one
    /// multiply-accumulate row per input, and a result row that is the next block's bias row.
    pub blocks: Vec<Block>,
    /// Linear layers: row of each output neuron's rescale ([`requant_rows`] rows each).
    pub requant: Vec<usize>,
    /// Layers without weights: first row of each output (a max pooling uses 2 rows per window
    /// element, a table activation 1 row).
    pub elem: Vec<usize>,
}

/// Row of the job-id cell.
pub(crate) const JOB_ROW: usize = 0;

impl Layout {
    pub fn new(spec: &CircuitSpec) -> Layout {
        let mut row = JOB_ROW + 1;
        let mut layers = Vec::with_capacity(spec.layers.len());
        for l in &spec.layers {
            let (n, m) = (l.inputs as usize, l.outputs as usize);
            let (layer, next) = layer_layout(&l.kind, n, m, row, spec.lane_count());
            row = next;
            layers.push(layer);
        }
        Layout { layers, rows: row }
    }

    /// The rows of [`Layout::new`], without planning the dense layers' blocks (verifiers
    /// check every bundle's spec: this keeps that cheap).
    pub fn rows(spec: &CircuitSpec) -> usize {
        let lanes = spec.lane_count();
        let mut row = JOB_ROW + 1;
        for l in &spec.layers {
            row += layer_rows(&l.kind, l.inputs as usize, l.outputs as usize, row, lanes);
        }
        row
    }

    /// An upper bound of the rows, computed without overflow.
    fn rows_bound(spec: &CircuitSpec) -> Option<usize> {
        let lanes = spec.lane_count().max(1);
        let mut row = JOB_ROW + 1;
        for l in &spec.layers {
            let (mut n, m) = (l.inputs as usize, l.outputs as usize);
            let mut nb = m.div_ceil(lanes);
            match &l.kind {
                LayerKind::MaxPool(c) => {
                    let window = (c.kernel[0] as usize).checked_mul(c.kernel[1] as usize)?;
                    row = row.checked_add(m.checked_mul(window)?.checked_mul(2)?)?;
                    continue;
                }
                LayerKind::Sigmoid | LayerKind::Tanh => {
                    row = row.checked_add(m)?;
                    continue;
                }
                LayerKind::Dense | LayerKind::Conv(_) => {}
            }
            if let LayerKind::Conv(c) = &l.kind {
                n = (c.in_channels as usize)
                    .checked_mul(c.kernel[0] as usize)?
                    .checked_mul(c.kernel[1] as usize)?;
                nb = (c.out_h() as usize)
                    .checked_mul(c.out_w() as usize)?
                    .checked_mul((c.out_channels as usize).div_ceil(lanes))?;
            }
            row = row
                .checked_add(nb.checked_mul(n.checked_add(1)?)?)?
                .checked_add(1)?
                .checked_add(m.checked_mul(requant_rows(lanes))?)?;
        }
        Some(row)
    }
}

/// The number of rows of one layer starting at `row` (that of [`layer_layout`]; a dense layer
/// by formula: `⌈m / lanes⌉` blocks of `n + 1` rows, one result row, the rescales).
pub(crate) fn layer_rows(kind: &LayerKind, n: usize, m: usize, row: usize, lanes: usize) -> usize {
    match kind {
        LayerKind::Dense => m.div_ceil(lanes.max(1)) * (n + 1) + 1 + requant_rows(lanes) * m,
        _ => layer_layout(kind, n, m, row, lanes).1 - row,
    }
}

/// The rows of one layer starting at `row` with `lanes` neuron lanes; returns the layout and the
/// next free row.
pub(crate) fn layer_layout(
    kind: &LayerKind,
    n: usize,
    m: usize,
    mut row: usize,
    lanes: usize,
) -> (LayerLayout, usize) {
    let mut layer = LayerLayout {
        blocks: Vec::new(),
        requant: Vec::new(),
        elem: Vec::new(),
    };
    match kind {
        LayerKind::Dense | LayerKind::Conv(_) => {
            let (blocks, next) = plan(kind, n, m, row, lanes);
            row = next;
            layer.blocks = blocks;
            let stride = requant_rows(lanes);
            layer.requant = (0..m).map(|o| row + stride * o).collect();
            row += stride * m;
        }
        LayerKind::MaxPool(_) => {
            for o in 0..m {
                layer.elem.push(row);
                row += 2 * kind.connections(n, o).len();
            }
        }
        LayerKind::Sigmoid | LayerKind::Tanh => {
            layer.elem = (row..row + m).collect();
            row += m;
        }
    }
    (layer, row)
}

/// `e^x` with IEEE basic operations only (`+ − × ÷`, exact scaling by powers of two), so the
/// result is the same on every machine (libm's `exp` may differ in the last bit, and the
/// activation tables fix the verifying key). `|x| ≤ 100`.
fn exp_det(x: f64) -> f64 {
    const LN2: f64 = std::f64::consts::LN_2;
    let n = (x / LN2).round();
    let r = x - n * LN2;
    // Taylor series of e^r, |r| ≤ 0.35: 24 terms are far below f64 precision.
    let mut term = 1.0;
    let mut sum = 1.0;
    for i in 1..24 {
        term = term * r / f64::from(i);
        sum += term;
    }
    // 2^n exactly, |n| ≤ 145 (split so each factor is a normal number).
    let n = n as i64;
    let pow2 = |e: i64| f64::from_bits(((e + 1023) as u64) << 52);
    sum * pow2(n / 2) * pow2(n - n / 2)
}

/// The table of an activation layer: the output at scale `output_scale` of each 8-bit input at
/// scale `input_scale`, `table[x + 128] = clamp(round(f(x·2^-input_scale)·2^output_scale))`.
pub(crate) fn activation_table(kind: &LayerKind, input_scale: i32, output_scale: i32) -> Vec<i64> {
    let f = |x: f64| -> f64 {
        // Both functions are saturated far below |x| = 40 at 8-bit output precision.
        let x = x.clamp(-40.0, 40.0);
        match kind {
            LayerKind::Sigmoid => 1.0 / (1.0 + exp_det(-x)),
            _ => {
                let e = exp_det(-2.0 * x.abs());
                let t = (1.0 - e) / (1.0 + e);
                if x < 0.0 { -t } else { t }
            }
        }
    };
    let (to_real, to_out) = (pow2f(-input_scale), pow2f(output_scale));
    (ACT_MIN..=ACT_MAX)
        .map(|x| {
            let y = (f(x as f64 * to_real) * to_out).round();
            (y.clamp(ACT_MIN as f64, ACT_MAX as f64)) as i64
        })
        .collect()
}

/// `2^e` exactly (`|e| ≤ 60`).
fn pow2f(e: i32) -> f64 {
    f64::from_bits(((i64::from(e) + 1023) as u64) << 52)
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
    /// The same model laid out with `lanes` lanes (one of [`LANE_CHOICES`]) at the smallest
    /// `k` that fits: e.g. to rebuild a model stored with a layout that [`calibrate`] no longer
    /// picks. The weights and the quantization are unchanged; the spec (hence the verifying key
    /// and the weight commitment) is that layout's.
    pub fn with_lanes(&self, lanes: u32) -> Result<QuantizedModel, ZkError> {
        if !LANE_CHOICES.contains(&lanes) {
            return Err(ZkError::unsupported(
                "model",
                format!("{lanes} lanes (supported: {LANE_CHOICES:?})"),
            ));
        }
        let k = min_k(&self.spec, lanes).ok_or_else(|| {
            ZkError::unsupported(
                "model",
                format!(
                    "needs more than the supported 2^{} circuit rows with {lanes} lanes",
                    max_k(lanes as usize)
                ),
            )
        })?;
        let mut model = self.clone();
        model.spec.lanes = lanes;
        model.spec.k = k;
        model.spec.validate()?;
        Ok(model)
    }

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

/// Largest |bias| (at the accumulator's scale) a layer may have: far beyond what a rescale of at
/// most `MAX_SHIFT` bits brings into an output range, and small enough that no accumulator of
/// in-range inputs overflows `i64`.
const MAX_BIAS: u64 = 1 << 50;

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
    // Fail fast on models too large for the circuit in every layout, before calibrating.
    let fits = |lanes: u32| {
        let mut rows = JOB_ROW + 1;
        model.layers.iter().all(|l| {
            rows += layer_rows(&l.kind, l.inputs, l.outputs, rows, lanes as usize);
            rows <= 1usize << max_k(lanes as usize)
        })
    };
    if !LANE_CHOICES.into_iter().any(fits) {
        return Err(ZkError::unsupported(
            "model",
            format!("needs more than the supported 2^{MAX_K} circuit rows"),
        ));
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
        let range = if li == last && !fl.relu && fl.kind.is_linear() {
            [WIDE_MIN, WIDE_MAX]
        } else {
            [ACT_MIN, ACT_MAX]
        };
        let (spec, q) = if fl.kind.is_linear() {
            calibrate_layer(li, fl, scale, &xs, range)?
        } else {
            fixed_layer(fl, scale)
        };
        xs = xs
            .iter()
            .map(|x| layer_forward(li, &spec, &q, x, range).map(|(_, out)| out))
            .collect::<Result<_, _>>()?;
        scale = spec.output_scale;
        specs.push(spec);
        layers.push(q);
    }
    let version = if specs.iter().all(|l| l.kind.is_linear()) {
        SPEC_VERSION_LINEAR
    } else {
        SPEC_VERSION
    };
    let mut spec = CircuitSpec {
        version,
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
    (spec.lanes, spec.k) = choose_lanes(&spec).ok_or_else(|| {
        ZkError::unsupported(
            "model",
            format!("needs more than the supported 2^{MAX_K} circuit rows"),
        )
    })?;
    // Never emit a spec that verifiers would refuse (e.g. an activation table at a scale
    // outside the supported range).
    if let Err(e) = spec.validate() {
        let reason = match e {
            ZkError::Verification(m) => m,
            other => other.to_string(),
        };
        return Err(ZkError::unsupported("model", reason));
    }
    Ok(QuantizedModel { spec, layers })
}

/// The smallest `k` whose `2^k` rows hold the spec's layout at `lanes` lanes (and the lookup
/// tables), if any up to [`max_k`]`(lanes)`.
pub(crate) fn min_k(spec: &CircuitSpec, lanes: u32) -> Option<u32> {
    let spec = CircuitSpec {
        lanes,
        ..spec.clone()
    };
    let rows = Layout::rows(&spec) + UNUSABLE_ROWS;
    let table = (1usize << LIMB_BITS).max(spec.act_table_rows()) + UNUSABLE_ROWS;
    (MIN_K..=max_k(lanes as usize)).find(|k| (1usize << k) >= rows.max(table))
}

/// The layout rule: `(lanes, k)` for a spec's layers, from its shapes alone. Verification
/// costs a multi-scalar multiplication of `2^k` points (plus a few per column), so the rule
/// takes the lane count of [`LANE_CHOICES`] with the smallest `k`, and on a tie the fewest
/// lanes (fewer columns: a smaller proof and link, cheaper proving). Small models therefore
/// keep 8 lanes (and their circuits); only models whose rows a wider layout fits into a smaller
/// power of two get 16 or 32. `None` if no layout fits (each lane count has its own largest
/// `k`, [`max_k`]).
pub fn choose_lanes(spec: &CircuitSpec) -> Option<(u32, u32)> {
    LANE_CHOICES
        .iter()
        .filter_map(|&lanes| min_k(spec, lanes).map(|k| (lanes, k)))
        .min_by_key(|&(lanes, k)| (k, lanes))
}

/// The spec of a layer without weights (max pooling, table activation) at `input_scale`.
fn fixed_layer(fl: &FloatLayer, input_scale: i32) -> (LayerSpec, QLayer) {
    let (output_scale, table) = if fl.kind.is_table() {
        (
            TABLE_OUTPUT_SCALE,
            activation_table(&fl.kind, input_scale, TABLE_OUTPUT_SCALE),
        )
    } else {
        (input_scale, Vec::new())
    };
    let spec = LayerSpec {
        kind: fl.kind.clone(),
        inputs: fl.inputs as u32,
        outputs: fl.outputs as u32,
        relu: false,
        input_scale,
        weight_scale: 0,
        output_scale,
        shift: 0,
        table,
    };
    let q = QLayer {
        weights: Vec::new(),
        bias: Vec::new(),
    };
    (spec, q)
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
    let too_large = || {
        ZkError::unsupported(
            "model",
            format!("layer {li}: a bias or accumulator too large for the fixed-point circuit"),
        )
    };
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
        // Checked: a model with absurd biases (or inputs) must be refused, not wrap around
        // (found by fuzzing the compiler with mutated models).
        if bias0.iter().any(|b| b.unsigned_abs() > MAX_BIAS) {
            return Err(too_large());
        }
        let mut max_acc = 0i64;
        for x in xs {
            for (o, c) in conns.iter().enumerate() {
                let acc = c.iter().try_fold(bias0[o], |acc, &(i, w)| {
                    weights[w]
                        .checked_mul(x[i])
                        .and_then(|p| acc.checked_add(p))
                });
                max_acc = max_acc.max(acc.and_then(i64::checked_abs).ok_or_else(too_large)?);
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
        let bias = bias0
            .iter()
            .map(|b| b.checked_add(half).ok_or_else(too_large))
            .collect::<Result<_, _>>()?;
        let spec = LayerSpec {
            kind: fl.kind.clone(),
            inputs: fl.inputs as u32,
            outputs: fl.outputs as u32,
            relu: fl.relu,
            input_scale,
            weight_scale,
            output_scale,
            shift,
            table: Vec::new(),
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
    if !spec.kind.is_linear() {
        return Ok((Vec::new(), fixed_forward(li, spec, x)?));
    }
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

/// A layer without weights in integers: the max of each window, or the table of each input
/// (an input outside the table, i.e. outside the activation range, is `OutOfRange`).
fn fixed_forward(li: usize, spec: &LayerSpec, x: &[i64]) -> Result<Vec<i64>, ZkError> {
    let (n, m) = (spec.inputs as usize, spec.outputs as usize);
    (0..m)
        .map(|o| {
            let conns = spec.kind.connections(n, o);
            if spec.kind.is_table() {
                let v = x[o];
                let idx = usize::try_from(v - ACT_MIN)
                    .ok()
                    .filter(|&i| i < spec.table.len());
                idx.map(|i| spec.table[i]).ok_or(ZkError::OutOfRange {
                    at: format!("layer {li} neuron {o} (activation table input)"),
                    value: v,
                    min: ACT_MIN,
                    max: ACT_MAX,
                })
            } else {
                conns
                    .iter()
                    .map(|&(i, _)| x[i])
                    .max()
                    .ok_or_else(|| ZkError::Internal(format!("layer {li}: empty pooling window")))
            }
        })
        .collect()
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

/// A dense float model of `sizes` with ReLU between layers, for unit tests: weights and biases
/// from the fixed sequence `sin((seed + n)·12.9898)·amplitude` (biases a tenth of it).
#[cfg(test)]
pub(crate) fn test_dense_model(sizes: &[usize], seed: f32, amplitude: f32) -> FloatModel {
    let mut t = seed;
    let mut next = move || {
        t += 1.0;
        (t * 12.9898).sin() * amplitude
    };
    let layers = sizes
        .windows(2)
        .enumerate()
        .map(|(i, w)| FloatLayer {
            kind: LayerKind::Dense,
            inputs: w[0],
            outputs: w[1],
            weights: (0..w[0] * w[1]).map(|_| next()).collect(),
            bias: (0..w[1]).map(|_| next() * 0.1).collect(),
            relu: i + 2 < sizes.len(),
        })
        .collect();
    FloatModel {
        input_name: "input".into(),
        output_name: "output".into(),
        layers,
    }
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
    fn deterministic_exp_and_tables_match_libm() {
        for i in -1000..=1000 {
            let x = f64::from(i) * 0.1;
            let (a, b) = (exp_det(x), x.exp());
            assert!(((a - b) / b).abs() < 1e-13, "exp({x}): {a} vs {b}");
        }
        for kind in [LayerKind::Sigmoid, LayerKind::Tanh] {
            for s in [-3, 0, 2, 5, 9, 30, -30] {
                let t = activation_table(&kind, s, TABLE_OUTPUT_SCALE);
                assert_eq!(t.len(), TABLE_LEN);
                for (i, &y) in t.iter().enumerate() {
                    let x = (i as f64 + ACT_MIN as f64) * 2f64.powi(-s);
                    let f = match kind {
                        LayerKind::Sigmoid => 1.0 / (1.0 + (-x).exp()),
                        _ => x.tanh(),
                    };
                    let want = (f * 128.0).clamp(ACT_MIN as f64, ACT_MAX as f64);
                    assert!(
                        (y as f64 - want).abs() <= 0.5 + 1e-9,
                        "{kind:?} s={s} x={x}: {y} vs {want}"
                    );
                }
            }
        }
    }

    /// A dense float model with ReLU between layers (weights from a fixed sequence).
    fn dense_model(sizes: &[usize]) -> FloatModel {
        test_dense_model(sizes, 0.0, 0.5)
    }

    #[test]
    fn lane_rule_picks_the_smallest_k_then_the_fewest_lanes() {
        // (sizes, lanes, k): the digits MLP fits 2^9 rows with 8 lanes, so it keeps the
        // original layout (and its pinned verifying key); 40 → 48 → 4 needs 2^10 rows with 8
        // lanes and 2^9 with more (tie: 16); 96 → 64 → 10 fits 2^9 from 32 lanes, 64 → 96 → 10
        // only with 64; the MNIST-size MLP needs 2^14, 2^13, 2^12, 2^11 rows with 8, 16, 32, 64.
        for (sizes, lanes, k) in [
            (&[64, 16, 10][..], 8, 9),
            (&[40, 48, 4][..], 16, 9),
            (&[96, 64, 10][..], 32, 9),
            (&[64, 96, 10][..], 64, 9),
            (&[784, 128, 10][..], 64, 11),
        ] {
            let m = calibrate(&dense_model(sizes), &[]).unwrap();
            assert_eq!((m.spec.lanes, m.spec.k), (lanes, k), "{sizes:?}");
            assert_eq!(choose_lanes(&m.spec), Some((lanes, k)));
            m.spec.validate().unwrap();
            // The rule depends on the shapes only, not on the lanes a spec already has.
            let narrow = m.with_lanes(8).unwrap();
            assert_eq!(choose_lanes(&narrow.spec), Some((lanes, k)));
            for l in LANE_CHOICES {
                let other = m.with_lanes(l).unwrap();
                assert_eq!(other.spec.k, min_k(&m.spec, l).unwrap());
                assert!(other.spec.k >= k && (other.spec.k > k || l >= lanes));
                assert_eq!(other.layers, m.layers);
            }
        }
        let mnist = calibrate(&dense_model(&[784, 128, 10]), &[]).unwrap();
        let ks: Vec<u32> = LANE_CHOICES
            .iter()
            .map(|&l| mnist.with_lanes(l).unwrap().spec.k)
            .collect();
        assert_eq!(ks, [14, 13, 12, 11]);
        // Wider layouts stop at the 8-lane circuit's largest number of advice cells.
        assert_eq!(LANE_CHOICES.map(|l| max_k(l as usize)), [MAX_K, 17, 16, 15]);
        // A convolution with 3 output channels fills at most 3 lanes of a block: wider layouts
        // save no rows, so it keeps 8.
        let shape = crate::shape::ConvShape {
            in_channels: 1,
            in_h: 12,
            in_w: 12,
            out_channels: 3,
            kernel: [3, 3],
            stride: [1, 1],
            pads: [1, 1, 1, 1],
            depthwise: false,
        };
        let mut conv = dense_model(&[144, 432, 4]);
        conv.layers[0].kind = LayerKind::Conv(shape.clone());
        conv.layers[0].weights.truncate(shape.weight_count());
        let m = calibrate(&conv, &[]).unwrap();
        assert_eq!(m.spec.lanes, 8);
        assert_eq!(min_k(&m.spec, 32), Some(m.spec.k));
    }

    #[test]
    fn layer_rows_match_the_layout() {
        for lanes in LANE_CHOICES {
            for (n, m) in [(1, 1), (64, 16), (10, 11), (784, 128), (128, 10), (7, 65)] {
                let spec = CircuitSpec {
                    lanes,
                    ..calibrate(&dense_model(&[n, m]), &[]).unwrap().spec
                };
                assert_eq!(Layout::rows(&spec), Layout::new(&spec).rows, "{n} → {m}");
            }
        }
    }

    #[test]
    fn lanes_are_validated() {
        let m = calibrate(&dense_model(&[64, 96, 10]), &[]).unwrap();
        assert!(m.with_lanes(12).is_err());
        for lanes in [0, 1, 4, 12, 48, 128, u32::MAX] {
            let mut spec = m.spec.clone();
            spec.lanes = lanes;
            assert!(spec.validate().is_err(), "{lanes} lanes accepted");
        }
        // A layout that does not fit the spec's k.
        let mut spec = m.spec.clone();
        spec.lanes = 8;
        assert!(spec.validate().is_err());
        // A spec JSON without "lanes" has the original 8.
        let mut json = serde_json::to_value(&m.with_lanes(8).unwrap().spec).unwrap();
        json.as_object_mut().unwrap().remove("lanes");
        let spec: CircuitSpec = serde_json::from_value(json).unwrap();
        assert_eq!(spec.lanes, 8);
        spec.validate().unwrap();
        // Serialized specs always carry "lanes" (the hash of 8-lane specs is unchanged).
        assert!(
            serde_json::to_string(&spec)
                .unwrap()
                .contains(r#""lanes":8,"#)
        );
    }

    #[test]
    fn fit_scale_leaves_margin() {
        assert_eq!(fit_scale(1.0, MARGIN, ACT_MAX), 6);
        assert_eq!(fit_scale(16.0, MARGIN, ACT_MAX), 2);
        assert_eq!(fit_scale(0.9, 0.0, ACT_MAX), 7);
    }
}
