//! Envelope encryption: a key-encryption key (KEK) wraps a fresh data key (DEK) per model
//! version, and the DEK encrypts the model in segments with AES-256-GCM in the STREAM
//! construction, so truncating, reordering or altering any segment makes decryption fail.
//!
//! Ciphertext layout (`docs/SECURITY.md`):
//! ```text
//! "MHE1" | segment size (u32 BE) | nonce prefix (7 bytes) | segment_0 | ... | segment_last
//! ```
//! Every segment but the last holds exactly `segment size` plaintext bytes plus a 16-byte tag;
//! the last holds the rest (possibly none) and is sealed with STREAM's last-segment flag.

use std::path::Path;

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::stream::{DecryptorBE32, EncryptorBE32};
use aes_gcm::aead::{KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Magic bytes that open every encrypted blob.
pub const MAGIC: &[u8; 4] = b"MHE1";
/// Plaintext bytes per segment.
pub const SEGMENT_SIZE: usize = 64 * 1024;
const TAG: usize = 16;
const PREFIX: usize = 7;
/// Length of the blob header.
pub const HEADER_LEN: usize = 4 + 4 + PREFIX;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("key file {path}: {error}")]
    KeyFile { path: String, error: std::io::Error },
    #[error("key file {path} does not hold a base64 32-byte key")]
    KeyFormat { path: String },
    #[error("key file {path} is open to group or others (mode {mode:o}); run `chmod 600 {path}`")]
    KeyFileMode { path: String, mode: u32 },
    #[error("wrapped key is malformed or was wrapped for another model or by another key")]
    Unwrap,
    #[error("ciphertext header is malformed")]
    Header,
    #[error(
        "ciphertext segment {segment} failed authentication (tampered, truncated or reordered)"
    )]
    Segment { segment: u64 },
    #[error("encryption failed")]
    Encrypt,
}

/// A 256-bit AES key, wiped from memory on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretKey([u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    pub fn generate() -> SecretKey {
        let mut k = [0u8; 32];
        OsRng.fill_bytes(&mut k);
        SecretKey(k)
    }

    pub fn from_bytes(bytes: [u8; 32]) -> SecretKey {
        SecretKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub(crate) fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&self.0))
    }
}

pub use crate::kek::Kek;

