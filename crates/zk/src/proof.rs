//! Keys, proving and verifying, and the proof file format (`modelhub-proof/1`).
//!
//! A [`ProofBundle`] is JSON:
//!
//! ```text
//! { "format": "modelhub-proof/1",
//!   "spec":   CircuitSpec (public circuit description; see quant::CircuitSpec),
//!   "public": { "input":  [i64]  quantized input,  x_q = round(x · 2^spec.input_scale),
//!               "output": [i64]  quantized output, y = y_q · 2^-(last layer output_scale),
//!               "commitment": hex, spec.lanes compressed Vesta points (32 bytes each) = the
//!                             model's weight commitment recorded at upload,
//!               "job_id": string },
//!   "proof": base64, "link": base64 }
//! ```
//!
//! To verify: check `format`; validate the spec; check `input` ⊂ `activation_range` and
//! `output` ⊂ `output_range`; rebuild the verifying key with `keygen_vk` (halo2_proofs 0.4,
//! `Params::new(spec.k)`) from the witness-free circuit of the spec; check the link proof
//! ([`crate::commit`]) against the first `spec.lanes` advice commitments of `proof`; and run
//! `verify_proof` (Blake2b transcript, `Challenge255`, IPA over Vesta, `SingleVerifier`) with
//! one instance column `[J, input.., output..]`, where `J` is the job id element (the first 31
//! bytes of SHA-256(job_id) read little-endian). The proof starts with the advice commitments
//! in column order (32-byte compressed points): 20 with 8 lanes, `2L + 5` with `L > 8` lanes
//! ([`crate::quant::advice_columns`]); the first `L` are the weight columns.
//! A verifier must also check that `spec` and `commitment` are the ones registered for the model.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use ff::Field;
use halo2_proofs::{
    plonk::{self, ProvingKey, SingleVerifier, VerifyingKey},
    transcript::{Blake2bRead, Blake2bWrite, Challenge255},
};
use pasta_curves::{EqAffine, Fp};
use rand::SeedableRng;
use rand::rngs::ChaCha20Rng;
use rand_core::Rng;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::ZkError;
use crate::circuit::{Witness, instance, num_advice, with_circuit};
use crate::commit::{
    Commitment, LinkSecret, LinkStatement, Opening, Params, link_prove, link_verify, linked_point,
    sys_rng,
};
use crate::quant::{ACT_MAX, ACT_MIN, CircuitSpec, QuantizedModel, UNUSABLE_ROWS};

/// The value of [`ProofBundle::format`].
pub const PROOF_FORMAT: &str = "modelhub-proof/1";

/// Where [`Keys::load_or_create`] got the keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Read from the file an earlier run stored.
    Disk,
    /// Made by keygen and stored: `stale` is why an existing file was not used, `not_stored`
    /// why the keys could not be stored (they are still good to use).
    Keygen {
        stale: Option<String>,
        not_stored: Option<String>,
    },
}

const KEYS_MAGIC: &[u8; 16] = b"modelhub-keys/1\n";

/// The fingerprint of the sources keygen depends on (computed by build.rs).
fn code_hash() -> [u8; 32] {
    let mut out = [0u8; 32];
    // build.rs always sets 64 hex digits; a failure leaves zeros, which no file matches.
    let _ = hex::decode_to_slice(env!("MODELHUB_ZK_CODE_HASH"), &mut out);
    out
}

fn key_file_error(m: &str) -> ZkError {
    ZkError::Internal(format!("key file: {m}"))
}

/// Checks a key file's envelope (see [`Keys::to_bytes`]) and returns the halo2 proving key in it.
fn open_key_file<'a>(
    params: &Params,
    spec: &CircuitSpec,
    bytes: &'a [u8],
) -> Result<&'a [u8], ZkError> {
    spec.validate()?;
    let header = KEYS_MAGIC.len() + 64;
    if bytes.len() < header + 32 || !bytes.starts_with(KEYS_MAGIC) {
        return Err(key_file_error("not a key file"));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if sha2::Sha256::digest(body).as_slice() != sum {
        return Err(key_file_error("checksum mismatch (corrupt or truncated)"));
    }
    let rest = &body[KEYS_MAGIC.len()..];
    if rest[..32] != code_hash() {
        return Err(key_file_error(
            "written by another build of the circuit code",
        ));
    }
    if rest[32..64] != spec.hash() {
        return Err(key_file_error("made for another circuit spec"));
    }
    if params.k() != spec.k {
        return Err(key_file_error("params for another k"));
    }
    Ok(&rest[64..])
}

