//! The one lookup table: `(t_in, t_relu, t_byte)` = `(i - 128, max(i - 128, 0), i)` for
//! `i ∈ [0, 256)`. `(t_in, t_relu)` range-checks a rescaled value and gives its ReLU;
//! `t_byte` range-checks the remainder limbs.

use halo2_proofs::{
    circuit::{Layouter, Value},
    plonk::{ConstraintSystem, Error, TableColumn},
};
use pasta_curves::Fp;

use crate::field::fe;
use crate::quant::{ACT_MIN, LIMB_BITS};

#[derive(Debug, Clone, Copy)]
pub struct ActTableConfig {
    pub t_in: TableColumn,
    pub t_relu: TableColumn,
    pub t_byte: TableColumn,
}

impl ActTableConfig {
    pub fn configure(meta: &mut ConstraintSystem<Fp>) -> Self {
        ActTableConfig {
            t_in: meta.lookup_table_column(),
            t_relu: meta.lookup_table_column(),
            t_byte: meta.lookup_table_column(),
        }
    }

    pub fn load(&self, layouter: &mut impl Layouter<Fp>) -> Result<(), Error> {
        layouter.assign_table(
            || "activation table",
            |mut table| {
                for i in 0..(1usize << LIMB_BITS) {
                    let v = i as i64 + ACT_MIN;
                    table.assign_cell(|| "in", self.t_in, i, || Value::known(fe(v)))?;
                    table.assign_cell(|| "relu", self.t_relu, i, || Value::known(fe(v.max(0))))?;
                    table.assign_cell(|| "byte", self.t_byte, i, || Value::known(fe(i as i64)))?;
                }
                Ok(())
            },
        )
    }
}
