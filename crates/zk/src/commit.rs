//! Weight commitments and the link proof that binds each proof's weight columns to them.
//!
//! # Design
//!
//! The weights (and biases) sit in the dedicated advice columns `W_0..W_{L−1}` (`L =
//! spec.lanes`: 8, 16, 32 or 64) at rows fixed by the public spec, zero in every other usable row
//! (`weight_columns`). At upload the hub makes, per column, a blinded Pedersen vector
//! commitment with the same bases halo2 uses for advice columns: `C_j = Σ_i w_{j,i}·L_i +
//! b0_j·H`, where `L_i` are the Lagrange-basis points of the IPA parameters and `H` their
//! blinding generator (`commit_lagrange(column, Blind(b0_j))`, `b0_j` random). The public
//! commitment is the list of the `L` compressed `C_j`.
//!
//! Every halo2 proof starts with its advice commitments in column order, so its first `L`
//! points are `A_j = Σ_{usable i} W_{j,i}·L_i + Σ_{r ∈ R} v_{j,r}·L_r + b_j·H`, with `R` the
//! last `UNUSABLE_ROWS` rows that halo2 fills with random values and `b_j` a random blind,
//! all drawn from the rng passed to `create_proof`. The prover drives that rng from a seed it
//! keeps, replays the draws in halo2's order (per column the unusable-row values, then one blind
//! per column) and recomputes `A_j`; a mismatch with the proof bytes is an error, so a change of
//! halo2's layout cannot silently break the binding.
//!
//! The link proof is a Fiat–Shamir Okamoto proof of knowledge of `(v_{j,r})_r, δ_j` with
//! `A_j − C_j = Σ_{r∈R} v_{j,r}·L_r + δ_j·H` for all `j` at once (one challenge from a
//! domain-separated BLAKE2b hash of the spec hash, the commitment, all `A_j` and nonces `T_j`,
//! the job id and the public input and output).
//!
//! Wire format of `link` (all scalars 32-byte little-endian canonical, points 32-byte
//! compressed): for each column `j = 0..L`: `T_j`, `z_{j,r}` for the `R = 7` last rows in
//! order, `z_{j,H}` — `L` × 9 × 32 bytes: 2304 (8 lanes), 4608 (16), 9216 (32), 18432 (64).
//! Challenge `e = Fp::from_uniform_bytes(BLAKE2b-512, personal "modelhub-zk-link", over
//! "modelhub-zk/link/v1" ‖ SHA-256(spec JSON) ‖ C_0..C_{L−1} ‖ A_0..A_{L−1} ‖ T_0..T_{L−1} ‖
//! u64le(len job id) ‖ job id ‖ u64le(len input) ‖ input as i64le ‖ u64le(len output) ‖ output
//! as i64le)`. The verifier checks `Σ_r z_{j,r}·L_r + z_{j,H}·H = T_j + e·(A_j − C_j)` for
//! every `j` (batched with weights `ρ_j = Fp::from_uniform_bytes(BLAKE2b-512, personal
//! "modelhub-zk-lnkb", e ‖ u64le(j)))`), where `L_r = commit_lagrange(unit vector at row 2^k −
//! 7 + i, Blind(0))` and `H = commit_lagrange(0, Blind(1))`.
//!
//! Binding: halo2 is an argument of knowledge, so a prover that convinces the verifier knows
//! the opening `(W_j, b_j)` of `A_j`; the link proof (special sound) yields `(v, δ)`; with the
//! opening `(w_j, b0_j)` of `C_j` (whoever made `C_j` knows it), `A_j` then has the openings
//! `W_j` and `w_j + v` on the bases `{L_i} ∪ {H}`. Unless they are equal — i.e. the usable rows
//! of the proved column are exactly the committed weights — that is a non-trivial discrete-log
//! relation among independent Pallas/Vesta generators, which is infeasible. Hiding: `C_j` has a
//! uniform blind; each proof uses fresh `v`, `b_j` (halo2's own zero knowledge needs exactly
//! these) and the link proof is honest-verifier zero knowledge, so proofs for many jobs under
//! the same commitment reveal nothing about the weights beyond the public outputs. Cost: one
//! multi-scalar multiplication of `2^k` points per column at upload, and per proof `L`
//! recomputed commitments plus `L·(|R|+1)` scalar multiplications — no hashing of weights in
//! the circuit.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::OnceLock;

