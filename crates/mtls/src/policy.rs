//! Who may call what: one table per internal service, read from the real call sites.
//!
//! | caller | calls |
//! |---|---|
//! | gateway (for signed HTTP requests) | every registry method, storage `PutModel`/`DeleteModel`, inference `Predict`, prover `Compile`/`Forget`/`GetProof`/`Verify` |
//! | inference | storage `GetModel` (to open a model), prover `Enqueue` (proof jobs) |
//! | prover | storage `GetModel` (to compile a model) |
//! | admin (operator tools) | registry account, key, credit and ledger management (`modelhub admin bootstrap`), prover `Verify` |
//!
//! Notably: only the gateway reads key secrets (`LookupKey`) and moves credits
//! (`Reserve`/`Commit`/`Release`); nothing but the gateway and the admin tool creates accounts;
//! the gateway never gets a model's plaintext (storage `GetModel`). `grpc.health.v1` is open to
//! every authenticated identity. A method missing from a table is refused to everyone, and a
//! test checks every table against the generated service descriptors.

use crate::Identity;
use crate::Identity::{Admin, Gateway, Inference, Prover};

/// The methods of one gRPC service and the identities allowed to call each.
#[derive(Debug)]
pub struct Policy {
    /// Fully qualified service name, e.g. `modelhub.registry.v1.Registry`.
    pub service: &'static str,
    /// `(method, callers)`.
    pub methods: &'static [(&'static str, &'static [Identity])],
}

impl Policy {
    /// The identities allowed to call `method` of this service (none for an unknown method).
    pub fn callers(&self, method: &str) -> &'static [Identity] {
        self.methods
            .iter()
            .find(|(m, _)| *m == method)
            .map_or(&[], |(_, callers)| callers)
    }
}

/// The registry: accounts, keys, models, credits.
pub static REGISTRY: Policy = Policy {
    service: "modelhub.registry.v1.Registry",
    methods: &[
        ("CreateAccount", &[Gateway, Admin]),
        ("GetAccount", &[Gateway, Admin]),
        ("CreateKey", &[Gateway, Admin]),
        ("RevokeKey", &[Gateway, Admin]),
        ("RotateKey", &[Gateway]),
        // Answers key secrets: the gateway verifies signatures with them, nobody else may.
        ("LookupKey", &[Gateway]),
        // Spends a request nonce for replay protection, shared by every gateway.
        ("UseNonce", &[Gateway]),
        ("GrantCredits", &[Gateway, Admin]),
        ("CheckModelName", &[Gateway]),
        ("CreateModel", &[Gateway]),
        ("GetModel", &[Gateway, Admin]),
        ("ListModels", &[Gateway, Admin]),
        ("DeleteModel", &[Gateway]),
        ("Reserve", &[Gateway]),
        ("Commit", &[Gateway]),
        ("Release", &[Gateway]),
        ("GetLedger", &[Gateway, Admin]),
        ("SettleNow", &[Gateway, Admin]),
        ("ResealSecrets", &[Admin]),
    ],
};

/// Storage: encrypted model blobs; `GetModel` answers plaintext weights.
pub static STORAGE: Policy = Policy {
    service: "modelhub.storage.v1.Storage",
    methods: &[
        ("PutModel", &[Gateway]),
        ("GetModel", &[Inference, Prover]),
        ("DeleteModel", &[Gateway]),
    ],
};

/// Inference: runs models.
pub static INFERENCE: Policy = Policy {
    service: "modelhub.inference.v1.Inference",
    methods: &[("Predict", &[Gateway])],
};

/// The prover: circuits and proofs.
pub static PROVER: Policy = Policy {
    service: "modelhub.prover.v1.Prover",
    methods: &[
        ("Compile", &[Gateway]),
        ("Forget", &[Gateway]),
        ("Enqueue", &[Inference]),
        ("GetProof", &[Gateway]),
        // No caller today; proof files are public, so the gateway and operators may.
        ("Verify", &[Gateway, Admin]),
        ("ResealOpenings", &[Admin]),
    ],
};

/// Every table, for tests and documentation.
pub static ALL: [&Policy; 4] = [&REGISTRY, &STORAGE, &INFERENCE, &PROVER];

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// The RPCs of each Model Hub service, from the generated descriptor set.
    fn generated() -> Vec<(String, Vec<String>)> {
        let set =
            prost_types::FileDescriptorSet::decode(modelhub_proto::FILE_DESCRIPTOR_SET).unwrap();
        set.file
            .iter()
            .flat_map(|f| {
                f.service.iter().map(move |s| {
                    (
                        format!("{}.{}", f.package(), s.name()),
                        s.method.iter().map(|m| m.name().to_owned()).collect(),
                    )
                })
            })
            .collect()
    }

    #[test]
    fn every_generated_rpc_has_exactly_one_rule_and_every_rule_an_rpc() {
        let generated = generated();
        assert_eq!(generated.len(), ALL.len(), "services: {generated:?}");
        for (service, methods) in &generated {
            let policy = ALL
                .iter()
                .find(|p| p.service == service)
                .unwrap_or_else(|| panic!("no policy for {service}"));
            for m in methods {
                assert_eq!(
                    policy.methods.iter().filter(|(name, _)| name == m).count(),
                    1,
                    "{service}/{m} needs exactly one rule"
                );
                assert!(!policy.callers(m).is_empty(), "{service}/{m}");
            }
            for (m, _) in policy.methods {
                assert!(methods.iter().any(|g| g == m), "{service} has no {m}");
            }
        }
    }

    #[test]
    fn only_the_gateway_and_admin_create_accounts_and_only_the_gateway_reads_key_secrets() {
        assert_eq!(REGISTRY.callers("CreateAccount"), &[Gateway, Admin]);
        assert_eq!(REGISTRY.callers("LookupKey"), &[Gateway]);
        assert!(!STORAGE.callers("GetModel").contains(&Gateway));
        assert!(REGISTRY.callers("NoSuchMethod").is_empty());
    }
}