/// Associated data that binds a data key and every ciphertext segment to one model version.
pub fn model_aad(model_id: &str, version: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(model_id.len() + 1 + version.len());
    aad.extend_from_slice(model_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(version.as_bytes());
    aad
}

pub(crate) fn decode_key(text: &str) -> Option<SecretKey> {
    let mut raw = URL_SAFE_NO_PAD
        .decode(text)
        .or_else(|_| STANDARD.decode(text))
        .ok()?;
    let key = <[u8; 32]>::try_from(raw.as_slice()).ok().map(SecretKey);
    raw.zeroize();
    key
}

/// Creates a new file readable only by its owner.
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Encrypts a plaintext pushed in pieces of any size; see the module docs for the layout.
pub struct SegmentEncryptor {
    inner: EncryptorBE32<Aes256Gcm>,
    aad: Vec<u8>,
    pending: Vec<u8>,
}

impl SegmentEncryptor {
    /// Starts a blob; the returned header must precede the segments.
    pub fn new(dek: &SecretKey, aad: Vec<u8>) -> (SegmentEncryptor, Vec<u8>) {
        let mut prefix = [0u8; PREFIX];
        OsRng.fill_bytes(&mut prefix);
        let inner = EncryptorBE32::from_aead(dek.cipher(), (&prefix).into());
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&(SEGMENT_SIZE as u32).to_be_bytes());
        header.extend_from_slice(&prefix);
        (
            SegmentEncryptor {
                inner,
                aad,
                pending: Vec::with_capacity(SEGMENT_SIZE),
            },
            header,
        )
    }

    /// Encrypts what it can of `data`, appending whole sealed segments to `out`. One segment
    /// is always held back, since only `finish` knows which one is last.
    pub fn update(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), CryptoError> {
        while !data.is_empty() {
            if self.pending.len() == SEGMENT_SIZE {
                let ct = self
                    .inner
                    .encrypt_next(Payload {
                        msg: &self.pending,
                        aad: &self.aad,
                    })
                    .map_err(|_| CryptoError::Encrypt)?;
                out.extend_from_slice(&ct);
                self.pending.zeroize();
                self.pending.clear();
            }
            let take = (SEGMENT_SIZE - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(())
    }

    /// Seals the last segment.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<(), CryptoError> {
        let ct = self
            .inner
            .encrypt_last(Payload {
                msg: &self.pending,
                aad: &self.aad,
            })
            .map_err(|_| CryptoError::Encrypt)?;
        out.extend_from_slice(&ct);
        self.pending.zeroize();
        Ok(())
    }
}

/// Decrypts a blob pushed in pieces of any size.
pub struct SegmentDecryptor {
    dek: SecretKey,
    aad: Vec<u8>,
    inner: Option<DecryptorBE32<Aes256Gcm>>,
    buf: Vec<u8>,
    segment_len: usize,
    segment: u64,
}

impl SegmentDecryptor {
    pub fn new(dek: SecretKey, aad: Vec<u8>) -> SegmentDecryptor {
        SegmentDecryptor {
            dek,
            aad,
            inner: None,
            buf: Vec::new(),
            segment_len: 0,
            segment: 0,
        }
    }

    /// Decrypts what it can, appending plaintext to `out`.
    pub fn update(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), CryptoError> {
        self.buf.extend_from_slice(data);
        if self.inner.is_none() {
            if self.buf.len() < HEADER_LEN {
                return Ok(());
            }
            if &self.buf[..4] != MAGIC {
                return Err(CryptoError::Header);
            }
            // The segment size is not covered by any tag: only the one size this format
            // writes is read, so no byte of a blob can change without the blob being refused
            // (found by the property test of the reader).
            let seg = u32::from_be_bytes(self.buf[4..8].try_into().expect("4 bytes")) as usize;
            if seg != SEGMENT_SIZE {
                return Err(CryptoError::Header);
            }
            let prefix: [u8; PREFIX] = self.buf[8..HEADER_LEN].try_into().expect("7 bytes");
            self.inner = Some(DecryptorBE32::from_aead(
                self.dek.cipher(),
                (&prefix).into(),
            ));
            self.segment_len = seg + TAG;
            self.buf.drain(..HEADER_LEN);
        }
        let inner = self.inner.as_mut().expect("set above");
        // Keep at least one byte past a full segment: the last one must go to `finish`.
        let mut start = 0;
        while self.buf.len() - start > self.segment_len {
            let pt = inner
                .decrypt_next(Payload {
                    msg: &self.buf[start..start + self.segment_len],
                    aad: &self.aad,
                })
                .map_err(|_| CryptoError::Segment {
                    segment: self.segment,
                })?;
            out.extend_from_slice(&pt);
            self.segment += 1;
            start += self.segment_len;
        }
        self.buf.drain(..start);
        Ok(())
    }

    /// Decrypts the last segment; fails when the blob was cut short.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<(), CryptoError> {
        let inner = self.inner.take().ok_or(CryptoError::Header)?;
        let pt = inner
            .decrypt_last(Payload {
                msg: &self.buf,
                aad: &self.aad,
            })
            .map_err(|_| CryptoError::Segment {
                segment: self.segment,
            })?;
        out.extend_from_slice(&pt);
        Ok(())
    }
}

/// Encrypts a whole buffer (tests and small blobs).
pub fn encrypt_all(dek: &SecretKey, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let (mut enc, mut out) = SegmentEncryptor::new(dek, aad.to_vec());
    enc.update(plaintext, &mut out)?;
    enc.finish(&mut out)?;
    Ok(out)
}

