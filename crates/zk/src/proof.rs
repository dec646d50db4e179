//! Proving and verifying, and the proof file format (`modelhub-proof/2`); keys are in
//! [`crate::keys`].
//!
//! A [`ProofBundle`] is JSON:
//!
//! ```text
//! { "format": "modelhub-proof/2",
//!   "spec":   CircuitSpec (public circuit description; see quant::CircuitSpec),
//!   "public": { "model_digest": hex, 32 bytes: the model this proves (crate::digest),
//!               "input":  [i64]  quantized input,  x_q = round(x · 2^spec.input_scale),
//!               "output": [i64]  quantized output, y = y_q · 2^-(last layer output_scale),
//!               "commitment": hex, spec.lanes compressed Vesta points (32 bytes each) = the
//!                             model's weight commitment recorded at upload,
//!               "job_id": string },
//!   "proof": base64, "link": base64 }
//! ```
//!
//! To verify against the model a verifier expects (its [`ModelDigest`], from the registry or
//! the chain): check `format`; check that `model_digest` is the digest of `spec` and
//! `commitment` and equals the expected one; validate the spec; check `input` ⊂
//! `activation_range` and `output` ⊂ `output_range`; check that the spec's circuit blinds the
//! last `UNUSABLE_ROWS` rows and has `num_advice(lanes)` advice columns (what the weight link
//! assumes); rebuild the verifying key with `keygen_vk` (halo2_proofs 0.4, params pinned by
//! [`crate::commit::Params`]) from the witness-free circuit of the spec; check the link proof
//! ([`crate::commit`]) against the first `spec.lanes` advice commitments of `proof`; and run
//! `verify_proof` (Blake2b transcript, `Challenge255`, IPA over Vesta, `SingleVerifier`) with
//! one instance column `[J, input.., output..]`, where `J` is the job id element (the first 31
//! bytes of SHA-256(job_id) read little-endian), and require the transcript to end exactly
//! where the proof does (no trailing bytes: a proof has one encoding). The proof starts with
//! the advice commitments in column order (32-byte compressed points): 20 with 8 lanes,
//! `2L + 5` with `L > 8` lanes ([`crate::quant::advice_columns`]); the first `L` are the weight
//! columns. There is no verification without an expected digest.

use std::path::Path;

use ff::Field;
use halo2_proofs::{
    plonk::{self, SingleVerifier},
    transcript::{Blake2bRead, Blake2bWrite, Challenge255},
};
use pasta_curves::{EqAffine, Fp};
use rand::SeedableRng;
use rand::rngs::ChaCha20Rng;
use rand_core::Rng;
use serde::{Deserialize, Serialize};

use crate::ZkError;
use crate::circuit::{Witness, check_layout, instance, num_advice, with_circuit};
use crate::commit::{
    Commitment, LinkSecret, LinkStatement, Opening, Params, link_prove, link_verify, linked_point,
    sys_rng,
};
use crate::digest::ModelDigest;
use crate::keys::{Keys, VkSource, internal};
use crate::quant::{ACT_MAX, ACT_MIN, CircuitSpec, QuantizedModel, UNUSABLE_ROWS};

/// The value of [`ProofBundle::format`].
pub const PROOF_FORMAT: &str = "modelhub-proof/2";

/// Formats no longer accepted (they do not name their model).
const OLD_FORMATS: &[&str] = &["modelhub-proof/1"];

/// The public instance of a proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicInstance {
    /// The model proved: [`ModelDigest::of`] `spec` and `commitment`.
    pub model_digest: ModelDigest,
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

impl ProofBundle {
    /// Reads a proof file. A file of an older format is refused with a message naming the
    /// current one.
    pub fn from_json(bytes: &[u8]) -> Result<ProofBundle, ZkError> {
        #[derive(Deserialize)]
        struct Format {
            format: Option<String>,
        }
        let not_a_proof = |e: serde_json::Error| {
            ZkError::Verification(format!("not a proof file ({PROOF_FORMAT}): {e}"))
        };
        let head: Format = serde_json::from_slice(bytes).map_err(not_a_proof)?;
        match head.format.as_deref() {
            Some(PROOF_FORMAT) => serde_json::from_slice(bytes).map_err(not_a_proof),
            Some(old) if OLD_FORMATS.contains(&old) => Err(old_format(old)),
            Some(other) => Err(ZkError::Verification(format!(
                "unknown proof format {other:?} (expected {PROOF_FORMAT})"
            ))),
            None => Err(ZkError::Verification(format!(
                "not a proof file ({PROOF_FORMAT}): no format"
            ))),
        }
    }

    /// The digest of the bundle's own spec and commitment.
    pub fn computed_digest(&self) -> ModelDigest {
        ModelDigest::of(&self.spec, &self.public.commitment)
    }

    /// Checks that the proof is for the model registered with `spec` and `commitment`, saying
    /// which of the two differs. (Verification itself needs only the digest: [`verify`].)
    pub fn check_model(&self, spec: &CircuitSpec, commitment: &Commitment) -> Result<(), ZkError> {
        let spec_differs = self.spec.hash() != spec.hash();
        let commitment_differs = self.public.commitment != *commitment;
        let what = match (spec_differs, commitment_differs) {
            (false, false) => return Ok(()),
            (true, false) => "its circuit spec (layers, scales or activations) differs",
            (false, true) => "its weight commitment differs",
            (true, true) => "its circuit spec and its weight commitment differ",
        };
        Err(ZkError::Verification(format!(
            "the proof is not for the registered model: {what}"
        )))
    }
}

