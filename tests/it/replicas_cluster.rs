//! Replicas on a 3-node NATS cluster (JetStream, every bucket and stream on three nodes),
//! under load: a ticker publishes events on the Salesforce-like faye fixture (replay ids,
//! so that a source moving to another replica resumes where the last one committed)
//! while sources move. One NATS node killed and restarted mid-way: every event reaches
//! the sink, the leases survive. Ten sources spread over three replicas; a fourth replica
//! joins and takes its share, one replica stops (SIGTERM) and its sources move: nothing is
//! lost. Each with a JetStream sink (every event in the stream exactly once: the bridge's
//! `Nats-Msg-Id` de-duplicates what a new owner delivers again) and with webhooks (every
//! event at least once, a repeat only under the same `webhook-id`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::bayeux::{BayeuxServer, FayeOptions};
use crate::support::daemon::Daemon;
use crate::support::nats_cluster::{NODES, NatsCluster};
use crate::support::peer::{WAIT, open};
use crate::support::webhook::WebhookReceiver;

const LEASE_TTL: Duration = Duration::from_secs(2);
const CHANNEL: &str = "/event/Tick__e";
/// The stream the JetStream sinks publish into (`ticks.<source>`).
const STREAM: &str = "TICKS";

/// Where the subscriptions deliver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SinkKind {
    JetStream,
    Webhook,
}

/// The fixture, the NATS cluster, the sink's receiving end, and the running replicas.
struct Fleet {
    faye: BayeuxServer,
    cluster: NatsCluster,
    dir: tempfile::TempDir,
    sources: usize,
    sink: SinkKind,
    receiver: WebhookReceiver,
    jetstream: async_nats::jetstream::Context,
    replicas: BTreeMap<String, Daemon>,
}

impl Fleet {
    /// `sources` sources (`s0`, `s1`, …), each with one subscription to [`CHANNEL`] on its own
    /// session, delivering to `sink`; no replica runs yet.
    async fn new(sources: usize, sink: SinkKind) -> Fleet {
        let faye = BayeuxServer::faye(FayeOptions {
            timeout: Some(2),
            extensions: vec![("salesforce".to_string(), json!({}))],
            ..FayeOptions::default()
        })
        .await;
        let cluster = NatsCluster::start().await;
        // Patient: after a node restarts, the stream may take a moment to answer.
        let mut jetstream = async_nats::jetstream::new(cluster.client().await);
        jetstream.set_timeout(WAIT);
        jetstream
            .create_stream(async_nats::jetstream::stream::Config {
                name: STREAM.into(),
                subjects: vec!["ticks.>".into()],
                num_replicas: NODES,
                ..Default::default()
            })
            .await
            .expect("create the sink stream");
        Fleet {
            faye,
            cluster,
            dir: tempfile::tempdir().expect("temp dir"),
            sources,
            sink,
            receiver: WebhookReceiver::start([]).await,
            jetstream,
            replicas: BTreeMap::new(),
        }
    }

    /// Starts the replicas `names`, one after the other (JetStream on a busy 3-node
    /// cluster can take longer than a request's timeout to create or update a replicated
    /// bucket for several at once).
    async fn start(&mut self, names: &[&str]) {
        for name in names {
            let daemon = self.replica(name).await;
            self.replicas.insert((*name).to_string(), daemon);
        }
    }

