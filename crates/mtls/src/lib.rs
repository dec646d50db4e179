//! Mutual TLS between Model Hub's internal gRPC services (registry, storage, inference, prover)
//! and their callers (the gateway, the services themselves, operator tools).
//!
//! - Every party has an [`Identity`]; its certificate, signed by the deployment's own CA, names
//!   it twice: DNS SAN `<name>` (what a client checks the server against, whatever host or
//!   Kubernetes service name it dialled) and URI SAN `spiffe://modelhub/<name>` (what a server
//!   reads to decide what the caller may do).
//! - A folder made by `modelhub certs` (or by `modelhub up` under `<data-dir>/tls/`) holds
//!   `ca.pem` and `<name>.pem` + `<name>.key` per identity; [`TlsDir::load`] reads the three
//!   files one party needs.
//! - Servers: [`TlsDir::server`] gives a tonic `Server` that speaks only TLS, asks for a client
//!   certificate (optional at the handshake, so a client without one gets a gRPC
//!   `UNAUTHENTICATED` instead of a broken connection) and checks every call against the
//!   service's table in [`policy`] ([`authorize`]).
//! - Clients: [`TlsDir::endpoint`] gives a tonic `Endpoint` for an `https://` address that
//!   presents the caller's certificate and accepts only the named service's; [`lazy_channel`]
//!   turns it into a channel whose connect timeout bounds the TLS handshake too.

pub mod authorize;
#[cfg(feature = "generate")]
pub mod generate;
pub mod policy;

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Server, ServerTlsConfig};

pub use authorize::{AuthorizeLayer, Caller};
pub use policy::Policy;

/// The CA certificate every party trusts, in a certificates folder.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key, in a folder made by `modelhub certs`; no service reads it.
pub const CA_KEY: &str = "ca.key";

/// How long a TLS handshake may take before the server drops the connection.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is at either end of an internal call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Identity {
    Gateway,
    Registry,
    Storage,
    Inference,
    Prover,
    /// Operator tools such as `modelhub admin bootstrap`.
    Admin,
}

impl Identity {
    /// Every identity, in the order `modelhub certs` makes them.
    pub const ALL: [Identity; 6] = [
        Identity::Gateway,
        Identity::Registry,
        Identity::Storage,
        Identity::Inference,
        Identity::Prover,
        Identity::Admin,
    ];

    /// `gateway`, `registry`, ...: the DNS SAN and the file names `<name>.pem`, `<name>.key`.
    pub fn name(self) -> &'static str {
        match self {
            Identity::Gateway => "gateway",
            Identity::Registry => "registry",
            Identity::Storage => "storage",
            Identity::Inference => "inference",
            Identity::Prover => "prover",
            Identity::Admin => "admin",
        }
    }

    /// `spiffe://modelhub/<name>`: the URI SAN a server reads the caller's identity from.
    pub fn uri(self) -> String {
        format!("spiffe://modelhub/{}", self.name())
    }

    /// The identity a URI SAN names, if any.
    pub fn from_uri(uri: &str) -> Option<Identity> {
        let name = uri.strip_prefix("spiffe://modelhub/")?;
        Identity::ALL.into_iter().find(|i| i.name() == name)
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why certificates could not be loaded or a TLS endpoint not be built.
#[derive(Debug, thiserror::Error)]
pub enum MtlsError {
    /// A file of the certificates folder is missing or unreadable.
    #[error(
        "reading {path}: {error} (make the certificates with `modelhub certs --out {dir}`, or point --mtls-dir at them)"
    )]
    Read {
        path: PathBuf,
        dir: PathBuf,
        error: std::io::Error,
    },
    /// An internal address is not a valid `https://` URI.
    #[error("{what} address {uri:?}: {reason}")]
    Address {
        what: &'static str,
        uri: String,
        reason: String,
    },
    /// tonic refused the TLS settings (e.g. a file that is not PEM).
    #[error("TLS settings of {identity}: {error}")]
    Tls {
        identity: Identity,
        error: tonic::transport::Error,
    },
}

/// The files one party needs from a certificates folder: the CA certificate, and its own
/// certificate and key.
#[derive(Clone)]
pub struct TlsDir {
    me: Identity,
    ca: Certificate,
    identity: tonic::transport::Identity,
}

impl std::fmt::Debug for TlsDir {
    /// The private key is never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsDir").field("me", &self.me).finish()
    }
}

impl TlsDir {
    /// Reads `ca.pem`, `<me>.pem` and `<me>.key` from `dir`.
    pub fn load(dir: &Path, me: Identity) -> Result<TlsDir, MtlsError> {
        let read = |file: String| {
            let path = dir.join(file);
            std::fs::read(&path).map_err(|error| MtlsError::Read {
                path,
                dir: dir.to_path_buf(),
                error,
            })
        };
        let ca = read(CA_CERT.to_owned())?;
        let cert = read(format!("{}.pem", me.name()))?;
        let key = read(format!("{}.key", me.name()))?;
        Ok(TlsDir {
            me,
            ca: Certificate::from_pem(ca),
            identity: tonic::transport::Identity::from_pem(cert, key),
        })
    }

    /// Whose certificate this is.
    pub fn identity(&self) -> Identity {
        self.me
    }

