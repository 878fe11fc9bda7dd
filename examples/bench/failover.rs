//! Scenario: failover among replicas. Two bridges run one configuration on the NATS state
//! (`cluster.lease_ttl = "5s"`), one source on faye forwarding to JetStream (read here as
//! plain NATS messages, with their headers), while a
//! publisher sends a numbered message every 10 ms. The owner is killed (`kill -9`); the
//! failover time is from the kill to the first message the new owner forwards (told by
//! its session in `Nats-Msg-Id`, `<source>.<subscription>.<session>.<sequence>`). The
//! killed replica is started again under its name and stands by; the next round kills
//! the other. Bounded: `KILLS` rounds, each waiting at most `ROUND_LIMIT`.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::process::{Proc, root};
use crate::servers::{free_port, wait_ready};

/// Kills measured.
pub const KILLS: usize = 20;
/// The lease's time to live, as the contract's default.
const LEASE_TTL_S: u64 = 5;
/// The longest a round may take before the run fails.
const ROUND_LIMIT: Duration = Duration::from_secs(30);
/// Between two published messages: the measurement's resolution.
const TICK: Duration = Duration::from_millis(10);

/// One replica: its process and admin port.
struct Replica {
    name: &'static str,
    process: Option<Proc>,
    admin: u16,
}

/// The failover times of `KILLS` kills, in milliseconds: median, p99 (the largest of 20),
/// min and max, and every run.
pub async fn failover(url: &str, nats_url: &str) -> Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let nats = async_nats::connect(nats_url).await.expect("connect");
    // A JetStream sink, for its `Nats-Msg-Id`; the stream's messages reach a plain
    // subscriber too.
    async_nats::jetstream::new(nats.clone())
        .create_stream(async_nats::jetstream::stream::Config {
            name: "FAILOVER".into(),
            subjects: vec!["bench.failover".into()],
            max_messages: 100_000,
            ..Default::default()
        })
        .await
        .expect("create the stream");
    let mut forwarded = nats.subscribe("bench.failover").await.expect("subscribe");
    nats.flush().await.expect("flush");
    let mut replicas = [
        Replica { name: "r0", process: None, admin: free_port() },
        Replica { name: "r1", process: None, admin: free_port() },
    ];
    for replica in &mut replicas {
        start(replica, url, nats_url, dir.path()).await;
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let publisher = tokio::spawn(publish(url.to_string(), stop.clone()));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let mut times = Vec::new();
    for kill in 0..KILLS {
        // The owner, once it forwards: its session is the one in the messages.
        let message = tokio::time::timeout(ROUND_LIMIT, forwarded.next())
            .await
            .expect("messages flow")
            .expect("subscribed");
        let session = session_of(&message).expect("a Nats-Msg-Id on a JetStream sink's message");
        // The API names the owner from its next look at the leases (within a second).
        let deadline = Instant::now() + ROUND_LIMIT;
        let owner = loop {
            let mut owner = None;
            for (index, replica) in replicas.iter().enumerate() {
                let answer = http
                    .get(format!("http://127.0.0.1:{}/api/v1/sources", replica.admin))
                    .send()
                    .await
                    .expect("the API answers");
                let sources: Value =
                    serde_json::from_slice(&answer.bytes().await.expect("a body")).expect("JSON");
                if sources[0]["owner"] == replica.name && sources[0]["state"] == "connected" {
                    owner = Some(index);
                }
            }
            if let Some(owner) = owner {
                break owner;
            }
            assert!(Instant::now() < deadline, "no replica owns and runs the source");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let killed = Instant::now();
        replicas[owner].process.take().expect("running").kill();
        let taken = loop {
            let message = tokio::time::timeout(ROUND_LIMIT, forwarded.next())
                .await
                .expect("another replica takes over")
                .expect("subscribed");
            if session_of(&message).is_some_and(|other| other != session) {
                break killed.elapsed();
            }
        };
        let millis = taken.as_secs_f64() * 1000.0;
        eprintln!("failover {}/{KILLS}: {millis:.0} ms", kill + 1);
        times.push(millis);
        start(&mut replicas[owner], url, nats_url, dir.path()).await;
    }
    stop.cancel();
    let _ = publisher.await;
    for replica in &mut replicas {
        if let Some(process) = replica.process.take() {
            process.kill();
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let p99 = sorted[((sorted.len() as f64 * 0.99).ceil() as usize).clamp(1, sorted.len()) - 1];
    json!({
        "kills": times.len(), "lease_ttl_s": LEASE_TTL_S, "tick_ms": TICK.as_millis() as u64,
        "median_ms": sorted[sorted.len() / 2], "p99_ms": p99,
        "min_ms": sorted[0], "max_ms": sorted[sorted.len() - 1], "runs_ms": times,
    })
}

/// The CometD session a forwarded message came on, from its `Nats-Msg-Id`.
fn session_of(message: &async_nats::Message) -> Option<String> {
    let id = message.headers.as_ref()?.get("Nats-Msg-Id")?.as_str().to_string();
    // `<source>.<subscription>.<session>.<sequence>`: the source and subscription here
    // have no dots.
    let mut parts = id.splitn(3, '.');
    let rest = parts.nth(2)?;
    rest.rsplit_once('.').map(|(session, _)| session.to_string())
}

/// Starts `replica` (or starts it again under its name) and waits until it is ready.
async fn start(replica: &mut Replica, url: &str, nats_url: &str, dir: &std::path::Path) {
    let state = dir.join(replica.name);
    std::fs::create_dir_all(&state).expect("state dir");
    let file = state.join("config.toml");
    std::fs::write(
        &file,
        format!(
            "[admin]\nlisten = \"127.0.0.1:{}\"\n\
             [state]\nbackend = \"nats\"\nbucket = \"failover\"\npath = \"{}\"\n\
             [cluster]\nreplica = \"{}\"\nlease_ttl = \"{LEASE_TTL_S}s\"\n\
             [nats]\nurl = \"{nats_url}\"\n\
             [[sources]]\nname = \"bench\"\nurl = \"{url}\"\n\
             [[subscriptions]]\nid = \"failover\"\nsource = \"bench\"\nchannel = \"/bench/failover\"\n\
             sink = {{ type = \"nats\", subject = \"bench.failover\", jetstream = true }}\n",
            replica.admin,
            state.display(),
            replica.name,
        ),
    )
    .expect("write config");
    let mut command = std::process::Command::new(root().join("target/release/cometd-bridge"));
    command.args(["run", "--config"]).arg(&file).env("RUST_LOG", "warn");
    replica.process = Some(Proc::spawn(command));
    wait_ready(replica.admin).await;
}

/// Publishes a numbered message every [`TICK`] until stopped (bounded by an hour's worth).
async fn publish(url: String, stop: tokio_util::sync::CancellationToken) {
    let publisher = cometd_bridge::cometd::Client::builder(url).build().expect("a client");
    publisher.open().await.expect("open");
    let mut ticks = tokio::time::interval(TICK);
    for n in 0..360_000u64 {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let _ = publisher.publish("/bench/failover", json!({ "seq": n })).await;
    }
    publisher.close().await;
}
