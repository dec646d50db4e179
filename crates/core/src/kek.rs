//! The key-encryption key (KEK) of a deployment, as a ring that can be rotated while the
//! services run.
//!
//! A KEK file holds one base64 key per line. The first is the **current** key: it wraps
//! everything new (data keys, API key secrets, commitment openings). The others only unwrap
//! what was wrapped under them before a rotation. A wrap names the key that made it:
//!
//! ```text
//! 2 | key id (8 bytes) | nonce (12 bytes) | AES-256-GCM(secret, aad)
//! ```
//!
//! (Wraps from before rotation existed start with `1` and name no key; every key is tried.)
//! The key id is the first 8 bytes of SHA-256 over a label and the key: it tells keys apart
//! and says nothing of them.
//!
//! A [`Kek`] loaded from a file follows it, so a rotation needs no restart: it reads the file
//! again when it changed: at once when an unwrap names a key the ring does not hold, and before
//! a wrap (looked at no more than once per [`FOLLOW_INTERVAL`]). The rotation itself
//! (`modelhub admin rotate-kek`, docs/OPERATIONS.md) is: [`stage_new_key`] puts a new key first
//! and keeps the old ones; once every service wraps with it, the services re-wrap what they
//! keep ([`Kek::rewrap`]); [`retire_old_keys`] then drops the old keys.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use aes_gcm::Nonce;
use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{Aead, OsRng, Payload};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

use crate::crypto::{CryptoError, SecretKey, decode_key};

/// A wrap from before key ids: version byte, nonce, ciphertext.
const WRAP_V1: u8 = 1;
/// A wrap that names its key: version byte, key id, nonce, ciphertext.
const WRAP_V2: u8 = 2;
const ID_LEN: usize = 8;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// How stale a followed ring may be before a wrap looks at its file again.
pub const FOLLOW_INTERVAL: Duration = Duration::from_secs(1);

/// What names a key in a wrap.
type KeyId = [u8; ID_LEN];

fn key_id(key: &SecretKey) -> KeyId {
    let digest = Sha256::new()
        .chain_update(b"modelhub kek id\0")
        .chain_update(key.as_bytes())
        .finalize();
    let mut id = [0u8; ID_LEN];
    id.copy_from_slice(&digest[..ID_LEN]);
    id
}

/// The keys, current first.
struct Ring {
    keys: Vec<(KeyId, SecretKey)>,
}

impl Ring {
    fn of(keys: Vec<SecretKey>) -> Ring {
        Ring {
            keys: keys.into_iter().map(|k| (key_id(&k), k)).collect(),
        }
    }

    fn current(&self) -> &(KeyId, SecretKey) {
        &self.keys[0]
    }

    fn find(&self, id: &[u8]) -> Option<&SecretKey> {
        self.keys.iter().find(|(i, _)| i == id).map(|(_, k)| k)
    }
}

/// What a file looked like when it was read: a rename (how it is rewritten) changes the inode.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    modified: Option<std::time::SystemTime>,
    len: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        inode: m.ino(),
        modified: m.modified().ok(),
        len: m.len(),
    })
}

struct Followed {
    path: PathBuf,
    /// When the file was last looked at, and how it looked then.
    seen: Mutex<(Instant, Option<Stamp>)>,
}

/// The deployment's key-encryption keys (see the module docs). Cheap to clone: clones share
/// the ring and follow the same file.
#[derive(Clone)]
pub struct Kek {
    ring: Arc<RwLock<Arc<Ring>>>,
    file: Option<Arc<Followed>>,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek")
            .field("keys", &self.ring().keys.len())
            .field("file", &self.file.as_ref().map(|f| &f.path))
            .finish()
    }
}

impl Kek {
    /// A ring of one key that follows no file.
    pub fn new(key: SecretKey) -> Kek {
        Kek {
            ring: Arc::new(RwLock::new(Arc::new(Ring::of(vec![key])))),
            file: None,
        }
    }

    /// Reads a KEK file, or creates one (mode 0600) with a new key when it does not exist yet.
    pub fn load_or_generate(path: &Path) -> Result<Kek, CryptoError> {
        if !path.exists() {
            let io = |error| CryptoError::KeyFile {
                path: path.display().to_string(),
                error,
            };
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let mut file = crate::crypto::create_private(path).map_err(io)?;
            let mut text = key_lines(&[SecretKey::generate()]);
            std::io::Write::write_all(&mut file, text.as_bytes()).map_err(io)?;
            file.sync_all().map_err(io)?;
            text.zeroize();
        }
        Kek::load(path)
    }

