//! What every service binary does around `run`: bind and announce the address, stop on ctrl-c.

use std::net::SocketAddr;

/// Prints `modelhub <service> listening on <addr>` on stdout (with `--listen ...:0`, the port the
/// system chose), so scripts and tests can find a service they started.
pub fn announce(service: &str, addr: SocketAddr) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "modelhub {service} listening on {addr}");
    let _ = out.flush();
}

/// Binds `addr` for `service` and [`announce`]s the bound address: what every gRPC service
/// binary does before `run`.
pub async fn bind(service: &str, addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("binding {addr}: {e}")))?;
    announce(service, listener.local_addr()?);
    Ok(listener)
}

/// Resolves on ctrl-c (SIGINT): the graceful-shutdown signal of the binaries.
pub async fn ctrl_c() {
    if let Err(e) = tokio::signal::ctrl_c().await {
        tracing::error!(error = %e, "waiting for ctrl-c failed");
    }
}
