//! `modelhub-gateway`: the public HTTP gateway as a binary of its own.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use modelhub_gateway::{Settings, run};

#[derive(Parser)]
#[command(name = "modelhub-gateway", about = "Model Hub public HTTP gateway")]
struct Cli {
    /// Address to serve HTTP on.
    #[arg(
        long,
        env = "MODELHUB_GATEWAY_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    listen: SocketAddr,
    #[command(flatten)]
    settings: Settings,
}

#[tokio::main]
async fn main() -> ExitCode {
    modelhub_core::telemetry::init("gateway");
    let cli = Cli::parse();
    match serve(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("modelhub-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    cli.settings.validate()?;
    let listener = std::net::TcpListener::bind(cli.listen)
        .with_context(|| format!("binding {}", cli.listen))?;
    let shutdown = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "waiting for ctrl-c failed");
        }
    };
    run(cli.settings, listener, shutdown).await
}
