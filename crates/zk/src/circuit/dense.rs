//! The dense-layer chip: one output neuron per lane (`spec.lanes` lanes: 8, 16, 32 or 64) in
//! each block, one input per row.
//!
//! Block layout (rows relative to the block's first row `r0`, `n` inputs):
//!
//! | row        | `W_l`         | `X`     | `A_l`                 | gate  |
//! |------------|---------------|---------|-----------------------|-------|
//! | r0         | bias of `o_l` |         | (previous result)     | bias: `A_l[+1] = W_l` |
//! | r0 + 1 + t | `w[o_l][t]`   | `x_t`   | partial sum before t  | mac: `A_l[+1] = A_l + W_l·X` |
//! | r0 + n + 1 | next bias     |         | result                | (next block's bias row) |
//!
//! `X` cells are copy-constrained to the layer input (instance cells for the first layer).
//! The weight columns hold nothing but weights and biases, at rows fixed by the spec: the
//! commitment binds these columns (see [`crate::commit`]).

use halo2_proofs::{
    circuit::{AssignedCell, Region, Value},
    plonk::{Advice, Column, ConstraintSystem, Error, Instance, Selector},
    poly::Rotation,
};
use pasta_curves::Fp;

use crate::field::fe;
use crate::quant::QLayer;
use crate::shape::Block;

#[derive(Debug, Clone)]
pub struct DenseConfig {
    /// One weight column and one accumulator column per lane.
    pub w: Vec<Column<Advice>>,
    pub acc: Vec<Column<Advice>>,
    pub x: Column<Advice>,
    q_bias: Selector,
    q_mac: Selector,
}

/// Where a layer's inputs come from.
pub enum DenseInput<'a> {
    /// Instance cells `first_row..first_row + n`.
    Instance {
        column: Column<Instance>,
        first_row: usize,
    },
    /// The previous layer's output cells.
    Cells(&'a [AssignedCell<Fp, Fp>]),
}

impl DenseInput<'_> {
    /// Copies input `idx` into `column` at `row` (copy constraint to its source cell).
    pub fn copy(
        &self,
        region: &mut Region<'_, Fp>,
        idx: usize,
        column: Column<Advice>,
        row: usize,
    ) -> Result<AssignedCell<Fp, Fp>, Error> {
        match self {
            DenseInput::Cells(prev) => {
                prev.get(idx)
                    .ok_or(Error::Synthesis)?
                    .copy_advice(|| "x", region, column, row)
            }
            DenseInput::Instance {
                column: inst,
                first_row,
            } => region.assign_advice_from_instance(|| "x", *inst, first_row + idx, column, row),
        }
    }
}

/// A result cell with its integer value.
pub type IntCell = (AssignedCell<Fp, Fp>, Value<i64>);

impl DenseConfig {
    /// `w` and `acc` have one column per lane (the same number).
    pub fn configure(
        meta: &mut ConstraintSystem<Fp>,
        w: Vec<Column<Advice>>,
        acc: Vec<Column<Advice>>,
        x: Column<Advice>,
    ) -> Self {
        assert_eq!(
            w.len(),
            acc.len(),
            "one weight and one accumulator column per lane"
        );
        let lanes = w.len();
        for &c in &acc {
            meta.enable_equality(c);
        }
        meta.enable_equality(x);
        let q_bias = meta.selector();
        let q_mac = meta.selector();
        meta.create_gate("bias", |meta| {
            let q = meta.query_selector(q_bias);
            (0..lanes)
                .map(|l| {
                    let next = meta.query_advice(acc[l], Rotation::next());
                    let b = meta.query_advice(w[l], Rotation::cur());
                    q.clone() * (next - b)
                })
                .collect::<Vec<_>>()
        });
        meta.create_gate("mac", |meta| {
            let q = meta.query_selector(q_mac);
            let xv = meta.query_advice(x, Rotation::cur());
            (0..lanes)
                .map(|l| {
                    let cur = meta.query_advice(acc[l], Rotation::cur());
                    let next = meta.query_advice(acc[l], Rotation::next());
                    let wv = meta.query_advice(w[l], Rotation::cur());
                    q.clone() * (next - cur - wv * xv.clone())
                })
                .collect::<Vec<_>>()
        });
        DenseConfig {
            w,
            acc,
            x,
            q_bias,
            q_mac,
        }
    }

