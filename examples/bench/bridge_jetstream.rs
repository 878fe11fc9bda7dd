//! Scenario: the bridge into JetStream with acks, its delivery stage against a plain publisher.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::RUNS;
use crate::flood::flood_command;
use crate::process::Proc;
use crate::servers::{source, start_bridge};
use crate::stats::now_us;
use crate::subscribers::subscriber_command;
use crate::summary::summary;

/// Bridge → JetStream with acks, measured twice. The delivery stage alone (the bridge's
/// forwarder and JetStream sink, fed from memory) against a plain async-nats JetStream
/// publisher with the bridge's ack window, both in this process, in the same run: the
/// like-for-like comparison. And end to end (flood → faye → bridge → stream) beside a
/// direct CometD subscriber on the same flood, which shows what the CometD side delivers.
pub async fn bridge_jetstream(url: &str, nats_url: &str) -> Value {
    const COUNT: u64 = 20_000;
    let jetstream = async_nats::jetstream::new(async_nats::connect(nats_url).await.expect("connect"));
    let mut stage_rates = Vec::new();
    let mut plain_rates = Vec::new();
    let mut plain_id_rates = Vec::new();
    let mut bridge_rates = Vec::new();
    let mut direct_rates = Vec::new();
    for run in 0..RUNS {
        plain_rates.push(plain_publisher(&jetstream, &format!("plain{run}"), COUNT, false).await);
        plain_id_rates.push(plain_publisher(&jetstream, &format!("plainid{run}"), COUNT, true).await);
        stage_rates.push(delivery_stage(nats_url, &jetstream, &format!("stage{run}"), COUNT).await);

        // End to end.
        let name = format!("BRIDGE{run}");
        create_stream(&jetstream, &name, &format!("bridge{run}.>")).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let config = format!(
            "[nats]\nurl = \"{nats_url}\"\n{}[[subscriptions]]\nid = \"js\"\nsource = \"bench\"\nchannel = \"/bench/js{run}\"\nsink = {{ type = \"nats\", subject = \"bridge{run}.x\", jetstream = true }}\n",
            source(url)
        );
        let (bridge, _, _) = start_bridge(&config, dir.path()).await;
        let channel = format!("/bench/js{run}");
        let mut direct = Proc::spawn(subscriber_command("cometd-bridge", url, &channel, COUNT, "websocket"));
        direct.expect_ready();
        let started = Instant::now();
        let mut publisher = Proc::spawn(flood_command(url, COUNT, 64, 0, &[&channel]));
        wait_stored(&jetstream, &name, COUNT).await;
        bridge_rates.push(COUNT as f64 / started.elapsed().as_secs_f64());
        let _ = publisher.line();
        publisher.reap();
        let direct_stats: Value = serde_json::from_str(&direct.line().expect("stats")).expect("JSON");
        direct.reap();
        let span = (direct_stats["last_us"].as_f64().unwrap_or(0.0)
            - direct_stats["first_us"].as_f64().unwrap_or(0.0))
            / 1e6;
        direct_rates.push((direct_stats["received"].as_f64().unwrap_or(0.0) - 1.0) / span.max(1e-9));
        bridge.kill();
        eprintln!(
            "JetStream: delivery stage {:.0} msg/s, plain publisher {:.0} msg/s ({:.0} with Nats-Msg-Id); end to end {:.0} msg/s, direct subscriber {:.0} msg/s",
            stage_rates[run], plain_rates[run], plain_id_rates[run], bridge_rates[run], direct_rates[run]
        );
    }
    json!({
        "messages": COUNT,
        "stage_rate": summary(&stage_rates),
        "plain_publisher_rate": summary(&plain_rates),
        "plain_publisher_with_message_id_rate": summary(&plain_id_rates),
        "bridge_rate": summary(&bridge_rates),
        "direct_rate": summary(&direct_rates),
    })
}

pub async fn create_stream(jetstream: &async_nats::jetstream::Context, name: &str, subjects: &str) {
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: name.to_string(),
            subjects: vec![subjects.to_string()],
            ..Default::default()
        })
        .await
        .expect("stream");
}