use ff::{Field, FromUniformBytes, PrimeField};
use group::{Curve, Group, GroupEncoding};
use halo2_proofs::poly::{EvaluationDomain, commitment::Blind};
use pasta_curves::{Eq, EqAffine, Fp};
use rand_core::Rng;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::ZkError;
use crate::field::fe;
use crate::quant::{LANE_CHOICES, Layout, MAX_K, MIN_K, QuantizedModel, UNUSABLE_ROWS};

/// SHA-256 of `params-k{k}.bin` (halo2's `Params::new(k)` written by `Params::write`) for
/// `k = MIN_K..=MAX_K`: the only parameter files [`Params::load_or_create`] accepts. Checked
/// against freshly made params by the test `params_are_pinned`.
pub const PINNED_PARAMS: [&str; (MAX_K - MIN_K + 1) as usize] = [
    "b7ea13dd3cfe5db384fab28fd90c4ca7327fb20d3fde16c12eb8b3f81538cb62", // k = 9
    "65235f086265cdf98b12514ab36fe9b849198870918d73cd160903ceb0a954dc", // k = 10
    "1eab6f93a080ce41b908d935c04bd2e3ed1ac23f277c15d11c499d56d28fa0f7", // k = 11
    "1b97b06da453b9efb1ae18b9ba77c3d870f22dc72898297d5707e340c3f44865", // k = 12
    "76ebe6b75b5281cb1dcc2eb04888968573758672b521522f62abedf6366bb876", // k = 13
    "1cb278fe4d9cf5325e5cbc710d863c0deca3e961e1b8f6c8736890c43345c461", // k = 14
    "e1fb29749c7bd0870768044d5329b4e293cb2d44dae24db2554605427b19d0dd", // k = 15
    "174780f80c577d968d10bc3f0a8f819e55a96b9e882ffe73c15d55e9f94053e2", // k = 16
    "7c65b8e3d12f2c1054f07c2721da8670d97f0f14c846df6bcf4d390dd62cbceb", // k = 17
    "50645fa7a51508a3fe9e34b5b34ee31bfe6a19891364b682d801b3ca265afe33", // k = 18
];

fn pinned_params(k: u32) -> Result<[u8; 32], ZkError> {
    let unsupported = || ZkError::Internal(format!("k = {k} is not supported"));
    let i = k.checked_sub(MIN_K).ok_or_else(unsupported)? as usize;
    let mut out = [0u8; 32];
    hex::decode_to_slice(PINNED_PARAMS.get(i).ok_or_else(unsupported)?, &mut out)
        .map_err(|_| unsupported())?;
    Ok(out)
}

/// halo2's IPA parameters for one `k` (plus the cached link-proof bases).
pub struct Params {
    pub(crate) inner: halo2_proofs::poly::commitment::Params<EqAffine>,
    basis: OnceLock<Basis>,
}

impl std::fmt::Debug for Params {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Params").field("k", &self.k()).finish()
    }
}

/// `L_r` for the unusable rows and the blinding generator `H`.
pub(crate) struct Basis {
    pub rows: Vec<EqAffine>,
    pub h: EqAffine,
}

impl Params {
    /// Generates parameters (slow: seconds at k = 14; prefer [`Params::load_or_create`]).
    pub fn new(k: u32) -> Result<Params, ZkError> {
        if !(MIN_K..=MAX_K).contains(&k) {
            return Err(ZkError::Internal(format!("k = {k} is not supported")));
        }
        Ok(Params::wrap(halo2_proofs::poly::commitment::Params::new(k)))
    }

    fn wrap(inner: halo2_proofs::poly::commitment::Params<EqAffine>) -> Params {
        Params {
            inner,
            basis: OnceLock::new(),
        }
    }

