//! The JSON records of the public API, converted from the registry's messages at the edge.

use modelhub_core::TensorSpec;
use modelhub_proto::registry::v1 as pb;
use serde::Serialize;

use crate::error::GatewayError;

/// A model record (`docs/API.md`, "A model record"). The wrapped data key never leaves the
/// gateway.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelRecord {
    pub model_id: String,
    /// The owner's account id.
    pub owner: String,
    /// The owner's handle, when the owner has one.
    pub owner_handle: Option<String>,
    /// `namespace/name@version`, the namespace being the owner's handle (or account id): what
    /// names this version for good.
    pub full_name: String,
    pub name: String,
    pub version: String,
    /// Credits per prediction.
    pub price: u64,
    /// Credits charged when the proof of a prediction is delivered (`GET /v1/proofs/{job}`);
    /// `None` for a model without a circuit (it has no proofs).
    pub proof_price: Option<u64>,
    /// The most rows (batch size) one predict may hold, when the owner capped it; the
    /// gateway's `--max-rows-per-request` applies either way.
    pub max_rows: Option<u32>,
    /// The most predictions (rows) one account may make per minute, when the owner set a
    /// quota (per gateway replica).
    pub calls_per_minute: Option<u32>,
    pub cid: String,
    pub sha256: String,
    pub size: u64,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub commitment: Option<String>,
    /// The public circuit spec the commitment belongs to (docs/ZK.md), when there is one.
    pub circuit_spec: Option<serde_json::Value>,
    /// Why the model has no circuit, when the prover could not compile it.
    pub zk_note: Option<String>,
    /// The model digest over the circuit spec and the commitment (docs/ZK.md): what a proof
    /// of this model names and what the chain records.
    pub digest: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
}

/// The declared tensors of a stored model; a bad one is the registry's fault, not the client's.
pub fn specs(
    model_id: &str,
    specs: &[modelhub_proto::common::v1::TensorSpec],
) -> Result<Vec<TensorSpec>, GatewayError> {
    specs
        .iter()
        .cloned()
        .map(TensorSpec::try_from)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            GatewayError::internal(format!(
                "registry returned a bad tensor spec for {model_id}: {}",
                e.message
            ))
        })
}

impl TryFrom<pb::Model> for ModelRecord {
    type Error = GatewayError;

    fn try_from(m: pb::Model) -> Result<Self, GatewayError> {
        Ok(ModelRecord {
            inputs: specs(&m.model_id, &m.inputs)?,
            outputs: specs(&m.model_id, &m.outputs)?,
            full_name: format!(
                "{}/{}@{}",
                if m.owner_handle.is_empty() {
                    &m.owner
                } else {
                    &m.owner_handle
                },
                m.name,
                m.version
            ),
            owner_handle: Some(m.owner_handle).filter(|h| !h.is_empty()),
            model_id: m.model_id,
            owner: m.owner,
            name: m.name,
            version: m.version,
            price: m.price,
            proof_price: m.circuit_spec.is_some().then_some(m.proof_price),
            max_rows: Some(m.max_rows).filter(|&n| n > 0),
            calls_per_minute: Some(m.calls_per_minute).filter(|&n| n > 0),
            cid: m.cid,
            sha256: m.sha256,
            size: m.size,
            commitment: m.commitment,
            circuit_spec: m
                .circuit_spec
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(|e| {
                    GatewayError::internal(format!("registry returned a bad circuit spec: {e}"))
                })?,
            zk_note: m.zk_note,
            digest: m.digest,
            created_at: m.created_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use modelhub_proto::common::v1 as common;

    use super::*;

    #[test]
    fn a_record_has_exactly_the_documented_fields_and_no_key() {
        let model = pb::Model {
            model_id: "mdl_1".into(),
            owner: "acct_1".into(),
            owner_handle: "alice".into(),
            name: "digits".into(),
            version: "1.0".into(),
            price: 3,
            cid: "bafy".into(),
            sha256: "ab".repeat(32),
            size: 1234,
            wrapped_dek: b"very secret".to_vec(),
            inputs: vec![common::TensorSpec {
                name: "X".into(),
                datatype: common::DataType::Fp32 as i32,
                shape: vec![-1, 64],
            }],
            outputs: vec![common::TensorSpec {
                name: "label".into(),
                datatype: common::DataType::Int64 as i32,
                shape: vec![-1],
            }],
            commitment: None,
            created_at: 1_767_225_600,
            circuit_spec: None,
            zk_note: Some("op Softmax is not supported".into()),
            digest: None,
            proof_price: 0,
            max_rows: 16,
            calls_per_minute: 0,
        };
        let json = serde_json::to_value(ModelRecord::try_from(model).unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "model_id": "mdl_1", "owner": "acct_1", "owner_handle": "alice",
                "full_name": "alice/digits@1.0", "name": "digits", "version": "1.0",
                "price": 3, "proof_price": null, "max_rows": 16, "calls_per_minute": null, "cid": "bafy", "sha256": "ab".repeat(32), "size": 1234,
                "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 64]}],
                "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]}],
                "commitment": null, "circuit_spec": null,
                "zk_note": "op Softmax is not supported", "digest": null,
                "created_at": 1_767_225_600,
            })
        );
    }

    #[test]
    fn a_bad_spec_from_the_registry_is_internal() {
        let model = pb::Model {
            inputs: vec![common::TensorSpec {
                name: "X".into(),
                datatype: 99,
                shape: vec![1],
            }],
            ..Default::default()
        };
        let e = ModelRecord::try_from(model).unwrap_err();
        assert_eq!(e.code(), modelhub_core::ErrorCode::Internal);
    }
}