fn key_path(dir: &Path, spec: &CircuitSpec) -> std::path::PathBuf {
    dir.join(format!("keys-{}.bin", hex::encode(spec.hash())))
}

/// Proving and verifying keys for one spec.
pub struct Keys {
    spec: CircuitSpec,
    pk: ProvingKey<EqAffine>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("k", &self.spec.k).finish()
    }
}

/// The verifying key of a spec (the circuit of its version and lane count).
fn keygen_vk(params: &Params, spec: &CircuitSpec) -> Result<VerifyingKey<EqAffine>, ZkError> {
    with_circuit!(spec, C => plonk::keygen_vk(
        &params.inner,
        &C { spec: spec.clone(), witness: None },
    ))?
    .map_err(internal("keygen_vk"))
}

fn internal(what: &str) -> impl Fn(plonk::Error) -> ZkError + '_ {
    move |e| ZkError::Internal(format!("{what}: {e}"))
}

impl Keys {
    pub fn new(params: &Params, spec: &CircuitSpec) -> Result<Keys, ZkError> {
        spec.validate()?;
        if params.k() != spec.k {
            return Err(ZkError::Internal(format!(
                "params have k = {}, the spec needs k = {}",
                params.k(),
                spec.k
            )));
        }
        let vk = keygen_vk(params, spec)?;
        let pk = with_circuit!(spec, C => plonk::keygen_pk(
            &params.inner,
            vk,
            &C { spec: spec.clone(), witness: None },
        ))?
        .map_err(internal("keygen_pk"))?;
        Ok(Keys {
            spec: spec.clone(),
            pk,
        })
    }

