//! Pieces the delivery scenarios share (the `it` tests and the long outage tests of
//! `tests/outage.rs`): a faye that forgets silent sessions quickly, a webhook source and
//! subscription, paced publishing, counting deliveries, reading a metric, and JetStream
//! streams.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use super::bayeux::{BayeuxServer, FayeOptions};
use super::nats::NatsServer;
use super::peer::{WAIT, open};
use super::webhook::WebhookReceiver;

/// faye holding each `/meta/connect` 2 s: it drops a session that has not polled for 4 s
/// (twice its timeout), with whatever it held.
pub async fn faye() -> BayeuxServer {
    BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await
}

pub fn source(faye: &BayeuxServer) -> String {
    format!("[[sources]]\nname = \"demo\"\nurl = \"{}\"\n", faye.url())
}

pub fn webhook(id: &str, channel: &str, url: &str) -> String {
    format!(
        "[[subscriptions]]\nid = \"{id}\"\nsource = \"demo\"\nchannel = \"{channel}\"\nsink = {{ type = \"webhook\", url = \"{url}\" }}\nretry = {{ max_backoff = \"1s\" }}\n"
    )
}

/// Collects the numbers delivered with a 2xx until every one of `expected` arrived;
/// returns how often each came.
pub async fn delivered(receiver: &mut WebhookReceiver, expected: u64) -> BTreeMap<u64, usize> {
    let mut seen = BTreeMap::new();
    while (seen.len() as u64) < expected {
        let request = receiver.next().await;
        if request.status == 200 {
            let n = request.json()["data"]["n"].as_u64().expect("a numbered message");
            *seen.entry(n).or_insert(0) += 1;
        }
    }
    while let Some(request) = receiver.try_next() {
        if request.status == 200 {
            let n = request.json()["data"]["n"].as_u64().expect("a numbered message");
            *seen.entry(n).or_insert(0) += 1;
        }
    }
    seen
}

pub fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|line| line.starts_with(name))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
}

/// Publishes numbered messages on `channel` at `rate` per second.
pub async fn publish_paced(url: String, channel: &'static str, numbers: std::ops::Range<u64>, rate: u64) {
    let publisher = open(cometd_bridge::cometd::Client::builder(url)).await;
    let mut ticks = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    for n in numbers {
        ticks.tick().await;
        publisher.publish(channel, json!({ "n": n, "sent_ms": unix_ms() })).await.expect("publish");
    }
    publisher.close().await;
}

/// Milliseconds since the Unix epoch: `publish_paced` stamps each message with it, so a
/// test can tell how long a message took to arrive.
pub fn unix_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970");
    u64::try_from(since.as_millis()).expect("fits")
}

pub async fn create_stream(nats: &NatsServer, name: &str, subjects: &str) -> async_nats::jetstream::Context {
    let jetstream = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: name.into(),
            subjects: vec![subjects.into()],
            ..Default::default()
        })
        .await
        .expect("create stream");
    jetstream
}

pub async fn stream_messages(jetstream: &async_nats::jetstream::Context, name: &str) -> u64 {
    jetstream.get_stream(name).await.expect("stream").info().await.expect("info").state.messages
}

pub async fn wait_for_stream(jetstream: &async_nats::jetstream::Context, name: &str, count: u64) {
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    loop {
        let have = stream_messages(jetstream, name).await;
        if have >= count {
            assert_eq!(have, count, "no more than the messages sent");
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the stream has {have} of {count} messages");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
