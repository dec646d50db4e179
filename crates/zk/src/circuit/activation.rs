//! The table-activation chip (spec version 2): `Sigmoid` and `Tanh` by one lookup per value.
//!
//! The lookup table `(t_tag, t_x, t_y)` holds a zero row `(0, 0, 0)` and, for the `t`-th table
//! layer of the spec (`t = 1, 2, ..`), the rows `(t, x, table_t[x + 128])` for every
//! `x ∈ [-128, 127]`, where `table_t` is that layer's public table ([`LayerSpec::table`]); it is
//! a fixed column, so the verifying key depends on the tables (which are part of the spec).
//!
//! One row per value: `X` = the input (copy-constrained to the previous layer's output cell or
//! the instance), `A_0` = the output, the fixed `tag` = `t`, and a selector `s`; the lookup
//! `(tag, s·X, s·A_0) ∈ (t_tag, t_x, t_y)` forces `A_0 = table_t[X + 128]` on selected rows and
//! an input in the table's domain (anything else has no row: no proof), and is `(0, 0, 0)` on
//! every other row. `tag` is fixed by the spec, so a prover cannot use another layer's table.
//!
//! [`LayerSpec::table`]: crate::quant::LayerSpec::table

use halo2_proofs::{
    circuit::{Layouter, Region, Value},
    plonk::{Advice, Column, ConstraintSystem, Error, Fixed, Selector, TableColumn},
    poly::Rotation,
};
use pasta_curves::Fp;

use super::dense::{DenseInput, IntCell};
use crate::field::fe;
use crate::quant::{ACT_MIN, TABLE_LEN};

#[derive(Debug, Clone)]
pub struct ActConfig {
    pub x: Column<Advice>,
    pub y: Column<Advice>,
    tag: Column<Fixed>,
    q_act: Selector,
    t_tag: TableColumn,
    t_x: TableColumn,
    t_y: TableColumn,
}

impl ActConfig {
    /// `x` and `y` need equality enabled.
    pub fn configure(
        meta: &mut ConstraintSystem<Fp>,
        x: Column<Advice>,
        y: Column<Advice>,
    ) -> Self {
        let tag = meta.fixed_column();
        let q_act = meta.complex_selector();
        let (t_tag, t_x, t_y) = (
            meta.lookup_table_column(),
            meta.lookup_table_column(),
            meta.lookup_table_column(),
        );
        meta.lookup(|meta| {
            let s = meta.query_selector(q_act);
            let tv = meta.query_fixed(tag);
            let xv = meta.query_advice(x, Rotation::cur());
            let yv = meta.query_advice(y, Rotation::cur());
            vec![(tv, t_tag), (s.clone() * xv, t_x), (s * yv, t_y)]
        });
        ActConfig {
            x,
            y,
            tag,
            q_act,
            t_tag,
            t_x,
            t_y,
        }
    }

    /// Loads the zero row and the tables (tag `t + 1` for `tables[t]`).
    pub fn load(&self, layouter: &mut impl Layouter<Fp>, tables: &[&[i64]]) -> Result<(), Error> {
        layouter.assign_table(
            || "activation tables",
            |mut t| {
                let mut row = 0;
                let mut put = |tag: u64, x: i64, y: i64| -> Result<(), Error> {
                    t.assign_cell(|| "tag", self.t_tag, row, || Value::known(Fp::from(tag)))?;
                    t.assign_cell(|| "x", self.t_x, row, || Value::known(fe(x)))?;
                    t.assign_cell(|| "y", self.t_y, row, || Value::known(fe(y)))?;
                    row += 1;
                    Ok(())
                };
                put(0, 0, 0)?;
                for (i, table) in tables.iter().enumerate() {
                    if table.len() != TABLE_LEN {
                        return Err(Error::Synthesis);
                    }
                    for (j, &y) in table.iter().enumerate() {
                        put(i as u64 + 1, j as i64 + ACT_MIN, y)?;
                    }
                }
                Ok(())
            },
        )
    }

