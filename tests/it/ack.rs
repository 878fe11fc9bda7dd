//! The ack extension against the official cometd-nodejs-server with its server-side ack
//! extension: negotiated at the handshake, every batch acknowledged once received, an
//! unconfirmed batch sent again by the server and handed out once; against faye (no ack)
//! it stays off.

use std::time::Duration;

use cometd_bridge::cometd::{AckExtension, Client, Data, Message};
use serde_json::{Value, json};

use crate::support::app::TestApp;
use crate::support::bayeux::{BayeuxServer, CometdOptions, FayeOptions};
use crate::support::peer::{WAIT, open};
use crate::support::webhook::WebhookReceiver;

async fn ack_server() -> BayeuxServer {
    BayeuxServer::cometd(CometdOptions { timeout: Some(2000), ack: true, ..CometdOptions::default() }).await
}

async fn next(client: &Client) -> Message {
    tokio::time::timeout(WAIT, client.receive()).await.expect("a message within the wait").expect("a message")
}

fn number(message: &Message) -> u64 {
    message
        .data
        .clone()
        .map(Data::into_value)
        .and_then(|data| data["n"].as_u64())
        .expect("a numbered message")
}

async fn publish(server: &BayeuxServer, channel: &str, numbers: std::ops::Range<u64>) {
    let publisher = open(Client::builder(server.url())).await;
    for n in numbers {
        publisher.publish(channel, json!({ "n": n })).await.expect("publish");
    }
    publisher.close().await;
}

#[tokio::test]
async fn batches_are_acknowledged_and_each_message_arrives_once() {
    let server = ack_server().await;
    let extension = AckExtension::new();
    let client = open(Client::builder(server.url()).extension(extension.clone())).await;
    assert!(extension.is_enabled(), "the server agreed to acknowledgements");
    client.subscribe("/acked").await.expect("subscribe");
    publish(&server, "/acked", 0..20).await;
    let mut numbers = Vec::new();
    while numbers.len() < 20 {
        numbers.push(number(&next(&client).await));
    }
    assert_eq!(numbers, (0..20).collect::<Vec<_>>());
    // A marker after them: nothing was sent twice in between.
    publish(&server, "/acked", 20..21).await;
    assert_eq!(number(&next(&client).await), 20);
    client.close().await;
}

/// A batch not confirmed in time is sent again by the server (the next connect
/// acknowledges only the batch before it); the client recognises the events it already
/// handed out and drops them: each arrives once, and the next one after them.
#[tokio::test]
async fn a_batch_sent_again_is_handed_out_once() {
    let server = ack_server().await;
    let (extension, confirmer) = AckExtension::confirmed(Duration::from_millis(300));
    let client = open(Client::builder(server.url()).extension(extension.clone())).await;
    client.subscribe("/unconfirmed").await.expect("subscribe");
    publish(&server, "/unconfirmed", 0..1).await;
    assert_eq!(number(&next(&client).await), 0);
    // Not confirmed: the server sends message 0 again, and the client drops it.
    let deadline = tokio::time::Instant::now() + WAIT;
    while extension.resent_dropped() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the server never sent the batch again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    publish(&server, "/unconfirmed", 1..2).await;
    assert_eq!(number(&next(&client).await), 1, "message 0 was not handed out twice");
    confirmer.confirm(2);
    publish(&server, "/unconfirmed", 2..3).await;
    assert_eq!(number(&next(&client).await), 2, "once confirmed, no further copy");
    client.close().await;
}

/// Receive, leave unconfirmed, close, open: events of the earlier session never hold the
/// new session's connects back, so the open succeeds at once (it used to wait for them
/// inside the outgoing hooks until request_timeout, and fail).
#[tokio::test]
async fn events_left_unconfirmed_never_delay_the_next_open() {
    let server = ack_server().await;
    let (extension, _never_confirms) = AckExtension::confirmed(Duration::from_secs(30));
    let options =
        Client::builder(server.url()).extension(extension.clone()).request_timeout(Duration::from_secs(5));
    let client = open(options).await;
    client.subscribe("/left").await.expect("subscribe");
    publish(&server, "/left", 0..3).await;
    // Unconfirmed, the batch may come again: received at least once, left so.
    assert_eq!(number(&next(&client).await), 0);
    client.close().await;
    tokio::time::timeout(Duration::from_secs(2), client.open())
        .await
        .expect("open succeeds at once")
        .expect("open succeeds");
    assert!(extension.is_enabled());
    client.subscribe("/left").await.expect("subscribe again");
    publish(&server, "/left", 3..4).await;
    let mut after = number(&next(&client).await);
    while after < 3 {
        after = number(&next(&client).await); // what was pending from before the close
    }
    assert_eq!(after, 3, "the new session delivers");
    client.close().await;
}

#[tokio::test]
async fn a_server_without_acks_leaves_it_off() {
    let server = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let extension = AckExtension::new();
    let client = open(Client::builder(server.url()).extension(extension.clone())).await;
    assert!(!extension.is_enabled());
    client.subscribe("/plain").await.expect("subscribe");
    client.publish("/plain", json!({"n": 7})).await.expect("publish");
    assert_eq!(number(&next(&client).await), 7);
    client.close().await;
}

