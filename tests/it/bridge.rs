//! The bridge end to end, in-process: real faye, real nats-server, a real webhook receiver.

use cometd_bridge::cometd::Client;
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::support::app::TestApp;
use crate::support::bayeux::{BayeuxServer, FayeOptions};
use crate::support::nats::NatsServer;
use crate::support::peer::{WAIT, open};
use crate::support::scenario::{create_stream, stream_messages, wait_for_stream};
use crate::support::webhook::WebhookReceiver;

async fn faye() -> BayeuxServer {
    BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await
}

fn source(faye: &BayeuxServer) -> String {
    format!("[[sources]]\nname = \"demo\"\nurl = \"{}\"\nconnection_timeout = \"2s\"\n", faye.url())
}

async fn publisher(faye: &BayeuxServer) -> Client {
    open(Client::builder(faye.url())).await
}

async fn next_nats(subscriber: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(WAIT, subscriber.next())
        .await
        .expect("a NATS message within the wait")
        .expect("subscribed")
}

#[tokio::test]
async fn messages_reach_their_nats_subjects_in_order_with_headers() {
    let faye = faye().await;
    let nats = NatsServer::start().await;
    let app = TestApp::spawn(&format!(
        "[nats]\nurl = \"{}\"\n{}[[subscriptions]]\nid = \"orders\"\nsource = \"demo\"\nchannel = \"/orders/**\"\nsink = {{ type = \"nats\", subject = \"cometd.{{source}}.{{channel}}\" }}\n",
        nats.url(),
        source(&faye)
    ))
    .await;
    let nats_client = async_nats::connect(nats.url()).await.expect("connect");
    let mut subscriber = nats_client.subscribe("cometd.>").await.expect("subscribe");
    nats_client.flush().await.expect("flush");
    app.wait_ready().await;

    let publisher = publisher(&faye).await;
    for n in 0..20 {
        publisher.publish("/orders/eu/new", json!({ "n": n })).await.expect("publish");
    }
    publisher.publish("/elsewhere", json!("not routed")).await.expect("publish");
    for n in 0..20 {
        let message = next_nats(&mut subscriber).await;
        assert_eq!(message.subject.as_str(), "cometd.demo.orders.eu.new");
        let payload: Value = serde_json::from_slice(&message.payload).expect("JSON payload");
        assert_eq!(payload, json!({ "n": n }), "in order");
        let headers = message.headers.expect("headers");
        assert_eq!(headers.get("CometD-Source").map(|v| v.as_str()), Some("demo"));
        assert_eq!(headers.get("CometD-Subscription").map(|v| v.as_str()), Some("orders"));
        assert_eq!(headers.get("CometD-Channel").map(|v| v.as_str()), Some("/orders/eu/new"));
        assert!(headers.get("CometD-Message-Id").is_some(), "faye keeps the publisher's id");
        assert!(headers.get("Nats-Msg-Id").is_none(), "core NATS needs no de-duplication key");
    }
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("cometd_bridge_messages_forwarded_total{subscription=\"orders\",sink=\"nats\"} 20"),
        "{metrics}"
    );
    assert!(metrics.contains("cometd_bridge_source_connected{source=\"demo\"} 1"), "{metrics}");
    app.stop().await;
}

