//! `max_pending_count`: a slow consumer holds back events, never protocol replies, and
//! loses nothing.

use cometd_bridge::cometd::{ConnectionType, Data};
use serde_json::json;

use crate::on_every_peer;
use crate::support::peer::{Peer, WAIT, next, open};

const LIMIT: i64 = 5;

on_every_peer!(replies_pass_a_full_queue, a_slow_consumer_loses_nothing);

/// The client receives its own publishes back; with the queue full after five, the
/// remaining publishes must still get their replies (aiocometd deadlocks here).
async fn replies_pass_a_full_queue(peer: Peer) {
    let server = peer.start().await;
    let client = open(peer.options(&server).max_pending_count(LIMIT)).await;
    client.subscribe("/echo").await.expect("subscribe");
    for n in 0..50 {
        tokio::time::timeout(WAIT, client.publish("/echo", json!(n)))
            .await
            .unwrap_or_else(|_| panic!("publish {n} was held up by the full queue"))
            .expect("publish");
    }
    client.subscribe("/also").await.expect("subscribe while the queue is full");
    for n in 0..50 {
        assert_eq!(
            next(&client).await.expect("message").data.map(Data::into_value),
            Some(json!(n)),
            "in order"
        );
    }
}

/// A publisher floods a channel while the subscriber does not read; the subscriber then
/// reads everything, in order. On websocket the client stops reading the socket when the
/// queue is full, so it holds at most the limit plus the one frame it was reading.
async fn a_slow_consumer_loses_nothing(peer: Peer) {
    const COUNT: u64 = 300;
    let server = peer.start().await;
    let subscriber = open(peer.options(&server).max_pending_count(LIMIT)).await;
    let publisher = peer.open(&server).await;
    subscriber.subscribe("/flood").await.expect("subscribe");
    for n in 0..COUNT {
        publisher.publish("/flood", json!({ "n": n })).await.expect("publish");
    }
    if peer.connection_type() == ConnectionType::WebSocket {
        // Full first (a check before anything arrived would prove nothing)...
        let deadline = tokio::time::Instant::now() + WAIT;
        while subscriber.pending_count() < LIMIT as usize {
            assert!(tokio::time::Instant::now() < deadline, "the queue never filled");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // ...then bounded while the rest of the flood waits at the server: sampled over
        // a while, since what is checked is that it does not grow.
        for _ in 0..40 {
            let held = subscriber.pending_count();
            assert!(held <= LIMIT as usize + 1, "the subscriber buffered {held} messages");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    for n in 0..COUNT {
        let message = next(&subscriber).await.expect("message");
        assert_eq!(
            message.data.map(Data::into_value),
            Some(json!({ "n": n })),
            "message {n}: none lost, order kept"
        );
    }
}
