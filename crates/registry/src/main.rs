//! `modelhub-registry`: runs the registry gRPC service until ctrl-c.

use std::net::SocketAddr;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "modelhub-registry", about = "Model Hub registry service")]
struct Cli {
    #[arg(
        long,
        env = "MODELHUB_REGISTRY_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    listen: SocketAddr,
    #[command(flatten)]
    settings: modelhub_registry::Settings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    modelhub_core::telemetry::init("registry");
    let cli = Cli::parse();
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    let shutdown = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "waiting for ctrl-c failed");
        }
    };
    modelhub_registry::run(cli.settings, listener, shutdown).await
}
