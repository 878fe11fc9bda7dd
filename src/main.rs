//! The `cometd-bridge` command line.

use clap::Parser;

/// Bridges CometD (Bayeux) channels to NATS subjects and HTTP webhooks.
#[derive(Debug, Parser)]
#[command(name = "cometd-bridge", version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    eprintln!("cometd-bridge: no command is implemented yet; see the README's status table");
    std::process::exit(2);
}