    /// Assigns one table layer (tag `tag`, one row per value in `rows`); returns the output
    /// cells. An input outside the table gets the output 0 (and then no valid proof).
    /// `tweak(o, y)` lets tests corrupt the witness.
    #[allow(clippy::too_many_arguments)]
    pub fn assign(
        &self,
        region: &mut Region<'_, Fp>,
        rows: &[usize],
        tag: u64,
        table: &[i64],
        input: &DenseInput<'_>,
        x: &[Value<i64>],
        tweak: &dyn Fn(usize, i64) -> i64,
    ) -> Result<Vec<IntCell>, Error> {
        let mut out = Vec::with_capacity(rows.len());
        for (o, &row) in rows.iter().enumerate() {
            self.q_act.enable(region, row)?;
            region.assign_fixed(|| "tag", self.tag, row, || Value::known(Fp::from(tag)))?;
            input.copy(region, o, self.x, row)?;
            let xv = *x.get(o).ok_or(Error::Synthesis)?;
            let y = xv.map(|v| {
                let y = usize::try_from(v - ACT_MIN)
                    .ok()
                    .and_then(|i| table.get(i).copied())
                    .unwrap_or(0);
                tweak(o, y)
            });
            let cell = region.assign_advice(|| "y", self.y, row, || y.map(fe))?;
            out.push((cell, y));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use halo2_proofs::{
        circuit::SimpleFloorPlanner,
        dev::MockProver,
        plonk::{Circuit, Instance},
    };

    use super::*;
    use crate::quant::{TABLE_OUTPUT_SCALE, activation_table};
    use crate::shape::LayerKind;

    /// Two table layers side by side over the same instance inputs: a sigmoid (tag 1) and a
    /// tanh (tag 2); outputs exposed as instance if `expose`.
    #[derive(Clone)]
    struct TestCircuit {
        x: Vec<i64>,
        tweak: fn(usize, i64) -> i64,
        expose: bool,
    }

    fn tables() -> [Vec<i64>; 2] {
        [
            activation_table(&LayerKind::Sigmoid, 4, TABLE_OUTPUT_SCALE),
            activation_table(&LayerKind::Tanh, 5, TABLE_OUTPUT_SCALE),
        ]
    }

    impl Circuit<Fp> for TestCircuit {
        type Config = (ActConfig, Column<Instance>);
        type FloorPlanner = SimpleFloorPlanner;

        fn without_witnesses(&self) -> Self {
            self.clone()
        }

        fn configure(meta: &mut ConstraintSystem<Fp>) -> Self::Config {
            let [x, y] = [(); 2].map(|_| meta.advice_column());
            meta.enable_equality(x);
            meta.enable_equality(y);
            let inst = meta.instance_column();
            meta.enable_equality(inst);
            (ActConfig::configure(meta, x, y), inst)
        }

        fn synthesize(
            &self,
            (act, inst): Self::Config,
            mut layouter: impl Layouter<Fp>,
        ) -> Result<(), Error> {
            let [sig, tanh] = tables();
            act.load(&mut layouter, &[&sig, &tanh])?;
            let n = self.x.len();
            let xs: Vec<Value<i64>> = self.x.iter().map(|&v| Value::known(v)).collect();
            let input = DenseInput::Instance {
                column: inst,
                first_row: 0,
            };
            let out = layouter.assign_region(
                || "act",
                |mut region| {
                    let rows: Vec<usize> = (0..n).collect();
                    let mut out =
                        act.assign(&mut region, &rows, 1, &sig, &input, &xs, &|_, y| y)?;
                    let rows: Vec<usize> = (n..2 * n).collect();
                    out.extend(act.assign(
                        &mut region,
                        &rows,
                        2,
                        &tanh,
                        &input,
                        &xs,
                        &self.tweak,
                    )?);
                    Ok(out)
                },
            )?;
            if self.expose {
                for (o, (cell, _)) in out.iter().enumerate() {
                    layouter.constrain_instance(cell.cell(), inst, n + o)?;
                }
            }
            Ok(())
        }
    }

    fn instance(x: &[i64]) -> Vec<Fp> {
        let [sig, tanh] = tables();
        let at = |t: &[i64], v: i64| t[(v - ACT_MIN) as usize];
        x.iter()
            .map(|&v| fe(v))
            .chain(x.iter().map(|&v| fe(at(&sig, v))))
            .chain(x.iter().map(|&v| fe(at(&tanh, v))))
            .collect()
    }

    fn run(c: &TestCircuit, inst: Vec<Fp>) -> bool {
        MockProver::run(10, c, vec![inst]).unwrap().verify().is_ok()
    }

    #[test]
    fn tables_are_monotone_and_saturate() {
        let [sig, tanh] = tables();
        assert_eq!((sig.len(), tanh.len()), (TABLE_LEN, TABLE_LEN));
        assert!(sig.windows(2).all(|w| w[0] <= w[1]));
        assert!(tanh.windows(2).all(|w| w[0] <= w[1]));
        // sigmoid(0) = 0.5 → 64 at scale 7; sigmoid(-8) ≈ 0.0003 → 0; sigmoid(7.9) → 127.
        assert_eq!((sig[128], sig[0], sig[255]), (64, 0, 127));
        // tanh(0) = 0; tanh(±4) saturates at the 8-bit ends.
        assert_eq!((tanh[128], tanh[0], tanh[255]), (0, -128, 127));
        // tanh(1) at x = 32 (scale 5): round(0.7616·128) = 97.
        assert_eq!(tanh[128 + 32], 97);
    }

    #[test]
    fn activation_accepts_honest_witnesses_and_rejects_bad_ones() {
        let x: Vec<i64> = vec![-128, -40, -3, 0, 1, 17, 64, 127];
        let honest = TestCircuit {
            x: x.clone(),
            tweak: |_, y| y,
            expose: true,
        };
        MockProver::run(10, &honest, vec![instance(&x)])
            .unwrap()
            .assert_satisfied();
        // A wrong claimed output.
        let mut inst = instance(&x);
        inst[x.len() + 2] += Fp::one();
        assert!(!run(&honest, inst));
        // A wrong output witness (not the table's value), without the output check.
        let bad = TestCircuit {
            tweak: |o, y| if o == 5 { y + 1 } else { y },
            expose: false,
            ..honest.clone()
        };
        assert!(!run(&bad, instance(&x)));
        // The sigmoid table's value on the tanh rows: the tag is fixed, so the lookup fails.
        let tanh_with_sigmoid_values = TestCircuit {
            tweak: |o, y| {
                // replace the tanh value by the sigmoid value of the same input (x = 64)
                let sig = activation_table(&LayerKind::Sigmoid, 4, TABLE_OUTPUT_SCALE);
                if o == 6 {
                    sig[(64 - ACT_MIN) as usize]
                } else {
                    y
                }
            },
            expose: false,
            ..honest.clone()
        };
        assert!(!run(&tanh_with_sigmoid_values, instance(&x)));
        // An input outside the table's domain (the instance holds 200): no table row.
        let mut far = x.clone();
        far[3] = 200;
        let c = TestCircuit {
            x: far.clone(),
            expose: false,
            ..honest
        };
        let mut inst = instance(&x);
        inst[3] = fe(200);
        assert!(!run(&c, inst));
    }
}
