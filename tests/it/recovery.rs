//! The client through outages and server decisions: restarts, stalls, `reconnect: none`,
//! expired credentials.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cometd_bridge::cometd::{
    AuthExtension, Data, Error, ErrorKind, Extension, HeaderMap, Message, SessionState, TransportErrorKind,
    async_trait,
};
use serde_json::json;

use crate::on_every_peer;
use crate::support::bayeux::FayeOptions;
use crate::support::peer::{Peer, WAIT, next, open, wait_for_state};

on_every_peer!(recovers_after_a_server_restart, recovers_after_a_frozen_server);

/// Stop the server: `receive` reports the lost connection; restart it: the client
/// handshakes again, resubscribes, and receives again.
async fn recovers_after_a_server_restart(peer: Peer) {
    let mut server = peer.start().await;
    let client = open(peer.options(&server).connection_timeout(Some(Duration::from_secs(1)))).await;
    client.subscribe("/restart").await.expect("subscribe");
    let first_session = client.status().client_id;

    server.process().stop().await;
    let error = next(&client).await.expect_err("the server is gone");
    assert_eq!(error.transport_kind(), Some(&TransportErrorKind::ConnectionTimeout), "{error}");
    assert_eq!(error.kind(), ErrorKind::TransportTimeout);
    assert!(!client.is_closed(), "a connection timeout is not final");

    server.process().restart().await;
    wait_for_state(&client, SessionState::Connected).await;
    assert_ne!(client.status().client_id, first_session, "a new handshake");
    assert!(client.subscriptions().contains("/restart"), "resubscribed");
    let publisher = peer.open(&server).await;
    publisher.publish("/restart", json!("back")).await.expect("publish");
    assert_eq!(
        next(&client).await.expect("delivery resumes").data.map(Data::into_value),
        Some(json!("back"))
    );
}

/// Freeze the server (SIGSTOP): the held connect times out and `receive` reports it; thaw
/// it: the client recovers, with or without a new handshake.
async fn recovers_after_a_frozen_server(peer: Peer) {
    let mut server = peer.start().await;
    let client = open(peer.options(&server).connection_timeout(Some(Duration::from_secs(1)))).await;
    client.subscribe("/frozen").await.expect("subscribe");

    server.process().freeze();
    let error = next(&client).await.expect_err("the server stalls");
    assert_eq!(error.transport_kind(), Some(&TransportErrorKind::ConnectionTimeout), "{error}");

    server.process().thaw();
    wait_for_state(&client, SessionState::Connected).await;
    assert!(client.subscriptions().contains("/frozen"));
    let publisher = peer.open(&server).await;
    publisher.publish("/frozen", json!("thawed")).await.expect("publish");
    assert_eq!(
        next(&client).await.expect("delivery resumes").data.map(Data::into_value),
        Some(json!("thawed"))
    );
}

async fn advice_none_hands_out_pending_messages_then_closes(peer: Peer) {
    let trigger = tempfile::tempdir().expect("temp dir");
    let trigger_file = trigger.path().join("go-away");
    let server = peer
        .start_with(FayeOptions {
            extensions: vec![("reconnect-none".into(), json!({ "triggerFile": trigger_file }))],
            ..FayeOptions::default()
        })
        .await;
    let client = peer.open(&server).await;
    let publisher = peer.open(&server).await;
    client.subscribe("/last").await.expect("subscribe");
    publisher.publish("/last", json!(1)).await.expect("publish");
    publisher.publish("/last", json!(2)).await.expect("publish");
    std::fs::write(&trigger_file, "").expect("create the trigger");
    wait_for_state(&client, SessionState::Closed).await;
    assert!(client.is_closed());

    assert_eq!(next(&client).await.expect("pending first").data.map(Data::into_value), Some(json!(1)));
    assert_eq!(next(&client).await.expect("pending first").data.map(Data::into_value), Some(json!(2)));
    let error = next(&client).await.expect_err("then the server's verdict");
    let server_error = error.as_server_error().expect("a server error");
    assert_eq!(server_error.message(), "connection closed by the server");
    assert_eq!(server_error.error_code(), Some(403));
    assert!(matches!(next(&client).await, Err(Error::Closed)));
}

#[tokio::test]
async fn advice_none_on_websocket() {
    advice_none_hands_out_pending_messages_then_closes(Peer::FayeWebSocket).await;
}

