//! The CometD client against real servers: faye over websocket and long-polling, and the
//! official cometd-nodejs-server over long-polling.

use std::time::Duration;

use cometd_bridge::cometd::{
    Client, ConnectionType, Data, Error, ErrorKind, SessionState, TransportErrorKind,
};
use serde_json::json;

use crate::on_every_peer;
use crate::support::bayeux::{BayeuxServer, CometdOptions, FayeOptions};
use crate::support::peer::{Peer, WAIT, next, open};

on_every_peer!(
    opens_on_the_requested_transport,
    receives_what_it_subscribed_to_in_order,
    wildcards_match_one_or_many_segments,
    unsubscribing_stops_delivery,
    publish_returns_the_server_reply,
    close_then_reopen,
);

async fn opens_on_the_requested_transport(peer: Peer) {
    let server = peer.start().await;
    let client = peer.open(&server).await;
    assert!(!client.is_closed());
    assert_eq!(client.connection_type(), Some(peer.connection_type()));
    let status = client.status();
    assert_eq!(status.state, SessionState::Connected);
    assert!(status.client_id.is_some_and(|id| !id.is_empty()));
    client.close().await;
    assert!(client.is_closed());
}

async fn receives_what_it_subscribed_to_in_order(peer: Peer) {
    let server = peer.start().await;
    let subscriber = peer.open(&server).await;
    let publisher = peer.open(&server).await;
    subscriber.subscribe("/orders/new").await.expect("subscribe");
    assert!(subscriber.subscriptions().contains("/orders/new"));
    for n in 0..20 {
        publisher.publish("/orders/new", json!({ "n": n })).await.expect("publish");
    }
    for n in 0..20 {
        let message = next(&subscriber).await.expect("a message");
        assert_eq!(message.channel, "/orders/new");
        assert_eq!(message.data.map(Data::into_value), Some(json!({ "n": n })), "message {n} in order");
    }
    assert_eq!(subscriber.pending_count(), 0);
    assert!(!subscriber.has_pending_messages());
}

async fn wildcards_match_one_or_many_segments(peer: Peer) {
    let server = peer.start().await;
    let subscriber = peer.open(&server).await;
    let publisher = peer.open(&server).await;
    subscriber.subscribe("/chat/*").await.expect("subscribe /chat/*");
    subscriber.subscribe("/news/**").await.expect("subscribe /news/**");
    for channel in ["/chat/a/deeper", "/chat/room", "/other", "/news/eu/sport", "/news/x"] {
        publisher.publish(channel, json!({ "on": channel })).await.expect("publish");
    }
    let mut received = Vec::new();
    for _ in 0..3 {
        received.push(next(&subscriber).await.expect("a message").channel);
    }
    assert_eq!(received, ["/chat/room", "/news/eu/sport", "/news/x"]);
}

async fn unsubscribing_stops_delivery(peer: Peer) {
    let server = peer.start().await;
    let subscriber = peer.open(&server).await;
    let publisher = peer.open(&server).await;
    subscriber.subscribe("/a").await.expect("subscribe /a");
    subscriber.subscribe("/marker").await.expect("subscribe /marker");
    subscriber.unsubscribe("/a").await.expect("unsubscribe /a");
    assert!(!subscriber.subscriptions().contains("/a"));
    publisher.publish("/a", json!("dropped")).await.expect("publish /a");
    publisher.publish("/marker", json!("kept")).await.expect("publish /marker");
    let message = next(&subscriber).await.expect("a message");
    assert_eq!(
        (message.channel.as_str(), message.data.map(Data::into_value)),
        ("/marker", Some(json!("kept")))
    );
}

async fn publish_returns_the_server_reply(peer: Peer) {
    let server = peer.start().await;
    let client = peer.open(&server).await;
    let reply = client.publish("/service/echo", json!({ "ping": 1 })).await.expect("service publish");
    assert_eq!(reply.channel, "/service/echo");
    assert_eq!(reply.successful, Some(true));
    let reply = client.publish("/broadcast", json!(1)).await.expect("publish");
    assert_eq!((reply.channel.as_str(), reply.successful), ("/broadcast", Some(true)));
}

