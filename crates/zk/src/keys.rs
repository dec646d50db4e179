//! Proving and verifying keys, and their files on disk.
//!
//! Keygen is deterministic in the circuit spec (and the code), so keys are a cache: made once
//! per spec, stored, and read back after a restart instead of running keygen again. Two files,
//! both sealed the same way (see [`seal`]):
//!
//! - `keys-<spec hash>.bin` (`modelhub-keys/1`): the proving key, verifying key included
//!   ([`Keys::load_or_create`], the prover);
//! - `vk-<spec hash>.bin` (`modelhub-vkey/1`): a verifying key alone ([`verifying_key`], for a
//!   verifier that has no proving key, such as `modelhub proofs verify`).
//!
//! Key (de)serialization is our patch of halo2_proofs (vendor/halo2_proofs/MODELHUB.md).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use halo2_proofs::plonk::{self, ProvingKey, VerifyingKey};
use pasta_curves::EqAffine;
use sha2::{Digest, Sha256};

use crate::ZkError;
use crate::circuit::with_circuit;
use crate::commit::Params;
use crate::quant::CircuitSpec;

const KEYS_MAGIC: &[u8; 16] = b"modelhub-keys/1\n";
const VK_MAGIC: &[u8; 16] = b"modelhub-vkey/1\n";

/// Where a key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Read from the file an earlier run stored.
    Disk,
    /// Made by keygen and stored: `stale` is why an existing file was not used, `not_stored`
    /// why the key could not be stored (it is still good to use).
    Keygen {
        stale: Option<String>,
        not_stored: Option<String>,
    },
}

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

/// A key file: `magic (16) · code hash (32) · spec hash (32) · body · SHA-256 of all before (32)`.
/// The code hash fingerprints the sources keygen's result depends on, so a file made by another
/// build is refused rather than used; the spec hash ties it to one circuit.
fn seal(magic: &[u8; 16], spec: &CircuitSpec, body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 112);
    out.extend_from_slice(magic);
    out.extend_from_slice(&code_hash());
    out.extend_from_slice(&spec.hash());
    out.extend_from_slice(&body);
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out
}

/// Checks a file sealed by [`seal`] for `spec` and returns its body.
fn open<'a>(
    magic: &[u8; 16],
    params: &Params,
    spec: &CircuitSpec,
    bytes: &'a [u8],
) -> Result<&'a [u8], ZkError> {
    spec.validate()?;
    if bytes.len() < magic.len() + 64 + 32 || !bytes.starts_with(magic) {
        return Err(key_file_error("not a key file of this kind"));
    }
    let (sealed, sum) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(sealed).as_slice() != sum {
        return Err(key_file_error("checksum mismatch (corrupt or truncated)"));
    }
    let rest = &sealed[magic.len()..];
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

/// A verifying key file's key (`modelhub-vkey/1`, body: halo2's `VerifyingKey::write`).
fn read_vk_file(
    params: &Params,
    spec: &CircuitSpec,
    bytes: &[u8],
) -> Result<VerifyingKey<EqAffine>, ZkError> {
    let mut reader = open(VK_MAGIC, params, spec, bytes)?;
    let vk = with_circuit!(spec, C => VerifyingKey::<EqAffine>::read::<_, C>(
        &mut reader,
        &params.inner,
    ))?
    .map_err(|e| key_file_error(&e.to_string()))?;
    if !reader.is_empty() {
        return Err(key_file_error("trailing bytes"));
    }
    Ok(vk)
}

fn file_path(dir: &Path, prefix: &str, spec: &CircuitSpec) -> PathBuf {
    dir.join(format!("{prefix}-{}.bin", hex::encode(spec.hash())))
}

/// Why an existing file at `path` can't be used (`None`: there is none), or what `read` made of it.
fn read_file<T>(
    path: &Path,
    read: impl FnOnce(&[u8]) -> Result<T, ZkError>,
) -> Result<T, Option<String>> {
    match fs::read(path) {
        Ok(bytes) => read(&bytes).map_err(|e| Some(e.to_string())),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            Err(None)
        }
        Err(e) => Err(Some(e.to_string())),
    }
}

/// Writes `bytes` to `path` whole or not at all (a temp file, fsync, a rename); the error
/// says why not.
fn store(path: &Path, bytes: &[u8]) -> Option<String> {
    modelhub_core::fs::write_durably(path, bytes)
        .err()
        .map(|e| format!("storing {}: {e}", path.display()))
}

/// The verifying key of a spec (the circuit of its version and lane count).
fn keygen_vk(params: &Params, spec: &CircuitSpec) -> Result<VerifyingKey<EqAffine>, ZkError> {
    with_circuit!(spec, C => plonk::keygen_vk(
        &params.inner,
        &C { spec: spec.clone(), witness: None },
    ))?
    .map_err(internal("keygen_vk"))
}

pub(crate) fn internal(what: &str) -> impl Fn(plonk::Error) -> ZkError + '_ {
    move |e| ZkError::Internal(format!("{what}: {e}"))
}

