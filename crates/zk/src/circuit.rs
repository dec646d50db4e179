//! The model circuit: one [`dense`] chip, one [`requant`] chip and the lookup [`table`],
//! composed by [`ModelCircuit`]; from spec version 2 also the [`maxpool`] and [`activation`]
//! chips. The shape comes from the [`CircuitSpec`] carried in the circuit (halo2 0.4's
//! `Circuit` has no params): `configure` is the same for every spec of a version (a fixed set
//! of columns), everything spec-dependent happens in `synthesize`, and `without_witnesses`
//! keeps the spec, so the verifying key is a function of the spec alone.
//!
//! Columns, in allocation order (the order fixes the proof layout), for `L = spec.lanes` lanes:
//! advice `W_0..W_{L-1}` (weights, committed; they must stay the first advice columns),
//! `A_0..A_{L-1}` (accumulators; `A_0`/`A_1` double as the rescale's input and output), `X`,
//! `Q`, `H`, `R` (limbs), and with more than 8 lanes `R2` (second limb column: the rescale
//! takes 2 rows instead of 4); one instance column `[job id, input.., output..]`. Version 2
//! ([`ModelCircuit<true, L>`]) adds no advice column (max pooling and activations use `X`, `A_0`
//! and `R` on their own rows): only selectors, the activation tag (fixed) and the activation
//! table, configured after all of version 1's, so version 1 circuits are unchanged.
//!
//! The lane count `L` is a const parameter (one circuit type per entry of
//! [`crate::quant::LANE_CHOICES`]): with `L = 8` the columns, gates and lookups are exactly
//! those of the original circuit, so 8-lane specs keep their verifying keys. Wider layouts
//! add lanes (columns and gate terms, in the same order), `R2` with its byte lookup, and a gate
//! that keeps the 4 queries of `R` (so the same `UNUSABLE_ROWS`).

pub mod activation;
pub mod dense;
pub mod maxpool;
pub mod requant;
pub mod table;

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use halo2_proofs::{
    circuit::{Layouter, SimpleFloorPlanner, Value},
    plonk::{Circuit, Column, ConstraintSystem, Error, Instance},
};
use pasta_curves::Fp;

use self::activation::ActConfig;
use self::dense::{DenseConfig, DenseInput};
use self::maxpool::MaxPoolConfig;
use self::requant::RequantConfig;
use self::table::ActTableConfig;
use crate::ZkError;
use crate::field::{fe, job_id_element};
use crate::quant::{CircuitSpec, JOB_ROW, LANES, Layout, QLayer, UNUSABLE_ROWS};
use crate::shape::LayerKind;

/// Number of advice columns of a circuit with `lanes` lanes (the proof starts with this many
/// advice commitments): 20 for 8 lanes, 36 for 16, 68 for 32.
pub const fn num_advice(lanes: usize) -> usize {
    crate::quant::advice_columns(lanes)
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    dense: DenseConfig,
    requant: RequantConfig,
    table: ActTableConfig,
    instance: Column<Instance>,
    /// Version 2 only.
    ext: Option<ExtConfig>,
}

/// The chips of spec version 2.
#[derive(Debug, Clone)]
pub struct ExtConfig {
    maxpool: MaxPoolConfig,
    act: ActConfig,
}

/// The private witness: quantized layers and the quantized input.
#[derive(Debug, Clone)]
pub(crate) struct Witness {
    pub layers: Vec<QLayer>,
    pub input: Vec<i64>,
}

/// The circuit of a spec: `EXT = false` for version 1 (linear layers), `true` for version 2;
/// `L` lanes (`spec.lanes`).
#[derive(Debug, Clone)]
pub(crate) struct ModelCircuit<const EXT: bool, const L: usize> {
    pub spec: CircuitSpec,
    pub witness: Option<Witness>,
}

