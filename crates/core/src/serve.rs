//! What every service binary does around `run`: bind and announce the address, stop on SIGINT
//! (ctrl-c) or SIGTERM (what Kubernetes and `docker stop` send).

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

/// Resolves on SIGINT (ctrl-c) or SIGTERM, whichever comes first, after logging which: the
/// graceful-shutdown signal of every binary (`run` then stops accepting and lets in-flight
/// requests finish). The handlers are installed when this is called, not when the future is
/// first polled, so call it before announcing readiness. Must be called inside a Tokio runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let listen = |kind: SignalKind, name: &'static str| match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, signal = name, "cannot listen for the signal");
            None
        }
    };
    let mut int = listen(SignalKind::interrupt(), "SIGINT");
    let mut term = listen(SignalKind::terminate(), "SIGTERM");
    async fn wait(s: Option<&mut tokio::signal::unix::Signal>) {
        match s {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    }
    async move {
        tokio::select! {
            () = wait(int.as_mut()) => tracing::info!(signal = "SIGINT", "stopping"),
            () = wait(term.as_mut()) => tracing::info!(signal = "SIGTERM", "stopping"),
        }
    }
}

/// Declares a gRPC service crate's `ServeArgs`: what its own binary and `modelhub serve
/// <service>` take (`--listen`, with its environment variable and default, and the crate's
/// `Settings` flattened), and `ServeArgs::serve`, which [`bind`]s, announces and calls the
/// crate's `run(settings, listener, shutdown)`. The crate must depend on `clap` and `anyhow`.
///
/// ```ignore
/// modelhub_core::serve_args!("prover", "MODELHUB_PROVER_LISTEN", "127.0.0.1:50054");
/// ```
#[macro_export]
macro_rules! serve_args {
    ($service:literal, $listen_env:literal, $listen_default:literal) => {
        #[doc = concat!(
                    "What the `modelhub-", $service, "` binary and `modelhub serve ", $service,
                    "` take: where to listen, and the settings."
                )]
        #[derive(Debug, Clone, clap::Args)]
        pub struct ServeArgs {
            /// Address to listen on (port 0: any free port, printed once bound).
            #[arg(long, env = $listen_env, default_value = $listen_default)]
            pub listen: std::net::SocketAddr,
            #[command(flatten)]
            pub settings: Settings,
        }

        impl ServeArgs {
            /// Binds, announces the bound address on stdout, and serves until `shutdown`.
            pub async fn serve(
                self,
                shutdown: impl std::future::Future<Output = ()> + Send + 'static,
            ) -> anyhow::Result<()> {
                let listener = $crate::serve::bind($service, self.listen).await?;
                run(self.settings, listener, shutdown).await
            }
        }
    };
}
