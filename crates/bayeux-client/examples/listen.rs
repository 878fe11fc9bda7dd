//! Listen: subscribes to channels and prints every message as a JSON line.
//!
//! ```text
//! cargo run -p bayeux-client --example listen -- http://127.0.0.1:8000/bayeux /chat/** /news
//! cargo run -p bayeux-client --example listen -- --long-polling http://127.0.0.1:8000/bayeux /chat/**
//! ```
//!
//! Each message goes to stdout as `{"channel": ..., "data": ...}`, one a line; progress
//! (`subscribed /chat/**`) and errors go to stderr. The client tries websocket first and
//! falls back to long-polling unless `--long-polling` or `--websocket` says which. It
//! runs until interrupted (Ctrl-C closes the session politely).

use bayeux_client::{Client, ConnectionType, Data};
use futures_util::StreamExt;
use serde_json::json;

#[tokio::main]
async fn main() {
    let mut kinds = vec![ConnectionType::WebSocket, ConnectionType::LongPolling];
    let mut positional = Vec::new();
    for argument in std::env::args().skip(1) {
        match argument.as_str() {
            "--long-polling" => kinds = vec![ConnectionType::LongPolling],
            "--websocket" => kinds = vec![ConnectionType::WebSocket],
            _ => positional.push(argument),
        }
    }
    if positional.len() < 2 {
        eprintln!("usage: listen [--long-polling | --websocket] <url> <channel>...");
        std::process::exit(2);
    }
    let url = positional.remove(0);
    if let Err(error) = listen(&url, kinds, &positional).await {
        eprintln!("listen: {error}");
        std::process::exit(1);
    }
}

async fn listen(
    url: &str,
    kinds: Vec<ConnectionType>,
    channels: &[String],
) -> Result<(), bayeux_client::Error> {
    let client = Client::builder(url).connection_types(kinds).build()?;
    client.open().await?;
    for channel in channels {
        client.subscribe(channel).await?;
        eprintln!("subscribed {channel}");
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
                    let data = message.data.map(Data::into_value);
                    println!("{}", json!({ "channel": message.channel, "data": data }));
                }
                // The link was down for longer than the connection timeout: the client
                // keeps trying, and says so.
                Some(Err(error)) => eprintln!("listen: {error}"),
                None => break,
            },
            _ = &mut interrupted => break,
        }
    }
    client.close().await;
    Ok(())
}
