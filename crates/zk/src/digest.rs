//! The model digest: the 32 bytes that name a proved model.
//!
//! A proof covers a circuit spec (layer shapes, ReLU flags, scales, shifts, tables, lanes, `k`)
//! and a weight commitment. Either alone says too little: the commitment binds the weights but
//! not the function applied to them, and the spec the function but not the weights. The digest
//! binds both, and it is what the registry returns for a model version, what the marketplace
//! contract records, and what a proof names (`public.model_digest`):
//!
//! ```text
//! digest = SHA-256( "modelhub-model-digest/v1"          24 ASCII bytes, no terminator
//!                 ‖ SHA-256(spec JSON)                   32 bytes (CircuitSpec::hash)
//!                 ‖ u64le(number of commitment points)   8 bytes (= spec.lanes)
//!                 ‖ C_0 ‖ … ‖ C_{L−1} )                  32 bytes each, compressed Vesta points
//! ```
//!
//! `SHA-256(spec JSON)` is over the compact JSON this crate writes for the spec (fields in the
//! order of [`CircuitSpec`], no spaces), the same hash the weight link and the key files use.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::ZkError;
use crate::commit::Commitment;
use crate::quant::CircuitSpec;

/// The domain separator at the start of the hashed bytes.
pub const DIGEST_DOMAIN: &[u8; 24] = b"modelhub-model-digest/v1";

/// A model digest (hex in JSON and text: 64 lowercase digits).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelDigest(pub [u8; 32]);

impl ModelDigest {
    /// The digest of a circuit spec and a weight commitment.
    pub fn of(spec: &CircuitSpec, commitment: &Commitment) -> ModelDigest {
        let mut h = Sha256::new();
        h.update(DIGEST_DOMAIN);
        h.update(spec.hash());
        h.update((commitment.lanes() as u64).to_le_bytes());
        for p in commitment.bytes() {
            h.update(p);
        }
        ModelDigest(h.finalize().into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for ModelDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ModelDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelDigest({})", self.to_hex())
    }
}

impl FromStr for ModelDigest {
    type Err = ZkError;

    /// 64 hex digits, an optional `0x` in front.
    fn from_str(s: &str) -> Result<ModelDigest, ZkError> {
        let s = s.trim();
        let s = s.strip_prefix("0x").unwrap_or(s);
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| {
            ZkError::Verification("a model digest is 64 hex digits (32 bytes)".into())
        })?;
        Ok(ModelDigest(out))
    }
}

impl Serialize for ModelDigest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ModelDigest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::test_dense_model;

    #[test]
    fn the_digest_is_the_documented_hash() {
        let model = crate::calibrate(&test_dense_model(&[8, 8, 4], 1.0, 1.0), &[]).unwrap();
        let commitment = Commitment::from_hex(&"11".repeat(32 * model.spec.lane_count())).unwrap();
        let mut bytes = DIGEST_DOMAIN.to_vec();
        bytes.extend_from_slice(&model.spec.hash());
        bytes.extend_from_slice(&(model.spec.lane_count() as u64).to_le_bytes());
        bytes.extend_from_slice(&[0x11; 32].repeat(model.spec.lane_count()));
        let d = ModelDigest::of(&model.spec, &commitment);
        assert_eq!(d.0, <[u8; 32]>::from(Sha256::digest(&bytes)));

        // Text and JSON forms round-trip; a bad one is refused.
        assert_eq!(d.to_string().parse::<ModelDigest>().unwrap(), d);
        assert_eq!(format!("0x{d}").parse::<ModelDigest>().unwrap(), d);
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<ModelDigest>(&json).unwrap(), d);
        assert!("abcd".parse::<ModelDigest>().is_err());
        assert!("zz".repeat(32).parse::<ModelDigest>().is_err());

        // Any change of the spec or the commitment changes it.
        let mut spec = model.spec.clone();
        spec.layers[0].relu = !spec.layers[0].relu;
        assert_ne!(ModelDigest::of(&spec, &commitment), d);
        let other = Commitment::from_hex(&"12".repeat(32 * model.spec.lane_count())).unwrap();
        assert_ne!(ModelDigest::of(&model.spec, &other), d);
    }
}
