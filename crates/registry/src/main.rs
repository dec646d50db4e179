//! `modelhub-registry`: the registry service as a binary of its own (`modelhub serve registry` is the same).

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "modelhub-registry", about = "Model Hub registry service")]
struct Cli {
    #[command(flatten)]
    args: modelhub_registry::ServeArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    modelhub_core::telemetry::init("registry");
    Cli::parse()
        .args
        .serve(modelhub_core::serve::shutdown_signal())
        .await
}