/// The instance column: `[job id, input.., output..]`.
pub(crate) fn instance(job_id: &str, input: &[i64], output: &[i64]) -> Vec<Fp> {
    let mut v = Vec::with_capacity(1 + input.len() + output.len());
    v.push(job_id_element(job_id));
    v.extend(input.iter().map(|&x| fe(x)));
    v.extend(output.iter().map(|&x| fe(x)));
    v
}

/// Runs `$body` with `$C` the circuit type of `$spec` (its version and lane count); a spec
/// with another lane count is an internal error (specs are validated before this).
macro_rules! with_circuit {
    ($spec:expr, $C:ident => $body:expr) => {{
        let spec: &$crate::quant::CircuitSpec = $spec;
        match (spec.extended(), spec.lanes) {
            (false, 8) => {
                type $C = $crate::circuit::ModelCircuit<false, 8>;
                Ok($body)
            }
            (false, 16) => {
                type $C = $crate::circuit::ModelCircuit<false, 16>;
                Ok($body)
            }
            (false, 32) => {
                type $C = $crate::circuit::ModelCircuit<false, 32>;
                Ok($body)
            }
            (false, 64) => {
                type $C = $crate::circuit::ModelCircuit<false, 64>;
                Ok($body)
            }
            (true, 8) => {
                type $C = $crate::circuit::ModelCircuit<true, 8>;
                Ok($body)
            }
            (true, 16) => {
                type $C = $crate::circuit::ModelCircuit<true, 16>;
                Ok($body)
            }
            (true, 32) => {
                type $C = $crate::circuit::ModelCircuit<true, 32>;
                Ok($body)
            }
            (true, 64) => {
                type $C = $crate::circuit::ModelCircuit<true, 64>;
                Ok($body)
            }
            (_, lanes) => Err($crate::ZkError::Internal(format!(
                "no circuit for {lanes} lanes"
            ))),
        }
    }};
}
pub(crate) use with_circuit;

/// The circuit facts the weight link relies on, read from the spec's own constraint system (as
/// `keygen_vk` configures it): halo2 blinds the last [`UNUSABLE_ROWS`] rows (the link's `R`),
/// and there are [`num_advice`]`(lanes)` advice columns (the proof's first commitments; the
/// first `lanes` are the weight columns). Checked by every verification, once per circuit type.
pub(crate) fn check_layout(spec: &CircuitSpec) -> Result<(), ZkError> {
    type Seen = Mutex<HashSet<(bool, u32)>>;
    static CHECKED: OnceLock<Seen> = OnceLock::new();
    let key = (spec.extended(), spec.lanes);
    let checked = CHECKED.get_or_init(Default::default);
    if checked.lock().map(|c| c.contains(&key)).unwrap_or(false) {
        return Ok(());
    }
    let (blinding, advice) = with_circuit!(spec, C => {
        let mut cs = ConstraintSystem::<Fp>::default();
        C::configure(&mut cs);
        (cs.blinding_factors(), advice_column_count(&cs))
    })?;
    if blinding + 1 != UNUSABLE_ROWS || advice != Some(num_advice(spec.lane_count())) {
        return Err(ZkError::Internal(format!(
            "the circuit for {} lanes does not have the layout the weight link needs \
             ({blinding} blinding rows, {advice:?} advice columns)",
            spec.lanes
        )));
    }
    if let Ok(mut c) = checked.lock() {
        c.insert(key);
    }
    Ok(())
}

