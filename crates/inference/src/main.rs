//! `modelhub-inference`: the inference service as a binary of its own (`modelhub serve inference` is the same).

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "modelhub-inference", about = "Model Hub inference service")]
struct Cli {
    #[command(flatten)]
    args: modelhub_inference::ServeArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    modelhub_core::telemetry::init("inference");
    Cli::parse()
        .args
        .serve(modelhub_core::serve::shutdown_signal())
        .await
}
