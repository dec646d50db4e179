//! Random identifiers: a short type prefix and 128 random bits, e.g. `mdl_3f9c…`.

use aes_gcm::aead::OsRng;
use aes_gcm::aead::rand_core::RngCore;

pub const ACCOUNT: &str = "acct";
pub const KEY: &str = "mhk";
pub const MODEL: &str = "mdl";
pub const RESERVATION: &str = "rsv";
pub const RECEIPT: &str = "rcpt";
pub const JOB: &str = "job";

/// `prefix_` followed by 32 lowercase hex characters.
pub fn new_id(prefix: &str) -> String {
    let mut raw = [0u8; 16];
    OsRng.fill_bytes(&mut raw);
    format!("{prefix}_{}", hex::encode(raw))
}

/// Random bytes for secrets.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut raw = [0u8; N];
    OsRng.fill_bytes(&mut raw);
    raw
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_prefixed_and_distinct() {
        let a = super::new_id(super::MODEL);
        let b = super::new_id(super::MODEL);
        assert!(a.starts_with("mdl_") && a.len() == 36);
        assert_ne!(a, b);
    }
}
