//! Session hand-over in the client: a session detached from one client (no
//! `/meta/disconnect`) and continued by another with its ticket loses nothing the server
//! sent it, on every peer; a ticket the server no longer knows starts a new session with
//! the ticket's subscriptions.

use cometd_bridge::cometd::{Client, Data, Error, Resumed};
use serde_json::json;

use crate::on_every_peer;
use crate::support::peer::{Peer, WAIT, next};

on_every_peer!(
    a_detached_session_continues_in_another_client_with_nothing_lost,
    a_ticket_the_server_does_not_know_starts_a_new_session_with_its_subscriptions,
);

/// The `n` of each message until the client is closed and drained.
async fn drain(client: &Client) -> Vec<i64> {
    let mut numbers = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, client.receive()).await.expect("the detached client drains") {
            Ok(message) => numbers.push(number(message.data)),
            Err(Error::Closed) => return numbers,
            Err(error) => panic!("a detached client reports {error}"),
        }
    }
}

fn number(data: Option<Data>) -> i64 {
    data.map(Data::into_value).and_then(|value| value["n"].as_i64()).expect("a numbered message")
}

async fn a_detached_session_continues_in_another_client_with_nothing_lost(peer: Peer) {
    let server = peer.start().await;
    let first = peer.open(&server).await;
    let publisher = peer.open(&server).await;
    first.subscribe("/handoff").await.expect("subscribe");
    for n in 0..20 {
        publisher.publish("/handoff", json!({ "n": n })).await.expect("publish");
    }
    let ticket = first.detach(WAIT).await.expect("a connected client gives a ticket");
    assert!(first.is_closed());
    assert!(ticket.subscriptions.contains("/handoff"), "{ticket:?}");
    // What the first client took in before it stopped is still its to hand on.
    let mut received = drain(&first).await;
    // Published while no client holds the session: the server queues them for it.
    for n in 20..40 {
        publisher.publish("/handoff", json!({ "n": n })).await.expect("publish");
    }
    let second = peer.options(&server).build().expect("valid options");
    let resumed = tokio::time::timeout(WAIT, second.resume(ticket.clone())).await.expect("resume finishes");
    assert_eq!(resumed.expect("resume succeeds"), Resumed::Continued);
    assert_eq!(second.status().client_id.as_deref(), Some(ticket.client_id.as_str()));
    assert!(second.subscriptions().contains("/handoff"));
    for n in 40..45 {
        publisher.publish("/handoff", json!({ "n": n })).await.expect("publish");
    }
    while received.len() < 45 {
        received.push(number(next(&second).await.expect("a message").data));
    }
    assert_eq!(received, (0..45).collect::<Vec<_>>(), "every message once, in order");
    second.close().await;
}

async fn a_ticket_the_server_does_not_know_starts_a_new_session_with_its_subscriptions(peer: Peer) {
    let server = peer.start().await;
    let first = peer.open(&server).await;
    let publisher = peer.open(&server).await;
    first.subscribe("/handoff").await.expect("subscribe");
    let mut ticket = first.detach(WAIT).await.expect("a ticket");
    ticket.client_id = "a-session-the-server-never-had".into();
    let second = peer.options(&server).build().expect("valid options");
    let resumed = tokio::time::timeout(WAIT, second.resume(ticket.clone())).await.expect("resume finishes");
    assert_eq!(resumed.expect("resume succeeds"), Resumed::Handshaken);
    assert_ne!(second.status().client_id.as_deref(), Some(ticket.client_id.as_str()));
    publisher.publish("/handoff", json!({ "n": 1 })).await.expect("publish");
    assert_eq!(number(next(&second).await.expect("a message").data), 1);
    second.close().await;
}
