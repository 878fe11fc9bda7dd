//! Salesforce replay: logs in with OAuth, subscribes with the replay extension and prints
//! every event with its replay id, as JSON lines.
//!
//! ```text
//! cargo run -p bayeux-client --example salesforce_replay -- \
//!     --login https://login.salesforce.com --client-id 3MVG9... --client-secret ... \
//!     --refresh-token 5Aep... --replay-from -2 /event/Order__e
//! ```
//!
//! Flows: `--refresh-token T`, `--username U --password P`, or `--client-credentials`
//! (all with `--client-id` and `--client-secret`). `--replay-from` is where each channel
//! starts: `-1` new events only (the default), `-2` everything the org retains, or a
//! replay id to resume after; a position the org no longer has falls back to `-2`
//! (duplicates rather than gaps), said on stderr. `--api` picks the API version (default
//! 62.0); `--cometd-url` replaces the `{instance}/cometd/{api}` endpoint (for a test
//! server). Each event goes to stdout as `{"channel": ..., "replayId": ..., "data": ...}`.

use std::collections::HashMap;

use bayeux_client::{
    Client, ConnectionType, Data, ReplayExtension, ReplayFallback, ReplayPosition, SalesforceAuth,
    SalesforceCredentials, SalesforceFlow, replay_id,
};
use futures_util::StreamExt;
use serde_json::json;

const USAGE: &str = "usage: salesforce_replay --login <url> --client-id <id> [--client-secret <secret>] \
(--refresh-token <t> | --username <u> --password <p> | --client-credentials) \
[--replay-from -1|-2|<id>] [--api 62.0] [--cometd-url <url>] <channel>...";

#[tokio::main]
async fn main() {
    let (options, channels) = match read_arguments() {
        Ok(read) => read,
        Err(message) => {
            eprintln!("salesforce_replay: {message}\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(error) = run(options, &channels).await {
        eprintln!("salesforce_replay: {error}");
        std::process::exit(1);
    }
}

/// The command line as `--name value` pairs (flags get an empty value) and channels.
fn read_arguments() -> Result<(HashMap<String, String>, Vec<String>), String> {
    let mut options = HashMap::new();
    let mut channels = Vec::new();
    let mut arguments = std::env::args().skip(1);
    while let Some(argument) = arguments.next() {
        match argument.strip_prefix("--") {
            Some("client-credentials") => {
                options.insert("client-credentials".to_owned(), String::new());
            }
            Some(name) => {
                let value = arguments.next().ok_or(format!("--{name} needs a value"))?;
                options.insert(name.to_owned(), value);
            }
            None => channels.push(argument),
        }
    }
    if channels.is_empty() {
        return Err("no channel".into());
    }
    Ok((options, channels))
}

async fn run(options: HashMap<String, String>, channels: &[String]) -> Result<(), bayeux_client::Error> {
    let option = |name: &str| options.get(name).cloned();
    let invalid = |what: &str| bayeux_client::Error::InvalidOptions(what.to_owned());
    let flow = if let Some(refresh_token) = option("refresh-token") {
        SalesforceFlow::RefreshToken { refresh_token }
    } else if let (Some(username), Some(password)) = (option("username"), option("password")) {
        SalesforceFlow::Password { username, password }
    } else if options.contains_key("client-credentials") {
        SalesforceFlow::ClientCredentials
    } else {
        return Err(invalid(
            "no OAuth flow: --refresh-token, --username and --password, or --client-credentials",
        ));
    };
    let auth = SalesforceAuth::new(SalesforceCredentials {
        login_url: option("login").ok_or_else(|| invalid("--login is required"))?,
        client_id: option("client-id").ok_or_else(|| invalid("--client-id is required"))?,
        client_secret: option("client-secret"),
        flow,
    })?;
    // Logging in first tells where the org's instance is; the client logs in again by
    // itself when the server refuses the token later.
    let token = auth.login().await?;
    let api = option("api").unwrap_or_else(|| "62.0".into());
    let url = option("cometd-url").unwrap_or_else(|| SalesforceAuth::cometd_url(&token.instance_url, &api));
    let from = match option("replay-from") {
        Some(id) => ReplayPosition::from_id(id.parse().map_err(|_| invalid("--replay-from takes a number"))?),
        None => ReplayPosition::New,
    };
    // A real application would answer with the last replay id it processed, from its own
    // storage, so that a restart resumes where it stopped.
    let replay =
        ReplayExtension::new(move |_channel: &str| from, ReplayFallback::All).on_fallback(|applied| {
            eprintln!("replay: {} from {} instead ({})", applied.channel, applied.fallback, applied.error);
        });
    let client = Client::builder(url)
        .connection_types([ConnectionType::LongPolling])
        .auth(auth)
        .extension(replay)
        .build()?;
    client.open().await?;
    for channel in channels {
        client.subscribe(channel).await?;
        eprintln!("subscribed {channel} from {from}");
    }
    let mut messages = client.messages();
    // One listener for the whole loop: one made afresh each turn misses a Ctrl-C that
    // comes while a message is being printed.
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        tokio::select! {
            message = messages.next() => match message {
                Some(Ok(message)) => {
                    let id = replay_id(&message);
                    let data = message.data.map(Data::into_value);
                    println!("{}", json!({ "channel": message.channel, "replayId": id, "data": data }));
                }
                Some(Err(error)) => eprintln!("salesforce_replay: {error}"),
                None => break,
            },
            _ = &mut interrupted => break,
        }
    }
    client.close().await;
    Ok(())
}
