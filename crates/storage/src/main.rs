//! The `modelhub-storage` binary: settings from flags and `MODELHUB_STORAGE_*`, then serve.

use std::net::SocketAddr;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "modelhub-storage", about = "Model Hub storage service")]
struct Cli {
    #[arg(
        long,
        env = "MODELHUB_STORAGE_LISTEN",
        default_value = "127.0.0.1:50052"
    )]
    listen: SocketAddr,
    #[command(flatten)]
    settings: modelhub_storage::Settings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    modelhub_core::telemetry::init("storage");
    let cli = Cli::parse();
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    };
    modelhub_storage::run(cli.settings, listener, shutdown).await
}