fn old_format(old: &str) -> ZkError {
    ZkError::Verification(format!(
        "proof format {old} is no longer accepted (it does not name the model it proves); \
         fetch the proof again as {PROOF_FORMAT}"
    ))
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
    if keys.spec() != spec || params.k() != spec.k {
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
        keys.pk(),
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
        model_digest: ModelDigest::of(spec, commitment),
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

/// Verifies a proof bundle of the model `expected` (its digest, as registered), with the
/// verifying key rebuilt from `bundle.spec`. A proof of any other model (another spec or another
/// commitment) is refused, however valid in itself.
pub fn verify(
    params: &Params,
    bundle: &ProofBundle,
    expected: &ModelDigest,
) -> Result<(), ZkError> {
    verify_with(params, bundle, expected, VkSource::Keygen)
}

/// [`verify`], with the verifying key from the key files in `key_dir` (the prover's key file
/// for the spec, or a verifying key file, made and stored on first use: see
/// [`crate::keys::verifying_key`]) instead of keygen in every process. For a verifier that
/// sees proofs of a few circuits many times, each in a new process (`modelhub proofs verify`).
pub fn verify_cached(
    params: &Params,
    bundle: &ProofBundle,
    expected: &ModelDigest,
    key_dir: &Path,
) -> Result<(), ZkError> {
    verify_with(
        params,
        bundle,
        expected,
        VkSource::Files {
            dir: key_dir,
            store: true,
        },
    )
}

/// [`verify`], with the verifying key from the proving key file in `key_dir` when there is one
/// ([`Keys::load_or_create`]), else keygen; nothing is written. For the prover's `Verify`,
/// whose callers may send proofs of any circuit: they never make it store files.
pub fn verify_with_prover_keys(
    params: &Params,
    bundle: &ProofBundle,
    expected: &ModelDigest,
    key_dir: &Path,
) -> Result<(), ZkError> {
    verify_with(
        params,
        bundle,
        expected,
        VkSource::Files {
            dir: key_dir,
            store: false,
        },
    )
}

fn verify_with(
    params: &Params,
    bundle: &ProofBundle,
    expected: &ModelDigest,
    vk_source: VkSource<'_>,
) -> Result<(), ZkError> {
    if OLD_FORMATS.contains(&bundle.format.as_str()) {
        return Err(old_format(&bundle.format));
    }
    if bundle.format != PROOF_FORMAT {
        return Err(ZkError::Verification(format!(
            "unknown proof format (expected {PROOF_FORMAT})"
        )));
    }
    let spec = &bundle.spec;
    let public = &bundle.public;
    let computed = bundle.computed_digest();
    if public.model_digest != computed {
        return Err(ZkError::Verification(
            "the proof's model digest is not the digest of its spec and commitment".into(),
        ));
    }
    if computed != *expected {
        return Err(ZkError::Verification(format!(
            "the proof is for model {computed}, not the expected model {expected} (another \
             circuit spec or weight commitment)"
        )));
    }
    spec.validate()?;
    if params.k() != spec.k {
        return Err(ZkError::Verification(format!(
            "the proof needs parameters for k = {}",
            spec.k
        )));
    }
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
    // What the weight link relies on: halo2 blinds exactly the rows the link covers, and the
    // proof's first advice commitments are the weight columns.
    check_layout(spec)?;
    let advice = advice_points(&bundle.proof, spec.lane_count())?;
    let st = statement(spec.hash(), public, &advice);
    // The weight link and the halo2 proof are independent checks: the link (point
    // decompressions and a small multi-scalar multiplication, single-threaded) runs on a second
    // thread while halo2 verifies. A link failure is reported first, as when run in sequence.
    std::thread::scope(|scope| {
        let link = scope.spawn(|| link_verify(params, &st, &bundle.link));
        let proof = verify_plonk(params, bundle, vk_source);
        link.join()
            .unwrap_or_else(|_| Err(ZkError::Internal("link verifier panicked".into())))?;
        proof
    })
}

/// The halo2 part of [`verify`]: the proof against the verifying key rebuilt from the spec.
fn verify_plonk(
    params: &Params,
    bundle: &ProofBundle,
    vk_source: VkSource<'_>,
) -> Result<(), ZkError> {
    let public = &bundle.public;
    let vk = crate::keys::cached_vk(params, &bundle.spec, vk_source)?;
    let inst = instance(&public.job_id, &public.input, &public.output);
    let mut rest = &bundle.proof[..];
    let mut transcript = Blake2bRead::<_, EqAffine, Challenge255<_>>::init(&mut rest);
    plonk::verify_proof(
        &params.inner,
        &vk,
        SingleVerifier::new(&params.inner),
        &[&[&inst]],
        &mut transcript,
    )
    .map_err(|_| ZkError::Verification("the proof does not verify".into()))?;
    // One encoding per proof: bytes after the transcript would make proofs malleable.
    if !rest.is_empty() {
        return Err(ZkError::Verification(format!(
            "{} bytes after the end of the proof",
            rest.len()
        )));
    }
    Ok(())
}
