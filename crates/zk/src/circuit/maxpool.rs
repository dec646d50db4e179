//! The max-pooling chip (spec version 2): the max of each window by a running max.
//!
//! Output `o` with window `x_0..x_{k-1}` (its in-bounds inputs, in [`LayerKind::connections`]
//! order) uses `2k` rows from `r0`; element `j` sits at row `r = r0 + 2j`:
//!
//! | row     | `X`    | `A_0` | `R` (limbs)             | gate |
//! |---------|--------|-------|-------------------------|------|
//! | r0      | `x_0`  | `m_0` | 0                       | first: `m_0 = x_0` |
//! | r0 + 1  |        |       | 0                       | |
//! | r       | `x_j`  | `m_j` | `d_j = m_j − m_{j−1}`   | step: `d_j = A_0 − A_0[−2]`, `e_j = A_0 − X`, `d_j·e_j = 0` |
//! | r + 1   |        |       | `e_j = m_j − x_j`       | |
//!
//! The limb column is range-checked to bytes on every row by the rescale chip's lookup, so
//! `d_j, e_j ∈ [0, 256)`: `m_j ≥ m_{j−1}` and `m_j ≥ x_j`, and `d_j·e_j = 0` makes `m_j` equal
//! to one of them. By induction (`m_0 = x_0`, all inputs 8-bit, so true differences lie in
//! `(−256, 256)` and cannot wrap around the field) `m_j = max(x_0..x_j)`; the output is
//! `m_{k−1}` (the `A_0` cell of the last element). The `x_j` cells are copy-constrained to the
//! previous layer's outputs (or the instance). No new advice column: `X`, `A_0` and the limbs
//! are free on these rows.

use halo2_proofs::{
    circuit::{Region, Value},
    plonk::{Advice, Column, ConstraintSystem, Error, Selector},
    poly::Rotation,
};
use pasta_curves::Fp;

use super::dense::{DenseInput, IntCell};
use crate::field::fe;
use crate::shape::LayerKind;

#[derive(Debug, Clone)]
pub struct MaxPoolConfig {
    pub x: Column<Advice>,
    pub m: Column<Advice>,
    pub limbs: Column<Advice>,
    q_first: Selector,
    q_step: Selector,
}

/// The witness of one element: the running max and the two differences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MaxStep {
    pub m: i64,
    pub d: i64,
    pub e: i64,
}

impl MaxPoolConfig {
    /// `x` and `m` need equality enabled; `limbs` must be byte-range-checked on every row.
    pub fn configure(
        meta: &mut ConstraintSystem<Fp>,
        x: Column<Advice>,
        m: Column<Advice>,
        limbs: Column<Advice>,
    ) -> Self {
        let q_first = meta.selector();
        let q_step = meta.selector();
        meta.create_gate("max first", |meta| {
            let s = meta.query_selector(q_first);
            let xv = meta.query_advice(x, Rotation::cur());
            let mv = meta.query_advice(m, Rotation::cur());
            vec![s * (mv - xv)]
        });
        meta.create_gate("max step", |meta| {
            let s = meta.query_selector(q_step);
            let xv = meta.query_advice(x, Rotation::cur());
            let mv = meta.query_advice(m, Rotation::cur());
            let prev = meta.query_advice(m, Rotation(-2));
            let d = meta.query_advice(limbs, Rotation::cur());
            let e = meta.query_advice(limbs, Rotation::next());
            vec![
                s.clone() * (d.clone() - (mv.clone() - prev)),
                s.clone() * (e.clone() - (mv - xv)),
                s * d * e,
            ]
        });
        MaxPoolConfig {
            x,
            m,
            limbs,
            q_first,
            q_step,
        }
    }