/// Publishes `data`, JSON text as it is, through faye's long-polling endpoint: a
/// `serde_json::Value` would sort its keys, and this test is about the order being kept.
async fn publish_raw(faye: &BayeuxServer, channel: &str, data: &str) {
    let http = crate::support::http_client();
    let post = |body: String| {
        let request =
            http.post(faye.url()).header("content-type", "application/json").body(body).timeout(WAIT);
        async move {
            let body = request.send().await.expect("faye answers").bytes().await.expect("a body");
            let reply: Value = serde_json::from_slice(&body).expect("JSON reply");
            assert_eq!(reply[0]["successful"], true, "{reply}");
            reply
        }
    };
    let handshake = post(
        json!([{"channel": "/meta/handshake", "version": "1.0", "supportedConnectionTypes": ["long-polling"]}])
            .to_string(),
    )
    .await;
    let client_id = handshake[0]["clientId"].as_str().expect("a client id");
    post(format!(r#"[{{"channel":"{channel}","clientId":"{client_id}","data":{data}}}]"#)).await;
}

#[tokio::test]
async fn data_reaches_nats_byte_for_byte_as_the_server_sent_it() {
    let faye = faye().await;
    let nats = NatsServer::start().await;
    let app = TestApp::spawn(&format!(
        "[nats]\nurl = \"{}\"\n{}[[subscriptions]]\nid = \"orders\"\nsource = \"demo\"\nchannel = \"/orders\"\nsink = {{ type = \"nats\", subject = \"orders\" }}\n",
        nats.url(),
        source(&faye)
    ))
    .await;
    let nats_client = async_nats::connect(nats.url()).await.expect("connect");
    let mut subscriber = nats_client.subscribe("orders").await.expect("subscribe");
    nats_client.flush().await.expect("flush");
    app.wait_ready().await;

    // Keys out of alphabetical order and a non-ASCII string: faye writes them back as it
    // read them, and the bridge forwards that text unchanged.
    let data = r#"{"z":1,"a":[1,2],"name":"café"}"#;
    publish_raw(&faye, "/orders", data).await;
    let message = next_nats(&mut subscriber).await;
    assert_eq!(std::str::from_utf8(&message.payload).expect("UTF-8"), data);
    app.stop().await;
}

#[tokio::test]
async fn wildcards_route_to_every_matching_subscription() {
    let faye = faye().await;
    let nats = NatsServer::start().await;
    let app = TestApp::spawn(&format!(
        "[nats]\nurl = \"{}\"\n{}\
         [[subscriptions]]\nid = \"one\"\nsource = \"demo\"\nchannel = \"/chat/*\"\nsink = {{ type = \"nats\", subject = \"one.{{channel}}\" }}\n\
         [[subscriptions]]\nid = \"many\"\nsource = \"demo\"\nchannel = \"/chat/**\"\nsink = {{ type = \"nats\", subject = \"many.{{subscription}}.{{channel}}\", payload = \"envelope\" }}\n",
        nats.url(),
        source(&faye)
    ))
    .await;
    let nats_client = async_nats::connect(nats.url()).await.expect("connect");
    let mut one = nats_client.subscribe("one.>").await.expect("subscribe");
    let mut many = nats_client.subscribe("many.>").await.expect("subscribe");
    nats_client.flush().await.expect("flush");
    app.wait_ready().await;

    let publisher = publisher(&faye).await;
    publisher.publish("/chat/room", json!(1)).await.expect("publish");
    publisher.publish("/chat/room/deep", json!(2)).await.expect("publish");
    assert_eq!(next_nats(&mut one).await.subject.as_str(), "one.chat.room");
    let first = next_nats(&mut many).await;
    assert_eq!(first.subject.as_str(), "many.many.chat.room");
    let envelope: Value = serde_json::from_slice(&first.payload).expect("JSON");
    assert_eq!((envelope["channel"].clone(), envelope["data"].clone()), (json!("/chat/room"), json!(1)));
    assert_eq!(next_nats(&mut many).await.subject.as_str(), "many.many.chat.room.deep");
    publisher.publish("/chat/marker", json!(3)).await.expect("publish");
    assert_eq!(
        next_nats(&mut one).await.subject.as_str(),
        "one.chat.marker",
        "/chat/room/deep did not reach /chat/*"
    );
    app.stop().await;
}

#[tokio::test]
async fn jetstream_stores_each_message_once_and_deduplicates_redelivery() {
    let faye = faye().await;
    let mut nats = NatsServer::start().await;
    let jetstream = create_stream(&nats, "ORDERS", "js.>").await;
    let app = TestApp::spawn(&format!(
        "[nats]\nurl = \"{}\"\n{}[[subscriptions]]\nid = \"js\"\nsource = \"demo\"\nchannel = \"/js/**\"\nsink = {{ type = \"nats\", subject = \"js.{{channel}}\", jetstream = true }}\n",
        nats.url(),
        source(&faye)
    ))
    .await;
    app.wait_ready().await;
    let publisher = publisher(&faye).await;
    for n in 0..10 {
        publisher.publish("/js/orders", json!({ "n": n })).await.expect("publish");
    }
    wait_for_stream(&jetstream, "ORDERS", 10).await;

    let stream = jetstream.get_stream("ORDERS").await.expect("stream");
    let mut ids = Vec::new();
    for sequence in 1..=10 {
        let stored = stream.get_raw_message(sequence).await.expect("stored message");
        let id = stored.headers.get("Nats-Msg-Id").expect("a Nats-Msg-Id").to_string();
        let payload: Value = serde_json::from_slice(&stored.payload).expect("JSON");
        assert_eq!(payload, json!({ "n": sequence - 1 }), "in order");
        ids.push((id, stored));
    }
    let unique: std::collections::BTreeSet<_> = ids.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(unique.len(), 10, "a distinct Nats-Msg-Id per message");
    // NATS frozen while 10 more go out: each publish reaches the server's socket, its
    // acknowledgement never comes, and the bridge publishes it again (same Nats-Msg-Id)
    // once the wait for it times out. Thawed, the server reads the first publishes and the
    // retries: the stream keeps one of each.
    nats.process().freeze();
    for n in 10..20 {
        publisher.publish("/js/orders", json!({ "n": n })).await.expect("publish");
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while !app.metrics().await.contains("cometd_bridge_delivery_failures_total{subscription=\"js\"") {
        assert!(tokio::time::Instant::now() < deadline, "no failed attempt while NATS was frozen");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    nats.process().thaw();
    wait_for_stream(&jetstream, "ORDERS", 20).await;
    // A marker after them: once it is stored, any second copy would be too.
    publisher.publish("/js/orders", json!({ "n": 20 })).await.expect("publish");
    wait_for_stream(&jetstream, "ORDERS", 21).await;
    let mut numbers = Vec::new();
    for sequence in 11..=21 {
        let stored = stream.get_raw_message(sequence).await.expect("stored message");
        let payload: Value = serde_json::from_slice(&stored.payload).expect("JSON");
        numbers.push(payload["n"].as_u64().expect("numbered"));
    }
    assert_eq!(numbers, (10..=20).collect::<Vec<_>>(), "each retried message stored once, in order");
    assert_eq!(stream_messages(&jetstream, "ORDERS").await, 21);
    app.stop().await;
}

#[tokio::test]
async fn a_nats_outage_mid_stream_loses_nothing() {
    let faye = faye().await;
    let mut nats = NatsServer::start().await;
    let jetstream = create_stream(&nats, "OUTAGE", "out.>").await;
    let app = TestApp::spawn(&format!(
        "[nats]\nurl = \"{}\"\n{}[[subscriptions]]\nid = \"out\"\nsource = \"demo\"\nchannel = \"/out\"\nsink = {{ type = \"nats\", subject = \"out.x\", jetstream = true }}\n",
        nats.url(),
        source(&faye)
    ))
    .await;
    app.wait_ready().await;
    let publisher = publisher(&faye).await;
    for n in 0..30 {
        publisher.publish("/out", json!(n)).await.expect("publish");
    }
    wait_for_stream(&jetstream, "OUTAGE", 30).await;
    nats.process().stop().await;
    for n in 30..60 {
        publisher.publish("/out", json!(n)).await.expect("publish while NATS is down");
    }
    nats.process().restart().await;
    for n in 60..90 {
        publisher.publish("/out", json!(n)).await.expect("publish");
    }
    let jetstream = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("reconnect"));
    wait_for_stream(&jetstream, "OUTAGE", 90).await;
    let stream = jetstream.get_stream("OUTAGE").await.expect("stream");
    for sequence in 1..=90u64 {
        let stored = stream.get_raw_message(sequence).await.expect("stored");
        let payload: Value = serde_json::from_slice(&stored.payload).expect("JSON");
        assert_eq!(payload, json!(sequence - 1), "every message, once, in order");
    }
    app.stop().await;
}

fn webhook_subscription(id: &str, channel: &str, url: &str, extra: &str) -> String {
    format!(
        "[[subscriptions]]\nid = \"{id}\"\nsource = \"demo\"\nchannel = \"{channel}\"\nsink = {{ type = \"webhook\", url = \"{url}\"{extra} }}\n"
    )
}

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[tokio::test]
async fn webhooks_are_signed_and_verify_with_the_reference_library() {
    let faye = faye().await;
    let mut receiver = WebhookReceiver::start([]).await;
    let app = TestApp::spawn(&format!(
        "{}{}",
        source(&faye),
        webhook_subscription("hook", "/alerts", &receiver.url(), &format!(", secret = \"{SECRET}\""))
    ))
    .await;
    app.wait_ready().await;
    let publisher = publisher(&faye).await;
    publisher.publish("/alerts", json!({ "level": "high" })).await.expect("publish");

    let request = receiver.next().await;
    let body = request.json();
    assert_eq!(body["source"], "demo");
    assert_eq!(body["subscription"], "hook");
    assert_eq!(body["channel"], "/alerts");
    assert_eq!(body["data"], json!({ "level": "high" }));
    assert!(body.get("id").is_some() && body.get("ext").is_some());
    assert_eq!(request.header("content-type"), "application/json");
    let verifier = standardwebhooks::Webhook::new(SECRET).expect("secret");
    verifier.verify(&request.body, &request.headers).expect("the signature verifies");
    app.stop().await;
}

#[tokio::test]
async fn a_webhook_failing_twice_then_succeeding_gets_the_message_once() {
    let faye = faye().await;
    let mut receiver = WebhookReceiver::start([500, 503]).await;
    let app = TestApp::spawn(&format!(
        "{}{}",
        source(&faye),
        webhook_subscription("retry", "/retry", &receiver.url(), &format!(", secret = \"{SECRET}\""))
    ))
    .await;
    app.wait_ready().await;
    let publisher = publisher(&faye).await;
    publisher.publish("/retry", json!("once")).await.expect("publish");
    let attempts = [receiver.next().await, receiver.next().await, receiver.next().await];
    assert_eq!(attempts.iter().map(|a| a.status).collect::<Vec<_>>(), [500, 503, 200]);
    let id = attempts[0].header("webhook-id").to_string();
    assert!(attempts.iter().all(|a| a.header("webhook-id") == id), "one webhook-id across attempts");
    let verifier = standardwebhooks::Webhook::new(SECRET).expect("secret");
    for attempt in &attempts {
        verifier.verify(&attempt.body, &attempt.headers).expect("each attempt is signed afresh");
    }
    publisher.publish("/retry", json!("marker")).await.expect("publish");
    assert_eq!(receiver.next().await.json()["data"], "marker", "no fourth delivery of the first message");
    assert!(app.dead_letters().await.is_empty());
    let metrics = app.metrics().await;
    assert!(metrics.contains("reason=\"http_500\"} 1"), "{metrics}");
    app.stop().await;
}

#[tokio::test]
async fn a_rejected_webhook_lands_in_the_dead_letters() {
    let faye = faye().await;
    let mut receiver = WebhookReceiver::start([400]).await;
    let app = TestApp::spawn(&format!(
        "{}{}",
        source(&faye),
        webhook_subscription("bad", "/bad", &receiver.url(), "")
    ))
    .await;
    app.wait_ready().await;
    let publisher = publisher(&faye).await;
    publisher.publish("/bad", json!({ "x": 1 })).await.expect("publish");
    assert_eq!(receiver.next().await.status, 400);
    publisher.publish("/bad", json!("marker")).await.expect("publish");
    assert_eq!(receiver.next().await.status, 200, "later messages still flow");
    app.wait_for_dead_letters(1).await;
    let letters = app.dead_letters().await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].subscription, "bad");
    assert_eq!(letters[0].reason, "rejected: HTTP 400");
    assert_eq!(letters[0].message["data"], json!({ "x": 1 }));
    assert!(app.metrics().await.contains("cometd_bridge_dead_letters_total{subscription=\"bad\"} 1"));
    app.stop().await;
}
