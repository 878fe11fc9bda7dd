//! Malformed replies, HTTP errors and abrupt closes (from a hand-written server, since no
//! real server produces them on demand): each is a transport error, never a panic, and the
//! client recovers once the replies are valid again.

use std::time::Duration;

use cometd_bridge::cometd::{Client, ConnectionType, Error, ErrorKind, SessionState, TransportErrorKind};

use crate::support::fake::{Behaviour, FakeServer};
use crate::support::peer::{WAIT, next, wait_for_state};

fn client(server: &FakeServer) -> Client {
    Client::builder(server.url())
        .connection_types([ConnectionType::LongPolling])
        .connection_timeout(Some(Duration::from_millis(500)))
        .request_timeout(Duration::from_secs(2))
        .backoff(Duration::from_millis(20), Duration::from_millis(100))
        .build()
        .expect("options")
}

fn expected_kind(behaviour: Behaviour) -> TransportErrorKind {
    match behaviour {
        Behaviour::Http500 => TransportErrorKind::HttpStatus(500),
        Behaviour::AbruptClose => TransportErrorKind::Io,
        Behaviour::BadJson => TransportErrorKind::MalformedReply("not JSON".into()),
        Behaviour::NotAnArray => TransportErrorKind::MalformedReply("not an array of Bayeux messages".into()),
        // The message without a channel is skipped, so the handshake has no reply.
        Behaviour::MissingFields => TransportErrorKind::MalformedReply("no reply to /meta/handshake".into()),
        Behaviour::NoReply => TransportErrorKind::MalformedReply("no reply to /meta/handshake".into()),
        other => unreachable!("{other:?} is not one of the bad replies"),
    }
}

fn same_kind(actual: &TransportErrorKind, expected: &TransportErrorKind) -> bool {
    match (actual, expected) {
        (TransportErrorKind::MalformedReply(actual), TransportErrorKind::MalformedReply(expected)) => {
            actual.starts_with(expected.as_str())
        }
        (actual, expected) => actual == expected,
    }
}

const BAD: [Behaviour; 6] = [
    Behaviour::BadJson,
    Behaviour::NotAnArray,
    Behaviour::MissingFields,
    Behaviour::NoReply,
    Behaviour::Http500,
    Behaviour::AbruptClose,
];

#[tokio::test]
async fn each_bad_reply_fails_open_with_a_transport_error_then_open_succeeds() {
    for behaviour in BAD {
        let server = FakeServer::start(behaviour).await;
        let client = client(&server);
        let error =
            tokio::time::timeout(WAIT, client.open()).await.expect("open gives up").expect_err("bad reply");
        assert_eq!(error.kind(), ErrorKind::Transport, "{behaviour:?}: {error}");
        let kind = error.transport_kind().expect("a transport error");
        assert!(same_kind(kind, &expected_kind(behaviour)), "{behaviour:?}: got {kind:?}");
        assert!(client.is_closed());

        server.set(Behaviour::Valid);
        client.open().await.unwrap_or_else(|error| panic!("{behaviour:?} then valid: {error}"));
        client.subscribe("/after").await.expect("subscribe");
        client.close().await;
    }
}

#[tokio::test]
async fn an_open_client_rides_out_bad_replies() {
    let server = FakeServer::start(Behaviour::Valid).await;
    let client = client(&server);
    client.open().await.expect("open");
    for behaviour in BAD {
        server.set(behaviour);
        let mut error = next(&client).await.expect_err("bad replies take the link down");
        // A message without a channel is told on its own, then the link goes down.
        while matches!(error, Error::BadMessage { .. }) {
            error = next(&client).await.expect_err("bad replies take the link down");
        }
        assert_eq!(error.transport_kind(), Some(&TransportErrorKind::ConnectionTimeout), "{behaviour:?}");
        assert!(client.status().last_error.is_some());
        server.set(Behaviour::Valid);
        wait_for_state(&client, SessionState::Connected).await;
        client.publish("/still/working", serde_json::json!(1)).await.expect("publish");
    }
}

/// A held `/meta/connect`'s reply, after a subscription, that mixes good events with one
/// of each kind of message that does not fit: a repeated key, a numeric `timestamp`, a
/// string `ext`, an `id` nested 200 deep.
fn mixed_reply(request: &serde_json::Value) -> String {
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let good = |n: u32| format!(r#"{{"channel":"/mixed","data":{{"n":{n}}}}}"#);
    [
        format!(r#"{{"channel":"/meta/connect","id":{},"successful":true}}"#, request["id"]),
        good(1),
        r#"{"channel":"/mixed","id":"7","id":"8","data":{"n":"repeated"}}"#.into(),
        good(2),
        r#"{"channel":"/mixed","timestamp":1733580000,"data":{"n":"timestamp"}}"#.into(),
        good(3),
        r#"{"channel":"/mixed","ext":"not an object","data":{"n":"ext"}}"#.into(),
        good(4),
        format!(r#"{{"channel":"/mixed","id":{deep},"data":{{"n":"deep"}}}}"#),
        good(5),
    ]
    .join(",")
}

/// Each bad message of a reply is reported with its channel and why, and every good one
/// is delivered, in order; the session goes on.
async fn each_message_of_a_reply_is_read_on_its_own(kind: ConnectionType) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let subscribed = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let (subscribed_in, sent_in) = (subscribed.clone(), sent.clone());
    let script: crate::support::scripted::Script = Arc::new(move |request| {
        match request["channel"].as_str() {
            Some("/meta/subscribe") => subscribed_in.store(true, Ordering::SeqCst),
            Some("/meta/connect")
                if request["advice"]["timeout"] != serde_json::json!(0)
                    && subscribed_in.load(Ordering::SeqCst)
                    && sent_in.fetch_add(1, Ordering::SeqCst) == 0 =>
            {
                return Some(mixed_reply(request));
            }
            _ => {}
        }
        None
    });
    let server = crate::support::scripted::ScriptedServer::start(script).await;
    let client = crate::support::peer::open(
        Client::builder(server.url()).connection_types([kind]).request_timeout(Duration::from_secs(5)),
    )
    .await;
    client.subscribe("/mixed").await.expect("subscribe");
    for n in 1..=5 {
        let message = next(&client).await.unwrap_or_else(|error| panic!("{kind}: event {n}: {error}"));
        assert_eq!(message.data.map(|data| data.into_value()), Some(serde_json::json!({ "n": n })), "{kind}");
    }
    for reason in ["duplicate field `id`", "invalid type: integer", "invalid type: string", "recursion limit"]
    {
        let error = next(&client).await.expect_err("then each bad message");
        match &error {
            Error::BadMessage { channel, reason: why } => {
                assert_eq!(channel.as_deref(), Some("/mixed"), "{kind}: {error}");
                assert!(why.contains(reason), "{kind}: expected {reason}: {error}");
            }
            other => panic!("{kind}: expected a skipped message, got {other}"),
        }
        assert!(error.to_string().starts_with("skipped a message on /mixed"), "{error}");
    }
    assert_eq!(client.status().state, SessionState::Connected, "{kind}: the session goes on");
    client.publish("/mixed", serde_json::json!("after")).await.expect("publish after");
    client.close().await;
}

#[tokio::test]
async fn each_message_of_a_long_polling_reply_is_read_on_its_own() {
    each_message_of_a_reply_is_read_on_its_own(ConnectionType::LongPolling).await;
}

#[tokio::test]
async fn each_message_of_a_websocket_frame_is_read_on_its_own() {
    each_message_of_a_reply_is_read_on_its_own(ConnectionType::WebSocket).await;
}
