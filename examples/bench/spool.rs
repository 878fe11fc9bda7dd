//! Scenario: the spool alone, appends to the embedded store and the drain of a backlog.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::summary::summary;

/// The spool alone: appends of 1 KiB messages to the embedded store in group commits of
/// 512 (each synced), then the drain of that backlog into core NATS by a forwarder that
/// reads it back from the store, as after a restart.
pub async fn spool_alone(nats_url: &str) -> Value {
    use cometd_bridge::bridge::forwarder::{Counters, Forwarder, Stop};
    use cometd_bridge::bridge::spool::{Spool, SpoolLimit};
    use cometd_bridge::delivery::Envelope;
    use cometd_bridge::sink::{NatsSink, RetryPolicy, Sink, subject::SubjectTemplate};
    use cometd_bridge::store::{EmbeddedStore, SpoolAppend, Store};

    const COUNT: u64 = 60_000;
    const GROUP: usize = 512;
    let mut append_rates = Vec::new();
    let mut drain_rates = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
        let pad = "x".repeat(1000);
        let records: Vec<SpoolAppend> = (0..COUNT)
            .map(|seq| {
                let envelope = Envelope {
                    source: "bench".into(),
                    subscription: "drain".into(),
                    session: "session".into(),
                    sequence: seq,
                    replay_id: None,
                    message: Arc::new(cometd_bridge::cometd::Message {
                        channel: "/bench/drain".into(),
                        data: Some(json!({"seq": seq, "pad": pad}).into()),
                        ..Default::default()
                    }),
                    received_at: std::time::SystemTime::now(),
                };
                SpoolAppend { subscription: "drain".into(), record: envelope.to_record() }
            })
            .collect();
        let started = Instant::now();
        for group in records.chunks(GROUP) {
            store.spool_append(group.to_vec().into()).await.expect("append");
        }
        append_rates.push(COUNT as f64 / started.elapsed().as_secs_f64());

        let summary = store.spool_summaries().await.expect("summaries").remove("drain");
        let client = async_nats::connect(nats_url).await.expect("connect");
        let counters = Arc::new(Counters::default());
        let spool = Spool::new("drain".into(), store.clone(), SpoolLimit::new(u64::MAX), u64::MAX, summary);
        let forwarder = Forwarder {
            subscription: "drain".into(),
            sink: Sink::Nats(Box::new(NatsSink::new(
                client,
                SubjectTemplate::parse("bench.drain").expect("subject"),
                false,
                cometd_bridge::config::Payload::Data,
            ))),
            spool,
            store: store.clone(),
            metrics: cometd_bridge::telemetry::metrics::Metrics::new(),
            counters: counters.clone(),
            replay: None,
            retry: RetryPolicy::new(cometd_bridge::config::RetryConfig {
                max_elapsed: Duration::from_secs(3600),
                max_backoff: Duration::from_secs(1),
                max_attempts: None,
            }),
            lease: cometd_bridge::bridge::gate::LeaseClock::forever(),
        };
        let stop = Stop::default();
        let started = Instant::now();
        let task = tokio::spawn(forwarder.run(summary.map_or(1, |summary| summary.first), stop.clone()));
        let deadline = Instant::now() + Duration::from_secs(120);
        while counters.forwarded.load(Ordering::Relaxed) < COUNT {
            assert!(Instant::now() < deadline, "the backlog did not drain in time");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drain_rates.push(COUNT as f64 / started.elapsed().as_secs_f64());
        stop.soon.cancel();
        task.await.expect("the forwarder stopped");
        eprintln!(
            "spool: {:.0} appends/s of 1 KiB in groups of {GROUP}, backlog of {COUNT} drained into NATS at {:.0} msg/s",
            append_rates.last().copied().unwrap_or(0.0),
            drain_rates.last().copied().unwrap_or(0.0)
        );
    }
    json!({"messages": COUNT, "group": GROUP, "append_rate": summary(&append_rates), "drain_rate": summary(&drain_rates)})
}
