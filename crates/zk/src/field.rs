//! Integers and hashes as Pallas scalar-field (`Fp`) elements.

use ff::PrimeField;
use pasta_curves::Fp;
use sha2::{Digest, Sha256};

/// A signed integer as a field element (negative values wrap to `p - |v|`).
pub fn fe(v: i64) -> Fp {
    if v >= 0 {
        Fp::from(v as u64)
    } else {
        -Fp::from(v.unsigned_abs())
    }
}

/// The job id as a field element: the first 31 bytes of SHA-256(job id), little-endian.
pub fn job_id_element(job_id: &str) -> Fp {
    let digest = Sha256::digest(job_id.as_bytes());
    let mut repr = [0u8; 32];
    repr[..31].copy_from_slice(&digest[..31]);
    // 31 bytes are below the modulus: always canonical.
    Fp::from_repr(repr).unwrap_or(Fp::zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_round_trip() {
        assert_eq!(fe(-5) + fe(5), Fp::zero());
        assert_eq!(fe(i64::MIN) + Fp::from(1u64 << 63), Fp::zero());
        assert_ne!(job_id_element("a"), job_id_element("b"));
    }
}