    /// Reads `dir/params-k{k}.bin`, or generates it and writes it (temp file, then rename).
    /// Either way the file's bytes must have the SHA-256 pinned for `k` ([`PINNED_PARAMS`]):
    /// params with other generators (whose discrete-log relations someone might know) are
    /// refused, never used.
    pub fn load_or_create(dir: &Path, k: u32) -> Result<Params, ZkError> {
        let pinned = pinned_params(k)?;
        let path = dir.join(format!("params-k{k}.bin"));
        if path.exists() {
            let bytes = fs::read(&path)?;
            if <[u8; 32]>::from(Sha256::digest(&bytes)) != pinned {
                return Err(ZkError::Verification(format!(
                    "params-k{k}.bin is not the pinned parameter file for k = {k} (SHA-256 \
                     mismatch); delete it to have it made again"
                )));
            }
            let inner = halo2_proofs::poly::commitment::Params::<EqAffine>::read(&mut &bytes[..])?;
            if inner.k() != k {
                return Err(ZkError::Internal(format!(
                    "cached params have k = {}, expected {k}",
                    inner.k()
                )));
            }
            return Ok(Params::wrap(inner));
        }
        let params = Params::new(k)?;
        let mut bytes = Vec::new();
        params.inner.write(&mut bytes)?;
        if <[u8; 32]>::from(Sha256::digest(&bytes)) != pinned {
            return Err(ZkError::Internal(format!(
                "this build makes params for k = {k} that differ from the pinned ones"
            )));
        }
        fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".params-k{k}.bin.{}.tmp", std::process::id()));
        {
            let mut w = BufWriter::new(fs::File::create(&tmp)?);
            w.write_all(&bytes)?;
            w.flush()?;
            w.get_ref().sync_all()?;
        }
        fs::rename(&tmp, &path)?;
        Ok(params)
    }

    pub fn k(&self) -> u32 {
        self.inner.k()
    }

    pub(crate) fn n(&self) -> usize {
        1usize << self.k()
    }

    /// Pedersen commitment to a column of `2^k` values (the halo2 advice commitment).
    pub(crate) fn commit_column(&self, values: Vec<Fp>, blind: Fp) -> EqAffine {
        let domain = EvaluationDomain::<Fp>::new(1, self.k());
        let poly = domain.lagrange_from_vec(values);
        self.inner.commit_lagrange(&poly, Blind(blind)).to_affine()
    }

    pub(crate) fn basis(&self) -> &Basis {
        self.basis.get_or_init(|| {
            let n = self.n();
            let rows = (n - UNUSABLE_ROWS..n)
                .map(|r| {
                    let mut v = vec![Fp::ZERO; n];
                    v[r] = Fp::ONE;
                    self.commit_column(v, Fp::ZERO)
                })
                .collect();
            let h = self.commit_column(vec![Fp::ZERO; n], Fp::ONE);
            Basis { rows, h }
        })
    }
}

/// The public weight commitment: one compressed point per weight column (`spec.lanes` of them:
/// 8, 16, 32 or 64); hex in JSON.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Commitment {
    points: Vec<[u8; 32]>,
}

impl Commitment {
    pub fn to_hex(&self) -> String {
        self.points.iter().map(hex::encode).collect()
    }

    pub fn from_hex(s: &str) -> Result<Commitment, ZkError> {
        let bytes =
            hex::decode(s).map_err(|_| ZkError::Verification("commitment is not hex".into()))?;
        if !LANE_CHOICES.iter().any(|&l| bytes.len() == 32 * l as usize) {
            return Err(ZkError::Verification(format!(
                "commitment must be 32 bytes per lane ({LANE_CHOICES:?} lanes)"
            )));
        }
        let points = bytes
            .chunks_exact(32)
            .map(|c| {
                let mut p = [0u8; 32];
                p.copy_from_slice(c);
                p
            })
            .collect();
        Ok(Commitment { points })
    }

    /// Number of weight columns committed (the spec's lanes).
    pub fn lanes(&self) -> usize {
        self.points.len()
    }

    pub(crate) fn bytes(&self) -> impl Iterator<Item = &[u8; 32]> {
        self.points.iter()
    }

    /// The points, which must be one per lane of a spec with `lanes` lanes.
    pub(crate) fn decode(&self, lanes: usize) -> Result<Vec<EqAffine>, ZkError> {
        if self.points.len() != lanes {
            return Err(ZkError::Verification(
                "commitment has the wrong size".into(),
            ));
        }
        self.points.iter().map(decode_point).collect()
    }
}

impl std::fmt::Debug for Commitment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Commitment({})", self.to_hex())
    }
}

