//! Malformed replies, HTTP errors and abrupt closes (from a hand-written server, since no
//! real server produces them on demand): each is a transport error, never a panic, and the
//! client recovers once the replies are valid again.

use std::time::Duration;

use cometd_bridge::cometd::{Client, ConnectionType, ErrorKind, SessionState, TransportErrorKind};

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
        Behaviour::NotAnArray | Behaviour::MissingFields => {
            TransportErrorKind::MalformedReply("not an array of Bayeux messages".into())
        }
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
        let error = next(&client).await.expect_err("bad replies take the link down");
        assert_eq!(error.transport_kind(), Some(&TransportErrorKind::ConnectionTimeout), "{behaviour:?}");
        assert!(client.status().last_error.is_some());
        server.set(Behaviour::Valid);
        wait_for_state(&client, SessionState::Connected).await;
        client.publish("/still/working", serde_json::json!(1)).await.expect("publish");
    }
}
