//! Several replicas of one configuration on one NATS state (a lease per source): one of
//! them runs the source at a time, so each message is forwarded once; when its owner is
//! killed (`kill -9`) another takes the source within the lease's time to live (what the
//! dead one delivered and had not settled is delivered again, under the same
//! `webhook-id`), and when its owner stops (SIGTERM) another takes it at once; a
//! subscription added or removed through a standby's API reaches the owner at once (a
//! watch on the shared store). (Session hand-over and store-side fencing are not built
//! yet: issue 24.)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::bayeux::{BayeuxServer, FayeOptions};
use crate::support::daemon::Daemon;
use crate::support::nats::NatsServer;
use crate::support::peer::{WAIT, open};
use crate::support::webhook::WebhookReceiver;

pub(crate) const LEASE_TTL: Duration = Duration::from_secs(2);

/// A replica named `name` of the shared configuration, as its own process.
pub(crate) async fn replica(
    name: &str,
    faye: &BayeuxServer,
    nats: &NatsServer,
    hook: &str,
    dir: &tempfile::TempDir,
) -> Daemon {
    replica_with(name, faye, nats, hook, dir, "").await
}

/// [`replica`], with `source` added to the source's settings (TOML lines).
pub(crate) async fn replica_with(
    name: &str,
    faye: &BayeuxServer,
    nats: &NatsServer,
    hook: &str,
    dir: &tempfile::TempDir,
    source: &str,
) -> Daemon {
    let state = dir.path().join(name);
    std::fs::create_dir_all(&state).expect("state dir");
    let config = state.join("bridge.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\nallow_private_webhooks = true\n\
             [state]\npath = \"{}\"\nbackend = \"nats\"\nbucket = \"shared\"\n\
             [cluster]\nreplica = \"{name}\"\nlease_ttl = \"{}s\"\nhandover_wait = \"2s\"\n\
             [nats]\nurl = \"{}\"\n\
             [[sources]]\nname = \"demo\"\nurl = \"{}\"\n{source}\
             [[subscriptions]]\nid = \"numbers\"\nsource = \"demo\"\nchannel = \"/numbers\"\n\
             sink = {{ type = \"webhook\", url = \"{hook}\" }}\n",
            state.display(),
            LEASE_TTL.as_secs(),
            nats.url(),
            faye.url()
        ),
    )
    .expect("write config");
    Daemon::start(&config).await
}

/// The source as `daemon` shows it.
pub(crate) async fn source_view(daemon: &Daemon) -> Value {
    let answer = crate::support::http_client()
        .get(format!("http://{}/api/v1/sources", daemon.admin))
        .send()
        .await
        .expect("the API answers");
    let sources: Value = serde_json::from_slice(&answer.bytes().await.expect("a body")).expect("JSON");
    sources[0].clone()
}

/// `daemon`'s metrics.
pub(crate) async fn metrics_of(daemon: &Daemon) -> String {
    let answer = crate::support::http_client()
        .get(format!("http://{}/metrics", daemon.admin))
        .send()
        .await
        .expect("metrics");
    answer.text().await.expect("text")
}

