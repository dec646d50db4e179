//! Reading and writing verifying and proving keys (Model Hub patch, see `MODELHUB.md`).
//!
//! Upstream halo2_proofs 0.4 cannot serialize keys (zcash/halo2#443, #449). This module stores
//! what keygen computes expensively and rebuilds the rest:
//!
//! - stored: the commitments to the fixed and permutation columns (the multi-scalar
//!   multiplications of keygen), the selector assignments (to rebuild the compressed constraint
//!   system exactly as keygen did), and for a proving key the fixed columns' and permutation
//!   polynomials' values;
//! - rebuilt: the constraint system, by running the circuit's `configure` and compressing its
//!   selectors again; every coefficient and coset form, by the same FFTs keygen runs.
//!
//! The circuit is never synthesized and nothing is committed to again.
//!
//! Format (integers little-endian):
//!
//! ```text
//! verifying key := "halo2vk1" · k:u32 · n_fixed:u32 · n_fixed × point
//!                  · n_perm:u32 · n_perm × point
//!                  · n_sel:u32 · n_sel × (2^k bits, least significant bit first, zero padded to bytes)
//! proving key   := "halo2pk1" · verifying key · n_fixed × (2^k × scalar) · n_perm × (2^k × scalar)
//! point         := compressed encoding (`GroupEncoding::to_bytes`)
//! scalar        := canonical encoding (`PrimeField::to_repr`)
//! ```
//!
//! Every count is checked against the constraint system of the circuit before anything is
//! allocated, and every point and scalar must be canonical: a truncated or corrupted file reads
//! as an `io::Error`, never as a panic. Integrity against deliberate tampering is the caller's
//! job (the file is a cache of something the caller can recompute).

use std::io;

use group::ff::{FromUniformBytes, PrimeField, WithSmallOrderMulGroup};

use super::{permutation, keygen::create_domain, Circuit, ProvingKey, VerifyingKey};
use crate::arithmetic::CurveAffine;
use crate::helpers::CurveRead;
use crate::poly::{commitment::Params, EvaluationDomain, LagrangeCoeff, Polynomial};

const VK_MAGIC: &[u8; 8] = b"halo2vk1";
const PK_MAGIC: &[u8; 8] = b"halo2pk1";

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn write_u32<W: io::Write>(w: &mut W, v: usize) -> io::Result<()> {
    let v = u32::try_from(v).map_err(|_| invalid("count does not fit in 32 bits"))?;
    w.write_all(&v.to_le_bytes())
}

fn read_u32<R: io::Read>(r: &mut R) -> io::Result<usize> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b) as usize)
}

fn read_magic<R: io::Read>(r: &mut R, magic: &[u8; 8]) -> io::Result<()> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    if &b != magic {
        return Err(invalid("not a halo2 key file of this format"));
    }
    Ok(())
}

/// Reads a count and checks that it is the one the circuit needs.
fn read_count<R: io::Read>(r: &mut R, expected: usize, what: &str) -> io::Result<()> {
    let n = read_u32(r)?;
    if n != expected {
        return Err(invalid(format!(
            "the key has {n} {what}, the circuit has {expected}"
        )));
    }
    Ok(())
}

fn write_points<W: io::Write, C: CurveAffine>(w: &mut W, points: &[C]) -> io::Result<()> {
    write_u32(w, points.len())?;
    for p in points {
        w.write_all(p.to_bytes().as_ref())?;
    }
    Ok(())
}

fn read_points<R: io::Read, C: CurveAffine>(
    r: &mut R,
    expected: usize,
    what: &str,
) -> io::Result<Vec<C>> {
    read_count(r, expected, what)?;
    (0..expected).map(|_| C::read(r)).collect()
}

fn write_values<W: io::Write, F: PrimeField>(
    w: &mut W,
    polys: &[Polynomial<F, LagrangeCoeff>],
) -> io::Result<()> {
    for poly in polys {
        for v in poly.iter() {
            w.write_all(v.to_repr().as_ref())?;
        }
    }
    Ok(())
}

fn read_values<R: io::Read, F: WithSmallOrderMulGroup<3>>(
    r: &mut R,
    domain: &EvaluationDomain<F>,
    count: usize,
) -> io::Result<Vec<Polynomial<F, LagrangeCoeff>>> {
    (0..count)
        .map(|_| {
            let mut poly = domain.empty_lagrange();
            for v in poly.iter_mut() {
                let mut repr = F::Repr::default();
                r.read_exact(repr.as_mut())?;
                *v = Option::from(F::from_repr(repr))
                    .ok_or_else(|| invalid("non-canonical field element"))?;
            }
            Ok(poly)
        })
        .collect()
}

