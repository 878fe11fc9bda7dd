//! The bridge with replay against the Salesforce-like faye fixture: nothing is lost across
//! `kill -9`, expired positions, expiring tokens and forgotten sessions, and what is
//! replayed twice is recognisable downstream by its delivery id.

use cometd_bridge::store::PositionRecords;
use cometd_bridge::store::Spools;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::app::TestApp;
use crate::support::bayeux::{BayeuxServer, FayeOptions};
use crate::support::daemon::Daemon;
use crate::support::nats::NatsServer;
use crate::support::peer::{WAIT, open};
use crate::support::webhook::WebhookReceiver;

const CHANNEL: &str = "/event/Order__e";

async fn salesforce_like(fixture: Value, extra: Vec<(String, Value)>, oauth: Option<Value>) -> BayeuxServer {
    let mut extensions = vec![("salesforce".to_string(), fixture)];
    extensions.extend(extra);
    BayeuxServer::faye(FayeOptions { timeout: Some(2), extensions, oauth, ..FayeOptions::default() }).await
}

fn replay_source(faye: &BayeuxServer, extra: &str) -> String {
    format!(
        "[[sources]]\nname = \"sf\"\nurl = \"{}\"\nconnection_types = [\"long-polling\"]\nreplay = true\n{extra}",
        faye.url()
    )
}

fn jetstream_subscription() -> String {
    format!(
        "[[subscriptions]]\nid = \"orders\"\nsource = \"sf\"\nchannel = \"{CHANNEL}\"\nsink = {{ type = \"nats\", subject = \"sf.orders\", jetstream = true }}\n"
    )
}

async fn stream(nats: &NatsServer) -> async_nats::jetstream::Context {
    let jetstream = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: "SF".into(),
            subjects: vec!["sf.>".into()],
            ..Default::default()
        })
        .await
        .expect("create stream");
    jetstream
}

/// The event numbers in the stream, in stream order.
async fn stored_numbers(jetstream: &async_nats::jetstream::Context) -> Vec<u64> {
    let mut stream = jetstream.get_stream("SF").await.expect("stream");
    let count = stream.info().await.expect("info").state.messages;
    let mut numbers = Vec::new();
    for sequence in 1..=count {
        let stored = stream.get_raw_message(sequence).await.expect("stored message");
        let payload: Value = serde_json::from_slice(&stored.payload).expect("JSON");
        numbers.push(payload["payload"]["n"].as_u64().expect("a numbered event"));
    }
    numbers
}

