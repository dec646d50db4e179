//! The rescale chip: `acc = q·2^shift + r0 + 2^8·r1` with `r0, r1, r0·f0, r1·f1` bytes (so
//! `0 ≤ r < 2^shift`), `q ∈ [-128, 127]` with `h = max(q, 0)` by one table lookup, and the
//! output `out = h` (ReLU) or `out = q`. One neuron per 4 rows (the limbs sit in one column at
//! rotations 0..3); in the wider layouts (more than 8 lanes) one neuron per 2 rows: `r0, r1` in
//! `R` and `u, v` in a second limb column `R2`, at rotations 0 and 1 (the same gate, with its
//! own byte lookup on `R2`). `2^shift`, `f0`, `f1`, the ReLU tag and the `checked` flag are fixed
//! columns set from the spec.
//!
//! Unchecked rows (`checked = 0`, only the last layer of a model whose output has no ReLU):
//! the quotient is the output cell itself, with no lookup; `q`/`h` stay zero. The output is a
//! public instance that the verifier range-checks natively (`spec.output_range`), and that is
//! enough for uniqueness: two solutions would give `(q1 − q2)·2^shift = r2 − r1` with both sides
//! far below the field size, so `r1 = r2` and `q1 = q2`. This lets logits use 16 bits.
//!
//! `q`, `h` and the limb column are used by nothing else: their unused rows stay zero, which
//! the tables contain, so the lookups need no selector.

use halo2_proofs::{
    circuit::{AssignedCell, Region, Value},
    plonk::{Advice, Column, ConstraintSystem, Error, Expression, Fixed, Selector},
    poly::Rotation,
};
use pasta_curves::Fp;

use super::table::ActTableConfig;
use crate::field::fe;
use crate::quant::{LIMB_BITS, Requant, limb_factors, requant};

#[derive(Debug, Clone)]
pub struct RequantConfig {
    pub acc: Column<Advice>,
    pub out: Column<Advice>,
    pub q: Column<Advice>,
    pub h: Column<Advice>,
    pub limbs: Column<Advice>,
    /// Wider layouts: the second limb column (2 rows per rescale).
    pub limbs2: Option<Column<Advice>>,
    pow: Column<Fixed>,
    f0: Column<Fixed>,
    f1: Column<Fixed>,
    relu: Column<Fixed>,
    checked: Column<Fixed>,
    q_rq: Selector,
}

impl RequantConfig {
    #[allow(clippy::too_many_arguments)]
    pub fn configure(
        meta: &mut ConstraintSystem<Fp>,
        acc: Column<Advice>,
        out: Column<Advice>,
        q: Column<Advice>,
        h: Column<Advice>,
        limbs: Column<Advice>,
        limbs2: Option<Column<Advice>>,
        table: &ActTableConfig,
    ) -> Self {
        meta.enable_equality(acc);
        meta.enable_equality(out);
        let (pow, f0, f1, relu, checked) = (
            meta.fixed_column(),
            meta.fixed_column(),
            meta.fixed_column(),
            meta.fixed_column(),
            meta.fixed_column(),
        );
        let q_rq = meta.selector();
        meta.create_gate("requant", |meta| {
            let s = meta.query_selector(q_rq);
            let acc = meta.query_advice(acc, Rotation::cur());
            let out = meta.query_advice(out, Rotation::cur());
            let qv = meta.query_advice(q, Rotation::cur());
            let hv = meta.query_advice(h, Rotation::cur());
            let l: Vec<Expression<Fp>> = match limbs2 {
                None => (0..4)
                    .map(|i| meta.query_advice(limbs, Rotation(i)))
                    .collect(),
                Some(r2) => [(limbs, 0), (limbs, 1), (r2, 0), (r2, 1)]
                    .map(|(c, i)| meta.query_advice(c, Rotation(i)))
                    .to_vec(),
            };
            let pow = meta.query_fixed(pow);
            let f0 = meta.query_fixed(f0);
            let f1 = meta.query_fixed(f1);
            let tag = meta.query_fixed(relu);
            let chk = meta.query_fixed(checked);
            let one = Expression::Constant(Fp::one());
            let limb = Expression::Constant(fe(1 << LIMB_BITS));
            // The quotient: `q` on checked rows, the output cell on unchecked rows.
            let quot = chk.clone() * qv.clone() + (one.clone() - chk.clone()) * out.clone();
            vec![
                s.clone() * (acc - quot * pow - l[0].clone() - limb * l[1].clone()),
                s.clone() * (l[2].clone() - f0 * l[0].clone()),
                s.clone() * (l[3].clone() - f1 * l[1].clone()),
                s * chk * (tag.clone() * (out.clone() - hv) + (one - tag) * (out - qv)),
            ]
        });
        meta.lookup(|meta| {
            vec![
                (meta.query_advice(q, Rotation::cur()), table.t_in),
                (meta.query_advice(h, Rotation::cur()), table.t_relu),
            ]
        });
        meta.lookup(|meta| vec![(meta.query_advice(limbs, Rotation::cur()), table.t_byte)]);
        if let Some(r2) = limbs2 {
            meta.lookup(|meta| vec![(meta.query_advice(r2, Rotation::cur()), table.t_byte)]);
            // Keep the four queries of `R` (rotations 0..3) of the 4-row layout: halo2 derives
            // the number of blinding rows from the most-queried column, and the weight link
            // assumes the same `UNUSABLE_ROWS` in every layout. (A constraint that always holds.)
            meta.create_gate("blinding rows", |meta| {
                let r2 = meta.query_advice(limbs, Rotation(2));
                let r3 = meta.query_advice(limbs, Rotation(3));
                vec![Expression::Constant(Fp::zero()) * (r2 + r3)]
            });
        }
        RequantConfig {
            acc,
            out,
            q,
            h,
            limbs,
            limbs2,
            pow,
            f0,
            f1,
            relu,
            checked,
            q_rq,
        }
    }

