//! The `cometd-bridge` command line: parses arguments, runs the command, and turns its
//! outcome into an exit code (0 success, 1 runtime failure, 2 bad usage or configuration)
//! and, on failure, readable lines on stderr.

use std::process::ExitCode;

use clap::Parser;
use cometd_bridge::cli::{self, Cli, Command, CommandError};
use cometd_bridge::{config, telemetry};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Run { .. } => "info",
        _ => "warn",
    };
    telemetry::init(cli.log_format, default_filter);
    let env = config::process_env();
    let result = match &cli.command {
        Command::Run { config } => cli::run(&cli::config_path(config.as_deref(), &env), &env).await,
        Command::Check { config } => cli::check(&cli::config_path(config.as_deref(), &env), &env),
        Command::Listen { url, channels, connection, count } => {
            cli::listen(url, channels, connection, *count).await
        }
        Command::Health { url, config } => {
            cli::health(&cli::health_url(url.as_deref(), &cli::config_path(config.as_deref(), &env), &env))
                .await
        }
        Command::Publish { url, channel, json, connection } => {
            cli::publish(url, channel, json, connection).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CommandError::Config(error)) => {
            for problem in error.problems() {
                eprintln!("{problem}");
            }
            ExitCode::from(2)
        }
        Err(error) => {
            eprintln!("cometd-bridge: {}", cometd_bridge::telemetry::error_chain(&error));
            ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(1))
        }
    }
}