impl std::fmt::Display for Commitment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Commitment {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Commitment {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Commitment::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// The private opening of a [`Commitment`]: the blind of each column (hex scalars).
/// Keep it sealed: with it and the weights, anyone can prove for this commitment.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opening {
    blinds: Vec<String>,
}

impl std::fmt::Debug for Opening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Opening(..)")
    }
}

impl Opening {
    /// The blinds, which must be one per lane of a spec with `lanes` lanes.
    pub(crate) fn blinds(&self, lanes: usize) -> Result<Vec<Fp>, ZkError> {
        if self.blinds.len() != lanes {
            return Err(ZkError::Internal("opening has the wrong size".into()));
        }
        self.blinds
            .iter()
            .map(|h| {
                let bytes: [u8; 32] = hex::decode(h)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| ZkError::Internal("malformed opening".into()))?;
                decode_scalar(&bytes).map_err(|_| ZkError::Internal("malformed opening".into()))
            })
            .collect()
    }
}

pub(crate) fn decode_point(bytes: &[u8; 32]) -> Result<EqAffine, ZkError> {
    Option::from(EqAffine::from_bytes(bytes))
        .ok_or_else(|| ZkError::Verification("invalid curve point".into()))
}

pub(crate) fn decode_scalar(bytes: &[u8; 32]) -> Result<Fp, ZkError> {
    Option::from(Fp::from_repr(*bytes))
        .ok_or_else(|| ZkError::Verification("invalid scalar".into()))
}

/// The weight columns `W_0..W_{L-1}` (`L = spec.lanes`) of `2^k` rows: biases and weights at
/// the spec's rows.
pub(crate) fn weight_columns(model: &QuantizedModel, n: usize) -> Vec<Vec<Fp>> {
    let mut cols = vec![vec![Fp::ZERO; n]; model.spec.lane_count()];
    let layout = Layout::new(&model.spec);
    for (ll, q) in layout.layers.iter().zip(&model.layers) {
        for blk in &ll.blocks {
            for (l, col) in cols.iter_mut().enumerate() {
                let Some(&o) = blk.outputs.get(l) else {
                    continue;
                };
                col[blk.row] = fe(q.bias[o]);
                for (t, w) in blk.weights.iter().enumerate() {
                    if let Some(w) = w[l] {
                        col[blk.row + 1 + t] = fe(q.weights[w]);
                    }
                }
            }
        }
    }
    cols
}

pub(crate) fn sys_rng() -> rand_core::UnwrapErr<rand::rngs::SysRng> {
    rand_core::UnwrapErr(rand::rngs::SysRng)
}

/// Commits to a model's weights with fresh blinds (at upload).
pub fn commit(model: &QuantizedModel, params: &Params) -> Result<(Commitment, Opening), ZkError> {
    if params.k() != model.spec.k {
        return Err(ZkError::Internal(format!(
            "params have k = {}, the model needs k = {}",
            params.k(),
            model.spec.k
        )));
    }
    let mut rng = sys_rng();
    let lanes = model.spec.lane_count();
    let mut points = Vec::with_capacity(lanes);
    let mut blinds = Vec::with_capacity(lanes);
    for col in weight_columns(model, params.n()) {
        let blind = Fp::random(&mut rng);
        points.push(params.commit_column(col, blind).to_bytes());
        blinds.push(hex::encode(blind.to_repr()));
    }
    Ok((Commitment { points }, Opening { blinds }))
}

/// The commitment `opening` makes for `model`: how an owner checks, on their own machine, that
/// a registered commitment is the one of their weights (`modelhub models check-commitment`).
pub fn recommit(
    model: &QuantizedModel,
    params: &Params,
    opening: &Opening,
) -> Result<Commitment, ZkError> {
    if params.k() != model.spec.k {
        return Err(ZkError::Internal(format!(
            "params have k = {}, the model needs k = {}",
            params.k(),
            model.spec.k
        )));
    }
    let blinds = opening.blinds(model.spec.lane_count()).map_err(|_| {
        ZkError::Verification("the opening does not fit this model's circuit".into())
    })?;
    let points = weight_columns(model, params.n())
        .into_iter()
        .zip(blinds)
        .map(|(col, blind)| params.commit_column(col, blind).to_bytes())
        .collect();
    Ok(Commitment { points })
}