    /// Rescales the accumulator cell at `row` (uses rows `row..row + 4`, or `row..row + 2`
    /// with a second limb column); returns the output cell. `tweak` lets tests corrupt the
    /// witness.
    #[allow(clippy::too_many_arguments)]
    pub fn assign(
        &self,
        region: &mut Region<'_, Fp>,
        row: usize,
        acc: &AssignedCell<Fp, Fp>,
        acc_value: Value<i64>,
        shift: u32,
        relu: bool,
        checked: bool,
        tweak: &dyn Fn(Requant) -> Requant,
    ) -> Result<(AssignedCell<Fp, Fp>, Value<i64>), Error> {
        self.q_rq.enable(region, row)?;
        let (f0, f1) = limb_factors(shift);
        region.assign_fixed(|| "2^shift", self.pow, row, || Value::known(fe(1 << shift)))?;
        region.assign_fixed(|| "f0", self.f0, row, || Value::known(fe(f0)))?;
        region.assign_fixed(|| "f1", self.f1, row, || Value::known(fe(f1)))?;
        region.assign_fixed(
            || "relu",
            self.relu,
            row,
            || Value::known(fe(i64::from(relu))),
        )?;
        region.assign_fixed(
            || "checked",
            self.checked,
            row,
            || Value::known(fe(i64::from(checked))),
        )?;
        acc.copy_advice(|| "acc", region, self.acc, row)?;
        let w = acc_value.map(|a| tweak(requant(a, shift, relu)));
        let (qv, hv) = if checked {
            (w.map(|w| fe(w.q)), w.map(|w| fe(w.h)))
        } else {
            (Value::known(Fp::zero()), Value::known(Fp::zero()))
        };
        region.assign_advice(|| "q", self.q, row, || qv)?;
        region.assign_advice(|| "h", self.h, row, || hv)?;
        let cells = match self.limbs2 {
            None => [
                (self.limbs, 0),
                (self.limbs, 1),
                (self.limbs, 2),
                (self.limbs, 3),
            ],
            Some(r2) => [(self.limbs, 0), (self.limbs, 1), (r2, 0), (r2, 1)],
        };
        for ((column, i), f) in cells.into_iter().zip([
            |w: Requant| w.r0,
            |w: Requant| w.r1,
            |w: Requant| w.u,
            |w: Requant| w.v,
        ]) {
            region.assign_advice(|| "limb", column, row + i, || w.map(|w| fe(f(w))))?;
        }
        let out = region.assign_advice(|| "out", self.out, row, || w.map(|w| fe(w.out)))?;
        Ok((out, w.map(|w| w.out)))
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

    /// `WIDE`: the 2-row layout with a second limb column.
    #[derive(Clone)]
    struct TestCircuit<const WIDE: bool> {
        /// (acc, shift, relu, checked)
        cases: Vec<(i64, u32, bool, bool)>,
        tweak: fn(Requant) -> Requant,
    }

    impl<const WIDE: bool> Circuit<Fp> for TestCircuit<WIDE> {
        type Config = (
            RequantConfig,
            ActTableConfig,
            Column<Advice>,
            Column<Instance>,
        );
        type FloorPlanner = SimpleFloorPlanner;

        fn without_witnesses(&self) -> Self {
            self.clone()
        }

        fn configure(meta: &mut ConstraintSystem<Fp>) -> Self::Config {
            let table = ActTableConfig::configure(meta);
            let cols = [(); 6].map(|_| meta.advice_column());
            let limbs2 = WIDE.then(|| meta.advice_column());
            let inst = meta.instance_column();
            meta.enable_equality(inst);
            meta.enable_equality(cols[5]);
            let rq = RequantConfig::configure(
                meta, cols[0], cols[1], cols[2], cols[3], cols[4], limbs2, &table,
            );
            (rq, table, cols[5], inst)
        }

        fn synthesize(
            &self,
            (rq, table, src, inst): Self::Config,
            mut layouter: impl Layouter<Fp>,
        ) -> Result<(), Error> {
            table.load(&mut layouter)?;
            let outs = layouter.assign_region(
                || "requant",
                |mut region| {
                    let mut outs = Vec::new();
                    let stride = if WIDE { 2 } else { 4 };
                    for (i, &(acc, shift, relu, checked)) in self.cases.iter().enumerate() {
                        let row = stride * i;
                        let cell =
                            region.assign_advice(|| "src", src, row, || Value::known(fe(acc)))?;
                        let (out, _) = rq.assign(
                            &mut region,
                            row,
                            &cell,
                            Value::known(acc),
                            shift,
                            relu,
                            checked,
                            &self.tweak,
                        )?;
                        outs.push(out);
                    }
                    Ok(outs)
                },
            )?;
            for (i, c) in outs.iter().enumerate() {
                layouter.constrain_instance(c.cell(), inst, i)?;
            }
            Ok(())
        }
    }

    fn cases() -> Vec<(i64, u32, bool, bool)> {
        vec![
            (1000, 4, true, true),
            (-1000, 4, true, true),
            (-1000, 4, false, true),
            (32_767, 8, false, true),
            (-32_768, 8, false, true),
            (3_000_000, 15, true, true),
            (-8_388_608, 16, false, true),
            (127, 0, false, true),
            (-128, 0, true, true),
            (77, 7, false, true),
            // unchecked (last layer without ReLU): wide quotients
            (3200, 4, false, false),
            (-1_000_000, 5, false, false),
            (12_345, 0, false, false),
        ]
    }

    fn expected(cases: &[(i64, u32, bool, bool)]) -> Vec<Fp> {
        cases
            .iter()
            .map(|&(a, s, r, _)| fe(requant(a, s, r).out))
            .collect()
    }

    #[test]
    fn requant_accepts_honest_witnesses() {
        let c = TestCircuit::<false> {
            cases: cases(),
            tweak: |w| w,
        };
        let inst = expected(&c.cases);
        MockProver::run(9, &c, vec![inst.clone()])
            .unwrap()
            .assert_satisfied();
        let c = TestCircuit::<true> {
            cases: cases(),
            tweak: |w| w,
        };
        MockProver::run(9, &c, vec![inst])
            .unwrap()
            .assert_satisfied();
    }

    #[test]
    fn requant_rejects_bad_witnesses() {
        rejects_bad_witnesses::<false>();
        rejects_bad_witnesses::<true>();
    }

    fn rejects_bad_witnesses<const WIDE: bool>() {
        let tweaks: [fn(Requant) -> Requant; 5] = [
            // q one lower with the remainder 2^shift larger: the limb range check fails.
            |w| Requant {
                q: w.q - 1,
                r1: w.r1 + 16,
                v: (w.r1 + 16) * 16,
                ..w
            },
            // a wrong output
            |w| Requant {
                out: w.out + 1,
                h: w.h + 1,
                ..w
            },
            // ReLU output on a negative value
            |w| Requant {
                out: w.q,
                h: w.q,
                ..w
            },
            // inconsistent scaled limb
            |w| Requant { u: w.u + 1, ..w },
            // q shifted by 256: the division no longer holds
            |w| Requant { q: w.q + 256, ..w },
        ];
        for (i, t) in tweaks.into_iter().enumerate() {
            for checked in [true, false] {
                if !checked && (i == 2 || i == 4) {
                    continue; // no ReLU and no q cell on unchecked rows
                }
                let c = TestCircuit::<WIDE> {
                    cases: vec![(-1000, 12, checked, checked)],
                    tweak: t,
                };
                let inst = vec![fe(requant(-1000, 12, checked).out)];
                assert!(
                    MockProver::run(9, &c, vec![inst])
                        .unwrap()
                        .verify()
                        .is_err(),
                    "tweak {i} (checked {checked}, wide {WIDE}) was accepted"
                );
            }
        }
    }

    #[test]
    fn requant_rejects_out_of_range_q() {
        // acc = 200·2^4: q = 200 is outside [-128, 127] even though the division is exact.
        let c = TestCircuit::<false> {
            cases: vec![(3200, 4, false, true)],
            tweak: |w| w,
        };
        let inst = vec![fe(200)];
        assert!(
            MockProver::run(9, &c, vec![inst.clone()])
                .unwrap()
                .verify()
                .is_err()
        );
        let c = TestCircuit::<true> {
            cases: vec![(3200, 4, false, true)],
            tweak: |w| w,
        };
        assert!(
            MockProver::run(9, &c, vec![inst])
                .unwrap()
                .verify()
                .is_err()
        );
    }
}
