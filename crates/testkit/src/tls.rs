//! Certificates for tests: a CA and a certificate per identity in a temporary folder, made
//! with the same code as `modelhub certs`, and clients that connect with any identity (or
//! none).

use std::path::Path;
use std::sync::OnceLock;

use modelhub_mtls::{Identity, TlsDir};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// A test PKI (`ca.pem`, `<name>.pem`, `<name>.key` per identity), removed when dropped.
#[derive(Debug)]
pub struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    /// Makes a fresh CA and certificates.
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().expect("tempdir");
        modelhub_mtls::generate::write_all(dir.path(), 2).expect("making test certificates");
        TestPki { dir }
    }

    /// One PKI shared by the whole test process (made on first use).
    pub fn shared() -> &'static TestPki {
        static PKI: OnceLock<TestPki> = OnceLock::new();
        PKI.get_or_init(TestPki::new)
    }

    /// The folder: what `--mtls-dir` / `Settings::mtls_dir` take.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The files of one identity.
    pub fn identity(&self, id: Identity) -> TlsDir {
        TlsDir::load(self.dir(), id).expect("loading test certificates")
    }

    /// A lazily connected channel to the `server` service at `url` (`https://`) as `caller`.
    pub fn channel(&self, caller: Identity, server: Identity, url: &str) -> Channel {
        modelhub_mtls::lazy_channel(
            &self
                .identity(caller)
                .endpoint(server, url)
                .expect("endpoint"),
        )
    }

    /// A lazily connected channel over TLS that trusts the CA but presents no certificate.
    pub fn anonymous_channel(&self, server: Identity, url: &str) -> Channel {
        let ca = std::fs::read(self.dir().join(modelhub_mtls::CA_CERT)).expect("ca.pem");
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name(server.name());
        modelhub_mtls::lazy_channel(
            &Endpoint::from_shared(url.to_owned())
                .expect("url")
                .tls_config(tls)
                .expect("tls config")
                .connect_timeout(std::time::Duration::from_secs(5)),
        )
    }

    /// A lazily connected plain-text (h2c) channel to the same port: must get nowhere.
    pub fn plaintext_channel(url: &str) -> Channel {
        let plain = url.replacen("https://", "http://", 1);
        modelhub_mtls::lazy_channel(
            &Endpoint::from_shared(plain)
                .expect("url")
                .connect_timeout(std::time::Duration::from_secs(5)),
        )
    }
}

impl Default for TestPki {
    fn default() -> TestPki {
        TestPki::new()
    }
}
