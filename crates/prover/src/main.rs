//! `modelhub-prover`: the prover service as a binary of its own (`modelhub serve prover` is the same).

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "modelhub-prover", about = "Model Hub prover service")]
struct Cli {
    #[command(flatten)]
    args: modelhub_prover::ServeArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    modelhub_core::telemetry::init("prover");
    Cli::parse()
        .args
        .serve(modelhub_core::serve::shutdown_signal())
        .await
}