/// Decrypts a whole buffer (tests and small blobs).
pub fn decrypt_all(dek: &SecretKey, aad: &[u8], ciphertext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut dec = SegmentDecryptor::new(dek.clone(), aad.to_vec());
    let mut out = Vec::new();
    dec.update(ciphertext, &mut out)?;
    dec.finish(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sample(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn round_trips_at_segment_boundaries_in_any_piece_size() {
        let dek = SecretKey::generate();
        for n in [
            0,
            1,
            SEGMENT_SIZE - 1,
            SEGMENT_SIZE,
            SEGMENT_SIZE + 1,
            3 * SEGMENT_SIZE + 5,
        ] {
            let pt = sample(n);
            let ct = encrypt_all(&dek, b"m\0v", &pt).unwrap();
            let segments = n / SEGMENT_SIZE + usize::from(n % SEGMENT_SIZE != 0 || n == 0);
            assert_eq!(ct.len(), HEADER_LEN + n + TAG * segments.max(1), "n={n}");
            for piece in [1usize, 7, 4096, 100_000] {
                let mut dec = SegmentDecryptor::new(dek.clone(), b"m\0v".to_vec());
                let mut out = Vec::new();
                for c in ct.chunks(piece) {
                    dec.update(c, &mut out).unwrap();
                }
                dec.finish(&mut out).unwrap();
                assert_eq!(out, pt, "n={n} piece={piece}");
            }
        }
    }

    #[test]
    fn tampered_truncated_reordered_or_rebound_ciphertext_fails() {
        let dek = SecretKey::generate();
        let pt = sample(3 * SEGMENT_SIZE);
        let ct = encrypt_all(&dek, b"m\0v", &pt).unwrap();
        let seg = SEGMENT_SIZE + TAG;

        let mut flipped = ct.clone();
        flipped[HEADER_LEN + seg + 10] ^= 1;
        assert!(matches!(
            decrypt_all(&dek, b"m\0v", &flipped),
            Err(CryptoError::Segment { segment: 1 })
        ));

        let truncated = &ct[..HEADER_LEN + 2 * seg];
        assert!(decrypt_all(&dek, b"m\0v", truncated).is_err());

        let mut swapped = ct[..HEADER_LEN].to_vec();
        swapped.extend_from_slice(&ct[HEADER_LEN + seg..HEADER_LEN + 2 * seg]);
        swapped.extend_from_slice(&ct[HEADER_LEN..HEADER_LEN + seg]);
        swapped.extend_from_slice(&ct[HEADER_LEN + 2 * seg..]);
        assert!(decrypt_all(&dek, b"m\0v", &swapped).is_err());

        assert!(decrypt_all(&dek, b"other\0v", &ct).is_err());
        assert!(decrypt_all(&SecretKey::generate(), b"m\0v", &ct).is_err());
    }

    #[test]
    fn kek_file_is_private_and_reloads_the_same_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        let kek = Kek::load_or_generate(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dek = SecretKey::generate();
        let wrapped = kek.wrap_dek(&dek, "m1", "1");
        let again = Kek::load_or_generate(&path).unwrap();
        assert_eq!(
            again.unwrap_dek(&wrapped, "m1", "1").unwrap().as_bytes(),
            dek.as_bytes()
        );
        assert!(
            again.unwrap_dek(&wrapped, "m1", "2").is_err(),
            "bound to the version"
        );
        assert!(
            again.unwrap_dek(&wrapped, "m2", "1").is_err(),
            "bound to the model"
        );
    }

    #[test]
    fn a_bad_kek_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        create_private(&path)
            .unwrap()
            .write_all(b"not a key")
            .unwrap();
        assert!(matches!(
            Kek::load(&path),
            Err(CryptoError::KeyFormat { .. })
        ));
    }

    #[test]
    fn a_kek_file_readable_by_others_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        Kek::load_or_generate(&path).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = Kek::load_or_generate(&path).unwrap_err();
            assert!(
                matches!(err, CryptoError::KeyFileMode { mode: m, .. } if m == mode),
                "{err}"
            );
            let text = err.to_string();
            assert!(text.contains("chmod 600") && !text.contains('\n'), "{text}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        Kek::load_or_generate(&path).unwrap();
    }
}
