//! [`SecretBytes`]: a growable byte buffer for plaintext that must not outlive its use
//! (decrypted model weights). `Vec<u8>` leaves a copy behind in freed memory every time it
//! grows; this buffer zeroizes each allocation before it is freed, on growth and on drop.

use zeroize::{Zeroize, Zeroizing};

/// Bytes zeroized when they are freed, also the allocations left behind as the buffer grows.
#[derive(Default)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    pub fn new() -> SecretBytes {
        SecretBytes::default()
    }

    /// An empty buffer with room for `capacity` bytes (no copy until they are exceeded).
    pub fn with_capacity(capacity: usize) -> SecretBytes {
        SecretBytes(Zeroizing::new(Vec::with_capacity(capacity)))
    }

    /// Appends `more`; when it does not fit, moves the bytes into an allocation twice as
    /// large (at least) and zeroizes the old one before freeing it.
    pub fn extend_from_slice(&mut self, more: &[u8]) {
        let needed = self.0.len().saturating_add(more.len());
        if needed > self.0.capacity() {
            let mut grown = Vec::with_capacity(needed.max(self.0.capacity().saturating_mul(2)));
            grown.extend_from_slice(&self.0);
            // The old allocation is zeroized (all its capacity) as it is dropped here.
            self.0 = Zeroizing::new(grown);
        }
        self.0.extend_from_slice(more);
    }

    /// Appends the bytes of `more` (a message buffer, say) and zeroizes it before it is freed.
    pub fn extend_from_vec(&mut self, more: Vec<u8>) {
        let more = Zeroizing::new(more);
        self.extend_from_slice(&more);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Zeroizes the bytes and empties the buffer (its capacity is kept).
    pub fn clear(&mut self) {
        self.0.zeroize();
    }
}

impl From<Vec<u8>> for SecretBytes {
    /// Takes `bytes` without copying them; they are zeroized when the buffer frees them.
    fn from(bytes: Vec<u8>) -> SecretBytes {
        SecretBytes(Zeroizing::new(bytes))
    }
}

impl std::ops::Deref for SecretBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for SecretBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes({} bytes)", self.0.len())
    }
}
