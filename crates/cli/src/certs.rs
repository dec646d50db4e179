//! `modelhub certs --out DIR`: the certificates the internal services authenticate each other
//! with (mutual TLS): a CA, and a certificate and key per identity (`gateway`, `registry`,
//! `storage`, `inference`, `prover`, `admin`), keys mode 0600. `modelhub up` makes the same
//! under `<data-dir>/tls/` on first start. docs/SECURITY.md says how to deploy and rotate them.

use std::path::PathBuf;

use modelhub_mtls::Identity;
use modelhub_mtls::generate::DEFAULT_VALIDITY_DAYS;
use serde_json::json;

/// Arguments of `modelhub certs`.
#[derive(Debug, Clone, clap::Args)]
pub struct CertsArgs {
    /// Folder to write to (created with mode 0700; must not hold a `ca.pem` yet).
    #[arg(long)]
    pub out: PathBuf,
    /// How long the service certificates are valid, in days.
    #[arg(long, default_value_t = DEFAULT_VALIDITY_DAYS)]
    pub days: u32,
}

/// Writes the certificates and prints what it wrote (JSON).
pub fn run(args: &CertsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.days >= 1, "--days must be at least 1");
    modelhub_mtls::generate::write_all(&args.out, args.days)?;
    let names: Vec<_> = Identity::ALL.iter().map(|i| i.name()).collect();
    crate::commands::print_json(&json!({
        "dir": args.out,
        "ca": modelhub_mtls::CA_CERT,
        "identities": names,
        "days": args.days,
    }));
    Ok(())
}