async fn close_then_reopen(peer: Peer) {
    let server = peer.start().await;
    let client = peer.open(&server).await;
    let publisher = peer.open(&server).await;
    let first_id = client.status().client_id;
    client.subscribe("/x").await.expect("subscribe");
    publisher.publish("/x", json!("before close")).await.expect("publish");
    assert_eq!(next(&client).await.expect("message").data.map(Data::into_value), Some(json!("before close")));
    client.close().await;
    assert!(client.is_closed());
    assert!(matches!(next(&client).await, Err(Error::Closed)));
    let error = client.publish("/x", json!(1)).await.expect_err("closed");
    assert_eq!(error.kind(), ErrorKind::ClientInvalidOperation);

    client.open().await.expect("reopen");
    assert_ne!(client.status().client_id, first_id, "a new session");
    client.subscribe("/x").await.expect("subscribe again");
    publisher.publish("/x", json!("after reopen")).await.expect("publish");
    assert_eq!(next(&client).await.expect("message").data.map(Data::into_value), Some(json!("after reopen")));
    let error = client.open().await.expect_err("already open");
    assert_eq!(error.kind(), ErrorKind::ClientInvalidOperation);
}

#[tokio::test]
async fn default_connection_types_pick_websocket_on_faye() {
    let server = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let client = open(Client::builder(server.url())).await;
    assert_eq!(client.connection_type(), Some(ConnectionType::WebSocket));
}

#[tokio::test]
async fn default_connection_types_fall_back_to_long_polling_without_websocket() {
    let server =
        BayeuxServer::cometd(CometdOptions { timeout: Some(2000), ..CometdOptions::default() }).await;
    let client = open(Client::builder(server.url())).await;
    assert_eq!(client.connection_type(), Some(ConnectionType::LongPolling));
    // cometd-nodejs-server finds sessions by cookie: it must have been kept for 127.0.0.1.
    client.subscribe("/cookie/check").await.expect("subscribe with the session cookie");
}

#[tokio::test]
async fn a_websocket_url_works_with_websocket_only() {
    let server = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let client = open(Client::builder(server.ws_url()).connection_types([ConnectionType::WebSocket])).await;
    assert_eq!(client.connection_type(), Some(ConnectionType::WebSocket));
    client.subscribe("/ws/only").await.expect("subscribe");
    client.publish("/ws/only", json!("hi")).await.expect("publish");
    assert_eq!(next(&client).await.expect("message").data.map(Data::into_value), Some(json!("hi")));
}

#[tokio::test]
async fn websocket_only_against_a_long_polling_server_fails_clearly() {
    let server = BayeuxServer::cometd(CometdOptions::default()).await;
    let client = Client::builder(server.url())
        .connection_types([ConnectionType::WebSocket])
        .connection_timeout(Some(Duration::from_secs(1)))
        .backoff(Duration::from_millis(50), Duration::from_millis(200))
        .build()
        .expect("options");
    let error =
        tokio::time::timeout(WAIT, client.open()).await.expect("open gives up").expect_err("no websocket");
    assert_eq!(error.transport_kind(), Some(&TransportErrorKind::WebSocketUpgrade), "{error}");
    assert!(client.is_closed());
}

#[tokio::test]
async fn operations_on_a_closed_client_are_invalid() {
    let server = BayeuxServer::faye(FayeOptions::default()).await;
    let client = Client::builder(server.url()).build().expect("options");
    for error in [
        client.subscribe("/a").await.expect_err("not open"),
        client.unsubscribe("/a").await.expect_err("not open"),
        client.publish("/a", json!(1)).await.map(drop).expect_err("not open"),
    ] {
        assert_eq!(error.kind(), ErrorKind::ClientInvalidOperation, "{error}");
        assert!(error.to_string().contains("the client is closed"), "{error}");
    }
    assert!(matches!(client.receive().await, Err(Error::Closed)));
    client.close().await; // closing a closed client does nothing
}