/// The secrets of one column's link: `A_j − C_j = Σ v_r·L_r + δ·H`.
pub(crate) struct LinkSecret {
    pub rows: Vec<Fp>,
    pub delta: Fp,
}

/// The advice commitment a proof must contain for column `j`:
/// `C_j + Σ v_r·L_r + δ·H` (cheap: `|R| + 1` scalar multiplications).
pub(crate) fn linked_point(params: &Params, c: &EqAffine, secret: &LinkSecret) -> [u8; 32] {
    let basis = params.basis();
    (Eq::from(*c) + msm(&basis.rows, &secret.rows) + basis.h * secret.delta)
        .to_affine()
        .to_bytes()
}

/// Everything the link challenge commits to besides the nonces.
pub(crate) struct LinkStatement<'a> {
    pub spec_hash: [u8; 32],
    pub commitment: &'a Commitment,
    pub advice: &'a [[u8; 32]],
    pub job_id: &'a str,
    pub input: &'a [i64],
    pub output: &'a [i64],
}

fn challenge(st: &LinkStatement<'_>, nonces: &[[u8; 32]]) -> Fp {
    let mut h = blake2b_simd::Params::new()
        .hash_length(64)
        .personal(b"modelhub-zk-link")
        .to_state();
    h.update(b"modelhub-zk/link/v1");
    h.update(&st.spec_hash);
    for p in st.commitment.bytes() {
        h.update(p);
    }
    for p in st.advice.iter().chain(nonces) {
        h.update(p);
    }
    h.update(&(st.job_id.len() as u64).to_le_bytes());
    h.update(st.job_id.as_bytes());
    for list in [st.input, st.output] {
        h.update(&(list.len() as u64).to_le_bytes());
        for v in list {
            h.update(&v.to_le_bytes());
        }
    }
    let mut wide = [0u8; 64];
    wide.copy_from_slice(h.finalize().as_bytes());
    Fp::from_uniform_bytes(&wide)
}

const LINK_LANE_BYTES: usize = 32 * (UNUSABLE_ROWS + 2);

/// Proves the link for all columns: bytes `(T_j, z_{j,r}.., z_{j,H})` per column.
pub(crate) fn link_prove(
    params: &Params,
    st: &LinkStatement<'_>,
    secrets: &[LinkSecret],
    rng: &mut impl Rng,
) -> Vec<u8> {
    let basis = params.basis();
    let mut nonces = Vec::with_capacity(secrets.len());
    let mut tees = Vec::with_capacity(secrets.len());
    for _ in secrets {
        let rho: Vec<Fp> = (0..UNUSABLE_ROWS).map(|_| Fp::random(&mut *rng)).collect();
        let sigma = Fp::random(&mut *rng);
        let t = msm(&basis.rows, &rho) + basis.h * sigma;
        tees.push(t.to_affine().to_bytes());
        nonces.push((rho, sigma));
    }
    let e = challenge(st, &tees);
    let mut out = Vec::with_capacity(secrets.len() * LINK_LANE_BYTES);
    for ((s, (rho, sigma)), t) in secrets.iter().zip(nonces).zip(&tees) {
        out.extend_from_slice(t);
        for (r, v) in rho.iter().zip(&s.rows) {
            out.extend_from_slice(&(*r + e * v).to_repr());
        }
        out.extend_from_slice(&(sigma + e * s.delta).to_repr());
    }
    out
}

