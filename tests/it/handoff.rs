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
    // A pending limit below what the server queued meanwhile: the server may send that
    // ahead of the reply `resume` waits for, which must not wait for room.
    let second = peer.options(&server).max_pending_count(4).build().expect("valid options");
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

/// The bridge: a source's CometD session moves with the source among replicas (no
/// replay). The owner is killed (`kill -9`), and later the next owner stopped (SIGTERM)
/// while a ticker publishes 50 messages a second: each time the replica that takes the
/// source over continues the same session, so what was published while no replica held
/// it, queued by the server for the session, reaches the webhook, and no session is lost.
/// Every message arrives at least once; again only under the same `webhook-id`, except
/// after a `kill -9` with acknowledgements (see below).
mod bridge {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde_json::json;

    use crate::replicas::{LEASE_TTL, metrics_of, replica_with, source_view, wait_for_owner};
    use crate::support::bayeux::{BayeuxServer, CometdOptions, FayeOptions};
    use crate::support::nats::NatsServer;
    use crate::support::peer::{WAIT, open};
    use crate::support::webhook::WebhookReceiver;

    /// Publishes `numbers` on `/numbers`, one every 20 ms (50 a second).
    fn ticker(url: String, numbers: std::ops::Range<u64>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let publisher = open(cometd_bridge::cometd::Client::builder(url)).await;
            let mut every = tokio::time::interval(Duration::from_millis(20));
            for n in numbers {
                every.tick().await;
                publisher.publish("/numbers", json!({ "n": n })).await.expect("publish");
            }
            publisher.close().await;
        })
    }

    /// Receives until `n` arrived, recording each number's `webhook-id`s.
    async fn receive_until(receiver: &mut WebhookReceiver, n: u64, all: &mut BTreeMap<u64, Vec<String>>) {
        loop {
            let request = receiver.next().await;
            let id = request.header("webhook-id").to_string();
            assert!(!id.is_empty(), "a webhook-id on every delivery");
            let got = request.json()["data"]["n"].as_u64().expect("numbered");
            all.entry(got).or_default().push(id);
            if got == n {
                return;
            }
        }
    }

    async fn client_id(daemon: &crate::support::daemon::Daemon) -> String {
        source_view(daemon).await["client_id"].as_str().expect("a session").to_string()
    }

    /// faye over websocket. Without acknowledgements what the killed owner had received
    /// and not yet spooled dies with it (and on long-polling, the first batch faye sends
    /// after the kill, to the dead owner's held `/meta/connect`), so the ticker is quiet
    /// at the instant of the kill and runs while the next owner takes over; a SIGTERM
    /// hands everything over (the socket closed with a close handshake), so the ticker
    /// runs through it.
    #[tokio::test]
    async fn on_faye_over_websocket() {
        // faye forgets a session about 1.6 × its timeout after its last connect: longer
        // than the lease takes to expire.
        let faye = BayeuxServer::faye(FayeOptions { timeout: Some(5), ..FayeOptions::default() }).await;
        moves_with_the_source(faye, "", false).await;
    }

    /// cometd-nodejs-server over long-polling with the acknowledgement extension: the
    /// ticker runs through the kill, and the batch the killed owner had not acknowledged
    /// is sent again to the next owner. What the killed owner had spooled of it comes
    /// twice, under another `webhook-id` (the next owner cannot tell it from a new
    /// message); after a SIGTERM nothing does.
    #[tokio::test]
    async fn on_cometd_over_long_polling_with_acknowledgements() {
        let options = CometdOptions {
            timeout: Some(5_000),
            max_interval: Some(10_000),
            ack: true,
            ..CometdOptions::default()
        };
        let cometd = BayeuxServer::cometd(options).await;
        let long_polling = "connection_types = [\"long-polling\"]\n";
        moves_with_the_source(cometd, long_polling, true).await;
    }

    async fn moves_with_the_source(server: BayeuxServer, source: &str, acknowledged: bool) {
        let nats = NatsServer::start().await;
        let mut receiver = WebhookReceiver::start([]).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let a = replica_with("a", &server, &nats, &receiver.url(), &dir, source).await;
        wait_for_owner("a", &[("a", &a)], WAIT).await;
        let b = replica_with("b", &server, &nats, &receiver.url(), &dir, source).await;
        wait_for_owner("a", &[("a", &a), ("b", &b)], WAIT).await;
        let session = client_id(&a).await;
        let mut all = BTreeMap::new();

        // kill -9 of the owner.
        let ticking = if acknowledged {
            let ticking = ticker(server.url(), 0..200);
            receive_until(&mut receiver, 30, &mut all).await;
            ticking
        } else {
            ticker(server.url(), 0..30).await.expect("the ticker");
            receive_until(&mut receiver, 29, &mut all).await;
            ticker(server.url(), 30..200)
        };
        a.kill_9().await;
        // faye answers the next owner's first `/meta/connect` only when the dead owner's
        // held one times out (a Connection keeps its first timer): up to its timeout.
        wait_for_owner("b", &[("b", &b)], LEASE_TTL + Duration::from_secs(10)).await;
        assert_eq!(client_id(&b).await, session, "b continues a's session");
        receive_until(&mut receiver, 199, &mut all).await;
        ticking.await.expect("the ticker");
        let after_kill: BTreeMap<u64, Vec<String>> = std::mem::take(&mut all);

        // SIGTERM of the next owner, the ticker running through.
        let c = replica_with("c", &server, &nats, &receiver.url(), &dir, source).await;
        wait_for_owner("b", &[("b", &b), ("c", &c)], WAIT).await;
        let ticking = ticker(server.url(), 200..400);
        receive_until(&mut receiver, 230, &mut all).await;
        b.signal(libc::SIGTERM);
        wait_for_owner("c", &[("c", &c)], WAIT).await;
        assert_eq!(client_id(&c).await, session, "c continues the same session");
        receive_until(&mut receiver, 399, &mut all).await;
        ticking.await.expect("the ticker");

        let missing: Vec<u64> =
            (0..400).filter(|n| !all.contains_key(n) && !after_kill.contains_key(n)).collect();
        assert!(missing.is_empty(), "never delivered: {missing:?}");
        let same_id = |ids: &Vec<String>| ids.iter().all(|id| *id == ids[0]);
        for (n, ids) in all.iter().chain(after_kill.iter().filter(|_| !acknowledged)) {
            assert!(same_id(ids), "{n} delivered again under another webhook-id: {ids:?}");
        }
        let metrics = metrics_of(&c).await;
        assert!(metrics.contains("cometd_bridge_session_losses_total{source=\"demo\"} 0"), "{metrics}");
    }
}