    /// Assigns one max-pooling layer (`kind` is its [`LayerKind::MaxPool`], `n` inputs, first
    /// row of each output in `rows`); returns the output cells. `tweak(o, j, step)` lets tests
    /// corrupt the witness.
    #[allow(clippy::too_many_arguments)]
    pub fn assign(
        &self,
        region: &mut Region<'_, Fp>,
        kind: &LayerKind,
        n: usize,
        rows: &[usize],
        input: &DenseInput<'_>,
        x: &[Value<i64>],
        tweak: &dyn Fn(usize, usize, MaxStep) -> MaxStep,
    ) -> Result<Vec<IntCell>, Error> {
        let mut out = Vec::with_capacity(rows.len());
        for (o, &r0) in rows.iter().enumerate() {
            let mut last: Option<IntCell> = None;
            for (j, &(idx, _)) in kind.connections(n, o).iter().enumerate() {
                let row = r0 + 2 * j;
                input.copy(region, idx, self.x, row)?;
                let xv = *x.get(idx).ok_or(Error::Synthesis)?;
                let step = match &last {
                    None => {
                        self.q_first.enable(region, row)?;
                        xv.map(|xv| MaxStep { m: xv, d: 0, e: 0 })
                    }
                    Some((_, prev)) => {
                        self.q_step.enable(region, row)?;
                        prev.zip(xv).map(|(p, xv)| {
                            let m = p.max(xv);
                            MaxStep {
                                m,
                                d: m - p,
                                e: m - xv,
                            }
                        })
                    }
                };
                let step = step.map(|s| tweak(o, j, s));
                region.assign_advice(|| "d", self.limbs, row, || step.map(|s| fe(s.d)))?;
                region.assign_advice(|| "e", self.limbs, row + 1, || step.map(|s| fe(s.e)))?;
                let cell = region.assign_advice(|| "max", self.m, row, || step.map(|s| fe(s.m)))?;
                last = Some((cell, step.map(|s| s.m)));
            }
            out.push(last.ok_or(Error::Synthesis)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use halo2_proofs::{
        circuit::{Layouter, SimpleFloorPlanner},
        dev::MockProver,
        plonk::{Circuit, Instance},
    };

    use super::*;
    use crate::circuit::table::ActTableConfig;
    use crate::shape::ConvShape;

    /// A 2×3×3 input (from the instance) pooled 2×2, stride 1, pads 1 on the top and left:
    /// windows of 1, 2 and 4 elements; outputs exposed as instance if `expose` (bad witnesses
    /// run without, so that only the chip's own constraints can reject them).
    #[derive(Clone)]
    struct TestCircuit {
        x: Vec<i64>,
        tweak: fn(usize, usize, MaxStep) -> MaxStep,
        expose: bool,
    }

    fn kind() -> LayerKind {
        LayerKind::MaxPool(ConvShape {
            in_channels: 2,
            in_h: 3,
            in_w: 3,
            out_channels: 2,
            kernel: [2, 2],
            stride: [1, 1],
            pads: [1, 1, 0, 0],
            depthwise: true,
        })
    }

    const N: usize = 18;
    const M: usize = 18;

    fn rows() -> Vec<usize> {
        let k = kind();
        let mut row = 0;
        (0..M)
            .map(|o| {
                let r = row;
                row += 2 * k.connections(N, o).len();
                r
            })
            .collect()
    }

    impl Circuit<Fp> for TestCircuit {
        type Config = (MaxPoolConfig, ActTableConfig, Column<Instance>);
        type FloorPlanner = SimpleFloorPlanner;

        fn without_witnesses(&self) -> Self {
            self.clone()
        }

        fn configure(meta: &mut ConstraintSystem<Fp>) -> Self::Config {
            let table = ActTableConfig::configure(meta);
            let [x, m, limbs] = [(); 3].map(|_| meta.advice_column());
            meta.enable_equality(x);
            meta.enable_equality(m);
            let inst = meta.instance_column();
            meta.enable_equality(inst);
            meta.lookup(|meta| vec![(meta.query_advice(limbs, Rotation::cur()), table.t_byte)]);
            (MaxPoolConfig::configure(meta, x, m, limbs), table, inst)
        }

        fn synthesize(
            &self,
            (mp, table, inst): Self::Config,
            mut layouter: impl Layouter<Fp>,
        ) -> Result<(), Error> {
            table.load(&mut layouter)?;
            let xs: Vec<Value<i64>> = self.x.iter().map(|&v| Value::known(v)).collect();
            let out = layouter.assign_region(
                || "maxpool",
                |mut region| {
                    mp.assign(
                        &mut region,
                        &kind(),
                        N,
                        &rows(),
                        &DenseInput::Instance {
                            column: inst,
                            first_row: 0,
                        },
                        &xs,
                        &self.tweak,
                    )
                },
            )?;
            for (o, (cell, _)) in out.iter().enumerate() {
                if self.expose {
                    layouter.constrain_instance(cell.cell(), inst, N + o)?;
                }
            }
            Ok(())
        }
    }

    fn setup() -> (Vec<i64>, Vec<Fp>) {
        let x: Vec<i64> = (0..N as i64).map(|i| (i * 89 + 40) % 256 - 128).collect();
        let k = kind();
        let y: Vec<i64> = (0..M)
            .map(|o| k.connections(N, o).iter().map(|c| x[c.0]).max().unwrap())
            .collect();
        let inst = x.iter().chain(&y).map(|&v| fe(v)).collect();
        (x, inst)
    }

    fn run(tweak: fn(usize, usize, MaxStep) -> MaxStep, expose: bool, inst: Vec<Fp>) -> bool {
        let (x, _) = setup();
        let c = TestCircuit { x, tweak, expose };
        MockProver::run(9, &c, vec![inst]).unwrap().verify().is_ok()
    }

    #[test]
    fn maxpool_accepts_the_honest_witness_and_rejects_a_wrong_max() {
        let (x, inst) = setup();
        let c = TestCircuit {
            x,
            tweak: |_, _, s| s,
            expose: true,
        };
        MockProver::run(9, &c, vec![inst.clone()])
            .unwrap()
            .assert_satisfied();
        assert!(run(|_, _, s| s, false, inst.clone()));
        let mut bad = inst;
        bad[N + 5] += Fp::one();
        assert!(!run(|_, _, s| s, true, bad));
    }

    #[test]
    fn maxpool_rejects_bad_witnesses() {
        let tweaks: [fn(usize, usize, MaxStep) -> MaxStep; 5] = [
            // a running max above both values (d, e consistent, both positive): d·e ≠ 0
            |o, j, s| {
                if o == 8 && j == 1 {
                    MaxStep {
                        m: s.m + 1,
                        d: s.d + 1,
                        e: s.e + 1,
                    }
                } else {
                    s
                }
            },
            // keeps the smaller value (e.g. the new x when it is lower): a negative difference
            |o, j, s| {
                if o == 8 && j == 2 && s.d == 0 && s.e > 0 {
                    MaxStep {
                        m: s.m - s.e,
                        d: -s.e,
                        e: 0,
                    }
                } else if o == 8 && j == 2 {
                    MaxStep {
                        m: s.m - s.d,
                        d: 0,
                        e: -s.d,
                    }
                } else {
                    s
                }
            },
            // wrong difference witness
            |o, j, s| {
                if o == 4 && j == 1 {
                    MaxStep { d: s.d + 1, ..s }
                } else {
                    s
                }
            },
            // a first element that is not the input
            |o, j, s| {
                if o == 0 && j == 0 {
                    MaxStep { m: s.m + 1, ..s }
                } else {
                    s
                }
            },
            // a running max 256 too low: the differences would be ≥ 256
            |o, j, s| {
                if o == 17 && j == 3 {
                    MaxStep {
                        m: s.m - 256,
                        d: s.d - 256,
                        e: s.e - 256,
                    }
                } else {
                    s
                }
            },
        ];
        let (_, inst) = setup();
        for (i, t) in tweaks.into_iter().enumerate() {
            assert!(!run(t, false, inst.clone()), "tweak {i} was accepted");
        }
    }
}
