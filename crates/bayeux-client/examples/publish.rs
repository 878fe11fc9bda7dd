//! Publish: sends one message to a channel and prints the server's reply.
//!
//! ```text
//! cargo run -p bayeux-client --example publish -- http://127.0.0.1:8000/bayeux /chat/room '{"text": "hello"}'
//! ```
//!
//! The data is JSON (a bare word that is not JSON is sent as a string). The reply goes to
//! stdout as one JSON line; a refused publish exits with status 1 and the server's error.

use bayeux_client::{Client, ConnectionType};
use serde_json::Value;

#[tokio::main]
async fn main() {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let [url, channel, data] = arguments.as_slice() else {
        eprintln!("usage: publish <url> <channel> <json data>");
        std::process::exit(2);
    };
    let data = serde_json::from_str(data).unwrap_or_else(|_| Value::String(data.clone()));
    if let Err(error) = publish(url, channel, data).await {
        eprintln!("publish: {error}");
        std::process::exit(1);
    }
}

async fn publish(url: &str, channel: &str, data: Value) -> Result<(), bayeux_client::Error> {
    // One request and done: long-polling needs no upgrade round trip.
    let client = Client::builder(url).connection_types([ConnectionType::LongPolling]).build()?;
    client.open().await?;
    let outcome = client.publish(channel, data).await;
    client.close().await;
    let reply = outcome?;
    println!("{}", serde_json::to_string(&reply).unwrap_or_default());
    Ok(())
}
