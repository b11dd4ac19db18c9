//! The `devicehub` binary: parse the command line (`cli/`, which the
//! library knows nothing of), set up logging and tracing, run the library
//! until SIGINT/SIGTERM.

mod cli;
// Here rather than in `cli/`: the integration tests compile `cli/` too, and
// would run these again in every test binary.
#[cfg(test)]
#[path = "cli/tests.rs"]
mod cli_tests;

use clap::Parser;
use cli::{Cli, Command, ServeArgs};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = devicehub::telemetry::init(
        cli.log_format.into(),
        cli.otlp_endpoint.as_deref(),
        cli.otlp_sampler,
    )?;

    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));

    let result = match cli.command {
        #[cfg(feature = "simulator")]
        Some(Command::Simulate(args)) => simulate(&args, shutdown).await,
        Some(Command::Serve(args)) => serve(&args, shutdown).await,
        Some(Command::Health(args)) => {
            let status = devicehub::health::probe(&args.probe()).await;
            telemetry.shutdown();
            match status? {
                ServingStatus::Serving => {
                    println!("SERVING");
                    return Ok(());
                }
                other => {
                    println!("{}", other.as_str_name());
                    std::process::exit(1);
                }
            }
        }
        None => serve(&cli.serve, shutdown).await,
    };
    // The last spans, also those of a failed start.
    telemetry.shutdown();
    result
}

/// `devicehub serve`: the flags checked and turned into the library's
/// configuration, then the service until `shutdown`.
async fn serve(args: &ServeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = args.serve_config()?;
    devicehub::serve(config, shutdown).await?;
    Ok(())
}

/// `devicehub simulate`: the devices the flags describe, until `shutdown`.
#[cfg(feature = "simulator")]
async fn simulate(args: &cli::SimulateArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    devicehub::simulate::run(args.config()?, shutdown).await;
    Ok(())
}

/// Cancels `shutdown` on SIGINT (Ctrl-C) or SIGTERM.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the service");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    shutdown.cancel();
}