/// Where a verification gets its verifying key when it is not in memory.
#[derive(Debug, Clone, Copy)]
pub(crate) enum VkSource<'a> {
    /// Keygen from the spec.
    Keygen,
    /// The key files in `dir` ([`verifying_key`] if `store`, else only the prover's key file),
    /// keygen otherwise.
    Files { dir: &'a Path, store: bool },
}

/// The verifying key for `spec` from `dir`: from the prover's key file if there is one, else
/// from a verifying key file, else made by keygen and stored as a verifying key file (an
/// unusable file is replaced). The key files are a cache of what keygen makes from the public
/// spec, trusted like the params beside them.
pub fn verifying_key(
    params: &Params,
    spec: &CircuitSpec,
    dir: &Path,
) -> Result<(VerifyingKey<EqAffine>, KeySource), ZkError> {
    if let Some(vk) = prover_vk(params, spec, dir) {
        return Ok((vk, KeySource::Disk));
    }
    let path = file_path(dir, "vk", spec);
    let stale = match read_file(&path, |b| read_vk_file(params, spec, b)) {
        Ok(vk) => return Ok((vk, KeySource::Disk)),
        Err(stale) => stale,
    };
    let vk = keygen_vk(params, spec)?;
    let mut body = Vec::new();
    vk.write(&mut body)?;
    let not_stored = store(&path, &seal(VK_MAGIC, spec, body));
    Ok((vk, KeySource::Keygen { stale, not_stored }))
}

/// The verifying key in the prover's key file for `spec` in `dir`, if there is a usable one.
fn prover_vk(params: &Params, spec: &CircuitSpec, dir: &Path) -> Option<VerifyingKey<EqAffine>> {
    read_file(&file_path(dir, "keys", spec), |b| {
        Keys::read_verifying_key(params, spec, b)
    })
    .ok()
}

/// Verifying keys by spec hash, in memory (keygen is deterministic in the spec and `k`); on a
/// miss, from `source`.
pub(crate) fn cached_vk(
    params: &Params,
    spec: &CircuitSpec,
    source: VkSource<'_>,
) -> Result<Arc<VerifyingKey<EqAffine>>, ZkError> {
    type Cache = Mutex<HashMap<[u8; 32], Arc<VerifyingKey<EqAffine>>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = spec.hash();
    if let Some(vk) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(vk);
    }
    let vk = Arc::new(match source {
        VkSource::Files { dir, store: true } => verifying_key(params, spec, dir)?.0,
        VkSource::Files { dir, store: false } => match prover_vk(params, spec, dir) {
            Some(vk) => vk,
            None => keygen_vk(params, spec)?,
        },
        VkSource::Keygen => keygen_vk(params, spec)?,
    });
    if let Ok(mut c) = cache.lock() {
        if c.len() >= 64 {
            c.clear();
        }
        c.insert(key, vk.clone());
    }
    Ok(vk)
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

impl Keys {
    /// Keygen.
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
        let path = file_path(dir, "keys", spec);
        let stale = match read_file(&path, |b| Keys::read(params, spec, b)) {
            Ok(keys) => return Ok((keys, KeySource::Disk)),
            Err(stale) => stale,
        };
        let keys = Keys::new(params, spec)?;
        let not_stored = store(&path, &keys.to_bytes()?);
        Ok((keys, KeySource::Keygen { stale, not_stored }))
    }

    /// The keys as a key file (`modelhub-keys/1`, sealed as described in the module docs)
    /// whose body is halo2_proofs' `ProvingKey::write` (our patch).
    pub fn to_bytes(&self) -> Result<Vec<u8>, ZkError> {
        let mut body = Vec::with_capacity(1 << 20);
        self.pk.write(&mut body)?;
        Ok(seal(KEYS_MAGIC, &self.spec, body))
    }

    /// Reads keys written by [`Keys::to_bytes`] for `spec`, checking the file's checksum, the
    /// build that wrote it and the spec it was made for. Nothing is synthesized or committed:
    /// the keys are rebuilt from the stored commitments and column values.
    pub fn read(params: &Params, spec: &CircuitSpec, bytes: &[u8]) -> Result<Keys, ZkError> {
        let mut reader = open(KEYS_MAGIC, params, spec, bytes)?;
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

    /// Only the verifying key of a key file written by [`Keys::to_bytes`] (halo2's proving key
    /// format starts with its verifying key).
    pub fn read_verifying_key(
        params: &Params,
        spec: &CircuitSpec,
        bytes: &[u8],
    ) -> Result<VerifyingKey<EqAffine>, ZkError> {
        let mut reader = open(KEYS_MAGIC, params, spec, bytes)?;
        with_circuit!(spec, C => ProvingKey::<EqAffine>::read_verifying_key::<_, C>(
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

    pub(crate) fn pk(&self) -> &ProvingKey<EqAffine> {
        &self.pk
    }

    /// SHA-256 (hex) of the verifying key's pinned description: changes iff the circuit does.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.vk())
    }
}

/// SHA-256 (hex) of a verifying key's pinned description.
pub fn fingerprint(vk: &VerifyingKey<EqAffine>) -> String {
    hex::encode(Sha256::digest(format!("{:?}", vk.pinned()).as_bytes()))
}
