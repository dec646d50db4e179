//! HTTPS on the public port: the certificate chain and key an operator gives with
//! `--tls-cert`/`--tls-key`, served with rustls (aws-lc-rs, TLS 1.2 and 1.3).
//!
//! Without them the gateway speaks plain HTTP, which it does only where nobody else can listen
//! in: on a loopback address, or behind a TLS-terminating proxy the operator names with
//! `--behind-tls-proxy` (a Kubernetes ingress). Signatures don't hide what they sign, so a
//! request in the clear shows its inputs, outputs and key id to anyone on the path.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A TLS server configuration from PEM files: `cert` holds the leaf certificate first, then
/// any intermediates; `key` the leaf's private key (PKCS#8, PKCS#1 or SEC1).
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<rustls::ServerConfig> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading the TLS certificate chain {}", cert.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "{} holds no PEM certificate",
        cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the TLS private key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the TLS certificate and key don't make a usable pair")?;
    Ok(config)
}
