//! `modelhub-storage`: the storage service as a binary of its own (`modelhub serve storage` is the same).

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "modelhub-storage", about = "Model Hub storage service")]
struct Cli {
    #[command(flatten)]
    args: modelhub_storage::ServeArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    modelhub_core::telemetry::init("storage");
    Cli::parse()
        .args
        .serve(modelhub_core::serve::shutdown_signal())
        .await
}