/// Waits until the stream holds `count` messages (and no more).
async fn wait_for_stream(jetstream: &async_nats::jetstream::Context, count: u64) {
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    loop {
        let stream =
            jetstream.get_stream("SF").await.expect("stream").info().await.expect("info").state.messages;
        assert!(stream <= count, "the stream has {stream} messages, more than the {count} events published");
        if stream == count {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the stream has {stream} of {count} messages");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Moves the stored position back to `replay_id` and empties the spool, as if the bridge
/// had crashed after the sink acknowledged the later events but before it settled them
/// (the server replays them all from the position).
async fn rewind(state: &Path, subscription: &str, replay_id: i64) {
    let store = cometd_bridge::store::EmbeddedStore::open(state).expect("the stopped daemon's store");
    store.spool_delete(subscription).await.expect("empty the spool");
    // Whatever was committed (perhaps nothing yet: settlements are synced with the next
    // append), the position is now `replay_id`.
    let mut positions: BTreeMap<String, i64> = store.positions(subscription).await.expect("positions");
    positions.insert(CHANNEL.to_string(), replay_id);
    store.put_positions(subscription, &positions).await.expect("rewind");
}

async fn publish_numbers(faye: &BayeuxServer, numbers: std::ops::Range<u64>) {
    let publisher = open(cometd_bridge::cometd::Client::builder(faye.url())).await;
    for n in numbers {
        publisher.publish(CHANNEL, json!({ "n": n })).await.expect("publish");
    }
}

/// Starts the binary on `config`, once its source has subscribed.
async fn start_daemon(config: &Path) -> Daemon {
    let mut daemon = Daemon::start(config).await;
    daemon.wait_for_log("subscribed").await;
    daemon
}

#[tokio::test]
async fn kill_9_mid_stream_loses_nothing_and_jetstream_drops_the_replayed_copies() {
    let faye = salesforce_like(json!({}), vec![], None).await;
    let nats = NatsServer::start().await;
    let jetstream = stream(&nats).await;
    let state = tempfile::tempdir().expect("state");
    let config = state.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[state]\npath = \"{}\"\n[nats]\nurl = \"{}\"\n{}{}",
            state.path().display(),
            nats.url(),
            replay_source(&faye, ""),
            jetstream_subscription()
        ),
    )
    .expect("write config");

    let daemon = start_daemon(&config).await;
    publish_numbers(&faye, 0..40).await;
    // Let part of it through, then kill the bridge without warning.
    let deadline = tokio::time::Instant::now() + WAIT;
    while stored_numbers(&jetstream).await.len() < 10 {
        assert!(tokio::time::Instant::now() < deadline, "nothing reached JetStream");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.kill_9().await;
    publish_numbers(&faye, 40..60).await; // while the bridge is down
    // A crash can also fall between the stream's ack and the commit: replay from earlier.
    let mut stream = jetstream.get_stream("SF").await.expect("stream");
    let third: Value =
        serde_json::from_slice(&stream.get_raw_message(3).await.expect("stored").payload).expect("JSON");
    rewind(state.path(), "orders", third["event"]["replayId"].as_i64().expect("a replay id")).await;
    let _ = stream.info().await;

    let _daemon = start_daemon(&config).await;
    publish_numbers(&faye, 60..80).await;
    wait_for_stream(&jetstream, 80).await;
    assert_eq!(stored_numbers(&jetstream).await, (0..80).collect::<Vec<_>>(), "every event once, in order");
}

/// What the webhook receiver saw of one event.
#[derive(Default)]
struct Seen {
    webhook_ids: BTreeSet<String>,
    deliveries: usize,
    replay_id: i64,
}

fn record(seen: &mut BTreeMap<u64, Seen>, request: crate::support::webhook::Received) {
    let body = request.json();
    let n = body["data"]["payload"]["n"].as_u64().expect("a numbered event");
    let entry = seen.entry(n).or_default();
    let id = request.header("webhook-id");
    assert!(!id.is_empty(), "every request carries a webhook-id");
    entry.webhook_ids.insert(id.to_string());
    entry.deliveries += 1;
    entry.replay_id = body["data"]["event"]["replayId"].as_i64().expect("a replay id");
}

#[tokio::test]
async fn kill_9_with_a_webhook_repeats_only_with_the_same_webhook_id() {
    let faye = salesforce_like(json!({}), vec![], None).await;
    let mut receiver = WebhookReceiver::start([]).await;
    let state = tempfile::tempdir().expect("state");
    let config = state.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[state]\npath = \"{}\"\n{}[[subscriptions]]\nid = \"hook\"\nsource = \"sf\"\nchannel = \"{CHANNEL}\"\nsink = {{ type = \"webhook\", url = \"{}\", secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\" }}\n",
            state.path().display(),
            replay_source(&faye, ""),
            receiver.url()
        ),
    )
    .expect("write config");
    let mut seen: BTreeMap<u64, Seen> = BTreeMap::new();

    let daemon = start_daemon(&config).await;
    publish_numbers(&faye, 0..20).await;
    for _ in 0..5 {
        record(&mut seen, receiver.next().await);
    }
    daemon.kill_9().await;
    publish_numbers(&faye, 20..30).await;
    // As if the crash fell between the receiver's answer and the commit: resume after
    // event 0, so events 1.. come again.
    rewind(state.path(), "hook", seen[&0].replay_id).await;
    let _daemon = start_daemon(&config).await;
    publish_numbers(&faye, 30..40).await;
    while seen.len() < 40 || seen[&1].deliveries < 2 {
        record(&mut seen, receiver.next().await);
    }
    while let Some(request) = receiver.try_next() {
        record(&mut seen, request);
    }
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), (0..40).collect::<Vec<_>>(), "every event arrived");
    for (n, event) in &seen {
        assert_eq!(
            event.webhook_ids.len(),
            1,
            "event {n} arrived under several webhook-ids: {:?}",
            event.webhook_ids
        );
    }
    assert!(seen[&1].deliveries >= 2, "the replayed event came again, under its first webhook-id");
}