    /// The keys for `spec`: read from `dir` if an earlier run stored them there (see
    /// [`Keys::read`]), otherwise made by keygen and stored (temp file, then rename). A file
    /// that can't be used (corrupt, truncated, from another build) is replaced. The cache
    /// never fails the caller: why a file was not used, or could not be stored (disk full,
    /// read-only volume), comes back in [`KeySource::Keygen`] for the caller to log.
    pub fn load_or_create(
        params: &Params,
        spec: &CircuitSpec,
        dir: &Path,
    ) -> Result<(Keys, KeySource), ZkError> {
        let path = key_path(dir, spec);
        let stale = match fs::read(&path) {
            Ok(bytes) => match Keys::read(params, spec, &bytes) {
                Ok(keys) => return Ok((keys, KeySource::Disk)),
                Err(e) => Some(e.to_string()),
            },
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                None
            }
            Err(e) => Some(e.to_string()),
        };
        let keys = Keys::new(params, spec)?;
        let not_stored = keys.store(dir, &path).err().map(|e| e.to_string());
        Ok((keys, KeySource::Keygen { stale, not_stored }))
    }

    fn store(&self, dir: &Path, path: &Path) -> Result<(), ZkError> {
        fs::create_dir_all(dir)?;
        // Unique per process and call: two threads may store keys of the same spec at once.
        static STORES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp = dir.join(format!(
            ".keys-{}.{}-{}.tmp",
            hex::encode(self.spec.hash()),
            std::process::id(),
            STORES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let written = fs::write(&tmp, self.to_bytes()?)
            .and_then(|()| fs::File::open(&tmp)?.sync_all())
            .and_then(|()| fs::rename(&tmp, path));
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        Ok(written?)
    }

    /// The keys as a self-checking file (format `modelhub-keys/1`):
    ///
    /// ```text
    /// "modelhub-keys/1\n" · code hash (32) · spec hash (32) · halo2 proving key · SHA-256 of all before (32)
    /// ```
    ///
    /// The proving key is halo2_proofs' `ProvingKey::write` (our patch, see
    /// vendor/halo2_proofs/MODELHUB.md); the code hash fingerprints the sources that keygen's
    /// result depends on, so a file made by another build is refused rather than used.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ZkError> {
        let mut out = Vec::with_capacity(1 << 20);
        out.extend_from_slice(KEYS_MAGIC);
        out.extend_from_slice(&code_hash());
        out.extend_from_slice(&self.spec.hash());
        self.pk.write(&mut out)?;
        let sum = sha2::Sha256::digest(&out);
        out.extend_from_slice(&sum);
        Ok(out)
    }

    /// Reads keys written by [`Keys::to_bytes`] for `spec`, checking the file's checksum, the
    /// build that wrote it and the spec it was made for. Nothing is synthesized or committed:
    /// the keys are rebuilt from the stored commitments and column values.
    pub fn read(params: &Params, spec: &CircuitSpec, bytes: &[u8]) -> Result<Keys, ZkError> {
        let mut reader = open_key_file(params, spec, bytes)?;
        let pk = with_circuit!(spec, C => ProvingKey::<EqAffine>::read::<_, C>(
            &mut reader,
            &params.inner,
        ))?
        .map_err(|e| key_file_error(&e.to_string()))?;
        if !reader.is_empty() {
            return Err(key_file_error("trailing bytes"));
        }
        Ok(Keys {
            spec: spec.clone(),
            pk,
        })
    }

    /// Only the verifying key of a key file written by [`Keys::to_bytes`] (what
    /// [`verify_cached`] uses): the envelope is checked as by [`Keys::read`]; halo2's proving
    /// key format starts with its 8-byte magic and then the verifying key
    /// (vendor/halo2_proofs/src/plonk/keyfile.rs).
    pub fn read_verifying_key(
        params: &Params,
        spec: &CircuitSpec,
        bytes: &[u8],
    ) -> Result<VerifyingKey<EqAffine>, ZkError> {
        let pk = open_key_file(params, spec, bytes)?;
        let mut reader = pk.get(8..).ok_or_else(|| key_file_error("truncated"))?;
        with_circuit!(spec, C => VerifyingKey::<EqAffine>::read::<_, C>(
            &mut reader,
            &params.inner,
        ))?
        .map_err(|e| key_file_error(&e.to_string()))
    }

    pub fn spec(&self) -> &CircuitSpec {
        &self.spec
    }

    pub fn vk(&self) -> &VerifyingKey<EqAffine> {
        self.pk.get_vk()
    }

    /// SHA-256 (hex) of the verifying key's pinned description: changes iff the circuit does.
    pub fn fingerprint(&self) -> String {
        hex::encode(sha2::Sha256::digest(
            format!("{:?}", self.vk().pinned()).as_bytes(),
        ))
    }
}

/// The public instance of a proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicInstance {
    /// Quantized input (scale `spec.input_scale`).
    pub input: Vec<i64>,
    /// Quantized output (scale of the last layer's `output_scale`).
    pub output: Vec<i64>,
    pub commitment: Commitment,
    pub job_id: String,
}

/// A proof with everything needed to verify it (the proof file).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProofBundle {
    pub format: String,
    pub spec: CircuitSpec,
    pub public: PublicInstance,
    #[serde(with = "b64")]
    pub proof: Vec<u8>,
    #[serde(with = "b64")]
    pub link: Vec<u8>,
}

impl std::fmt::Debug for ProofBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProofBundle")
            .field("format", &self.format)
            .field("spec", &self.spec)
            .field("public", &self.public)
            .field("proof_bytes", &self.proof.len())
            .field("link_bytes", &self.link.len())
            .finish()
    }
}

mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

