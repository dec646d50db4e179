//! `modelhub-prover`: the prover service as a binary of its own (`modelhub serve prover` is the same).

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "modelhub-prover", about = "Model Hub prover service")]
struct Cli {
    #[command(flatten)]
    args: modelhub_prover::ServeArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    modelhub_core::telemetry::init("prover");
    let args = Cli::parse().args;
    match args.serve(modelhub_core::serve::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line, causes included: what an operator reads in a failed start.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