#[tokio::test]
async fn an_expired_position_falls_back_and_is_reported() {
    let faye = salesforce_like(json!({ "retention": 5 }), vec![], None).await;
    let nats = NatsServer::start().await;
    let jetstream = stream(&nats).await;
    let app = TestApp::spawn(&format!(
        "[nats]\nurl = \"{}\"\n{}{}",
        nats.url(),
        replay_source(&faye, "replay_fallback = \"all\"\n"),
        jetstream_subscription()
    ))
    .await;
    app.wait_ready().await;
    publish_numbers(&faye, 0..10).await;
    wait_for_stream(&jetstream, 10).await;
    let (status, view) = app.call("GET", "/api/v1/subscriptions/orders", None).await;
    assert_eq!(status, 200);
    assert!(view["positions"][CHANNEL].as_i64().is_some_and(|id| id > 1), "a committed position: {view}");

    // Reset to a position that left the retention window: the server refuses it.
    let (status, view) =
        app.call("POST", "/api/v1/subscriptions/orders/position", Some(json!({ "replay_from": 1 }))).await;
    assert_eq!(status, 200, "{view}");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if app.metrics().await.contains("cometd_bridge_replay_fallbacks_total{source=\"sf\"} 1") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fallback was not reported:\n{}",
            app.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The fallback replays everything retained; the stream already has it.
    publish_numbers(&faye, 10..12).await;
    wait_for_stream(&jetstream, 12).await;
    assert_eq!(stored_numbers(&jetstream).await, (0..12).collect::<Vec<_>>());
    let (status, error) = app
        .call("POST", "/api/v1/subscriptions/orders/position", Some(json!({ "replay_from": "soon" })))
        .await;
    assert_eq!((status, error["error"].clone()), (400, json!("invalid_position")));
    app.stop().await;
}

#[tokio::test]
async fn an_expiring_token_is_refreshed_without_loss() {
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "first").expect("token");
    let faye = salesforce_like(
        json!({}),
        vec![("token-auth".into(), json!({ "tokenFile": token_file }))],
        Some(json!({ "tokenFile": token_file, "clientId": "app", "clientSecret": "secret" })),
    )
    .await;
    let nats = NatsServer::start().await;
    let jetstream = stream(&nats).await;
    let login = faye.url().replace("/bayeux", "");
    let app = TestApp::spawn(&format!(
        "[nats]\nurl = \"{}\"\n{}{}",
        nats.url(),
        replay_source(
            &faye,
            &format!("salesforce = {{ flow = \"client_credentials\", login_url = \"{login}\", client_id = \"app\", client_secret = \"secret\" }}\n")
        ),
        jetstream_subscription()
    ))
    .await;
    app.wait_ready().await;
    let publisher =
        open(cometd_bridge::cometd::Client::builder(faye.url()).header("Authorization", "Bearer first"))
            .await;
    for n in 0..10 {
        publisher.publish(CHANNEL, json!({ "n": n })).await.expect("publish");
    }
    wait_for_stream(&jetstream, 10).await;
    std::fs::write(&token_file, "second").expect("the token expires");
    let publisher =
        open(cometd_bridge::cometd::Client::builder(faye.url()).header("Authorization", "Bearer second"))
            .await;
    for n in 10..20 {
        publisher.publish(CHANNEL, json!({ "n": n })).await.expect("publish");
    }
    wait_for_stream(&jetstream, 20).await;
    assert_eq!(stored_numbers(&jetstream).await, (0..20).collect::<Vec<_>>());
    app.stop().await;
}

#[tokio::test]
async fn a_forgotten_session_resumes_from_the_committed_position() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trigger = dir.path().join("forget");
    let faye = salesforce_like(json!({ "unknownClientFile": trigger }), vec![], None).await;
    let nats = NatsServer::start().await;
    let jetstream = stream(&nats).await;
    let app = TestApp::spawn(&format!(
        "[nats]\nurl = \"{}\"\n{}{}",
        nats.url(),
        replay_source(&faye, ""),
        jetstream_subscription()
    ))
    .await;
    app.wait_ready().await;
    let (_, before) = app.call("GET", "/api/v1/sources", None).await;
    publish_numbers(&faye, 0..10).await;
    wait_for_stream(&jetstream, 10).await;
    std::fs::write(&trigger, "").expect("arm: the next connect gets 403::Unknown client");
    publish_numbers(&faye, 10..30).await;
    wait_for_stream(&jetstream, 30).await;
    assert!(!trigger.exists(), "the session was forgotten");
    assert_eq!(stored_numbers(&jetstream).await, (0..30).collect::<Vec<_>>());
    let (_, after) = app.call("GET", "/api/v1/sources", None).await;
    assert_ne!(before[0]["client_id"], after[0]["client_id"], "a new session");
    app.stop().await;
}
