//! Self-tests of the harness: each server really answers, over the raw protocol, before any
//! test relies on it.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::support::bayeux::{BayeuxServer, CometdOptions, FayeOptions};
use crate::support::nats::{NatsServer, locate_nats_server};

const WAIT: Duration = Duration::from_secs(10);

fn handshake_request() -> Value {
    json!([{
        "channel": "/meta/handshake",
        "version": "1.0",
        "minimumVersion": "1.0",
        "supportedConnectionTypes": ["long-polling"],
        "id": "1",
    }])
}

/// POSTs a handshake and returns the reply message.
async fn post_handshake(url: &str) -> Result<Value, reqwest::Error> {
    post(url, handshake_request()).await
}

/// POSTs a Bayeux payload and returns the first message of the reply.
async fn post(url: &str, payload: Value) -> Result<Value, reqwest::Error> {
    let reply: Value = serde_json::from_slice(
        &crate::support::http_client()
            .post(url)
            .header("content-type", "application/json")
            .body(payload.to_string())
            .timeout(WAIT)
            .send()
            .await?
            .bytes()
            .await?,
    )
    .expect("the reply is JSON");
    Ok(reply[0].clone())
}

fn assert_successful_handshake(reply: &Value) {
    assert_eq!(reply["channel"], "/meta/handshake", "{reply}");
    assert_eq!(reply["successful"], true, "{reply}");
    assert!(reply["clientId"].as_str().is_some_and(|id| !id.is_empty()), "no clientId in {reply}");
}

#[tokio::test]
async fn faye_answers_a_long_polling_handshake() {
    let faye = BayeuxServer::faye(FayeOptions::default()).await;
    let reply = post_handshake(&faye.url()).await.expect("faye answers");
    assert_successful_handshake(&reply);
    let types = reply["supportedConnectionTypes"].as_array().expect("types");
    assert!(types.contains(&json!("websocket")) && types.contains(&json!("long-polling")));
}

#[tokio::test]
async fn cometd_nodejs_server_answers_a_long_polling_handshake() {
    let cometd = BayeuxServer::cometd(CometdOptions::default()).await;
    let reply = post_handshake(&cometd.url()).await.expect("cometd-nodejs-server answers");
    assert_successful_handshake(&reply);
    assert_eq!(reply["supportedConnectionTypes"], json!(["long-polling"]));
}

#[tokio::test]
async fn faye_answers_a_websocket_handshake() {
    let faye = BayeuxServer::faye(FayeOptions::default()).await;
    let (mut socket, _) = tokio_tungstenite::connect_async(faye.ws_url()).await.expect("upgrade");
    socket.send(WsMessage::text(handshake_request().to_string())).await.expect("send handshake");
    let frame = tokio::time::timeout(WAIT, socket.next())
        .await
        .expect("a reply within the wait")
        .expect("socket open")
        .expect("a frame");
    let reply: Value = serde_json::from_str(frame.to_text().expect("text frame")).expect("JSON");
    assert_successful_handshake(&reply[0]);
}

#[tokio::test]
async fn faye_extensions_are_installed_per_test() {
    let faye = BayeuxServer::faye(FayeOptions {
        extensions: vec![("token-auth".into(), json!({ "token": "s3cret" }))],
        ..FayeOptions::default()
    })
    .await;
    let denied = post_handshake(&faye.url()).await.expect("faye answers");
    assert_eq!(denied["successful"], false, "{denied}");
    assert_eq!(denied["error"], "403::Handshake denied");

    let mut request = handshake_request();
    request[0]["ext"] = json!({ "authToken": "s3cret" });
    let accepted = post(&faye.url(), request).await.expect("faye answers");
    assert_successful_handshake(&accepted);
}

#[tokio::test]
async fn a_stopped_and_restarted_faye_answers_again_on_the_same_port() {
    let mut faye = BayeuxServer::faye(FayeOptions::default()).await;
    let url = faye.url();
    assert_successful_handshake(&post_handshake(&url).await.expect("first start answers"));

    faye.process().stop().await;
    let refused = post_handshake(&url).await.expect_err("a stopped server refuses");
    assert!(refused.is_connect(), "expected connection refused, got {refused}");

    faye.process().restart().await;
    assert_eq!(faye.url(), url, "same port after restart");
    assert_successful_handshake(&post_handshake(&url).await.expect("restarted server answers"));
}

#[tokio::test]
async fn a_frozen_server_stalls_and_answers_once_thawed() {
    let mut cometd = BayeuxServer::cometd(CometdOptions::default()).await;
    let url = cometd.url();
    cometd.process().freeze();
    let client = crate::support::http_client();
    let stalled = client
        .post(&url)
        .header("content-type", "application/json")
        .body(handshake_request().to_string())
        .timeout(Duration::from_millis(500))
        .send()
        .await
        .expect_err("a frozen server does not answer");
    assert!(stalled.is_timeout(), "expected a timeout, got {stalled}");

    cometd.process().thaw();
    assert_successful_handshake(&post_handshake(&url).await.expect("thawed server answers"));
}

#[tokio::test]
async fn nats_server_answers_core_and_jetstream() {
    let nats = NatsServer::start().await;
    let client = async_nats::connect(nats.url()).await.expect("connect to nats-server");

    let mut subscriber = client.subscribe("harness.check").await.expect("subscribe");
    client.publish("harness.check", "ping".into()).await.expect("publish");
    client.flush().await.expect("flush");
    let message = tokio::time::timeout(WAIT, subscriber.next())
        .await
        .expect("message within the wait")
        .expect("subscription open");
    assert_eq!(message.payload.as_ref(), b"ping");

    let jetstream = async_nats::jetstream::new(client);
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: "HARNESS".into(),
            subjects: vec!["harness.js.>".into()],
            ..Default::default()
        })
        .await
        .expect("JetStream creates a stream");
    let ack = jetstream
        .publish("harness.js.one", "stored".into())
        .await
        .expect("publish")
        .await
        .expect("JetStream acknowledges");
    assert_eq!(ack.stream, "HARNESS");
    assert_eq!(ack.sequence, 1);
}

#[tokio::test]
async fn a_restarted_nats_server_keeps_its_port_and_jetstream_store() {
    let mut nats = NatsServer::start().await;
    let url = nats.url();
    {
        let jetstream = async_nats::jetstream::new(async_nats::connect(&url).await.expect("connect"));
        jetstream
            .create_stream(async_nats::jetstream::stream::Config {
                name: "KEPT".into(),
                subjects: vec!["kept.>".into()],
                ..Default::default()
            })
            .await
            .expect("create stream");
        jetstream.publish("kept.a", "1".into()).await.expect("publish").await.expect("ack");
    }
    nats.process().restart().await;
    assert_eq!(nats.url(), url);
    let jetstream = async_nats::jetstream::new(async_nats::connect(&url).await.expect("reconnect"));
    let mut stream = jetstream.get_stream("KEPT").await.expect("stream survives a restart");
    assert_eq!(stream.info().await.expect("stream info").state.messages, 1);
}

#[test]
fn a_missing_nats_server_fails_with_an_install_hint() {
    let error = locate_nats_server(Some(std::path::Path::new("/nonexistent/nats-server")))
        .expect_err("a missing binary is an error");
    assert!(error.contains("scripts/setup.sh"), "{error}");
    assert!(error.contains("/nonexistent/nats-server"), "{error}");
}
