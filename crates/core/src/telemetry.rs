//! Logging set-up shared by every binary.

/// Installs a `tracing` subscriber: `RUST_LOG` (default `info`), human-readable lines on stderr.
/// Calling it twice is harmless.
pub fn init(service: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    tracing::debug!(service, "telemetry initialised");
}