#[tokio::test]
async fn server_rejections_carry_the_parsed_error() {
    let server = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let client = open(Client::builder(server.url())).await;
    let error = client.subscribe("/meta/forbidden").await.expect_err("faye forbids /meta subscriptions");
    let server_error = error.as_server_error().expect("a server error");
    assert_eq!(server_error.message(), "subscribe request failed");
    assert_eq!(server_error.error_code(), Some(403));
    assert_eq!(server_error.error_message().as_deref(), Some("Forbidden channel"));
    assert_eq!(server_error.error_args(), Some(vec!["/meta/forbidden".to_string()]));
    let error = client.publish("/a b", json!(1)).await.expect_err("invalid channel");
    assert_eq!(error.as_server_error().and_then(|e| e.error_code()), Some(405));
    assert_eq!(error.as_server_error().map(|e| e.message()), Some("publish request failed"));
}

/// Sets `ext.authToken` on every outgoing message and records the channels it sees come in.
struct TokenInExt {
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

#[cometd_bridge::cometd::async_trait]
impl cometd_bridge::cometd::Extension for TokenInExt {
    async fn outgoing(
        &self,
        payload: &mut Vec<cometd_bridge::cometd::Message>,
        _headers: &mut cometd_bridge::cometd::HeaderMap,
    ) -> Result<(), Error> {
        for message in payload {
            message.ext.get_or_insert_with(Default::default).insert("authToken".into(), json!("s3cret"));
        }
        Ok(())
    }

    async fn incoming(
        &self,
        payload: &mut Vec<cometd_bridge::cometd::Message>,
        _headers: Option<&cometd_bridge::cometd::HeaderMap>,
    ) -> Result<(), Error> {
        let mut seen = self.seen.lock().expect("lock");
        seen.extend(payload.iter().map(|message| message.channel.clone()));
        Ok(())
    }
}

#[tokio::test]
async fn extensions_see_every_payload_both_ways() {
    let server = BayeuxServer::faye(FayeOptions {
        timeout: Some(2),
        extensions: vec![("token-auth".into(), json!({ "token": "s3cret" }))],
        ..FayeOptions::default()
    })
    .await;
    for kind in [ConnectionType::WebSocket, ConnectionType::LongPolling] {
        let denied = Client::builder(server.url()).connection_types([kind]).build().expect("options");
        let error = denied.open().await.expect_err("no token");
        assert_eq!(error.as_server_error().and_then(|e| e.error_code()), Some(403), "{kind}");

        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let client = open(
            Client::builder(server.url())
                .connection_types([kind])
                .extension(TokenInExt { seen: seen.clone() }),
        )
        .await;
        client.subscribe("/ext").await.expect("subscribe");
        client.publish("/ext", json!("x")).await.expect("publish");
        next(&client).await.expect("message");
        let seen = seen.lock().expect("lock").clone();
        for channel in ["/meta/handshake", "/meta/connect", "/meta/subscribe", "/ext"] {
            assert!(seen.iter().any(|c| c == channel), "{kind}: the extension saw no {channel} in {seen:?}");
        }
    }
}

#[tokio::test]
async fn configured_headers_reach_the_server_on_both_transports() {
    let server = BayeuxServer::faye(FayeOptions {
        timeout: Some(2),
        extensions: vec![("token-auth".into(), json!({ "token": "s3cret" }))],
        ..FayeOptions::default()
    })
    .await;
    for kind in [ConnectionType::WebSocket, ConnectionType::LongPolling] {
        let client = open(
            Client::builder(server.url()).connection_types([kind]).header("Authorization", "Bearer s3cret"),
        )
        .await;
        client.subscribe("/headers").await.expect("subscribe with the header");
    }
}

#[tokio::test]
async fn message_ids_keep_increasing_across_sessions() {
    let server = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let client = open(Client::builder(server.url())).await;
    let id =
        |reply: cometd_bridge::cometd::Message| -> u64 { reply.id.expect("an id").parse().expect("numeric") };
    let first = id(client.publish("/ids", json!(1)).await.expect("publish"));
    client.close().await;
    client.open().await.expect("reopen");
    let second = id(client.publish("/ids", json!(2)).await.expect("publish"));
    assert!(second > first + 2, "ids {first} then {second}: a new handshake does not reset them");
}