/// Waits until `owner` runs the source (connected and subscribed) and every replica in
/// `all` says it is the owner.
pub(crate) async fn wait_for_owner(owner: &str, daemons: &[(&str, &Daemon)], within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let mut settled = true;
        for (name, daemon) in daemons {
            let view = source_view(daemon).await;
            settled &= view["owner"] == owner;
            if *name == owner {
                settled &= view["state"] == "connected"
                    && view["subscriptions"].as_array().is_some_and(|channels| !channels.is_empty());
            }
        }
        if settled {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{owner} does not run the source within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every replica names the same owner of the source, and that one runs it;
/// its name.
async fn settled_owner(daemons: &[(&str, &Daemon)]) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let owner = source_view(daemons[0].1).await["owner"].as_str().map(str::to_string);
        if let Some(owner) = owner
            && daemons.iter().any(|(name, _)| *name == owner)
        {
            let mut settled = true;
            for (name, daemon) in daemons {
                let view = source_view(daemon).await;
                settled &= view["owner"] == owner.as_str();
                if *name == owner {
                    settled &= view["state"] == "connected"
                        && view["subscriptions"].as_array().is_some_and(|channels| !channels.is_empty());
                }
            }
            if settled {
                return owner;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no replica runs the source within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every delivery's number and `webhook-id`.
type Deliveries = BTreeMap<u64, Vec<String>>;

/// Publishes `numbers` and waits until each reached the webhook, recording every delivery
/// in `all`; then publishes a marker and waits for it, so that any second delivery has
/// arrived. Checks that each of `numbers` arrived once, and that anything delivered
/// again from before (after a `kill -9`, what the dead owner delivered but had not
/// settled) kept its `webhook-id`.
async fn publish_and_check(
    faye: &BayeuxServer,
    receiver: &mut WebhookReceiver,
    numbers: std::ops::Range<u64>,
    all: &mut Deliveries,
) {
    let publisher = open(cometd_bridge::cometd::Client::builder(faye.url())).await;
    for n in numbers.clone() {
        publisher.publish("/numbers", json!({ "n": n })).await.expect("publish");
    }
    let marker = 1_000_000 + numbers.end;
    publisher.publish("/numbers", json!({ "n": marker })).await.expect("the marker");
    publisher.close().await;
    let mut this_round = Deliveries::new();
    while !this_round.contains_key(&marker) {
        let request = receiver.next().await;
        let id = request.header("webhook-id");
        assert!(!id.is_empty(), "a webhook-id on every delivery");
        let n = request.json()["data"]["n"].as_u64().expect("numbered");
        this_round.entry(n).or_default().push(id.to_string());
    }
    for n in numbers.clone() {
        let ids = this_round.get(&n).map_or(0, Vec::len);
        assert_eq!(ids, 1, "{n} delivered {ids} times in its round: {this_round:?}");
    }
    for (n, ids) in &this_round {
        if let Some(before) = all.get(n) {
            assert!(ids.iter().all(|id| before.contains(id)), "{n} delivered again under another webhook-id");
        }
        all.entry(*n).or_default().extend(ids.iter().cloned());
    }
}

#[tokio::test]
async fn one_replica_runs_the_source_and_another_takes_it_when_the_owner_dies_or_stops() {
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let nats = NatsServer::start().await;
    let mut receiver = WebhookReceiver::start([]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let a = replica("a", &faye, &nats, &receiver.url(), &dir).await;
    // `a` takes the source before `b` exists; `b` is a standby, and ready.
    wait_for_owner("a", &[("a", &a)], WAIT).await;
    let b = replica("b", &faye, &nats, &receiver.url(), &dir).await;
    wait_for_owner("a", &[("a", &a), ("b", &b)], WAIT).await;
    let ready =
        crate::support::http_client().get(format!("http://{}/readyz", b.admin)).send().await.expect("readyz");
    assert_eq!(ready.status(), 200, "a healthy standby is ready");

    let mut all = Deliveries::new();
    publish_and_check(&faye, &mut receiver, 0..50, &mut all).await;

    // The owner dies: `b` takes the source once the lease expires.
    let killed = Instant::now();
    a.kill_9().await;
    wait_for_owner("b", &[("b", &b)], LEASE_TTL + Duration::from_secs(5)).await;
    let took = killed.elapsed();
    assert!(took <= LEASE_TTL + Duration::from_secs(2), "b took the source {took:?} after a died");
    publish_and_check(&faye, &mut receiver, 50..100, &mut all).await;

    // A third replica joins; then the owner stops: the other takes it at once, not
    // when a lease expires.
    let c = replica("c", &faye, &nats, &receiver.url(), &dir).await;
    wait_for_owner("b", &[("b", &b), ("c", &c)], WAIT).await;
    let stopped = Instant::now();
    b.signal(libc::SIGTERM);
    wait_for_owner("c", &[("c", &c)], WAIT).await;
    let took = stopped.elapsed();
    assert!(took < LEASE_TTL, "c took the source {took:?} after b stopped: released, not expired");
    publish_and_check(&faye, &mut receiver, 100..150, &mut all).await;
    let metrics = metrics_of(&c).await;
    assert!(metrics.contains("cometd_bridge_source_owned{source=\"demo\"} 1"), "{metrics}");
    assert!(metrics.contains("cometd_bridge_lease_changes_total{source=\"demo\"} 1"), "{metrics}");
}

/// The owner frozen (SIGSTOP) for three times the lease's TTL: the other replica takes
/// the source and delivers what is published meanwhile; when the frozen one wakes
/// (SIGCONT) its lease has lapsed on its own clock, so it appends, delivers and settles
/// nothing before it learns it lost the source, and gives it up: every message is
/// delivered once.
#[tokio::test]
async fn an_owner_frozen_past_its_lease_writes_nothing_when_it_wakes() {
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let nats = NatsServer::start().await;
    let mut receiver = WebhookReceiver::start([]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let a = replica("a", &faye, &nats, &receiver.url(), &dir).await;
    wait_for_owner("a", &[("a", &a)], WAIT).await;
    let b = replica("b", &faye, &nats, &receiver.url(), &dir).await;
    wait_for_owner("a", &[("a", &a), ("b", &b)], WAIT).await;
    let mut all = Deliveries::new();
    publish_and_check(&faye, &mut receiver, 0..20, &mut all).await;

    a.signal(libc::SIGSTOP);
    wait_for_owner("b", &[("b", &b)], LEASE_TTL * 3).await;
    publish_and_check(&faye, &mut receiver, 20..40, &mut all).await;
    // Frozen for three times the TTL in all, then woken while messages flow.
    tokio::time::sleep(LEASE_TTL).await;
    a.signal(libc::SIGCONT);
    publish_and_check(&faye, &mut receiver, 40..140, &mut all).await;
    wait_for_owner("b", &[("a", &a), ("b", &b)], WAIT).await;
    publish_and_check(&faye, &mut receiver, 140..160, &mut all).await;
    let metrics = metrics_of(&a).await;
    assert!(metrics.contains("cometd_bridge_source_owned{source=\"demo\"} 0"), "{metrics}");
    // b continued a's session, and the woken a sent nothing on it (it would have taken
    // the session's messages away from b).
    let metrics = metrics_of(&b).await;
    assert!(metrics.contains("cometd_bridge_session_losses_total{source=\"demo\"} 0"), "{metrics}");
}

/// A reload that changes the owned source (a new client, built unowned) on a replica
/// that holds its lease: the replica runs the new one, and messages flow again.
#[tokio::test]
async fn a_reloaded_source_runs_again_on_the_replica_that_holds_its_lease() {
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let nats = NatsServer::start().await;
    let mut receiver = WebhookReceiver::start([]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let a = replica("a", &faye, &nats, &receiver.url(), &dir).await;
    wait_for_owner("a", &[("a", &a)], WAIT).await;
    let mut all = Deliveries::new();
    publish_and_check(&faye, &mut receiver, 0..10, &mut all).await;
    let config = dir.path().join("a").join("bridge.toml");
    let changed = std::fs::read_to_string(&config)
        .expect("config")
        .replace("name = \"demo\"\n", "name = \"demo\"\nconnection_timeout = \"20s\"\n");
    std::fs::write(&config, changed).expect("rewrite");
    let before = source_view(&a).await["client_id"].clone();
    a.signal(libc::SIGHUP);
    let deadline = tokio::time::Instant::now() + WAIT;
    while source_view(&a).await["client_id"] == before {
        assert!(tokio::time::Instant::now() < deadline, "the changed source did not reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for_owner("a", &[("a", &a)], WAIT).await;
    publish_and_check(&faye, &mut receiver, 10..20, &mut all).await;
}

/// A subscription added through the owner's API, then the owner killed: the replica that
/// takes the source over runs the added subscription too (read from the shared store).
#[tokio::test]
async fn a_subscription_added_on_the_owner_runs_on_the_replica_that_takes_over() {
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let nats = NatsServer::start().await;
    let mut receiver = WebhookReceiver::start([]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let a = replica("a", &faye, &nats, &receiver.url(), &dir).await;
    wait_for_owner("a", &[("a", &a)], WAIT).await;
    let b = replica("b", &faye, &nats, &receiver.url(), &dir).await;
    wait_for_owner("a", &[("a", &a), ("b", &b)], WAIT).await;
    let body = json!({ "id": "extra", "source": "demo", "channel": "/extra", "sink": { "type": "webhook", "url": receiver.url() } });
    let added = crate::support::http_client()
        .post(format!("http://{}/api/v1/subscriptions", a.admin))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("the API answers");
    assert_eq!(added.status(), 201);
    let url = faye.url();
    let extra = |n: u64| {
        let url = url.clone();
        async move {
            let publisher = open(cometd_bridge::cometd::Client::builder(url)).await;
            publisher.publish("/extra", json!({ "n": n })).await.expect("publish");
            publisher.close().await;
        }
    };
    extra(1).await;
    assert_eq!(receiver.next().await.json()["data"]["n"], 1, "the added subscription runs on its owner");
    a.kill_9().await;
    wait_for_owner("b", &[("b", &b)], LEASE_TTL + Duration::from_secs(5)).await;
    extra(2).await;
    loop {
        // What a delivered and had not settled may come again first.
        let n = receiver.next().await.json()["data"]["n"].as_u64().expect("numbered");
        if n == 2 {
            break;
        }
        assert_eq!(n, 1, "only the earlier message may come again");
    }
}

/// `daemon`'s API: adds a subscription; the status.
async fn post_subscription(daemon: &Daemon, body: &Value) -> u16 {
    let answer = crate::support::http_client()
        .post(format!("http://{}/api/v1/subscriptions", daemon.admin))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("the API answers");
    answer.status().as_u16()
}

/// `daemon`'s API: removes a subscription; the status.
async fn delete_subscription(daemon: &Daemon, id: &str) -> u16 {
    let answer = crate::support::http_client()
        .delete(format!("http://{}/api/v1/subscriptions/{id}", daemon.admin))
        .send()
        .await
        .expect("the API answers");
    answer.status().as_u16()
}

/// Waits until the source's session on `daemon` is (or is no longer) subscribed upstream
/// to `channel`.
async fn wait_for_channel(daemon: &Daemon, channel: &str, subscribed: bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let view = source_view(daemon).await;
        let has =
            view["subscriptions"].as_array().is_some_and(|channels| channels.iter().any(|c| c == channel));
        if has == subscribed {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{channel} subscribed: {has}, expected {subscribed}: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The ids of the subscriptions `daemon`'s API lists.
async fn subscription_ids(daemon: &Daemon) -> Vec<String> {
    let answer = crate::support::http_client()
        .get(format!("http://{}/api/v1/subscriptions", daemon.admin))
        .send()
        .await
        .expect("the API answers");
    let listed: Value = serde_json::from_slice(&answer.bytes().await.expect("a body")).expect("JSON");
    listed.as_array().expect("a list").iter().map(|s| s["id"].as_str().expect("an id").to_string()).collect()
}

/// Publishes `data` on `channel` of `faye`.
async fn publish_on(faye: &BayeuxServer, channel: &str, data: Value) {
    let publisher = open(cometd_bridge::cometd::Client::builder(faye.url())).await;
    publisher.publish(channel, data).await.expect("publish");
    publisher.close().await;
}

/// A subscription added through the standby's API runs on the owner at once (the owner
/// watches the shared store): the owner subscribes upstream and forwards to NATS; removed
/// through the standby, the owner unsubscribes and nothing more arrives. After NATS
/// restarts, the watch is there again.
#[tokio::test]
async fn a_subscription_added_and_removed_on_a_standby_reaches_the_owner_at_once() {
    use futures_util::StreamExt;
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let mut nats = NatsServer::start().await;
    let mut receiver = WebhookReceiver::start([]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let a = replica("a", &faye, &nats, &receiver.url(), &dir).await;
    wait_for_owner("a", &[("a", &a)], WAIT).await;
    let b = replica("b", &faye, &nats, &receiver.url(), &dir).await;
    wait_for_owner("a", &[("a", &a), ("b", &b)], WAIT).await;
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let mut forwarded = client.subscribe("extra.>").await.expect("subscribe");
    client.flush().await.expect("flush");
    let extra = |id: &str, subject: &str| json!({ "id": id, "source": "demo", "channel": "/extra", "sink": { "type": "nats", "subject": subject } });

    assert_eq!(post_subscription(&b, &extra("extra", "extra.one")).await, 201);
    wait_for_channel(&a, "/extra", true).await;
    assert!(subscription_ids(&a).await.contains(&"extra".to_string()), "the owner's API lists it");
    publish_on(&faye, "/extra", json!({ "n": 1 })).await;
    let message = tokio::time::timeout(WAIT, forwarded.next()).await.expect("forwarded").expect("a message");
    let body: Value = serde_json::from_slice(&message.payload).expect("JSON");
    assert_eq!(body["n"], 1, "the data is the payload: {body}");

    assert_eq!(delete_subscription(&b, "extra").await, 204);
    wait_for_channel(&a, "/extra", false).await;
    assert!(!subscription_ids(&a).await.contains(&"extra".to_string()), "the owner's API no longer lists it");
    publish_on(&faye, "/extra", json!({ "n": 2 })).await;
    let mut all = Deliveries::new();
    publish_and_check(&faye, &mut receiver, 0..1, &mut all).await;
    client.flush().await.expect("flush");
    assert!(
        futures_util::FutureExt::now_or_never(forwarded.next()).is_none(),
        "nothing arrives from a removed subscription"
    );

    // NATS restarts (its store kept): the watch starts again.
    nats.process().restart().await;
    let owner = settled_owner(&[("a", &a), ("b", &b)]).await;
    let (owner, standby) = if owner == "a" { (&a, &b) } else { (&b, &a) };
    assert_eq!(post_subscription(standby, &extra("again", "extra.two")).await, 201);
    wait_for_channel(owner, "/extra", true).await;
    publish_on(&faye, "/extra", json!({ "n": 3 })).await;
    let message = tokio::time::timeout(WAIT, forwarded.next()).await.expect("forwarded").expect("a message");
    let body: Value = serde_json::from_slice(&message.payload).expect("JSON");
    assert_eq!((message.subject.as_str(), body["n"].as_u64()), ("extra.two", Some(3)), "{body}");
}
