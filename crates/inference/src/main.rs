//! The `modelhub-inference` binary: settings from flags and `MODELHUB_INFERENCE_*`, then serve.

use std::net::SocketAddr;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "modelhub-inference", about = "Model Hub inference service")]
struct Cli {
    #[arg(
        long,
        env = "MODELHUB_INFERENCE_LISTEN",
        default_value = "127.0.0.1:50053"
    )]
    listen: SocketAddr,
    #[command(flatten)]
    settings: modelhub_inference::Settings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    modelhub_core::telemetry::init("inference");
    let cli = Cli::parse();
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    };
    modelhub_inference::run(cli.settings, listener, shutdown).await
}