/// The number of advice columns of a configured constraint system. halo2 0.4 has no getter;
/// its pinned description (what the verifying key hashes) prints it.
fn advice_column_count(cs: &ConstraintSystem<Fp>) -> Option<usize> {
    let pinned = format!("{:?}", cs.pinned());
    let at = pinned.find("num_advice_columns: ")? + "num_advice_columns: ".len();
    let digits: String = pinned[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

impl<const EXT: bool, const L: usize> Circuit<Fp> for ModelCircuit<EXT, L> {
    type Config = ModelConfig;
    type FloorPlanner = SimpleFloorPlanner;

    fn without_witnesses(&self) -> Self {
        ModelCircuit {
            spec: self.spec.clone(),
            witness: None,
        }
    }

    fn configure(meta: &mut ConstraintSystem<Fp>) -> ModelConfig {
        let w: Vec<_> = (0..L).map(|_| meta.advice_column()).collect();
        let acc: Vec<_> = (0..L).map(|_| meta.advice_column()).collect();
        let (acc0, acc1) = (acc[0], acc[1]);
        let x = meta.advice_column();
        let q = meta.advice_column();
        let h = meta.advice_column();
        let limbs = meta.advice_column();
        // Wider layouts: a second limb column, so a rescale takes 2 rows instead of 4.
        let limbs2 = (L > LANES).then(|| meta.advice_column());
        let instance = meta.instance_column();
        meta.enable_equality(instance);
        let table = ActTableConfig::configure(meta);
        let dense = DenseConfig::configure(meta, w, acc, x);
        let requant = RequantConfig::configure(meta, acc0, acc1, q, h, limbs, limbs2, &table);
        // Version 2: everything after version 1's columns, gates and lookups.
        let ext = EXT.then(|| ExtConfig {
            maxpool: MaxPoolConfig::configure(meta, x, acc0, limbs),
            act: ActConfig::configure(meta, x, acc0),
        });
        ModelConfig {
            dense,
            requant,
            table,
            instance,
            ext,
        }
    }

    fn synthesize(
        &self,
        config: ModelConfig,
        mut layouter: impl Layouter<Fp>,
    ) -> Result<(), Error> {
        config.table.load(&mut layouter)?;
        if self.spec.extended() != EXT || self.spec.lane_count() != L {
            return Err(Error::Synthesis);
        }
        let tables: Vec<&[i64]> = self
            .spec
            .layers
            .iter()
            .filter(|l| l.kind.is_table())
            .map(|l| l.table.as_slice())
            .collect();
        if let Some(ext) = &config.ext {
            ext.act.load(&mut layouter, &tables)?;
        }
        let layout = Layout::new(&self.spec);
        let n_in = self.spec.input_len();
        let outputs = layouter.assign_region(
            || "model",
            |mut region| {
                region.assign_advice_from_instance(
                    || "job id",
                    config.instance,
                    0,
                    config.dense.x,
                    JOB_ROW,
                )?;
                let mut xs: Vec<Value<i64>> = match &self.witness {
                    Some(w) => w.input.iter().map(|&v| Value::known(v)).collect(),
                    None => vec![Value::unknown(); n_in],
                };
                let mut cells = Vec::new();
                let mut tag = 0u64;
                for (li, (ls, ll)) in self.spec.layers.iter().zip(&layout.layers).enumerate() {
                    let input = if li == 0 {
                        DenseInput::Instance {
                            column: config.instance,
                            first_row: 1,
                        }
                    } else {
                        DenseInput::Cells(&cells)
                    };
                    if !ls.kind.is_linear() {
                        let ext = config.ext.as_ref().ok_or(Error::Synthesis)?;
                        let out = if let LayerKind::MaxPool(_) = ls.kind {
                            ext.maxpool.assign(
                                &mut region,
                                &ls.kind,
                                ls.inputs as usize,
                                &ll.elem,
                                &input,
                                &xs,
                                &|_, _, s| s,
                            )?
                        } else {
                            tag += 1;
                            ext.act.assign(
                                &mut region,
                                &ll.elem,
                                tag,
                                &ls.table,
                                &input,
                                &xs,
                                &|_, y| y,
                            )?
                        };
                        (cells, xs) = out.into_iter().unzip();
                        continue;
                    }
                    let accs = config.dense.assign(
                        &mut region,
                        &ll.blocks,
                        ls.outputs as usize,
                        self.witness.as_ref().map(|w| &w.layers[li]),
                        &input,
                        &xs,
                        &|_, _, v| v,
                    )?;
                    let mut next_cells = Vec::with_capacity(accs.len());
                    let mut next_xs = Vec::with_capacity(accs.len());
                    for (o, (cell, value)) in accs.iter().enumerate() {
                        let (c, v) = config.requant.assign(
                            &mut region,
                            ll.requant[o],
                            cell,
                            *value,
                            ls.shift,
                            ls.relu,
                            self.spec.checked(li),
                            &|w| w,
                        )?;
                        next_cells.push(c);
                        next_xs.push(v);
                    }
                    cells = next_cells;
                    xs = next_xs;
                }
                Ok(cells)
            },
        )?;
        for (o, cell) in outputs.iter().enumerate() {
            layouter.constrain_instance(cell.cell(), config.instance, 1 + n_in + o)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use halo2_proofs::dev::MockProver;
    use proptest::prelude::*;

    use super::*;
    use crate::onnx::{FloatLayer, FloatModel};
    use crate::quant::{QuantizedModel, UNUSABLE_ROWS, calibrate, reference};
    use crate::shape::{ConvShape, LayerKind};

    fn model(sizes: &[usize], seed: u32) -> QuantizedModel {
        let fm = crate::quant::test_dense_model(sizes, seed as f32, 0.8);
        let samples: Vec<Vec<f32>> = (0..32)
            .map(|i| {
                (0..sizes[0])
                    .map(|j| (((i * 7 + j * 3) % 17) as f32) / 16.0)
                    .collect()
            })
            .collect();
        calibrate(&fm, &samples).unwrap()
    }

    fn run(
        m: &QuantizedModel,
        x: &[i64],
        y: &[i64],
    ) -> Result<(), Vec<halo2_proofs::dev::VerifyFailure>> {
        let witness = Some(Witness {
            layers: m.layers.clone(),
            input: x.to_vec(),
        });
        let inst = vec![instance("job", x, y)];
        let spec = m.spec.clone();
        with_circuit!(&m.spec, C => MockProver::run(m.spec.k, &C { spec, witness }, inst))
            .unwrap()
            .unwrap()
            .verify()
    }

    #[test]
    fn unusable_rows_match_halo2() {
        let mut cs = ConstraintSystem::<Fp>::default();
        ModelCircuit::<false, 8>::configure(&mut cs);
        assert_eq!(cs.blinding_factors() + 1, UNUSABLE_ROWS);
        // Lookups need degree 4 (extended domain 4·2^k); no gate goes above it.
        assert_eq!(cs.degree(), 4);
        // (the next advice column's index is the number of advice columns)
        let advice = format!("{:?}", cs.advice_column());
        assert!(
            advice.contains(&format!("index: {},", num_advice(8))),
            "{advice}"
        );
        assert_eq!(num_advice(8), 20);
        // Version 2: the same advice columns (the proof layout and the weight link are
        // unchanged) and the same blinding rows; the selector-gated activation lookup has
        // degree 5, which needs the same extended domain (4·2^k ≥ (5 − 1)·2^k).
        let mut cs = ConstraintSystem::<Fp>::default();
        ModelCircuit::<true, 8>::configure(&mut cs);
        assert_eq!(cs.blinding_factors() + 1, UNUSABLE_ROWS);
        assert_eq!(cs.degree(), 5);
        assert_eq!(format!("{:?}", cs.advice_column()), advice);
        // Wider layouts: more columns, the same blinding rows (the link proof's `R`) and degrees.
        fn wide<const EXT: bool, const L: usize>(degree: usize) {
            let mut cs = ConstraintSystem::<Fp>::default();
            ModelCircuit::<EXT, L>::configure(&mut cs);
            assert_eq!(cs.blinding_factors() + 1, UNUSABLE_ROWS);
            assert_eq!(cs.degree(), degree);
            let advice = format!("{:?}", cs.advice_column());
            assert!(
                advice.contains(&format!("index: {},", num_advice(L))),
                "{advice}"
            );
        }
        wide::<false, 16>(4);
        wide::<false, 32>(4);
        wide::<false, 64>(4);
        wide::<true, 16>(5);
        wide::<true, 32>(5);
        wide::<true, 64>(5);
        assert_eq!([16, 32, 64].map(num_advice), [37, 69, 133]);
        let mut cs = ConstraintSystem::<Fp>::default();
        ModelCircuit::<true, 32>::configure(&mut cs);
        assert_eq!(advice_column_count(&cs), Some(num_advice(32)));
    }

    /// Conv 3×3 (pads 1) + ReLU → MaxPool 3×3 stride 2 (pads on the top and left) → Dense →
    /// Sigmoid → Dense → Tanh, on a 1×6×6 input; or (`pool_first`) Tanh → MaxPool 2×2 →
    /// Dense on a 1×4×4 input (both new chips reading the instance).
    fn pool_model(seed: u32, pool_first: bool) -> QuantizedModel {
        let mut s = seed as f32;
        let mut next = move || {
            s += 1.0;
            (s * 43.758).sin() * 0.9
        };
        let mut dense = |i: usize, o: usize| FloatLayer {
            kind: LayerKind::Dense,
            inputs: i,
            outputs: o,
            weights: (0..i * o).map(|_| next()).collect(),
            bias: (0..o).map(|k| k as f32 * 0.05 - 0.1).collect(),
            relu: false,
        };
        let fixed = |kind: LayerKind, n: usize, m: usize| FloatLayer {
            kind,
            inputs: n,
            outputs: m,
            weights: vec![],
            bias: vec![],
            relu: false,
        };
        let pool = |c: u32, h: u32, k: u32, stride: u32, pads: [u32; 4]| {
            let shape = ConvShape {
                in_channels: c,
                in_h: h,
                in_w: h,
                out_channels: c,
                kernel: [k, k],
                stride: [stride, stride],
                pads,
                depthwise: true,
            };
            let (n, m) = (shape.inputs(), shape.outputs());
            fixed(LayerKind::MaxPool(shape), n, m)
        };
        let (n_in, layers) = if pool_first {
            (
                16,
                vec![
                    fixed(LayerKind::Tanh, 16, 16),
                    pool(1, 4, 2, 2, [0; 4]),
                    dense(4, 3),
                ],
            )
        } else {
            let shape = ConvShape {
                in_channels: 1,
                in_h: 6,
                in_w: 6,
                out_channels: 2,
                kernel: [3, 3],
                stride: [1, 1],
                pads: [1, 1, 1, 1],
                depthwise: false,
            };
            let mut s2 = seed as f32;
            let conv = FloatLayer {
                inputs: 36,
                outputs: 72,
                weights: (0..18)
                    .map(|_| {
                        s2 += 1.0;
                        (s2 * 12.9898).sin()
                    })
                    .collect(),
                bias: (0..72).map(|o| (o / 36) as f32 * 0.1).collect(),
                relu: true,
                kind: LayerKind::Conv(shape),
            };
            (
                36,
                vec![
                    conv,
                    pool(2, 6, 3, 2, [1, 1, 0, 0]),
                    dense(18, 6),
                    fixed(LayerKind::Sigmoid, 6, 6),
                    dense(6, 3),
                    fixed(LayerKind::Tanh, 3, 3),
                ],
            )
        };
        let fm = FloatModel {
            input_name: "input".into(),
            output_name: "output".into(),
            layers,
        };
        let samples: Vec<Vec<f32>> = (0..32)
            .map(|i| {
                (0..n_in)
                    .map(|j| (((i * 5 + j * 3) % 13) as f32) / 12.0 - 0.3)
                    .collect()
            })
            .collect();
        calibrate(&fm, &samples).unwrap()
    }

    #[test]
    fn model_circuit_rejects_a_wrong_output_or_weights() {
        let m = model(&[12, 9, 3], 1);
        let x: Vec<i64> = (0..12).map(|i| i * 5 - 20).collect();
        let y = reference(&m, &x).unwrap();
        run(&m, &x, &y).unwrap();
        let mut bad = y.clone();
        bad[1] += 1;
        assert!(run(&m, &x, &bad).is_err());
        let mut other = m.clone();
        other.layers[1].weights[0] += 1;
        let y2 = reference(&other, &x).unwrap();
        // A different model proves its own output: the circuit alone does not bind weights
        // (the commitment does), but the claimed output must be that model's output.
        run(&other, &x, &y2).unwrap();
        if y2 != y {
            assert!(run(&other, &x, &y).is_err());
        }
    }

    fn conv_model(seed: u32) -> QuantizedModel {
        let mut s = seed as f32;
        let mut next = move || {
            s += 1.0;
            (s * 78.233).sin() * 0.9
        };
        let shape = crate::shape::ConvShape {
            in_channels: 2,
            in_h: 5,
            in_w: 5,
            out_channels: 3,
            kernel: [3, 3],
            stride: [2, 2],
            pads: [1, 1, 1, 1],
            depthwise: false,
        };
        let conv = FloatLayer {
            inputs: shape.inputs(),
            outputs: shape.outputs(),
            weights: (0..shape.weight_count()).map(|_| next()).collect(),
            bias: (0..shape.outputs()).map(|o| (o / 9) as f32 * 0.1).collect(),
            relu: true,
            kind: LayerKind::Conv(shape),
        };
        let dense = FloatLayer {
            kind: LayerKind::Dense,
            inputs: 27,
            outputs: 4,
            weights: (0..27 * 4).map(|_| next()).collect(),
            bias: vec![0.1, -0.1, 0.0, 0.2],
            relu: false,
        };
        let fm = FloatModel {
            input_name: "input".into(),
            output_name: "output".into(),
            layers: vec![conv, dense],
        };
        let samples: Vec<Vec<f32>> = (0..32)
            .map(|i| {
                (0..50)
                    .map(|j| (((i * 5 + j * 3) % 13) as f32) / 12.0 - 0.3)
                    .collect()
            })
            .collect();
        calibrate(&fm, &samples).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        #[test]
        fn reference_equals_circuit(seed in 0u32..1000, x in proptest::collection::vec(0i64..=64, 10)) {
            let m = model(&[10, 11, 4], seed);
            // In-distribution inputs (the calibration range): must not leave the ranges.
            let y = reference(&m, &x);
            prop_assume!(y.is_ok());
            let y = y.unwrap();
            prop_assert!(run(&m, &x, &y).is_ok());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8))]
        #[test]
        fn conv_reference_equals_circuit(seed in 0u32..1000, x in proptest::collection::vec(-38i64..=89, 50)) {
            let m = conv_model(seed);
            let y = reference(&m, &x);
            prop_assume!(y.is_ok());
            let y = y.unwrap();
            prop_assert!(run(&m, &x, &y).is_ok());
            let mut bad = y.clone();
            bad[0] += 1;
            prop_assert!(run(&m, &x, &bad).is_err());
        }
    }

    #[test]
    fn pool_and_table_models_satisfy_the_circuit() {
        // Not left to prop_assume: these in-distribution inputs must prove.
        for (seed, first) in [(0, false), (5, false), (0, true), (77, true)] {
            let m = pool_model(seed, first);
            assert_eq!(m.spec.version, crate::quant::SPEC_VERSION);
            assert_eq!(
                m.spec.k,
                if first { 9 } else { 10 },
                "two tables need 513 rows"
            );
            let x: Vec<i64> = (0..m.spec.input_len() as i64)
                .map(|i| (i * 13) % 127 - 38)
                .collect();
            let y = reference(&m, &x).unwrap();
            run(&m, &x, &y).unwrap();
            m.spec.validate().unwrap();
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(6))]
        #[test]
        fn pool_and_table_reference_equals_circuit(
            seed in 0u32..1000,
            pool_first in any::<bool>(),
            x in proptest::collection::vec(-38i64..=89, 36),
        ) {
            let m = pool_model(seed, pool_first);
            prop_assert_eq!(m.spec.version, crate::quant::SPEC_VERSION);
            let x = &x[..m.spec.input_len()];
            let y = reference(&m, x);
            prop_assume!(y.is_ok());
            let y = y.unwrap();
            prop_assert!(run(&m, x, &y).is_ok());
            for o in 0..y.len() {
                let mut bad = y.clone();
                bad[o] += 1;
                prop_assert!(run(&m, x, &bad).is_err());
            }
        }
    }

    /// A calibration-like input of the 64-input test models (scale 6).
    fn wide_input() -> Vec<i64> {
        (0..64).map(|j| ((j * 3) % 17) * 4).collect()
    }

    #[test]
    fn wide_layouts_satisfy_the_circuit_and_reject_bad_witnesses() {
        // 64 → 96 → 10 fits 2^9 rows only with 64 lanes; the same model with 16 lanes (k = 10).
        let m = model(&[64, 96, 10], 3);
        assert_eq!((m.spec.lanes, m.spec.k), (64, 9));
        let x = wide_input();
        for m in [m.clone(), m.with_lanes(16).unwrap()] {
            assert_eq!(m.spec.k, if m.spec.lanes == 64 { 9 } else { 10 });
            let y = reference(&m, &x).unwrap();
            run(&m, &x, &y).unwrap();
            for o in 0..y.len() {
                let mut bad = y.clone();
                bad[o] += 1;
                assert!(
                    run(&m, &x, &bad).is_err(),
                    "{} lanes, output {o}",
                    m.spec.lanes
                );
            }
            // Hidden neuron 20 (lane 20 of the first block with 64 lanes, lane 4 of the
            // second with 16) with a bias that pushes its quotient out of the 8-bit range: the
            // range lookup rejects the witness whatever output is claimed.
            let mut other = m.clone();
            other.layers[0].bias[20] += 1 << 24;
            assert!(reference(&other, &x).is_err());
            assert!(run(&other, &x, &y).is_err());
            // Another weight in a lane beyond 8 proves its own output, never the old one when
            // the outputs differ (the commitment binds the weights).
            let mut other = m.clone();
            for i in 0..64 {
                other.layers[0].weights[29 * 64 + i] = 127;
            }
            if let Ok(y2) = reference(&other, &x) {
                run(&other, &x, &y2).unwrap();
                if y2 != y {
                    assert!(run(&other, &x, &y).is_err());
                }
            }
        }
        // Convolutions (3 channels in a block of 16 lanes) and the version-2 chips in the
        // wide circuits.
        let conv = conv_model(4).with_lanes(16).unwrap();
        // (a calibration sample: in range)
        let sample: Vec<f32> = (0..50)
            .map(|j| ((j * 3) % 13) as f32 / 12.0 - 0.3)
            .collect();
        let x = crate::quant::quantize_input(&conv.spec, &sample).unwrap();
        let y = reference(&conv, &x).unwrap();
        run(&conv, &x, &y).unwrap();
        let pool = pool_model(0, false).with_lanes(32).unwrap();
        assert!(pool.spec.extended());
        let x: Vec<i64> = (0..36).map(|i| (i * 13) % 127 - 38).collect();
        let y = reference(&pool, &x).unwrap();
        run(&pool, &x, &y).unwrap();
        let mut bad = y.clone();
        bad[0] += 1;
        assert!(run(&pool, &x, &bad).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(6))]
        #[test]
        fn wide_reference_equals_circuit(
            seed in 0u32..1000,
            lanes in proptest::sample::select(vec![16u32, 32, 64]),
            x in proptest::collection::vec(0i64..=64, 64),
        ) {
            let m = model(&[64, 96, 10], seed);
            prop_assert_eq!(m.spec.lanes, 64);
            let m = m.with_lanes(lanes).unwrap();
            let y = reference(&m, &x);
            prop_assume!(y.is_ok());
            let y = y.unwrap();
            prop_assert!(run(&m, &x, &y).is_ok());
            let mut bad = y.clone();
            bad[seed as usize % y.len()] -= 1;
            prop_assert!(run(&m, &x, &bad).is_err());
        }
    }
}
