//! The long outage tests, in a test binary of their own: cargo runs test binaries one
//! after another, so these minute-long scenarios, whose point is that no CometD session is
//! lost while a sink is down, do not share the machine with the rest of the suite.

#[path = "it/support/mod.rs"]
mod support;

use std::time::Duration;

use serde_json::Value;

use support::app::TestApp;
use support::nats::NatsServer;
use support::scenario::{
    create_stream, delivered, faye, metric, publish_paced, source, wait_for_stream, webhook,
};
use support::webhook::WebhookReceiver;

/// A webhook answering 503 for 60 s (15 session timeouts of faye) while 30 msg/s arrive,
/// with small client and queue capacities (the first release stalled its session behind
/// them): the source keeps polling, every message arrives exactly once, no dead letter, no
/// lost session.
#[tokio::test]
async fn a_webhook_down_longer_than_the_session_timeout_loses_nothing() {
    let faye = faye().await;
    let mut receiver = WebhookReceiver::start(std::iter::repeat_n(503, 1_000_000)).await;
    let app = TestApp::spawn(&format!(
        "[bridge]\nqueue_capacity = 20\n{}max_pending_count = 20\n{}",
        source(&faye),
        webhook("hook", "/down", &receiver.url())
    ))
    .await;
    app.wait_ready().await;
    let publishing = tokio::spawn(publish_paced(faye.url(), "/down", 0..1950, 30));
    // The outage itself.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let (_, subscriptions) = app.call("GET", "/api/v1/subscriptions/hook", None).await;
    assert!(
        subscriptions["backlog"]["messages"].as_u64().unwrap_or_default() > 100,
        "a backlog builds up: {subscriptions}"
    );
    receiver.heal();
    publishing.await.expect("published");
    let seen = delivered(&mut receiver, 1950).await;
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), (0..1950).collect::<Vec<_>>());
    assert!(seen.values().all(|count| *count == 1), "each exactly once: {seen:?}");
    assert!(app.dead_letters().await.is_empty());
    let metrics = app.metrics().await;
    assert_eq!(metric(&metrics, "cometd_bridge_session_losses_total"), 0.0, "{metrics}");
    // Delivered messages leave the spool with their settlement, a moment later.
    let deadline = tokio::time::Instant::now() + support::peer::WAIT;
    while metric(&app.metrics().await, "cometd_bridge_spool_messages{subscription=\"hook\"}") != 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "the spool does not empty");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.stop().await;
}

/// JetStream down for 40 s (10 session timeouts of faye) while 30 msg/s arrive: the stream
/// ends with every message once, in order.
#[tokio::test]
async fn jetstream_down_longer_than_the_session_timeout_stores_each_message_once() {
    let faye = faye().await;
    let mut nats = NatsServer::start().await;
    create_stream(&nats, "DOWN", "down.>").await;
    let app = TestApp::spawn(&format!(
        "[nats]\nurl = \"{}\"\n{}[[subscriptions]]\nid = \"js\"\nsource = \"demo\"\nchannel = \"/js\"\nsink = {{ type = \"nats\", subject = \"down.x\", jetstream = true }}\nretry = {{ max_backoff = \"1s\" }}\n",
        nats.url(),
        source(&faye)
    ))
    .await;
    app.wait_ready().await;
    let publishing = tokio::spawn(publish_paced(faye.url(), "/js", 0..1350, 30));
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.process().stop().await;
    // The outage itself.
    tokio::time::sleep(Duration::from_secs(40)).await;
    nats.process().restart().await;
    publishing.await.expect("published");
    let jetstream = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("reconnect"));
    wait_for_stream(&jetstream, "DOWN", 1350).await;
    let stream = jetstream.get_stream("DOWN").await.expect("stream");
    for sequence in 1..=1350u64 {
        let stored = stream.get_raw_message(sequence).await.expect("stored");
        let payload: Value = serde_json::from_slice(&stored.payload).expect("JSON");
        assert_eq!(payload["n"], sequence - 1, "every message, once, in order");
    }
    assert!(app.dead_letters().await.is_empty());
    assert_eq!(metric(&app.metrics().await, "cometd_bridge_session_losses_total"), 0.0);
    app.stop().await;
}