#[tokio::test]
async fn advice_none_on_long_polling() {
    advice_none_hands_out_pending_messages_then_closes(Peer::FayeLongPolling).await;
}

/// Reads its bearer token from a file, and again from the file when asked to
/// re-authenticate: a stand-in for an OAuth refresh.
struct FileToken {
    path: PathBuf,
    token: Mutex<String>,
    renewals: std::sync::Arc<AtomicUsize>,
}

impl FileToken {
    fn new(path: PathBuf, renewals: std::sync::Arc<AtomicUsize>) -> Self {
        let token = std::fs::read_to_string(&path).expect("token file");
        FileToken { path, token: Mutex::new(token), renewals }
    }
}

#[async_trait]
impl Extension for FileToken {
    async fn outgoing(&self, _payload: &mut Vec<Message>, headers: &mut HeaderMap) -> Result<(), Error> {
        let token = self.token.lock().expect("token lock").clone();
        headers.insert("authorization", format!("Bearer {token}").parse().expect("header value"));
        Ok(())
    }
}

#[async_trait]
impl AuthExtension for FileToken {
    async fn authenticate(&self) -> Result<(), Error> {
        *self.token.lock().expect("token lock") = std::fs::read_to_string(&self.path).expect("token file");
        self.renewals.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// The server starts rejecting the token the client holds: the auth extension renews it
/// and the session carries on, on websocket through a new socket with the new header.
async fn reauthenticates_when_the_token_is_rotated(peer: Peer) {
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "first").expect("write token");
    let server = peer
        .start_with(FayeOptions {
            extensions: vec![("token-auth".into(), json!({ "tokenFile": token_file }))],
            ..FayeOptions::default()
        })
        .await;
    let renewals = std::sync::Arc::new(AtomicUsize::new(0));
    let client = open(peer.options(&server).auth(FileToken::new(token_file.clone(), renewals.clone()))).await;
    client.subscribe("/secure").await.expect("subscribe");
    assert_eq!(renewals.load(Ordering::SeqCst), 0);

    std::fs::write(&token_file, "second").expect("rotate token");
    client.publish("/secure", json!("own")).await.expect("the publish is resent with the new token");
    assert!(renewals.load(Ordering::SeqCst) >= 1, "the client re-authenticated");
    assert_eq!(next(&client).await.expect("its own message").data.map(Data::into_value), Some(json!("own")));

    let publisher_renewals = std::sync::Arc::new(AtomicUsize::new(0));
    let publisher =
        open(peer.options(&server).auth(FileToken::new(token_file.clone(), publisher_renewals))).await;
    publisher.publish("/secure", json!("after rotation")).await.expect("publish");
    assert_eq!(
        next(&client).await.expect("delivery continues").data.map(Data::into_value),
        Some(json!("after rotation"))
    );
    assert_eq!(client.status().state, SessionState::Connected);
}

#[tokio::test]
async fn reauthenticates_on_websocket() {
    reauthenticates_when_the_token_is_rotated(Peer::FayeWebSocket).await;
}

#[tokio::test]
async fn reauthenticates_on_long_polling() {
    reauthenticates_when_the_token_is_rotated(Peer::FayeLongPolling).await;
}

#[tokio::test]
async fn a_handshake_with_a_bad_token_fails_open_with_the_server_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "wrong").expect("write token");
    let server = Peer::FayeLongPolling
        .start_with(FayeOptions {
            extensions: vec![("token-auth".into(), json!({ "token": "right" }))],
            ..FayeOptions::default()
        })
        .await;
    let renewals = std::sync::Arc::new(AtomicUsize::new(0));
    let client = Peer::FayeLongPolling
        .options(&server)
        .auth(FileToken::new(token_file, renewals.clone()))
        .build()
        .expect("options");
    let error = client.open().await.expect_err("denied");
    assert_eq!(error.as_server_error().and_then(|e| e.error_code()), Some(403), "{error}");
    assert_eq!(renewals.load(Ordering::SeqCst), 1, "re-authenticated once, then gave up");
    assert!(client.is_closed());
}

