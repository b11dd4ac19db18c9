//! The `devicehub` binary: parse the configuration, set up logging, run the
//! library until SIGINT/SIGTERM.

use std::io::IsTerminal;

use clap::Parser;
use devicehub::{
    config::{Cli, Command},
    shutdown,
};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("DEVICEHUB_LOG")
                .unwrap_or_else(|_| EnvFilter::new("info,rumqttd=off")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let (trigger, shutdown) = shutdown::channel();
    tokio::spawn(async move {
        shutdown::os_signal().await;
        trigger.fire();
    });

    match cli.command {
        Some(Command::Simulate(args)) => devicehub::simulate::run(args, shutdown).await?,
        Some(Command::Serve(args)) => devicehub::serve(&args, shutdown).await?,
        None => devicehub::serve(&cli.serve, shutdown).await?,
    }
    Ok(())
}
