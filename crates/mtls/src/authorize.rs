//! The tower layer every internal gRPC server runs its calls through: it reads the caller's
//! identity from the client certificate of the TLS connection and lets the call through only
//! if the service's [`Policy`] allows that identity to call that method.
//!
//! - no TLS connection or no client certificate → `UNAUTHENTICATED`;
//! - a certificate (signed by the CA, rustls checked that) naming no Model Hub identity, or an
//!   identity the table does not list for the method → `PERMISSION_DENIED`;
//! - `grpc.health.v1` → any authenticated identity.
//!
//! An allowed call carries the caller as a [`Caller`] request extension.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::{Identity, Policy};

/// The authenticated caller of a request (a request extension set by [`AuthorizeLayer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller(pub Identity);

/// Wraps a gRPC server's routes in [`Authorize`] for one service's table.
#[derive(Debug, Clone, Copy)]
pub struct AuthorizeLayer {
    policy: &'static Policy,
}

impl AuthorizeLayer {
    pub fn new(policy: &'static Policy) -> AuthorizeLayer {
        AuthorizeLayer { policy }
    }
}

impl<S> tower_layer::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            policy: self.policy,
        }
    }
}

/// See the [module](self) docs.
#[derive(Debug, Clone)]
pub struct Authorize<S> {
    inner: S,
    policy: &'static Policy,
}

/// The identity named by the client certificate of the connection `extensions` came on:
/// `Ok(None)` when there is no TLS or no certificate, `Err` when the certificate names no
/// identity.
fn peer(extensions: &http::Extensions) -> Result<Option<Identity>, ()> {
    let Some(certs) = extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
    else {
        return Ok(None);
    };
    let Some(leaf) = certs.first() else {
        return Ok(None);
    };
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(|_| ())?;
    let mut named = cert.valid_uri_names().filter_map(Identity::from_uri);
    match (named.next(), named.next()) {
        (Some(id), None) => Ok(Some(id)),
        _ => Err(()),
    }
}

/// Checks one call: the caller, or the status to answer instead.
fn check(
    policy: &Policy,
    path: &str,
    extensions: &http::Extensions,
) -> Result<Identity, tonic::Status> {
    let caller = match peer(extensions) {
        Ok(Some(id)) => id,
        Ok(None) => {
            return Err(tonic::Status::unauthenticated(
                "a client certificate is required (mutual TLS, see `modelhub certs`)",
            ));
        }
        Err(()) => {
            return Err(tonic::Status::permission_denied(
                "the client certificate names no Model Hub identity",
            ));
        }
    };
    let (service, method) = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .unwrap_or(("", ""));
    if service == "grpc.health.v1.Health" {
        return Ok(caller);
    }
    if service == policy.service && policy.callers(method).contains(&caller) {
        return Ok(caller);
    }
    tracing::warn!(%caller, path, "internal call refused");
    Err(tonic::Status::permission_denied(format!(
        "{caller} may not call {service}/{method}"
    )))
}

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for Authorize<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        match check(self.policy, req.uri().path(), req.extensions()) {
            Ok(caller) => {
                req.extensions_mut().insert(Caller(caller));
                Box::pin(self.inner.call(req))
            }
            Err(status) => {
                let response = status.into_http::<ResBody>();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}