/// Proves one prediction: quantizes `input`, runs the integer model and proves it.
pub fn prove(
    params: &Params,
    keys: &Keys,
    model: &QuantizedModel,
    commitment: &Commitment,
    opening: &Opening,
    input: &[f32],
    job_id: &str,
) -> Result<ProofBundle, ZkError> {
    let spec = &model.spec;
    if keys.spec != *spec || params.k() != spec.k {
        return Err(ZkError::Internal(
            "keys or params do not match the model".into(),
        ));
    }
    let input_q = crate::quantize_input(spec, input)?;
    let output_q = crate::reference(model, &input_q)?;
    let inst = instance(job_id, &input_q, &output_q);
    let witness = Witness {
        layers: model.layers.clone(),
        input: input_q.clone(),
    };

    // halo2 draws the unusable-row values and blinds of the advice columns from this rng;
    // the seed lets us replay them for the link proof.
    let mut seed = [0u8; 32];
    sys_rng().fill_bytes(&mut seed);
    let mut transcript = Blake2bWrite::<_, EqAffine, Challenge255<_>>::init(vec![]);
    let rng = ChaCha20Rng::from_seed(seed);
    with_circuit!(spec, C => plonk::create_proof(
        &params.inner,
        &keys.pk,
        &[C { spec: spec.clone(), witness: Some(witness) }],
        &[&[&inst]],
        rng,
        &mut transcript,
    ))?
    .map_err(internal("create_proof"))?;
    let proof = transcript.finalize();

    let lanes = spec.lane_count();
    let columns = num_advice(lanes);
    let mut replay = ChaCha20Rng::from_seed(seed);
    let mut rows: Vec<Vec<Fp>> = Vec::with_capacity(lanes);
    for col in 0..columns {
        let values: Vec<Fp> = (0..UNUSABLE_ROWS)
            .map(|_| Fp::random(&mut replay))
            .collect();
        if col < lanes {
            rows.push(values);
        }
    }
    let blinds: Vec<Fp> = (0..columns).map(|_| Fp::random(&mut replay)).collect();
    let advice = advice_points(&proof, lanes)?;
    let committed = opening.blinds(lanes)?;
    let commitment_points = commitment.decode(lanes)?;
    let mut secrets = Vec::with_capacity(lanes);
    for j in 0..lanes {
        let secret = LinkSecret {
            rows: rows[j].clone(),
            delta: blinds[j] - committed[j],
        };
        // The proof's weight column must be the committed column plus the replayed
        // unusable-row values and blind; otherwise the weights differ from the commitment
        // or halo2 changed how it draws them: either way, no proof.
        if linked_point(params, &commitment_points[j], &secret) != advice[j] {
            return Err(ZkError::Internal(
                "the proof's weight columns do not match the commitment (other weights, or a \
                 changed halo2 prover layout)"
                    .into(),
            ));
        }
        secrets.push(secret);
    }
    let public = PublicInstance {
        input: input_q,
        output: output_q,
        commitment: commitment.clone(),
        job_id: job_id.to_string(),
    };
    let st = statement(spec.hash(), &public, &advice);
    let link = link_prove(params, &st, &secrets, &mut sys_rng());
    Ok(ProofBundle {
        format: PROOF_FORMAT.into(),
        spec: spec.clone(),
        public,
        proof,
        link,
    })
}

fn statement<'a>(
    spec_hash: [u8; 32],
    public: &'a PublicInstance,
    advice: &'a [[u8; 32]],
) -> LinkStatement<'a> {
    LinkStatement {
        spec_hash,
        commitment: &public.commitment,
        advice,
        job_id: &public.job_id,
        input: &public.input,
        output: &public.output,
    }
}

/// The weight-column commitments at the start of a proof of a `lanes`-lane circuit.
fn advice_points(proof: &[u8], lanes: usize) -> Result<Vec<[u8; 32]>, ZkError> {
    if proof.len() < 32 * num_advice(lanes) {
        return Err(ZkError::Verification("proof too short".into()));
    }
    Ok(proof[..32 * lanes]
        .chunks_exact(32)
        .map(|c| {
            let mut p = [0u8; 32];
            p.copy_from_slice(c);
            p
        })
        .collect())
}

