//! Read coalescing against faye over websocket: with a policy eager enough to switch on
//! during any flood, nothing is lost or reordered, requests still get their replies while
//! the socket is read on a timer, and a message after the flood arrives promptly; the
//! client's count of switches to timed reads shows the policy took effect (and stays 0
//! with coalescing off).

use std::time::Duration;

use cometd_bridge::cometd::{Data, ReadCoalescing};
use serde_json::json;

use crate::support::peer::{Peer, WAIT, next, open};

/// Busy after a single wake-up in a window: every flood below reads on the timer.
const EAGER: ReadCoalescing = ReadCoalescing { wakeups_per_window: 1, interval: Duration::from_millis(1) };

#[tokio::test]
async fn a_flood_read_on_the_timer_arrives_whole_and_in_order() {
    const COUNT: u64 = 3_000;
    let peer = Peer::FayeWebSocket;
    let server = peer.start().await;
    let subscriber = open(peer.options(&server).read_coalescing(Some(EAGER)).max_pending_count(0)).await;
    let publisher = peer.open(&server).await;
    subscriber.subscribe("/flood").await.expect("subscribe");
    let flood = tokio::spawn(async move {
        for n in 0..COUNT {
            publisher.publish("/flood", json!({ "n": n })).await.expect("publish");
        }
        publisher
    });
    for n in 0..COUNT {
        let message = next(&subscriber).await.expect("message");
        assert_eq!(
            message.data.map(Data::into_value),
            Some(json!({ "n": n })),
            "message {n}: none lost, order kept"
        );
        if n == COUNT / 2 {
            // A request mid-flood is written and answered while the socket is busy.
            tokio::time::timeout(WAIT, subscriber.subscribe("/also"))
                .await
                .expect("a subscribe mid-flood got its reply")
                .expect("subscribe");
        }
    }
    let publisher = flood.await.expect("publisher task");
    // The flood is over; one more message is read as soon as it arrives, not held.
    publisher.publish("/also", json!("after")).await.expect("publish");
    let after = next(&subscriber).await.expect("the message after the flood");
    assert_eq!(after.data.map(Data::into_value), Some(json!("after")));
    assert_eq!(after.channel, "/also");
    // The flood was read on the timer: the policy took effect.
    assert!(subscriber.timed_read_switches() > 0, "the socket switched to timed reads during the flood");
}

/// With coalescing off, the same kind of flood is read on readiness all along.
#[tokio::test]
async fn with_coalescing_off_a_flood_never_switches_to_timed_reads() {
    const COUNT: u64 = 500;
    let peer = Peer::FayeWebSocket;
    let server = peer.start().await;
    let subscriber = open(peer.options(&server).read_coalescing(None).max_pending_count(0)).await;
    let publisher = peer.open(&server).await;
    subscriber.subscribe("/flood").await.expect("subscribe");
    let flood = tokio::spawn(async move {
        for n in 0..COUNT {
            publisher.publish("/flood", json!({ "n": n })).await.expect("publish");
        }
    });
    for n in 0..COUNT {
        let message = next(&subscriber).await.expect("message");
        assert_eq!(message.data.map(Data::into_value), Some(json!({ "n": n })), "message {n}");
    }
    flood.await.expect("publisher task");
    assert_eq!(subscriber.timed_read_switches(), 0, "coalescing off: never read on a timer");
}