    /// Reads a KEK file written by [`Kek::load_or_generate`], by a rotation or by an operator,
    /// and follows it. Refuses a file that group or others may read or write: the KEK opens
    /// every model and key secret.
    pub fn load(path: &Path) -> Result<Kek, CryptoError> {
        let seen = stamp(path);
        let ring = read_ring(path)?;
        Ok(Kek {
            ring: Arc::new(RwLock::new(Arc::new(ring))),
            file: Some(Arc::new(Followed {
                path: path.to_owned(),
                seen: Mutex::new((Instant::now(), seen)),
            })),
        })
    }

    fn ring(&self) -> Arc<Ring> {
        self.ring
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads the file again (when it can be read; a bad file leaves the ring as it was).
    fn reload(&self, file: &Followed) {
        let seen = stamp(&file.path);
        match read_ring(&file.path) {
            Ok(ring) => {
                *self.ring.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(ring);
                *file.seen.lock().unwrap_or_else(PoisonError::into_inner) = (Instant::now(), seen);
            }
            Err(error) => {
                tracing::warn!(%error, "the KEK file could not be read again; keeping the keys held")
            }
        }
    }

    /// Reads the file again if it changed: before a wrap, looking at it once per interval
    /// (`now` false); when an unwrap names a key the ring lacks, at once (`now` true).
    fn follow(&self, now: bool) {
        let Some(file) = &self.file else { return };
        let changed = {
            let mut seen = file.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if !now && seen.0.elapsed() < FOLLOW_INTERVAL {
                return;
            }
            let current = stamp(&file.path);
            seen.0 = Instant::now();
            current != seen.1
        };
        if changed {
            self.reload(file);
        }
    }

    /// Wraps a small secret under the current key.
    pub fn wrap(&self, secret: &[u8], aad: &[u8]) -> Vec<u8> {
        self.follow(false);
        let ring = self.ring();
        let (id, key) = ring.current();
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let ct = key
            .cipher()
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: secret, aad })
            .expect("AES-GCM encryption of a small buffer cannot fail");
        let mut out = Vec::with_capacity(1 + ID_LEN + NONCE_LEN + ct.len());
        out.push(WRAP_V2);
        out.extend_from_slice(id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Unwraps what any key of the ring wrapped (reading the file again when the wrap names a
    /// key the ring does not hold).
    pub fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match wrapped.first() {
            Some(&WRAP_V2) if wrapped.len() >= 1 + ID_LEN + NONCE_LEN + TAG_LEN => {
                let (id, rest) = wrapped[1..].split_at(ID_LEN);
                let mut ring = self.ring();
                if ring.find(id).is_none() {
                    self.follow(true);
                    ring = self.ring();
                }
                let key = ring.find(id).ok_or(CryptoError::Unwrap)?;
                open(key, rest, aad)
            }
            Some(&WRAP_V1) if wrapped.len() >= 1 + NONCE_LEN + TAG_LEN => self
                .ring()
                .keys
                .iter()
                .find_map(|(_, key)| open(key, &wrapped[1..], aad).ok())
                .ok_or(CryptoError::Unwrap),
            _ => Err(CryptoError::Unwrap),
        }
    }

    /// Whether `wrapped` was made with the current key (nothing to re-wrap).
    pub fn is_current(&self, wrapped: &[u8]) -> bool {
        wrapped.first() == Some(&WRAP_V2)
            && wrapped.get(1..1 + ID_LEN) == Some(&self.ring().current().0[..])
    }

    /// `wrapped` wrapped again under the current key, or `None` when it already is.
    pub fn rewrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<Option<Vec<u8>>, CryptoError> {
        self.follow(false);
        if self.is_current(wrapped) {
            return Ok(None);
        }
        let mut secret = self.unwrap(wrapped, aad)?;
        let again = self.wrap(&secret, aad);
        secret.zeroize();
        Ok(Some(again))
    }

    /// How many keys the ring holds (1 outside a rotation).
    pub fn key_count(&self) -> usize {
        self.ring().keys.len()
    }

    /// Wraps a data key for one model version (AAD = model id ‖ 0 ‖ version).
    pub fn wrap_dek(&self, dek: &SecretKey, model_id: &str, version: &str) -> Vec<u8> {
        self.wrap(dek.as_bytes(), &crate::crypto::model_aad(model_id, version))
    }

    pub fn unwrap_dek(
        &self,
        wrapped: &[u8],
        model_id: &str,
        version: &str,
    ) -> Result<SecretKey, CryptoError> {
        let mut raw = self.unwrap(wrapped, &crate::crypto::model_aad(model_id, version))?;
        let key = <[u8; 32]>::try_from(raw.as_slice())
            .map(SecretKey::from_bytes)
            .map_err(|_| CryptoError::Unwrap);
        raw.zeroize();
        key
    }
}

/// Counts what a re-wrap sweep of one service did, value by value, into the report the
/// service answers (`ResealSecrets`, `ResealOpenings`).
#[derive(Debug, Default)]
pub struct ResealTally(modelhub_proto::common::v1::ResealReport);

impl ResealTally {
    /// One sealed value: wrapped again under the current key and handed to `store`, which
    /// writes it only if the stored value is still `sealed` (compare-and-set) and says whether
    /// it did. `name` names the value when no key of the ring opens it.
    pub async fn value<E, F, Fut>(
        &mut self,
        kek: &Kek,
        sealed: &[u8],
        aad: &[u8],
        name: impl FnOnce() -> String,
        store: F,
    ) -> Result<(), E>
    where
        F: FnOnce(Vec<u8>) -> Fut,
        Fut: std::future::Future<Output = Result<bool, E>>,
    {
        match kek.rewrap(sealed, aad) {
            Ok(None) => self.0.current += 1,
            Ok(Some(again)) => {
                if store(again).await? {
                    self.0.resealed += 1;
                } else {
                    self.0.changed += 1;
                }
            }
            Err(_) => self.0.unreadable.push(name()),
        }
        Ok(())
    }

