//! The command line: clap definitions, and the `listen` and `publish` commands, which use
//! only the CometD client.

use std::io::Write;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use futures_util::StreamExt;

use crate::cometd::{Client, ConnectionType, Error, SessionState};

/// Bridges CometD (Bayeux) channels to NATS subjects and HTTP webhooks.
#[derive(Debug, Parser)]
#[command(name = "cometd-bridge", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log line format (the filter comes from RUST_LOG).
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: crate::telemetry::LogFormat,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the bridge daemon until SIGTERM or SIGINT.
    Run {
        /// The configuration file (.toml, .yaml, .json); default $COMETD_BRIDGE_CONFIG,
        /// else config/default.toml.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// Validate a configuration file and print every problem.
    Check {
        /// The configuration file; default $COMETD_BRIDGE_CONFIG, else
        /// config/default.toml (the same file `run` would read).
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// Subscribe to channels and print every message as one JSON line (the `nats sub` of
    /// CometD).
    Listen {
        /// The CometD endpoint, http(s):// or ws(s)://.
        url: String,
        /// Channels to subscribe to; `/*` and `/**` wildcards allowed.
        #[arg(required = true)]
        channels: Vec<String>,
        #[command(flatten)]
        connection: ConnectionArgs,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Ask a running bridge whether it is ready: exit 0 when its `/readyz` says so, 1
    /// otherwise (for an image's HEALTHCHECK, which has no shell nor curl).
    Health {
        /// The readiness URL; default: `/readyz` on the configuration's `admin.listen`
        /// (an unspecified address is asked on loopback), else http://127.0.0.1:8080/readyz.
        #[arg(long)]
        url: Option<String>,
        /// The configuration file whose `admin.listen` to ask; default
        /// $COMETD_BRIDGE_CONFIG, else config/default.toml.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// Publish one message and print the server's reply as JSON.
    Publish {
        /// The CometD endpoint, http(s):// or ws(s)://.
        url: String,
        /// The channel to publish on.
        channel: String,
        /// The message data, as JSON.
        json: String,
        #[command(flatten)]
        connection: ConnectionArgs,
    },
}

/// How to reach the server.
#[derive(Debug, clap::Args)]
pub struct ConnectionArgs {
    /// Use only this transport (default: websocket, then long-polling).
    #[arg(long, value_enum)]
    transport: Option<Transport>,
    /// Give up when the server cannot be reached for this long ("10s", "500ms").
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    connection_timeout: Duration,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Transport {
    Websocket,
    LongPolling,
}

impl ConnectionArgs {
    fn client(&self, url: &str) -> Result<Client, Error> {
        let mut options = Client::builder(url).connection_timeout(Some(self.connection_timeout));
        if let Some(transport) = self.transport {
            options = options.connection_types([match transport {
                Transport::Websocket => ConnectionType::WebSocket,
                Transport::LongPolling => ConnectionType::LongPolling,
            }]);
        }
        options.build()
    }
}

/// Why a command failed: the exit code says which kind.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Bad input from the user (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// An invalid configuration (exit code 2), one problem per line.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A failure at run time (exit code 1).
    #[error(transparent)]
    Runtime(#[from] Error),
    /// The daemon failed (exit code 1).
    #[error(transparent)]
    App(#[from] crate::app::AppError),
    /// The bridge asked by `health` is not ready or did not answer (exit code 1).
    #[error("{0}")]
    Unhealthy(String),
}

impl CommandError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            CommandError::Usage(_) | CommandError::Config(_) => 2,
            CommandError::Runtime(_) | CommandError::App(_) | CommandError::Unhealthy(_) => 1,
        }
    }
}

/// The configuration file `run` and `check` use: `--config`, else `$COMETD_BRIDGE_CONFIG`, else
/// `config/default.toml`.
pub fn config_path(flag: Option<&std::path::Path>, env: &crate::config::Env) -> std::path::PathBuf {
    flag.map(std::path::Path::to_path_buf)
        .or_else(|| env.get("COMETD_BRIDGE_CONFIG").map(std::path::PathBuf::from))
        .unwrap_or_else(|| "config/default.toml".into())
}

/// Validates the configuration at `path`; prints a summary when it is valid, and a warning
/// for what `run` would still refuse in this environment (an API without a token).
///
/// # Errors
/// [`CommandError::Config`] with every problem.
pub fn check(path: &std::path::Path, env: &crate::config::Env) -> Result<(), CommandError> {
    let config = crate::config::load(path, env)?;
    if let Some(problem) = config.unprotected_api() {
        eprintln!("warning: {problem} (run refuses to start like this)");
    }
    println!(
        "{}: valid ({} sources, {} subscriptions)",
        path.display(),
        config.sources.len(),
        config.subscriptions.len()
    );
    Ok(())
}

/// Runs the daemon until SIGTERM/SIGINT. The configuration is validated before anything
/// is bound.
///
/// # Errors
/// [`CommandError::Config`] for a bad configuration, [`CommandError::App`] when the daemon
/// cannot start.
pub async fn run(path: &std::path::Path, env: &crate::config::Env) -> Result<(), CommandError> {
    let config = crate::config::load(path, env)?;
    if let Some(problem) = config.unprotected_api() {
        return Err(crate::config::ConfigError::from(vec![problem]).into());
    }
    let app = crate::app::App::build(config).await?.reloadable(path.to_path_buf(), env.clone());
    tracing::info!(admin = %app.admin_address(), config = %path.display(), "cometd-bridge started");
    app.run_until(crate::shutdown::signal()).await?;
    Ok(())
}

/// Subscribes to `channels` and prints each message as a JSON line until `count` messages
/// were printed, the server closes the session, or the process is interrupted.
///
/// # Errors
/// [`CommandError::Runtime`] when the server cannot be reached or rejects a subscription.
pub async fn listen(
    url: &str,
    channels: &[String],
    connection: &ConnectionArgs,
    count: Option<u64>,
) -> Result<(), CommandError> {
    let client = connection.client(url).map_err(|error| CommandError::Usage(error.to_string()))?;
    client.open().await?;
    for channel in channels {
        client.subscribe(channel).await?;
    }
    let transport = client.connection_type().map_or("?", ConnectionType::as_str);
    eprintln!("listening on {} ({transport})", channels.join(", "));
    let mut printed = 0;
    let mut messages = client.messages();
    // Buffered, and flushed whenever no further message is waiting: a flood goes out in
    // large writes, and a single message still shows at once.
    let mut stdout = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let mut status = client.watch_status().expect("an open client has a status");
    let mut outage = false;
    let result = loop {
        if count.is_some_and(|count| printed >= count) {
            break Ok(());
        }
        let message = tokio::select! {
            message = messages.next() => message,
            _ = &mut interrupted => break Ok(()),
            Ok(()) = status.changed() => {
                // Say when the link is lost and when the session is back, once each.
                let (state, last_error) = {
                    let status = status.borrow_and_update();
                    (status.state, status.last_error.clone())
                };
                match state {
                    SessionState::Reconnecting | SessionState::Handshaking if !outage => {
                        outage = true;
                        eprintln!("connection lost ({}); reconnecting", last_error.as_deref().unwrap_or("no cause known"));
                    }
                    SessionState::Connected if outage => {
                        outage = false;
                        let transport = client.connection_type().map_or("?", ConnectionType::as_str);
                        eprintln!("reconnected ({transport}); subscribed to {}", client.subscriptions().into_iter().collect::<Vec<_>>().join(", "));
                    }
                    _ => {}
                }
                continue;
            }
        };
        match message {
            Some(Ok(message)) => {
                let written = serde_json::to_writer(&mut stdout, &message)
                    .map_err(std::io::Error::from)
                    .and_then(|()| stdout.write_all(b"\n"));
                let flushed = written
                    .and_then(|()| if client.has_pending_messages() { Ok(()) } else { stdout.flush() });
                if flushed.is_err() {
                    break Ok(()); // stdout closed (e.g. piped into `head`)
                }
                printed += 1;
            }
            // One message the server sent does not fit: told, and the others go on.
            Some(Err(error @ Error::BadMessage { .. })) => eprintln!("{error}"),
            Some(Err(error)) => break Err(error.into()),
            None => break Ok(()),
        }
    };
    let _ = stdout.flush();
    drop(stdout);
    client.close().await;
    result
}

/// Publishes `json` on `channel` and prints the server's reply.
///
/// # Errors
/// [`CommandError::Usage`] for invalid JSON; [`CommandError::Runtime`] when the server
/// cannot be reached or rejects the publish.
pub async fn publish(
    url: &str,
    channel: &str,
    json: &str,
    connection: &ConnectionArgs,
) -> Result<(), CommandError> {
    let data: serde_json::Value = serde_json::from_str(json)
        .map_err(|error| CommandError::Usage(format!("the message data is not JSON: {error}")))?;
    let client = connection.client(url).map_err(|error| CommandError::Usage(error.to_string()))?;
    client.open().await?;
    let result = client.publish(channel, data).await;
    client.close().await;
    let reply = result?;
    println!("{}", serde_json::to_string(&reply).expect("messages serialize"));
    Ok(())
}

/// How long `health` waits for the bridge's answer.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// The readiness URL `health` asks: `url`, else `/readyz` on the configuration's
/// `admin.listen` (an unspecified address asked on loopback), else port 8080 on loopback.
pub fn health_url(url: Option<&str>, config: &std::path::Path, env: &crate::config::Env) -> String {
    if let Some(url) = url {
        return url.to_string();
    }
    let listen = crate::config::load(config, env).map(|config| config.admin.listen).ok();
    let mut address = listen.unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 8080)));
    if address.ip().is_unspecified() {
        address.set_ip(match address.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("http://{address}/readyz")
}

/// Asks a running bridge's readiness endpoint; prints its answer.
///
/// # Errors
/// [`CommandError::Unhealthy`] when it is not ready or does not answer within 5 s.
pub async fn health(url: &str) -> Result<(), CommandError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(HEALTH_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .map_err(|error| CommandError::Usage(format!("HTTP client: {error}")))?;
    let response =
        client.get(url).send().await.map_err(|error| {
            CommandError::Unhealthy(format!("{url} did not answer: {}", error.without_url()))
        })?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    let body = body.trim();
    if status.is_success() {
        println!("ready: {body}");
        Ok(())
    } else {
        Err(CommandError::Unhealthy(format!("not ready ({status}): {body}")))
    }
}
