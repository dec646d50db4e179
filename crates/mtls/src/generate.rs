//! Making a deployment's certificates (`modelhub certs`, `modelhub up` on first start, test
//! harnesses): a CA, and per [`Identity`] a certificate (DNS SAN `<name>`, URI SAN
//! `spiffe://modelhub/<name>`, usable as server and client) with its ECDSA P-256 key.
//!
//! ```text
//! DIR/ca.pem   CA certificate (every party trusts it)     0644
//! DIR/ca.key   CA key (keep it offline; no service reads it) 0600
//! DIR/<name>.pem, DIR/<name>.key   per identity           0644 / 0600
//! ```

use std::io::Write;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::{CA_CERT, CA_KEY, Identity};

/// Default validity of the certificates, in days.
pub const DEFAULT_VALIDITY_DAYS: u32 = 825;

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The folder already holds a CA: certificates are never overwritten.
    #[error("{0} already holds certificates (ca.pem); choose an empty folder")]
    Exists(String),
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("making a certificate: {0}")]
    Cert(#[from] rcgen::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> GenerateError + '_ {
    move |source| GenerateError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `contents` to `path` (replacing a file left by an interrupted run) with `mode`.
fn write(path: &Path, contents: &str, mode: u32) -> Result<(), GenerateError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(path)(e)),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    file.write_all(contents.as_bytes()).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks that differ between machines.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

/// Makes a CA and a certificate for every identity in `dir` (created, mode 0700), valid for
/// `days`. Refuses a folder that already has a `ca.pem`.
pub fn write_all(dir: &Path, days: u32) -> Result<(), GenerateError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.join(CA_CERT).exists() {
        return Err(GenerateError::Exists(dir.display().to_string()));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "Model Hub internal CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca, days.saturating_add(30));
    let ca_cert = ca.self_signed(&ca_key)?;
    write(&dir.join(CA_KEY), &ca_key.serialize_pem(), 0o600)?;
    let issuer = Issuer::new(ca, ca_key);

    for id in Identity::ALL {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, id.name());
        params.subject_alt_names = vec![
            SanType::DnsName(id.name().try_into()?),
            SanType::URI(id.uri().try_into()?),
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, days);
        let cert = params.signed_by(&key, &issuer)?;
        write(
            &dir.join(format!("{}.key", id.name())),
            &key.serialize_pem(),
            0o600,
        )?;
        write(&dir.join(format!("{}.pem", id.name())), &cert.pem(), 0o644)?;
    }
    // Last: a folder with a ca.pem is complete.
    write(&dir.join(CA_CERT), &ca_cert.pem(), 0o644)
}

/// Makes the certificates in `dir` unless it already has them (`modelhub up`); true when it
/// made them.
pub fn ensure(dir: &Path, days: u32) -> Result<bool, GenerateError> {
    if dir.join(CA_CERT).exists() {
        return Ok(false);
    }
    write_all(dir, days)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn makes_every_identity_with_private_keys_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        assert!(ensure(&tls, 30).unwrap());
        let mode = |f: &str| std::fs::metadata(tls.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("ca.key"), 0o600);
        assert_eq!(mode("ca.pem"), 0o644);
        for id in Identity::ALL {
            assert_eq!(mode(&format!("{id}.key")), 0o600);
            crate::TlsDir::load(&tls, id).unwrap();
        }
        let ca = std::fs::read(tls.join("ca.pem")).unwrap();
        assert!(!ensure(&tls, 30).unwrap());
        assert!(matches!(write_all(&tls, 30), Err(GenerateError::Exists(_))));
        assert_eq!(std::fs::read(tls.join("ca.pem")).unwrap(), ca);
    }

    #[test]
    fn a_certificate_names_its_identity_in_its_uri_san() {
        let dir = tempfile::tempdir().unwrap();
        write_all(dir.path(), 30).unwrap();
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::CertificateDer::from_pem_file(dir.path().join("inference.pem"))
            .unwrap();
        let cert = webpki::EndEntityCert::try_from(&der).unwrap();
        let uris: Vec<_> = cert.valid_uri_names().collect();
        assert_eq!(uris, ["spiffe://modelhub/inference"]);
        let dns: Vec<_> = cert.valid_dns_names().collect();
        assert_eq!(dns, ["inference"]);
    }
}
