//! The model circuit: one [`dense`] chip, one [`requant`] chip and the lookup [`table`],
//! composed by [`ModelCircuit`]. The shape comes from the [`CircuitSpec`] carried in the
//! circuit (halo2 0.4's `Circuit` has no params): `configure` is the same for every spec (a
//! fixed set of columns), everything spec-dependent happens in `synthesize`, and
//! `without_witnesses` keeps the spec, so the verifying key is a function of the spec alone.
//!
//! Columns, in allocation order (the order fixes the proof layout): advice `W_0..W_7`
//! (weights, committed; they must stay the first advice columns), `A_0..A_7` (accumulators;
//! `A_0`/`A_1` double as the rescale's input and output), `X`, `Q`, `H`, `R` (limbs); one
//! instance column `[job id, input.., output..]`.

pub mod dense;
pub mod requant;
pub mod table;

use halo2_proofs::{
    circuit::{Layouter, SimpleFloorPlanner, Value},
    plonk::{Circuit, Column, ConstraintSystem, Error, Instance},
};
use pasta_curves::Fp;

use self::dense::{DenseConfig, DenseInput};
use self::requant::RequantConfig;
use self::table::ActTableConfig;
use crate::field::{fe, job_id_element};
use crate::quant::{CircuitSpec, JOB_ROW, LANES, Layout, QLayer};

/// Number of advice columns (the proof starts with this many advice commitments).
pub const NUM_ADVICE: usize = 2 * LANES + 4;

#[derive(Debug, Clone)]
pub struct ModelConfig {
    dense: DenseConfig,
    requant: RequantConfig,
    table: ActTableConfig,
    instance: Column<Instance>,
}

/// The private witness: quantized layers and the quantized input.
#[derive(Debug, Clone)]
pub(crate) struct Witness {
    pub layers: Vec<QLayer>,
    pub input: Vec<i64>,
}

#[derive(Debug, Clone)]
pub(crate) struct ModelCircuit {
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

impl Circuit<Fp> for ModelCircuit {
    type Config = ModelConfig;
    type FloorPlanner = SimpleFloorPlanner;

    fn without_witnesses(&self) -> Self {
        ModelCircuit {
            spec: self.spec.clone(),
            witness: None,
        }
    }

    fn configure(meta: &mut ConstraintSystem<Fp>) -> ModelConfig {
        let w = [(); LANES].map(|_| meta.advice_column());
        let acc = [(); LANES].map(|_| meta.advice_column());
        let x = meta.advice_column();
        let q = meta.advice_column();
        let h = meta.advice_column();
        let limbs = meta.advice_column();
        let instance = meta.instance_column();
        meta.enable_equality(instance);
        let table = ActTableConfig::configure(meta);
        let dense = DenseConfig::configure(meta, w, acc, x);
        let requant = RequantConfig::configure(meta, acc[0], acc[1], q, h, limbs, &table);
        ModelConfig {
            dense,
            requant,
            table,
            instance,
        }
    }

    fn synthesize(
        &self,
        config: ModelConfig,
        mut layouter: impl Layouter<Fp>,
    ) -> Result<(), Error> {
        config.table.load(&mut layouter)?;
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
                for (li, (ls, ll)) in self.spec.layers.iter().zip(&layout.layers).enumerate() {
                    let input = if li == 0 {
                        DenseInput::Instance {
                            column: config.instance,
                            first_row: 1,
                        }
                    } else {
                        DenseInput::Cells(&cells)
                    };
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
    use crate::shape::LayerKind;

    fn model(sizes: &[usize], seed: u32) -> QuantizedModel {
        let mut s = seed as f32;
        let mut next = move || {
            s += 1.0;
            (s * 12.9898).sin() * 0.8
        };
        let layers: Vec<FloatLayer> = sizes
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
        let fm = FloatModel {
            input_name: "input".into(),
            output_name: "output".into(),
            layers,
        };
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
        let circuit = ModelCircuit {
            spec: m.spec.clone(),
            witness: Some(Witness {
                layers: m.layers.clone(),
                input: x.to_vec(),
            }),
        };
        MockProver::run(m.spec.k, &circuit, vec![instance("job", x, y)])
            .unwrap()
            .verify()
    }

    #[test]
    fn unusable_rows_match_halo2() {
        let mut cs = ConstraintSystem::<Fp>::default();
        ModelCircuit::configure(&mut cs);
        assert_eq!(cs.blinding_factors() + 1, UNUSABLE_ROWS);
        // Lookups need degree 4 (extended domain 4·2^k); no gate goes above it.
        assert_eq!(cs.degree(), 4);
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
}