/// Verifying keys by spec hash (keygen is deterministic in the spec and `k`).
/// A key file in `key_dir` stands in for keygen (an unusable file is ignored).
fn cached_vk(
    params: &Params,
    spec: &CircuitSpec,
    key_dir: Option<&Path>,
) -> Result<Arc<VerifyingKey<EqAffine>>, ZkError> {
    type Cache = Mutex<HashMap<[u8; 32], Arc<VerifyingKey<EqAffine>>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = spec.hash();
    if let Some(vk) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(vk);
    }
    let stored = key_dir
        .and_then(|dir| fs::read(key_path(dir, spec)).ok())
        .and_then(|bytes| Keys::read_verifying_key(params, spec, &bytes).ok());
    let vk = Arc::new(match stored {
        Some(vk) => vk,
        None => keygen_vk(params, spec)?,
    });
    if let Ok(mut c) = cache.lock() {
        if c.len() >= 64 {
            c.clear();
        }
        c.insert(key, vk.clone());
    }
    Ok(vk)
}

/// Verifies a proof bundle against the verifying key rebuilt from `bundle.spec`.
pub fn verify(params: &Params, bundle: &ProofBundle) -> Result<(), ZkError> {
    verify_with(params, bundle, None)
}

/// [`verify`], taking the verifying key from a key file in `key_dir` (written by
/// [`Keys::load_or_create`]) when there is one for the bundle's spec, instead of keygen.
pub fn verify_cached(params: &Params, bundle: &ProofBundle, key_dir: &Path) -> Result<(), ZkError> {
    verify_with(params, bundle, Some(key_dir))
}

fn verify_with(
    params: &Params,
    bundle: &ProofBundle,
    key_dir: Option<&Path>,
) -> Result<(), ZkError> {
    if bundle.format != PROOF_FORMAT {
        return Err(ZkError::Verification(format!(
            "unknown proof format (expected {PROOF_FORMAT})"
        )));
    }
    let spec = &bundle.spec;
    spec.validate()?;
    if params.k() != spec.k {
        return Err(ZkError::Verification(format!(
            "the proof needs parameters for k = {}",
            spec.k
        )));
    }
    let public = &bundle.public;
    if public.input.len() != spec.input_len() || public.output.len() != spec.output_len() {
        return Err(ZkError::Verification(
            "public input or output has the wrong length".into(),
        ));
    }
    let [min, max] = spec.output_range;
    if public
        .input
        .iter()
        .any(|v| !(ACT_MIN..=ACT_MAX).contains(v))
        || public.output.iter().any(|v| !(min..=max).contains(v))
    {
        return Err(ZkError::Verification("public value out of range".into()));
    }
    let advice = advice_points(&bundle.proof, spec.lane_count())?;
    let st = statement(spec.hash(), public, &advice);
    // The weight link and the halo2 proof are independent checks: the link (point
    // decompressions and a small multi-scalar multiplication, single-threaded) runs on a second
    // thread while halo2 verifies. A link failure is reported first, as when run in sequence.
    std::thread::scope(|scope| {
        let link = scope.spawn(|| link_verify(params, &st, &bundle.link));
        let proof = verify_plonk(params, bundle, key_dir);
        link.join()
            .unwrap_or_else(|_| Err(ZkError::Internal("link verifier panicked".into())))?;
        proof
    })
}

/// The halo2 part of [`verify`]: the proof against the verifying key rebuilt from the spec.
fn verify_plonk(
    params: &Params,
    bundle: &ProofBundle,
    key_dir: Option<&Path>,
) -> Result<(), ZkError> {
    let public = &bundle.public;
    let vk = cached_vk(params, &bundle.spec, key_dir)?;
    let inst = instance(&public.job_id, &public.input, &public.output);
    let mut transcript = Blake2bRead::<_, EqAffine, Challenge255<_>>::init(&bundle.proof[..]);
    plonk::verify_proof(
        &params.inner,
        &vk,
        SingleVerifier::new(&params.inner),
        &[&[&inst]],
        &mut transcript,
    )
    .map_err(|_| ZkError::Verification("the proof does not verify".into()))
}