/// The bridge on a server with acks: each batch is acknowledged once spooled, and every
/// message reaches the webhook once.
#[tokio::test]
async fn the_bridge_acknowledges_spooled_batches() {
    let server = ack_server().await;
    let mut receiver = WebhookReceiver::start([]).await;
    let app = TestApp::spawn(&format!(
        "[[sources]]\nname = \"demo\"\nurl = \"{}\"\n[[subscriptions]]\nid = \"acked\"\nsource = \"demo\"\nchannel = \"/bridged\"\nsink = {{ type = \"webhook\", url = \"{}\" }}\n",
        server.url(),
        receiver.url()
    ))
    .await;
    app.wait_ready().await;
    publish(&server, "/bridged", 0..30).await;
    let mut numbers = Vec::new();
    while numbers.len() < 30 {
        let body: Value = receiver.next().await.json();
        numbers.push(body["data"]["n"].as_u64().expect("numbered"));
    }
    assert_eq!(numbers, (0..30).collect::<Vec<_>>(), "each once, in order");
    publish(&server, "/bridged", 30..31).await;
    assert_eq!(receiver.next().await.json()["data"]["n"], 30, "no copy before the marker");
    app.stop().await;
}

/// The bridge with acks on a state store that stalls for 20 s (the NATS backend's server
/// frozen) under a steady publisher: seen from the server, the bridge's connects never
/// stop for longer than the server holds one plus the ack wait's bound (1 s) and some
/// slack, the session is never lost, and once the store is back every accepted message
/// reaches the webhook, once.
#[tokio::test]
async fn a_stalled_store_never_holds_the_connects_back() {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::{Arc, Mutex};

    const MARKER: u64 = 1_000_000_000;
    let dir = tempfile::tempdir().expect("temp dir");
    let connects = dir.path().join("connects.log");
    let server = BayeuxServer::cometd(CometdOptions {
        timeout: Some(2000),
        ack: true,
        connect_log: Some(connects.clone()),
        ..CometdOptions::default()
    })
    .await;
    let mut nats = crate::support::nats::NatsServer::start().await;
    let mut receiver = WebhookReceiver::start([]).await;
    let toml = format!(
        // A lease longer than the stall: this test is about the ack wait, not about a
        // replica that stops its source when it cannot renew its lease.
        "[cluster]\nlease_ttl = \"60s\"\n[nats]\nurl = \"{}\"\n[[sources]]\nname = \"demo\"\nurl = \"{}\"\n[[subscriptions]]\nid = \"acked\"\nsource = \"demo\"\nchannel = \"/bridged\"\nsink = {{ type = \"webhook\", url = \"{}\" }}\n",
        nats.url(),
        server.url(),
        receiver.url()
    );
    let app = TestApp::spawn_with_state(
        &toml,
        tempfile::tempdir().expect("dir"),
        None,
        "backend = \"nats\"\nbucket = \"bridge\"\n",
    )
    .await;
    app.wait_ready().await;
    let accepted: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let ticking = tokio::spawn({
        let (url, accepted) = (server.url(), accepted.clone());
        async move {
            let publisher = open(Client::builder(url)).await;
            let mut every = tokio::time::interval(Duration::from_millis(100));
            for n in 0.. {
                every.tick().await;
                if publisher.publish("/bridged", json!({ "n": n })).await.is_ok() {
                    accepted.lock().expect("not poisoned").insert(n);
                }
            }
        }
    });
    let mut delivered: BTreeMap<u64, usize> = BTreeMap::new();
    while delivered.len() < 10 {
        let n = receiver.next().await.json()["data"]["n"].as_u64().expect("numbered");
        *delivered.entry(n).or_insert(0) += 1;
    }
    let frozen_at = std::time::SystemTime::now();
    nats.process().freeze();
    // The stall is the scenario: 20 s of a store that answers nothing.
    tokio::time::sleep(Duration::from_secs(20)).await;
    nats.process().thaw();
    let thawed_at = std::time::SystemTime::now();
    ticking.abort();
    let _ = ticking.await;
    let publisher = open(Client::builder(server.url())).await;
    publisher.publish("/bridged", json!({ "n": MARKER })).await.expect("the marker");
    publisher.close().await;
    while !delivered.contains_key(&MARKER) {
        let n = receiver.next().await.json()["data"]["n"].as_u64().expect("numbered");
        *delivered.entry(n).or_insert(0) += 1;
    }

    let millis = |time: std::time::SystemTime| {
        time.duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_millis() as u64
    };
    let times: Vec<u64> = std::fs::read_to_string(&connects)
        .expect("the connect log")
        .lines()
        .map(|line| line.parse().expect("a time"))
        .filter(|time| (millis(frozen_at)..=millis(thawed_at)).contains(time))
        .collect();
    let mut gaps: Vec<u64> = times.windows(2).map(|pair| pair[1] - pair[0]).collect();
    gaps.push(times.first().map_or(u64::MAX, |first| first - millis(frozen_at)));
    gaps.push(times.last().map_or(u64::MAX, |last| millis(thawed_at) - last));
    let longest = gaps.iter().max().copied().unwrap_or(u64::MAX);
    assert!(longest <= 4_000, "a connect waited {longest} ms (server hold 2 s, ack bound 1 s): {gaps:?}");
    let accepted = accepted.lock().expect("not poisoned").clone();
    let missing: Vec<u64> = accepted.iter().filter(|n| !delivered.contains_key(n)).copied().collect();
    let twice: Vec<(&u64, &usize)> = delivered.iter().filter(|(_, count)| **count > 1).collect();
    assert!(missing.is_empty(), "{} accepted messages never delivered: {missing:?}", missing.len());
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    let metrics = app.metrics().await;
    let losses =
        crate::support::scenario::metric(&metrics, "cometd_bridge_session_losses_total{source=\"demo\"}");
    assert_eq!(losses, 0.0, "the session was never lost");
    app.stop().await;
}
