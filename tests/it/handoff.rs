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

/// The bridge: a source's CometD session moves with the source among replicas. Under a
/// ticker (no replay), the owner is killed (`kill -9`), and later the next owner stopped
/// (SIGTERM): each time the replica that takes the source over continues the same
/// session, so every message published meanwhile, queued by the server for the session,
/// reaches the webhook (at least once; again only under the same `webhook-id`), and no
/// session is lost.
mod bridge {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde_json::json;

    use crate::replicas::{LEASE_TTL, metrics_of, replica, source_view, wait_for_owner};
    use crate::support::bayeux::{BayeuxServer, FayeOptions};
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

    #[tokio::test]
    async fn the_session_moves_with_the_source_and_nothing_published_meanwhile_is_lost() {
        // faye forgets a session about 1.6 × its timeout after its last connect: longer
        // than the lease takes to expire.
        let faye = BayeuxServer::faye(FayeOptions { timeout: Some(5), ..FayeOptions::default() }).await;
        let nats = NatsServer::start().await;
        let mut receiver = WebhookReceiver::start([]).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let a = replica("a", &faye, &nats, &receiver.url(), &dir).await;
        wait_for_owner("a", &[("a", &a)], WAIT).await;
        let b = replica("b", &faye, &nats, &receiver.url(), &dir).await;
        wait_for_owner("a", &[("a", &a), ("b", &b)], WAIT).await;
        let session = client_id(&a).await;
        let mut all = BTreeMap::new();

        // kill -9 of the owner while the ticker runs.
        let ticking = ticker(faye.url(), 0..200);
        receive_until(&mut receiver, 20, &mut all).await;
        a.kill_9().await;
        wait_for_owner("b", &[("b", &b)], LEASE_TTL + Duration::from_secs(5)).await;
        assert_eq!(client_id(&b).await, session, "b continues a's session");
        receive_until(&mut receiver, 199, &mut all).await;
        ticking.await.expect("the ticker");

        // SIGTERM of the next owner while the ticker runs: handed over at once.
        let c = replica("c", &faye, &nats, &receiver.url(), &dir).await;
        wait_for_owner("b", &[("b", &b), ("c", &c)], WAIT).await;
        let ticking = ticker(faye.url(), 200..400);
        receive_until(&mut receiver, 220, &mut all).await;
        b.signal(libc::SIGTERM);
        wait_for_owner("c", &[("c", &c)], WAIT).await;
        assert_eq!(client_id(&c).await, session, "c continues the same session");
        receive_until(&mut receiver, 399, &mut all).await;
        ticking.await.expect("the ticker");

        let missing: Vec<u64> = (0..400).filter(|n| !all.contains_key(n)).collect();
        assert!(missing.is_empty(), "never delivered: {missing:?}");
        for (n, ids) in &all {
            assert!(
                ids.iter().all(|id| *id == ids[0]),
                "{n} delivered again under another webhook-id: {ids:?}"
            );
        }
        let metrics = metrics_of(&c).await;
        assert!(metrics.contains("cometd_bridge_session_losses_total{source=\"demo\"} 0"), "{metrics}");
    }
}