/// After a restart the client resubscribes; a channel the server now refuses is reported
/// by `receive` and left out of the confirmed subscriptions, the others keep working, and
/// the refused one is tried again until the server accepts it.
async fn a_failed_resubscription_is_reported(peer: Peer) {
    let dir = tempfile::tempdir().expect("temp dir");
    let trigger = dir.path().join("deny");
    let mut server = peer
        .start_with(FayeOptions {
            extensions: vec![(
                "deny-subscribe".into(),
                json!({ "channel": "/denied", "triggerFile": trigger }),
            )],
            ..FayeOptions::default()
        })
        .await;
    let client = peer.open(&server).await;
    client.subscribe("/kept").await.expect("subscribe /kept");
    client.subscribe("/denied").await.expect("subscribe /denied before the trigger");
    std::fs::write(&trigger, "").expect("create trigger");
    server.process().restart().await;

    let error = next(&client).await.expect_err("the refused resubscription");
    let server_error = error.as_server_error().expect("a server error");
    assert_eq!(server_error.message(), "subscribe request failed");
    assert_eq!(server_error.error_args(), Some(vec!["/denied".to_string()]));
    wait_for_state(&client, SessionState::Connected).await;
    assert_eq!(client.subscriptions().into_iter().collect::<Vec<_>>(), vec!["/kept".to_string()]);
    let publisher = peer.open(&server).await;
    publisher.publish("/kept", json!("still here")).await.expect("publish");
    assert_eq!(next(&client).await.expect("message").data.map(Data::into_value), Some(json!("still here")));

    // D7: the refused channel is tried again with backoff, and comes back once allowed.
    std::fs::remove_file(&trigger).expect("remove trigger");
    let mut status = client.watch_status().expect("open");
    tokio::time::timeout(WAIT, status.wait_for(|status| status.subscriptions.contains("/denied")))
        .await
        .expect("resubscribed within the wait")
        .expect("the session runs");
    publisher.publish("/denied", json!("allowed again")).await.expect("publish");
    assert_eq!(
        next(&client).await.expect("message").data.map(Data::into_value),
        Some(json!("allowed again"))
    );
}

#[tokio::test]
async fn a_failed_resubscription_is_reported_on_websocket() {
    a_failed_resubscription_is_reported(Peer::FayeWebSocket).await;
}

#[tokio::test]
async fn a_failed_resubscription_is_reported_on_long_polling() {
    a_failed_resubscription_is_reported(Peer::FayeLongPolling).await;
}

/// A channel refused with 403 while another flows: the refusal is that channel's error,
/// never expired credentials: no re-authentication, so no socket reset (which dropped
/// frames already received on websocket), and no gap in the other channel's sequence.
async fn a_refused_channel_costs_nothing_else(peer: Peer) {
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "token").expect("write token");
    let trigger = dir.path().join("deny");
    std::fs::write(&trigger, "").expect("create trigger");
    let server = peer
        .start_with(FayeOptions {
            extensions: vec![
                ("token-auth".into(), json!({ "tokenFile": token_file })),
                ("deny-subscribe".into(), json!({ "channel": "/refused", "triggerFile": trigger })),
            ],
            ..FayeOptions::default()
        })
        .await;
    let renewals = std::sync::Arc::new(AtomicUsize::new(0));
    let client = open(peer.options(&server).auth(FileToken::new(token_file.clone(), renewals.clone()))).await;
    client.subscribe("/flowing").await.expect("subscribe /flowing");
    let publisher = open(
        peer.options(&server).auth(FileToken::new(token_file, std::sync::Arc::new(AtomicUsize::new(0)))),
    )
    .await;
    let publishing = tokio::spawn(async move {
        for n in 0..100u64 {
            publisher.publish("/flowing", json!({ "n": n })).await.expect("publish");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    for _ in 0..10 {
        let error = client.subscribe("/refused").await.expect_err("refused");
        assert_eq!(error.as_server_error().and_then(|error| error.error_code()), Some(403), "{error}");
    }
    publishing.await.expect("publisher");
    for n in 0..100u64 {
        let message = next(&client).await.expect("the flowing channel's messages");
        let data = message.data.map(Data::into_value).expect("data");
        assert_eq!(data["n"], json!(n), "no gap in the sequence");
    }
    assert_eq!(renewals.load(Ordering::SeqCst), 0, "no re-authentication (nor socket reset)");
    assert_eq!(client.subscriptions().into_iter().collect::<Vec<_>>(), vec!["/flowing".to_string()]);
    client.close().await;
}

#[tokio::test]
async fn a_refused_channel_costs_nothing_else_on_websocket() {
    a_refused_channel_costs_nothing_else(Peer::FayeWebSocket).await;
}

#[tokio::test]
async fn a_refused_channel_costs_nothing_else_on_long_polling() {
    a_refused_channel_costs_nothing_else(Peer::FayeLongPolling).await;
}