    /// A value that went away between the listing and the read.
    pub fn gone(&mut self) {
        self.0.changed += 1;
    }

    /// The report, with the ring as the sweep left it (it follows the file as it goes);
    /// logged as `what` ("API key secrets and data keys", ...).
    pub fn finish(mut self, kek: &Kek, what: &str) -> modelhub_proto::common::v1::ResealReport {
        self.0.keys = u32::try_from(kek.key_count()).unwrap_or(u32::MAX);
        let r = &self.0;
        tracing::warn!(
            resealed = r.resealed,
            current = r.current,
            changed = r.changed,
            unreadable = r.unreadable.len(),
            keys = r.keys,
            "{what} wrapped again under the current KEK"
        );
        self.0
    }
}

fn open(key: &SecretKey, nonce_and_ct: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let (nonce, ct) = nonce_and_ct.split_at(NONCE_LEN);
    key.cipher()
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
        .map_err(|_| CryptoError::Unwrap)
}

/// The keys of a KEK file, current first; the file must be private to its owner.
fn read_keys(path: &Path) -> Result<Vec<SecretKey>, CryptoError> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display().to_string();
    let io = |error| CryptoError::KeyFile {
        path: shown.clone(),
        error,
    };
    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CryptoError::KeyFileMode { path: shown, mode });
    }
    let mut text = std::fs::read_to_string(path).map_err(io)?;
    let keys: Option<Vec<SecretKey>> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(decode_key)
        .collect();
    text.zeroize();
    match keys {
        Some(keys) if !keys.is_empty() => Ok(keys),
        _ => Err(CryptoError::KeyFormat { path: shown }),
    }
}

fn read_ring(path: &Path) -> Result<Ring, CryptoError> {
    read_keys(path).map(Ring::of)
}

fn key_lines(keys: &[SecretKey]) -> String {
    keys.iter()
        .map(|k| URL_SAFE_NO_PAD.encode(k.as_bytes()) + "\n")
        .collect()
}

/// Replaces a KEK file whole (mode 0600, renamed into place, synced).
fn write_keys(path: &Path, keys: &[SecretKey]) -> Result<(), CryptoError> {
    let mut text = key_lines(keys);
    let written = crate::fs::write_durably(path, text.as_bytes());
    text.zeroize();
    written.map_err(|error| CryptoError::KeyFile {
        path: path.display().to_string(),
        error,
    })
}