    /// Assigns one layer of `m` outputs laid out in `blocks`; returns the `m` accumulator
    /// cells. `tweak(row, lane, partial)` lets tests corrupt a partial sum.
    #[allow(clippy::too_many_arguments)]
    pub fn assign(
        &self,
        region: &mut Region<'_, Fp>,
        blocks: &[Block],
        m: usize,
        layer: Option<&QLayer>,
        input: &DenseInput<'_>,
        x: &[Value<i64>],
        tweak: &dyn Fn(usize, usize, i64) -> i64,
    ) -> Result<Vec<IntCell>, Error> {
        let mut first_x: Vec<Option<AssignedCell<Fp, Fp>>> = vec![None; x.len()];
        let mut results: Vec<Option<IntCell>> = vec![None; m];
        for blk in blocks {
            let r0 = blk.row;
            self.q_bias.enable(region, r0)?;
            let lanes = self.w.len();
            if blk.outputs.len() > lanes {
                return Err(Error::Synthesis);
            }
            let mut acc: Vec<Value<i64>> = Vec::with_capacity(lanes);
            let mut cells = Vec::with_capacity(lanes);
            for l in 0..lanes {
                let bias = match (layer, blk.outputs.get(l)) {
                    (Some(q), Some(&o)) => Value::known(q.bias[o]),
                    (Some(_), None) => Value::known(0),
                    (None, _) => Value::unknown(),
                };
                region.assign_advice(|| "bias", self.w[l], r0, || bias.map(fe))?;
                let a = bias.map(|v| tweak(r0 + 1, l, v));
                cells.push(region.assign_advice(|| "acc", self.acc[l], r0 + 1, || a.map(fe))?);
                acc.push(a);
            }
            for (t, &idx) in blk.inputs.iter().enumerate() {
                let row = r0 + 1 + t;
                self.q_mac.enable(region, row)?;
                // First use of an input: copy it in (from the instance or the previous
                // layer); later uses copy that cell. (The order of copies fixes the
                // permutation, hence the verifying key: keep it.)
                match &first_x[idx] {
                    Some(cell) => {
                        cell.copy_advice(|| "x", region, self.x, row)?;
                    }
                    None => {
                        let cell = match input {
                            DenseInput::Cells(prev) => {
                                prev[idx].copy_advice(|| "x", region, self.x, row)?
                            }
                            DenseInput::Instance { column, first_row } => region
                                .assign_advice_from_instance(
                                    || "x",
                                    *column,
                                    first_row + idx,
                                    self.x,
                                    row,
                                )?,
                        };
                        first_x[idx] = Some(cell);
                    }
                }
                for (l, a) in acc.iter_mut().enumerate() {
                    let wv = match (layer, blk.weights[t].get(l).copied().flatten()) {
                        (Some(q), Some(w)) => Value::known(q.weights[w]),
                        (Some(_), None) => Value::known(0),
                        (None, _) => Value::unknown(),
                    };
                    region.assign_advice(|| "w", self.w[l], row, || wv.map(fe))?;
                    *a = a
                        .zip(wv)
                        .zip(x[idx])
                        .map(|((a, w), xv)| tweak(row + 1, l, a + w * xv));
                    cells[l] =
                        region.assign_advice(|| "acc", self.acc[l], row + 1, || a.map(fe))?;
                }
            }
            for (l, &o) in blk.outputs.iter().enumerate() {
                results[o] = Some((cells[l].clone(), acc[l]));
            }
        }
        results
            .into_iter()
            .map(|r| r.ok_or(Error::Synthesis))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use halo2_proofs::{
        circuit::{Layouter, SimpleFloorPlanner},
        dev::MockProver,
        plonk::Circuit,
    };

    use super::*;
    use crate::shape::{LayerKind, plan};

    /// `M` outputs (two or three blocks of `L` lanes) over 3 inputs from the instance, results
    /// exposed as instance.
    #[derive(Clone)]
    struct TestCircuit<const L: usize, const M: usize> {
        layer: QLayer,
        x: Vec<i64>,
        corrupt: Option<(usize, usize)>,
    }

    const N: usize = 3;

    impl<const L: usize, const M: usize> Circuit<Fp> for TestCircuit<L, M> {
        type Config = (DenseConfig, Column<Instance>);
        type FloorPlanner = SimpleFloorPlanner;

        fn without_witnesses(&self) -> Self {
            self.clone()
        }

        fn configure(meta: &mut ConstraintSystem<Fp>) -> Self::Config {
            let w = (0..L).map(|_| meta.advice_column()).collect();
            let acc = (0..L).map(|_| meta.advice_column()).collect();
            let x = meta.advice_column();
            let inst = meta.instance_column();
            meta.enable_equality(inst);
            (DenseConfig::configure(meta, w, acc, x), inst)
        }

        fn synthesize(
            &self,
            (config, inst): Self::Config,
            mut layouter: impl Layouter<Fp>,
        ) -> Result<(), Error> {
            let xs: Vec<Value<i64>> = self.x.iter().map(|&v| Value::known(v)).collect();
            let corrupt = self.corrupt;
            let tweak = move |row: usize, lane: usize, v: i64| {
                if corrupt == Some((row, lane)) {
                    v + 1
                } else {
                    v
                }
            };
            let out = layouter.assign_region(
                || "dense",
                |mut region| {
                    config.assign(
                        &mut region,
                        &plan(&LayerKind::Dense, N, M, 0, L).0,
                        M,
                        Some(&self.layer),
                        &DenseInput::Instance {
                            column: inst,
                            first_row: 0,
                        },
                        &xs,
                        &tweak,
                    )
                },
            )?;
            for (o, (cell, _)) in out.iter().enumerate() {
                layouter.constrain_instance(cell.cell(), inst, N + o)?;
            }
            Ok(())
        }
    }

    fn setup<const L: usize, const M: usize>() -> (TestCircuit<L, M>, Vec<Fp>) {
        let layer = QLayer {
            weights: (0..N * M).map(|i| (i as i64 * 37) % 255 - 127).collect(),
            bias: (0..M).map(|i| i as i64 * 1000 - 4000).collect(),
        };
        let x = vec![5, -128, 127];
        let mut inst: Vec<Fp> = x.iter().map(|&v| fe(v)).collect();
        for o in 0..M {
            let acc = layer.bias[o] + (0..N).map(|t| layer.weights[o * N + t] * x[t]).sum::<i64>();
            inst.push(fe(acc));
        }
        (
            TestCircuit {
                layer,
                x,
                corrupt: None,
            },
            inst,
        )
    }

    fn rejects<const L: usize, const M: usize>(wrong_output: usize, corrupt: (usize, usize)) {
        let (c, mut inst) = setup::<L, M>();
        inst[N + wrong_output] += Fp::one();
        assert!(
            MockProver::run(6, &c, vec![inst])
                .unwrap()
                .verify()
                .is_err()
        );
        let (mut c, inst) = setup::<L, M>();
        c.corrupt = Some(corrupt);
        assert!(
            MockProver::run(6, &c, vec![inst])
                .unwrap()
                .verify()
                .is_err(),
            "corrupted partial sum (row, lane) {corrupt:?} with {L} lanes was accepted"
        );
    }

    #[test]
    fn dense_accepts_the_honest_witness() {
        let (c, inst) = setup::<8, 10>();
        MockProver::run(6, &c, vec![inst])
            .unwrap()
            .assert_satisfied();
        // Wide layouts: two full blocks plus a partial one, and one partial block.
        let (c, inst) = setup::<16, 40>();
        MockProver::run(6, &c, vec![inst])
            .unwrap()
            .assert_satisfied();
        let (c, inst) = setup::<32, 20>();
        MockProver::run(6, &c, vec![inst])
            .unwrap()
            .assert_satisfied();
    }

    #[test]
    fn dense_rejects_a_wrong_output_or_partial_sum() {
        // lane 1's partial sum after the first input
        rejects::<8, 10>(4, (2, 1));
        // Wide layouts: a lane beyond 8, in the first and in a later block (block 1 of the
        // 16-lane layout starts at row N + 1 = 4: its partial sums are on rows 5..).
        rejects::<16, 40>(13, (2, 12));
        rejects::<16, 40>(30, (6, 15));
        rejects::<32, 20>(19, (3, 19));
    }
}
