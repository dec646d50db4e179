//! `modelhub`: see `modelhub --help`.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    modelhub_core::telemetry::init("modelhub");
    let cli = modelhub_cli::commands::Cli::parse();
    match modelhub_cli::commands::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
