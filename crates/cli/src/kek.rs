//! `modelhub admin rotate-kek`: rotating the deployment's key-encryption key while the
//! services run (the ring and its file: `modelhub_core::kek`; the steps: docs/OPERATIONS.md,
//! "Rotating the KEK").
//!
//! 1. Stage: a new key goes first in the KEK file, the old ones stay (they still unwrap). If
//!    the file already holds more than one key, a rotation is under way and is resumed.
//! 2. Settle: wait until every service wraps with the new key (each follows its file).
//! 3. Re-wrap: the registry wraps every model's data key and API key secret again, the
//!    prover every commitment opening; both leave alone what already is under the new key,
//!    so a run cut short is finished by the next.
//! 4. Retire (`--retire`, later): re-wrap once more, and if nothing is left that only an old
//!    key opens, keep only the current key in the file.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use modelhub_mtls::{Identity, TlsDir, lazy_channel};
use modelhub_proto::common::v1::ResealReport;
use modelhub_proto::prover::v1 as prover;
use modelhub_proto::registry::v1 as registry;
use serde_json::{Value, json};

/// What to rotate, and where the services are.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub kek_file: PathBuf,
    pub registry: String,
    pub prover: Option<String>,
    /// How long to wait after staging for every service to wrap with the new key.
    pub settle: Duration,
    /// Drop the old keys once nothing needs them.
    pub retire: bool,
}

/// Runs the rotation (see the module docs); what each step did, as JSON.
pub async fn rotate(tls: &TlsDir, rotation: &Rotation) -> anyhow::Result<Value> {
    let staged = modelhub_core::kek::stage_new_key(&rotation.kek_file)
        .with_context(|| format!("staging a new key in {}", rotation.kek_file.display()))?;
    // Also when resuming: the run that staged the key may have been cut before it waited.
    tokio::time::sleep(rotation.settle).await;
    let registry_report = {
        let channel = lazy_channel(&tls.endpoint(Identity::Registry, &rotation.registry)?);
        registry::registry_client::RegistryClient::new(channel)
            .reseal_secrets(registry::ResealRequest {})
            .await
            .with_context(|| format!("re-wrapping at the registry at {}", rotation.registry))?
            .into_inner()
    };
    let prover_report = match &rotation.prover {
        Some(url) => {
            let channel = lazy_channel(&tls.endpoint(Identity::Prover, url)?);
            Some(
                prover::prover_client::ProverClient::new(channel)
                    .reseal_openings(prover::ResealOpeningsRequest {})
                    .await
                    .with_context(|| format!("re-wrapping at the prover at {url}"))?
                    .into_inner(),
            )
        }
        None => None,
    };
    let reports: Vec<&ResealReport> = std::iter::once(&registry_report)
        .chain(prover_report.as_ref())
        .collect();
    let left: Vec<&String> = reports.iter().flat_map(|r| &r.unreadable).collect();
    let changed: u64 = reports.iter().map(|r| r.changed).sum();
    let retired = if rotation.retire {
        anyhow::ensure!(
            left.is_empty(),
            "not retiring the old keys: no key of the ring opens {left:?}"
        );
        anyhow::ensure!(
            changed == 0,
            "not retiring the old keys: {changed} values changed while they were re-wrapped; run again"
        );
        modelhub_core::kek::retire_old_keys(&rotation.kek_file)
            .with_context(|| format!("retiring old keys in {}", rotation.kek_file.display()))?
    } else {
        0
    };
    Ok(json!({
        "staged": staged,
        "registry": report_json(&registry_report),
        "prover": prover_report.as_ref().map(report_json),
        "retired_keys": retired,
    }))
}

fn report_json(r: &ResealReport) -> Value {
    json!({
        "resealed": r.resealed,
        "current": r.current,
        "changed": r.changed,
        "unreadable": r.unreadable,
        "keys": r.keys,
    })
}
