//! The `devicehub` binary: parse the command line, set up logging and
//! tracing, run the library until SIGINT/SIGTERM.

use clap::Parser;
use devicehub::cli::{Cli, Command};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = devicehub::telemetry::init(
        cli.log_format,
        cli.otlp_endpoint.as_deref(),
        cli.otlp_sampler,
    )?;

    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));

    let result = match cli.command {
        #[cfg(feature = "simulator")]
        Some(Command::Simulate(args)) => devicehub::simulate::run(*args, shutdown)
            .await
            .map_err(anyhow::Error::from),
        Some(Command::Serve(args)) => devicehub::serve(&args, shutdown).await.map_err(Into::into),
        Some(Command::Health(args)) => {
            let status = devicehub::health::probe(&args).await;
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
        None => devicehub::serve(&cli.serve, shutdown)
            .await
            .map_err(Into::into),
    };
    // The last spans, also those of a failed start.
    telemetry.shutdown();
    result
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