/// Checks the link proof against the commitment and the proof's advice commitments.
pub(crate) fn link_verify(
    params: &Params,
    st: &LinkStatement<'_>,
    link: &[u8],
) -> Result<(), ZkError> {
    let fail = |m: &str| Err(ZkError::Verification(format!("weight link: {m}")));
    // One link per weight column: `st.advice` holds the proof's first `spec.lanes` advice
    // commitments, and the commitment must have as many points.
    let lanes = st.advice.len();
    if !LANE_CHOICES.iter().any(|&l| l as usize == lanes) || link.len() != lanes * LINK_LANE_BYTES {
        return fail("wrong length");
    }
    let basis = params.basis();
    let commitments = st.commitment.decode(lanes)?;
    let mut tees = Vec::with_capacity(lanes);
    let mut parsed = Vec::with_capacity(lanes);
    for chunk in link.chunks_exact(LINK_LANE_BYTES) {
        let words: Vec<[u8; 32]> = chunk
            .chunks_exact(32)
            .map(|c| {
                let mut w = [0u8; 32];
                w.copy_from_slice(c);
                w
            })
            .collect();
        let t = decode_point(&words[0])?;
        let z: Vec<Fp> = words[1..]
            .iter()
            .map(decode_scalar)
            .collect::<Result<_, _>>()?;
        tees.push(words[0]);
        parsed.push((t, z));
    }
    let e = challenge(st, &tees);
    // All columns at once: Σ_j ρ_j·(Σ_r z_{j,r}·L_r + z_{j,H}·H − T_j − e·(A_j − C_j)) = 0 with
    // per-column weights ρ_j derived from the challenge (a random linear combination), as one
    // multi-scalar multiplication.
    let mut scalars = vec![Fp::ZERO; UNUSABLE_ROWS + 1];
    let mut bases: Vec<EqAffine> = basis.rows.clone();
    bases.push(basis.h);
    for (j, ((t, z), (a, c))) in parsed
        .iter()
        .zip(st.advice.iter().zip(&commitments))
        .enumerate()
    {
        let rho = batch_weight(&e, j);
        for (acc, zi) in scalars.iter_mut().zip(z) {
            *acc += rho * zi;
        }
        scalars.push(-rho);
        bases.push(*t);
        scalars.push(-(rho * e));
        bases.push(decode_point(a)?);
        scalars.push(rho * e);
        bases.push(*c);
    }
    if !bool::from(halo2_proofs::arithmetic::best_multiexp(&scalars, &bases).is_identity()) {
        return fail("the proof's weight columns do not match the commitment");
    }
    Ok(())
}

/// The weight of column `j` in the batched link check.
fn batch_weight(e: &Fp, j: usize) -> Fp {
    let mut h = blake2b_simd::Params::new()
        .hash_length(64)
        .personal(b"modelhub-zk-lnkb")
        .to_state();
    h.update(&e.to_repr());
    h.update(&(j as u64).to_le_bytes());
    let mut wide = [0u8; 64];
    wide.copy_from_slice(h.finalize().as_bytes());
    Fp::from_uniform_bytes(&wide)
}