    /// A replica named `name` of the shared configuration, as its own process.
    async fn replica(&self, name: &str) -> Daemon {
        let state = self.dir.path().join(name);
        std::fs::create_dir_all(&state).expect("state dir");
        let mut config = format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\nallow_private_webhooks = true\n\
             [state]\npath = \"{}\"\nbackend = \"nats\"\nbucket = \"shared\"\nreplicas = {NODES}\n\
             [cluster]\nreplica = \"{name}\"\nlease_ttl = \"{}s\"\nhandover_wait = \"2s\"\n\
             [nats]\nurl = \"{}\"\n",
            state.display(),
            LEASE_TTL.as_secs(),
            self.cluster.urls(),
        );
        for source in 0..self.sources {
            let sink = match self.sink {
                SinkKind::JetStream => {
                    format!("{{ type = \"nats\", subject = \"ticks.s{source}\", jetstream = true }}")
                }
                SinkKind::Webhook => format!("{{ type = \"webhook\", url = \"{}\" }}", self.receiver.url()),
            };
            config.push_str(&format!(
                "[[sources]]\nname = \"s{source}\"\nurl = \"{}\"\nconnection_types = [\"long-polling\"]\nreplay = true\n\
                 [[subscriptions]]\nid = \"t{source}\"\nsource = \"s{source}\"\nchannel = \"{CHANNEL}\"\nsink = {sink}\n\
                 retry = {{ max_backoff = \"500ms\" }}\n",
                self.faye.url()
            ));
        }
        let file = state.join("bridge.toml");
        std::fs::write(&file, config).expect("write config");
        Daemon::start(&file).await
    }

    /// Stops replica `name` (SIGTERM) and waits until it has exited.
    async fn stop(&mut self, name: &str) {
        let mut daemon = self.replicas.remove(name).expect("a running replica");
        daemon.signal(libc::SIGTERM);
        tokio::time::timeout(WAIT, daemon.child.wait()).await.expect("it stops").expect("exit status");
    }

    /// Waits until every running replica names the same owner for each source, that owner
    /// is a running replica, and it runs the source (connected, subscribed); the owners.
    async fn settled_owners(&mut self) -> BTreeMap<String, String> {
        let deadline = tokio::time::Instant::now() + WAIT * 2;
        loop {
            let mut views = BTreeMap::new();
            for (name, daemon) in &mut self.replicas {
                match sources_of(daemon).await {
                    Some(view) => views.insert(name.clone(), view),
                    None => {
                        let status = tokio::time::timeout(WAIT, daemon.child.wait()).await;
                        let logs: Vec<String> =
                            daemon.unread_logs().iter().map(ToString::to_string).collect();
                        panic!("replica {name} does not answer ({status:?}):\n{}", logs.join("\n"));
                    }
                };
            }
            if let Some(owners) = self.agreed(&views) {
                return owners;
            }
            assert!(tokio::time::Instant::now() < deadline, "the owners do not settle: {views:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The owners every replica agrees on, each running its sources; `None` until then.
    fn agreed(&self, views: &BTreeMap<String, Vec<Value>>) -> Option<BTreeMap<String, String>> {
        let mut owners = BTreeMap::new();
        for source in (0..self.sources).map(|source| format!("s{source}")) {
            let mut named = BTreeSet::new();
            for view in views.values() {
                let shown = view.iter().find(|view| view["name"] == source.as_str())?;
                named.insert(shown["owner"].as_str()?.to_string());
            }
            let [owner] = <[String; 1]>::try_from(named.into_iter().collect::<Vec<_>>()).ok()?;
            let running = views.get(&owner)?.iter().find(|view| view["name"] == source.as_str())?;
            let subscribed = running["subscriptions"]
                .as_array()
                .is_some_and(|channels| channels.iter().any(|channel| channel == CHANNEL));
            if running["state"] != "connected" || !subscribed {
                return None;
            }
            owners.insert(source, owner);
        }
        Some(owners)
    }

    /// Waits until the owners settle with `check` true of how many sources each running
    /// replica owns; the owners.
    async fn owners_where(
        &mut self,
        what: &str,
        check: impl Fn(&BTreeMap<String, usize>) -> bool,
    ) -> BTreeMap<String, String> {
        let deadline = tokio::time::Instant::now() + WAIT * 2;
        loop {
            let owners = self.settled_owners().await;
            let counts = owned_counts(&owners, self.replicas.keys());
            if check(&counts) {
                return owners;
            }
            assert!(tokio::time::Instant::now() < deadline, "the sources do not spread {what}: {counts:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Publishes numbered events on [`CHANNEL`], `rate` a second, in the background until
    /// stopped (at most `MAX_TICKS`), so that events flow through every move.
    fn ticker(&self, rate: u64) -> Ticker {
        let (progress, sent) = tokio::sync::watch::channel(0);
        let stop = tokio_util::sync::CancellationToken::new();
        let url = self.faye.url();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let publisher = open(cometd_bridge::cometd::Client::builder(url)).await;
            let mut ticks = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            let mut n = 0;
            while n < MAX_TICKS && !stopped.is_cancelled() {
                ticks.tick().await;
                publisher.publish(CHANNEL, json!({ "n": n })).await.expect("publish");
                n += 1;
                progress.send_replace(n);
            }
            publisher.close().await;
            n
        });
        Ticker { task, sent, stop }
    }

    /// Waits until every source delivered each of the `count` events, and checks how: into
    /// the stream exactly once each, or to the webhook at least once, a repeat only under
    /// the same non-empty `webhook-id`.
    async fn check_delivered(&mut self, count: u64) {
        let expected = self.sources as u64 * count;
        match self.sink {
            SinkKind::JetStream => {
                let deadline = tokio::time::Instant::now() + WAIT * 3;
                let mut stream = loop {
                    // A node just restarted may answer late once.
                    match self.jetstream.get_stream(STREAM).await {
                        Ok(stream) => break stream,
                        Err(error) => assert!(tokio::time::Instant::now() < deadline, "the stream: {error}"),
                    }
                };
                loop {
                    let stored = stream.info().await.expect("stream info").state.messages;
                    assert!(
                        stored <= expected,
                        "{stored} messages in the stream, more than the {expected} events"
                    );
                    if stored == expected {
                        break;
                    }
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "the stream has {stored} of {expected} events"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let mut seen: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
                for sequence in 1..=expected {
                    let stored = stream.get_raw_message(sequence).await.expect("a stored message");
                    let payload: Value = serde_json::from_slice(&stored.payload).expect("JSON");
                    let n = payload["payload"]["n"].as_u64().expect("a numbered event");
                    assert!(
                        seen.entry(stored.subject.to_string()).or_default().insert(n),
                        "{n} twice in {}",
                        stored.subject
                    );
                }
                for source in 0..self.sources {
                    let numbers = seen.remove(&format!("ticks.s{source}")).unwrap_or_default();
                    assert_eq!(numbers, (0..count).collect::<BTreeSet<_>>(), "s{source}: every event once");
                }
            }
            SinkKind::Webhook => {
                let mut seen: BTreeMap<(String, u64), BTreeSet<String>> = BTreeMap::new();
                let deadline = tokio::time::Instant::now() + WAIT * 3;
                while (seen.len() as u64) < expected {
                    let Some(request) = self.receiver.try_next() else {
                        if tokio::time::Instant::now() > deadline {
                            let missing: Vec<(String, u64)> = (0..self.sources)
                                .flat_map(|source| (0..count).map(move |n| (format!("s{source}"), n)))
                                .filter(|key| !seen.contains_key(key))
                                .collect();
                            panic!(
                                "{} of {expected} events delivered; missing {missing:?}\n{}",
                                seen.len(),
                                self.diagnose()
                            );
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    let id = request.header("webhook-id").to_string();
                    assert!(!id.is_empty(), "a webhook-id on every delivery");
                    let body = request.json();
                    let source = body["source"].as_str().expect("the source").to_string();
                    let n = body["data"]["payload"]["n"].as_u64().expect("a numbered event");
                    assert!(n < count, "{n} was never published");
                    seen.entry((source, n)).or_default().insert(id);
                }
                while let Some(request) = self.receiver.try_next() {
                    let body = request.json();
                    let source = body["source"].as_str().expect("the source").to_string();
                    let n = body["data"]["payload"]["n"].as_u64().expect("a numbered event");
                    seen.entry((source, n)).or_default().insert(request.header("webhook-id").to_string());
                }
                for ((source, n), ids) in &seen {
                    assert_eq!(
                        ids.len(),
                        1,
                        "{source} {n} delivered again under another webhook-id: {ids:?}"
                    );
                }
            }
        }
    }
}

impl Fleet {
    /// The warnings and errors the replicas logged and nobody read, to explain a failure.
    fn diagnose(&mut self) -> String {
        let mut lines = Vec::new();
        for (name, daemon) in &mut self.replicas {
            for event in daemon.unread_logs() {
                if event["level"] != "INFO" && event["level"] != "DEBUG" {
                    lines.push(format!("{name}: {event}"));
                }
            }
        }
        lines.join("\n")
    }

    /// The node leading `stream`.
    async fn leader(&self, stream: &str) -> usize {
        let info = self
            .jetstream
            .get_stream(stream)
            .await
            .expect("the stream")
            .info()
            .await
            .expect("stream info")
            .clone();
        let leader = info.cluster.and_then(|cluster| cluster.leader).expect("a leader");
        NatsCluster::index_of(&leader)
    }
}

/// The most events a ticker publishes.
const MAX_TICKS: u64 = 3_000;

/// Events published in the background.
struct Ticker {
    task: tokio::task::JoinHandle<u64>,
    sent: tokio::sync::watch::Receiver<u64>,
    stop: tokio_util::sync::CancellationToken,
}

impl Ticker {
    /// Waits until `more` events are published after those so far.
    async fn more(&mut self, more: u64) {
        let until = *self.sent.borrow() + more;
        self.sent.wait_for(|sent| *sent >= until).await.expect("the ticker runs");
    }

    /// Stops it; how many events it published.
    async fn stop(self) -> u64 {
        self.stop.cancel();
        self.task.await.expect("the ticker")
    }
}

/// The sources as `daemon`'s API shows them; `None` when it does not answer.
async fn sources_of(daemon: &Daemon) -> Option<Vec<Value>> {
    let answer = crate::support::http_client()
        .get(format!("http://{}/api/v1/sources", daemon.admin))
        .send()
        .await
        .ok()?;
    let sources: Value = serde_json::from_slice(&answer.bytes().await.ok()?).expect("JSON");
    Some(sources.as_array().expect("a list").clone())
}

/// How many sources each of `replicas` owns.
fn owned_counts<'a>(
    owners: &BTreeMap<String, String>,
    replicas: impl Iterator<Item = &'a String>,
) -> BTreeMap<String, usize> {
    let mut counts: BTreeMap<String, usize> = replicas.map(|name| (name.clone(), 0)).collect();
    for owner in owners.values() {
        *counts.entry(owner.clone()).or_default() += 1;
    }
    counts
}

/// `counts` within one of the most even spread of `sources`.
fn spread_evenly(counts: &BTreeMap<String, usize>, sources: usize) -> bool {
    let replicas = counts.len();
    let (low, high) = (sources / replicas, sources.div_ceil(replicas));
    counts.values().all(|count| (low.saturating_sub(1)..=high + 1).contains(count))
}

/// The cluster tests run one at a time (each is three NATS servers and up to four
/// replicas), beside the other tests.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One NATS node of three killed (`kill -9`) under load and started again: every event
/// reaches the sink, and each source keeps its owner.
async fn a_nats_node_killed_under_load(sink: SinkKind) {
    let _alone = ONE_CLUSTER.lock().await;
    let mut fleet = Fleet::new(3, sink).await;
    fleet.start(&["a", "b", "c"]).await;
    let before = fleet.settled_owners().await;
    let mut ticker = fleet.ticker(50);
    ticker.more(50).await;
    // The node leading the sink's stream, unless it leads the leases too: then another.
    // (Killing the leases' leader stalls their renewals for the election that follows,
    // several seconds, past a 2 s lease: the sources move, see docs/operations.md.)
    let sink_leader = fleet.leader(STREAM).await;
    let leases_leader = fleet.leader("KV_shared-leases").await;
    let node = if sink_leader == leases_leader { (leases_leader + 1) % NODES } else { sink_leader };
    fleet.cluster.kill(node).await;
    ticker.more(50).await;
    fleet.cluster.restart(node).await;
    ticker.more(25).await;
    let sent = ticker.stop().await;
    fleet.check_delivered(sent).await;
    assert_eq!(fleet.settled_owners().await, before, "the leases survive");
}

/// Ten sources over three replicas spread 3/3/4 (± 1); a fourth replica takes its share,
/// and a replica stopped (SIGTERM) hands its sources over, while events flow: nothing lost.
async fn sources_spread_and_move_without_loss(sink: SinkKind) {
    const SOURCES: usize = 10;
    let _alone = ONE_CLUSTER.lock().await;
    let mut fleet = Fleet::new(SOURCES, sink).await;
    fleet.start(&["a", "b", "c"]).await;
    fleet.owners_where("3/3/4", |counts| spread_evenly(counts, SOURCES)).await;
    let mut ticker = fleet.ticker(50);
    ticker.more(20).await;
    fleet.start(&["d"]).await;
    let owners =
        fleet.owners_where("over four", |counts| counts["d"] > 0 && spread_evenly(counts, SOURCES)).await;
    ticker.more(20).await;
    let stopped = owners["s0"].clone();
    fleet.stop(&stopped).await;
    fleet.owners_where("over the three left", |counts| spread_evenly(counts, SOURCES)).await;
    ticker.more(20).await;
    let sent = ticker.stop().await;
    fleet.check_delivered(sent).await;
}

#[tokio::test]
async fn a_nats_node_killed_under_load_loses_nothing_into_jetstream() {
    a_nats_node_killed_under_load(SinkKind::JetStream).await;
}

#[tokio::test]
async fn a_nats_node_killed_under_load_loses_nothing_to_webhooks() {
    a_nats_node_killed_under_load(SinkKind::Webhook).await;
}

#[tokio::test]
async fn sources_spread_over_replicas_and_move_without_loss_into_jetstream() {
    sources_spread_and_move_without_loss(SinkKind::JetStream).await;
}

#[tokio::test]
async fn sources_spread_over_replicas_and_move_without_loss_to_webhooks() {
    sources_spread_and_move_without_loss(SinkKind::Webhook).await;
}