/// Waits (at most two minutes) until stream `name` holds `count` messages.
pub async fn wait_stored(jetstream: &async_nats::jetstream::Context, name: &str, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let stored =
            jetstream.get_stream(name).await.expect("stream").info().await.expect("info").state.messages;
        if stored >= count || Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The peer: `count` 64-byte JSON messages published with async-nats, the bridge's ack
/// window in flight; `with_message_id` adds a `Nats-Msg-Id` header, as the bridge must, so
/// that the stream tracks duplicates for it too. Returns messages per second until the
/// last ack.
pub async fn plain_publisher(
    jetstream: &async_nats::jetstream::Context,
    prefix: &str,
    count: u64,
    with_message_id: bool,
) -> f64 {
    create_stream(jetstream, &prefix.to_uppercase(), &format!("{prefix}.>")).await;
    let started = Instant::now();
    let mut window = std::collections::VecDeque::new();
    for seq in 0..count {
        let payload = json!({"seq": seq, "ts": now_us(), "pad": "x".repeat(64)}).to_string();
        let ack = if with_message_id {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("bench.{prefix}.session.{seq}"));
            jetstream.publish_with_headers(format!("{prefix}.x"), headers, payload.into()).await
        } else {
            jetstream.publish(format!("{prefix}.x"), payload.into()).await
        };
        window.push_back(ack.expect("publish"));
        if window.len() >= cometd_bridge::sink::ACK_WINDOW {
            window.pop_front().expect("ack").await.expect("ack");
        }
    }
    for ack in window {
        ack.await.expect("ack");
    }
    count as f64 / started.elapsed().as_secs_f64()
}

/// The bridge's delivery stage alone: its spool, forwarder and JetStream sink, as the
/// daemon runs them, handed `count` messages like the plain publisher's by appending them
/// to the spool in batches of 512. Returns messages per second until the forwarder has
/// every ack.
pub async fn delivery_stage(
    nats_url: &str,
    jetstream: &async_nats::jetstream::Context,
    prefix: &str,
    count: u64,
) -> f64 {
    use cometd_bridge::bridge::forwarder::{Counters, Forwarder, Stop};
    use cometd_bridge::bridge::spool::{Spool, SpoolLimit, Spooled};
    use cometd_bridge::delivery::Envelope;
    use cometd_bridge::sink::{NatsSink, RetryPolicy, Sink, subject::SubjectTemplate};
    use cometd_bridge::store::{EmbeddedStore, SpoolAppend, Store};

    create_stream(jetstream, &prefix.to_uppercase(), &format!("{prefix}.>")).await;
    let client = async_nats::connect(nats_url).await.expect("connect");
    let metrics = cometd_bridge::telemetry::metrics::Metrics::new();
    let subject = SubjectTemplate::parse(&format!("{prefix}.x")).expect("subject");
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
    let counters = Arc::new(Counters::default());
    let spool = Spool::new("stage".into(), store.clone(), SpoolLimit::new(u64::MAX), u64::MAX, None);
    let forwarder = Forwarder {
        subscription: "stage".into(),
        sink: Sink::Nats(Box::new(NatsSink::new(
            client,
            subject,
            true,
            cometd_bridge::config::Payload::Data,
        ))),
        spool: spool.clone(),
        store: store.clone(),
        metrics,
        counters: counters.clone(),
        replay: None,
        retry: RetryPolicy::new(cometd_bridge::config::RetryConfig {
            max_elapsed: Duration::from_secs(3600),
            max_backoff: Duration::from_secs(1),
            max_attempts: None,
        }),
        lease: cometd_bridge::bridge::gate::LeaseClock::forever(),
    };
    let (source, session): (Arc<str>, Arc<str>) = ("bench".into(), "session".into());
    let stop = Stop::default();
    let started = Instant::now();
    // The forwarder runs as the daemon runs it; the spool is filled as fast as it can be.
    let task = tokio::spawn(forwarder.run(1, stop.clone()));
    let mut seq = 0;
    while seq < count {
        let mut envelopes = Vec::new();
        while seq < count && envelopes.len() < 512 {
            let message = cometd_bridge::cometd::Message {
                channel: "/bench/stage".into(),
                data: Some(json!({"seq": seq, "ts": now_us(), "pad": "x".repeat(64)}).into()),
                ..Default::default()
            };
            envelopes.push(Envelope {
                source: source.clone(),
                subscription: "stage".into(),
                session: session.clone(),
                sequence: seq,
                replay_id: None,
                message: Arc::new(message),
                received_at: std::time::SystemTime::now(),
            });
            seq += 1;
        }
        let appends: Vec<SpoolAppend> = envelopes
            .iter()
            .map(|envelope| SpoolAppend { subscription: "stage".into(), record: envelope.to_record() })
            .collect();
        let sizes: Vec<u64> = appends.iter().map(|append| append.record.len() as u64).collect();
        let sequences = store.spool_append(appends.into()).await.expect("spooled").into_iter().flatten();
        spool.appended(
            envelopes.into_iter().zip(sequences).zip(sizes).map(|((envelope, sequence), bytes)| Spooled {
                sequence,
                bytes,
                envelope,
            }),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while counters.forwarded.load(Ordering::Relaxed) < count {
        assert!(Instant::now() < deadline, "the forwarder did not deliver every message in time");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    stop.soon.cancel();
    task.await.expect("the forwarder finished");
    rate
}