/// The first step of a rotation: puts a new key first in the file and keeps the others.
/// `false` when a rotation is already under way (the file holds more than one key): nothing
/// is changed, so a rotation cut short is resumed, not started again.
pub fn stage_new_key(path: &Path) -> Result<bool, CryptoError> {
    let mut keys = read_keys(path)?;
    if keys.len() > 1 {
        return Ok(false);
    }
    keys.insert(0, SecretKey::generate());
    write_keys(path, &keys)?;
    Ok(true)
}

/// The last step of a rotation: keeps only the current key. Whatever is still wrapped under
/// another key can't be unwrapped afterwards: re-wrap everything first.
pub fn retire_old_keys(path: &Path) -> Result<usize, CryptoError> {
    let mut keys = read_keys(path)?;
    let retired = keys.len() - 1;
    keys.truncate(1);
    write_keys(path, &keys)?;
    Ok(retired)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_kek(dir: &Path) -> (PathBuf, Kek) {
        let path = dir.join("kek");
        (path.clone(), Kek::load_or_generate(&path).unwrap())
    }

    #[test]
    fn wraps_bind_their_aad_and_name_their_key() {
        let kek = Kek::new(SecretKey::generate());
        let wrapped = kek.wrap(b"secret", b"aad");
        assert_eq!(wrapped[0], WRAP_V2);
        assert!(kek.is_current(&wrapped));
        assert_eq!(kek.unwrap(&wrapped, b"aad").unwrap(), b"secret");
        assert!(kek.unwrap(&wrapped, b"other").is_err());
        let stranger = Kek::new(SecretKey::generate());
        assert!(stranger.unwrap(&wrapped, b"aad").is_err());
        assert!(kek.unwrap(&wrapped[..20], b"aad").is_err());
        assert!(kek.unwrap(&[], b"aad").is_err());
    }

    #[test]
    fn wraps_from_before_key_ids_still_unwrap_and_are_rewrapped() {
        let key = SecretKey::generate();
        // A version-1 wrap, as the code before rotation made it.
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let ct = key
            .cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: b"old",
                    aad: b"aad",
                },
            )
            .unwrap();
        let old = [&[WRAP_V1][..], &nonce, &ct].concat();
        let kek = Kek::new(key);
        assert_eq!(kek.unwrap(&old, b"aad").unwrap(), b"old");
        assert!(!kek.is_current(&old));
        let again = kek.rewrap(&old, b"aad").unwrap().unwrap();
        assert!(kek.is_current(&again));
        assert_eq!(kek.unwrap(&again, b"aad").unwrap(), b"old");
        assert_eq!(kek.rewrap(&again, b"aad").unwrap(), None);
    }

    #[test]
    fn a_running_ring_follows_a_rotation_of_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, service) = file_kek(dir.path());
        let before = service.wrap(b"dek", b"m1");

        // Stage: the file gets a new current key; a second stage is a no-op (resumed).
        assert!(stage_new_key(&path).unwrap());
        assert!(!stage_new_key(&path).unwrap());
        let operator = Kek::load(&path).unwrap();
        assert_eq!(operator.key_count(), 2);
        let after = operator.wrap(b"new", b"m2");
        // The service has not looked at its file yet, but an unwrap naming a key it lacks
        // reads it again.
        assert_eq!(service.unwrap(&after, b"m2").unwrap(), b"new");
        assert_eq!(service.key_count(), 2);
        // Once it has followed the file, it wraps with the new key.
        std::thread::sleep(FOLLOW_INTERVAL);
        let fresh = service.wrap(b"x", b"m3");
        assert!(operator.is_current(&fresh));

        // Re-wrap what was wrapped before, then retire the old key.
        let rewrapped = operator.rewrap(&before, b"m1").unwrap().unwrap();
        assert_eq!(retire_old_keys(&path).unwrap(), 1);
        let retired = Kek::load(&path).unwrap();
        assert_eq!(retired.key_count(), 1);
        assert_eq!(retired.unwrap(&rewrapped, b"m1").unwrap(), b"dek");
        assert!(
            retired.unwrap(&before, b"m1").is_err(),
            "the old key is gone"
        );
    }

    #[test]
    fn a_key_file_must_be_private_and_well_formed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = file_kek(dir.path());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Kek::load(&path),
            Err(CryptoError::KeyFileMode { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "not a key\n").unwrap();
        assert!(matches!(
            Kek::load(&path),
            Err(CryptoError::KeyFormat { .. })
        ));
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            Kek::load(&path),
            Err(CryptoError::KeyFormat { .. })
        ));
    }
}