impl<C: CurveAffine> VerifyingKey<C>
where
    C::Scalar: FromUniformBytes<64>,
{
    /// Writes the key in the format of this module.
    pub fn write<W: io::Write>(&self, writer: &mut W) -> io::Result<()> {
        writer.write_all(VK_MAGIC)?;
        writer.write_all(&self.domain.k().to_le_bytes())?;
        write_points(writer, &self.fixed_commitments)?;
        write_points(writer, self.permutation.column_commitments())?;
        write_u32(writer, self.selectors.len())?;
        for selector in &self.selectors {
            let mut bytes = vec![0u8; selector.len().div_ceil(8)];
            for (i, _) in selector.iter().enumerate().filter(|(_, on)| **on) {
                bytes[i / 8] |= 1 << (i % 8);
            }
            writer.write_all(&bytes)?;
        }
        Ok(())
    }

    /// Reads a key written by [`VerifyingKey::write`] for the circuit `ConcreteCircuit` with
    /// `params` (the same `k`). The result equals the key `keygen_vk` makes, as long as the
    /// file was written for this circuit: the caller binds the file to the circuit.
    pub fn read<R: io::Read, ConcreteCircuit: Circuit<C::Scalar>>(
        reader: &mut R,
        params: &Params<C>,
    ) -> io::Result<Self> {
        read_magic(reader, VK_MAGIC)?;
        Self::read_body::<R, ConcreteCircuit>(reader, params)
    }

    fn read_body<R: io::Read, ConcreteCircuit: Circuit<C::Scalar>>(
        reader: &mut R,
        params: &Params<C>,
    ) -> io::Result<Self> {
        let mut k = [0u8; 4];
        reader.read_exact(&mut k)?;
        let k = u32::from_le_bytes(k);
        if k != params.k() {
            return Err(invalid(format!(
                "the key is for k = {k}, the params have k = {}",
                params.k()
            )));
        }
        let (domain, cs, _config) = create_domain::<C, ConcreteCircuit>(params);
        let n = params.n as usize;
        if n < cs.minimum_rows() {
            return Err(invalid("the circuit does not fit in 2^k rows"));
        }
        // The fixed commitments come first, but how many there are depends on the selector
        // compression, which needs the selectors: read the commitments' bytes now, parse later.
        let n_fixed = read_u32(reader)?;
        // Compression turns selectors into at most one fixed column each.
        if n_fixed > cs.num_fixed_columns + cs.num_selectors {
            return Err(invalid("the key has more fixed columns than the circuit"));
        }
        let fixed: Vec<C> = (0..n_fixed)
            .map(|_| C::read(reader))
            .collect::<io::Result<_>>()?;
        let permutation = read_points(reader, cs.permutation.get_columns().len(), "permuted columns")?;
        read_count(reader, cs.num_selectors, "selectors")?;
        let selectors = (0..cs.num_selectors)
            .map(|_| {
                let mut bytes = vec![0u8; n.div_ceil(8)];
                reader.read_exact(&mut bytes)?;
                Ok((0..n).map(|i| bytes[i / 8] >> (i % 8) & 1 == 1).collect())
            })
            .collect::<io::Result<Vec<Vec<bool>>>>()?;
        let (cs, _selector_polys) = cs.compress_selectors(selectors.clone());
        if fixed.len() != cs.num_fixed_columns {
            return Err(invalid(format!(
                "the key has {} fixed columns, the circuit has {}",
                fixed.len(),
                cs.num_fixed_columns
            )));
        }
        Ok(VerifyingKey::from_parts(
            domain,
            fixed,
            permutation::VerifyingKey::from_commitments(permutation),
            cs,
            selectors,
        ))
    }
}

impl<C: CurveAffine> ProvingKey<C>
where
    C::Scalar: FromUniformBytes<64>,
{
    /// Reads only the verifying key at the start of a proving key written by
    /// [`ProvingKey::write`] (for a verifier that has the proving key's file).
    pub fn read_verifying_key<R: io::Read, ConcreteCircuit: Circuit<C::Scalar>>(
        reader: &mut R,
        params: &Params<C>,
    ) -> io::Result<VerifyingKey<C>> {
        read_magic(reader, PK_MAGIC)?;
        VerifyingKey::<C>::read::<R, ConcreteCircuit>(reader, params)
    }

    /// Writes the key in the format of this module (its verifying key included).
    pub fn write<W: io::Write>(&self, writer: &mut W) -> io::Result<()> {
        writer.write_all(PK_MAGIC)?;
        self.vk.write(writer)?;
        write_values(writer, &self.fixed_values)?;
        write_values(writer, self.permutation.permutations())
    }

    /// Reads a key written by [`ProvingKey::write`] for the circuit `ConcreteCircuit` with
    /// `params`; see [`VerifyingKey::read`].
    pub fn read<R: io::Read, ConcreteCircuit: Circuit<C::Scalar>>(
        reader: &mut R,
        params: &Params<C>,
    ) -> io::Result<Self> {
        let vk = Self::read_verifying_key::<R, ConcreteCircuit>(reader, params)?;
        let fixed = read_values(reader, &vk.domain, vk.cs.num_fixed_columns)?;
        let permutations = read_values(reader, &vk.domain, vk.cs.permutation.get_columns().len())?;
        let permutation = permutation::ProvingKey::from_permutations(&vk.domain, permutations);
        Ok(ProvingKey::from_parts(vk, fixed, permutation))
    }
}
