//! `modelhub-gateway`: the public HTTP gateway as a binary of its own (`modelhub serve gateway` is the same).

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "modelhub-gateway", about = "Model Hub public HTTP gateway")]
struct Cli {
    #[command(flatten)]
    args: modelhub_gateway::ServeArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    modelhub_core::telemetry::init("gateway");
    Cli::parse()
        .args
        .serve(modelhub_core::serve::shutdown_signal())
        .await
}