fn msm(bases: &[EqAffine], scalars: &[Fp]) -> Eq {
    bases
        .iter()
        .zip(scalars)
        .fold(Eq::identity(), |acc, (b, s)| acc + *b * s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_cached_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let a = Params::load_or_create(dir.path(), MIN_K).unwrap();
        assert!(dir.path().join(format!("params-k{MIN_K}.bin")).exists());
        let b = Params::load_or_create(dir.path(), MIN_K).unwrap();
        let (mut wa, mut wb) = (Vec::new(), Vec::new());
        a.inner.write(&mut wa).unwrap();
        b.inner.write(&mut wb).unwrap();
        assert_eq!(wa, wb);
        assert_eq!(b.k(), MIN_K);
        assert!(Params::load_or_create(dir.path(), 40).is_err());

        // A file with other contents (here: another k's params under this name) is refused.
        let other = dir.path().join(format!("params-k{}.bin", MIN_K + 1));
        std::fs::write(&other, &wa).unwrap();
        let err = Params::load_or_create(dir.path(), MIN_K + 1).unwrap_err();
        assert!(err.to_string().contains("pinned"), "{err}");
        // One flipped byte too.
        let mut flipped = wa.clone();
        flipped[100] ^= 1;
        std::fs::write(dir.path().join(format!("params-k{MIN_K}.bin")), &flipped).unwrap();
        assert!(Params::load_or_create(dir.path(), MIN_K).is_err());
    }

    /// The pins are what this build makes (the small sizes every run; all of them with
    /// `--ignored`, which takes about 15 minutes in a debug build here).
    #[test]
    fn params_are_pinned() {
        check_pins(MIN_K..=MIN_K + 1);
    }

    #[test]
    #[ignore = "makes params up to k = 18"]
    fn all_params_are_pinned() {
        check_pins(MIN_K..=MAX_K);
    }

    fn check_pins(ks: std::ops::RangeInclusive<u32>) {
        let made: Vec<(u32, String)> = ks
            .map(|k| {
                let mut bytes = Vec::new();
                Params::new(k).unwrap().inner.write(&mut bytes).unwrap();
                let sum = hex::encode(Sha256::digest(&bytes));
                eprintln!("    \"{sum}\", // k = {k}");
                (k, sum)
            })
            .collect();
        for (k, sum) in made {
            assert_eq!(sum, PINNED_PARAMS[(k - MIN_K) as usize], "k = {k}");
        }
    }

    #[test]
    fn commitment_hex_round_trip() {
        for lanes in LANE_CHOICES {
            let c = Commitment {
                points: vec![Eq::generator().to_affine().to_bytes(); lanes as usize],
            };
            let json = serde_json::to_string(&c).unwrap();
            let back: Commitment = serde_json::from_str(&json).unwrap();
            assert_eq!(back, c);
            assert_eq!(back.lanes(), lanes as usize);
            assert_eq!(back.decode(lanes as usize).unwrap().len(), lanes as usize);
            // A commitment for another lane count is refused where a spec's is expected.
            assert!(back.decode(lanes as usize * 2).is_err());
        }
        assert!(Commitment::from_hex("zz").is_err());
        assert!(Commitment::from_hex("00").is_err());
        // 12 points: no layout has 12 lanes.
        assert!(Commitment::from_hex(&"00".repeat(32 * 12)).is_err());
    }

    #[test]
    fn link_proof_accepts_the_witness_and_rejects_others() {
        let params = Params::new(MIN_K).unwrap();
        for lanes in [8, 16] {
            link_case(&params, lanes);
        }
    }

    fn link_case(params: &Params, lanes: usize) {
        let n = params.n();
        let mut rng = sys_rng();
        let mut commitment = Commitment { points: vec![] };
        let mut advice = vec![];
        let mut secrets = vec![];
        for _ in 0..lanes {
            let w: Vec<Fp> = (0..n).map(|i| fe(i as i64 % 7 - 3)).collect();
            let mut w0 = w.clone();
            w0[n - UNUSABLE_ROWS..]
                .iter_mut()
                .for_each(|v| *v = Fp::ZERO);
            let (b0, b) = (Fp::random(&mut rng), Fp::random(&mut rng));
            let mut wa = w0.clone();
            let rows: Vec<Fp> = (0..UNUSABLE_ROWS).map(|_| Fp::random(&mut rng)).collect();
            wa[n - UNUSABLE_ROWS..].copy_from_slice(&rows);
            commitment
                .points
                .push(params.commit_column(w0, b0).to_bytes());
            advice.push(params.commit_column(wa, b).to_bytes());
            secrets.push(LinkSecret {
                rows,
                delta: b - b0,
            });
        }
        let st = LinkStatement {
            spec_hash: [1; 32],
            commitment: &commitment,
            advice: &advice,
            job_id: "job",
            input: &[1, 2],
            output: &[3],
        };
        let link = link_prove(params, &st, &secrets, &mut rng);
        assert_eq!(link.len(), lanes * LINK_LANE_BYTES);
        link_verify(params, &st, &link).unwrap();
        // Dropping lanes (the statement of a narrower layout) is refused.
        let fewer = LinkStatement {
            advice: &advice[..lanes / 2],
            ..st
        };
        assert!(link_verify(params, &fewer, &link[..link.len() / 2]).is_err());
        let other_job = LinkStatement {
            job_id: "job2",
            ..st
        };
        assert!(link_verify(params, &other_job, &link).is_err());
        let mut bad = link.clone();
        bad[40] ^= 1;
        assert!(link_verify(params, &st, &bad).is_err());
        // The last lane's response.
        let mut bad = link.clone();
        let last = link.len() - 32;
        bad[last] ^= 1;
        assert!(link_verify(params, &st, &bad).is_err());
        // An advice column whose usable rows differ from the committed weights.
        let mut wrong = advice.clone();
        let mut w: Vec<Fp> = (0..n).map(|i| fe(i as i64 % 7 - 3)).collect();
        w[5] += Fp::ONE;
        wrong[lanes - 1] = params.commit_column(w, Fp::ONE).to_bytes();
        let st2 = LinkStatement {
            advice: &wrong,
            ..st
        };
        let link2 = link_prove(params, &st2, &secrets, &mut rng);
        assert!(link_verify(params, &st2, &link2).is_err());
    }
}
