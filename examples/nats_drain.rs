//! Times the drain of a spool backlog on the NATS backend: the NATS store's reads (an
//! ordered consumer per read) against the first release's way (one direct get per
//! message), on the same stream. Prints, asserts nothing.
//!
//! `cargo run --release --example nats_drain -- nats://127.0.0.1:4222 [messages] [per read]`
//! against a nats-server with JetStream (nothing else on it needs to be there).

use cometd_bridge::store::Spools;
use std::sync::Arc;
use std::time::Instant;

use cometd_bridge::store::{NatsKvStore, SpoolAppend};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args.next().ok_or("usage: nats_drain <nats url> [messages] [per read]")?;
    let messages: u64 = args.next().map_or(Ok(60_000), |text| text.parse())?;
    let per_read: usize = args.next().map_or(Ok(512), |text| text.parse())?;
    let bucket = format!("drain{}", std::process::id());
    let client = async_nats::connect(&url).await?;
    let store = NatsKvStore::open(client.clone(), &bucket).await?;
    let subscription = "backlog";
    // Records shaped like the bridge's (a small CometD message in its envelope), ~300 B.
    let started = Instant::now();
    let mut appended = 0;
    while appended < messages {
        let batch: Vec<SpoolAppend> = (appended..messages.min(appended + 512))
            .map(|n| SpoolAppend {
                subscription: subscription.into(),
                record: format!(
                    r#"{{"source":"demo","subscription":"backlog","session":"s1","sequence":{n},"received_at":1765100000000,"message":{{"channel":"/orders","id":"{n}","data":{{"order":{n},"amount":"12.50","note":"a backlog of small messages, as a webhook outage leaves"}}}}}}"#
                )
                .into_bytes(),
            })
            .collect();
        appended += batch.len() as u64;
        store.spool_append(Arc::from(batch)).await?;
    }
    println!("appended {messages} messages in {:.2} s", started.elapsed().as_secs_f64());

    // Before: one direct get per message, as the store read its spool until this change.
    let jetstream = async_nats::jetstream::new(client);
    let hex: String = subscription.bytes().map(|byte| format!("{byte:02x}")).collect();
    let stream = jetstream.get_stream(format!("{bucket}-spool-{hex}")).await?;
    let started = Instant::now();
    let mut read = 0u64;
    let mut bytes = 0usize;
    for sequence in 1..=messages {
        let message = stream.direct_get(sequence).await?;
        bytes += message.payload.len();
        read += 1;
    }
    let before = started.elapsed().as_secs_f64();
    println!(
        "before (direct get per message): {read} messages, {bytes} bytes in {before:.2} s: {:.0} msg/s",
        read as f64 / before
    );

    // After: the store's reads, `per_read` at a time, as a forwarder drains its backlog.
    let started = Instant::now();
    let (mut next, mut read, mut bytes) = (1u64, 0u64, 0usize);
    loop {
        let entries = store.spool_read(subscription, next, per_read).await?;
        let Some(last) = entries.last() else { break };
        next = last.sequence + 1;
        read += entries.len() as u64;
        bytes += entries.iter().map(|entry| entry.record.len()).sum::<usize>();
    }
    let after = started.elapsed().as_secs_f64();
    println!(
        "after (ordered consumer, {per_read} per read): {read} messages, {bytes} bytes in {after:.2} s: {:.0} msg/s ({:.1}x)",
        read as f64 / after,
        before / after
    );
    store.spool_delete(subscription).await?;
    Ok(())
}