    /// A gRPC server that accepts only TLS, asks every client for a certificate signed by the
    /// CA (optional at the handshake; calls without one answer `UNAUTHENTICATED`) and lets a
    /// caller reach only the methods `policy` allows it (plus `grpc.health.v1`).
    pub fn server(&self, policy: &'static Policy) -> Result<AuthorizedServer, MtlsError> {
        let tls = ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
            .client_auth_optional(true)
            .timeout(HANDSHAKE_TIMEOUT);
        Ok(Server::builder()
            .tls_config(tls)
            .map_err(|error| MtlsError::Tls {
                identity: self.me,
                error,
            })?
            .layer(AuthorizeLayer::new(policy)))
    }

    /// A lazily usable endpoint for the `server` service at `uri` (which must be `https://`):
    /// presents this party's certificate, accepts only a certificate for `server` signed by
    /// the CA (whatever host name `uri` has), TCP_NODELAY, 5 s connect timeout.
    pub fn endpoint(&self, server: Identity, uri: &str) -> Result<Endpoint, MtlsError> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(server.name());
        https_endpoint(server, uri)?
            .tls_config(tls)
            .map_err(|error| MtlsError::Tls {
                identity: self.me,
                error,
            })
    }
}

/// A lazily connected channel to `endpoint` whose connect timeout bounds the whole connection
/// set-up: TCP connect *and* TLS handshake.
///
/// Use it instead of `Endpoint::connect_lazy`, whose connect timeout bounds only the TCP
/// connect. A peer that accepts connections but never answers (a stopped or wedged process:
/// its kernel still completes the TCP handshake) then holds the channel in its TLS handshake for
/// ever, and every call queued on the channel waits with it: the endpoint's per-call `timeout`
/// starts only once the connection is up.
pub fn lazy_channel(endpoint: &Endpoint) -> Channel {
    let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
    // `https://` URIs: the TLS layer tonic puts on top does the handshake.
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    endpoint.connect_with_connector_lazy(tcp)
}

/// A tonic server with TLS and the authorization layer ([`TlsDir::server`]).
pub type AuthorizedServer = Server<tower_layer::Stack<AuthorizeLayer, tower_layer::Identity>>;

/// Parses an internal service address: `https://HOST:PORT` only. A `http://` address is
/// refused rather than quietly sent in the clear (tonic would dial plain TCP for it).
pub fn https_endpoint(server: Identity, uri: &str) -> Result<Endpoint, MtlsError> {
    let bad = |reason: &str| MtlsError::Address {
        what: server.name(),
        uri: uri.to_owned(),
        reason: reason.to_owned(),
    };
    if !uri.starts_with("https://") {
        return Err(bad(
            "internal services speak mutual TLS only: use https://HOST:PORT",
        ));
    }
    Ok(Endpoint::from_shared(uri.to_owned())
        .map_err(|e| bad(&format!("not a valid URI: {e}")))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_their_uri() {
        for id in Identity::ALL {
            assert_eq!(Identity::from_uri(&id.uri()), Some(id));
        }
        assert_eq!(Identity::from_uri("spiffe://modelhub/root"), None);
        assert_eq!(Identity::from_uri("spiffe://other/gateway"), None);
    }

    #[test]
    fn plain_http_addresses_are_refused() {
        let err = https_endpoint(Identity::Registry, "http://127.0.0.1:50051").unwrap_err();
        assert!(err.to_string().contains("https://"), "{err}");
        assert!(https_endpoint(Identity::Registry, "https://127.0.0.1:50051").is_ok());
        assert!(https_endpoint(Identity::Registry, "https://bad host").is_err());
    }

    /// A peer whose kernel completes the TCP handshake but which never reads (a stopped
    /// process, modelled by a listener nobody accepts on): the call fails once the connect
    /// timeout has passed, instead of waiting in the TLS handshake for ever.
    #[tokio::test]
    async fn a_peer_that_never_answers_the_handshake_fails_the_call() {
        use modelhub_proto::registry::v1 as reg;

        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}", silent.local_addr().unwrap());
        let endpoint = https_endpoint(Identity::Registry, &url)
            .unwrap()
            .connect_timeout(Duration::from_millis(300))
            .tls_config(ClientTlsConfig::new().domain_name("registry"))
            .unwrap();
        let mut client = reg::registry_client::RegistryClient::new(lazy_channel(&endpoint));
        // The guard only turns a hang into a failure; the call is expected to end in ~300 ms.
        let answer = tokio::time::timeout(
            Duration::from_secs(60),
            client.create_account(reg::CreateAccountRequest::default()),
        )
        .await
        .expect("the call waited in the TLS handshake past the connect timeout");
        // tonic reports the connect timeout as `UNKNOWN` "transport error" (a refused
        // connection as `UNAVAILABLE`); callers read both as "unavailable".
        let status = answer.unwrap_err();
        assert!(
            matches!(
                status.code(),
                tonic::Code::Unknown | tonic::Code::Unavailable
            ),
            "{status}"
        );
        drop(silent);
    }

    #[test]
    fn a_missing_folder_names_the_command_that_makes_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = TlsDir::load(&dir.path().join("tls"), Identity::Storage).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("ca.pem") && text.contains("modelhub certs"),
            "{text}"
        );
        assert!(!text.contains('\n'), "one line: {text}");
    }
}
