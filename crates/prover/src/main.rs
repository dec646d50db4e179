//! The `modelhub-prover` binary: settings from flags and `MODELHUB_PROVER_*`, then serve.

use std::net::SocketAddr;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "modelhub-prover", about = "Model Hub prover service")]
struct Cli {
    #[arg(
        long,
        env = "MODELHUB_PROVER_LISTEN",
        default_value = "127.0.0.1:50054"
    )]
    listen: SocketAddr,
    #[command(flatten)]
    settings: modelhub_prover::Settings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    modelhub_core::telemetry::init("prover");
    let cli = Cli::parse();
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    };
    modelhub_prover::run(cli.settings, listener, shutdown).await
}
