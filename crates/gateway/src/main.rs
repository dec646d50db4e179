//! `modelhub-gateway`: the public HTTP gateway as a binary of its own (`modelhub serve gateway` is the same).

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "modelhub-gateway", about = "Model Hub public HTTP gateway")]
struct Cli {
    #[command(flatten)]
    args: modelhub_gateway::ServeArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    modelhub_core::telemetry::init("gateway");
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
