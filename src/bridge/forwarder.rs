//! The forwarder: one task per subscription that hands its messages to the sink in order,
//! and stores what cannot be delivered as dead letters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::envelope::Envelope;
use super::replay::ReplayState;
use crate::sink::{Outcome, Sink};
use crate::store::{DeadLetter, Store, record_id};
use crate::telemetry::metrics::Metrics;

/// Why messages still queued at the end of the grace period were not delivered.
pub const SHUTDOWN_REASON: &str = "shutdown: not delivered within the grace period";

/// A subscription's counts, for the API.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages routed to it.
    pub received: AtomicU64,
    /// Messages its sink acknowledged.
    pub forwarded: AtomicU64,
    /// Messages stored as dead letters.
    pub dead_letters: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A subscription's delivery task.
pub struct Forwarder {
    /// The subscription's id.
    pub subscription: Arc<str>,
    /// Where messages go.
    pub sink: Sink,
    /// The metrics label of the sink.
    pub sink_kind: &'static str,
    /// Where undeliverable messages go.
    pub store: Arc<dyn Store>,
    /// Metrics.
    pub metrics: Metrics,
    /// The subscription's counts.
    pub counters: Arc<Counters>,
    /// The source's replay state, when it uses replay: positions advance here.
    pub replay: Option<Arc<ReplayState>>,
}

impl Forwarder {
    /// Delivers what arrives on `queue`, one batch at a time, until the queue is closed and
    /// empty, or until `stop` is cancelled, after which whatever is left is dead-lettered.
    pub async fn run(self, mut queue: mpsc::Receiver<Envelope>, stop: CancellationToken) {
        let mut batch = Vec::with_capacity(self.sink.batch_size());
        let forwarded = self.metrics.forwarded_counter(&self.subscription, self.sink_kind);
        loop {
            let first = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                envelope = queue.recv() => match envelope {
                    Some(envelope) => envelope,
                    None => return,
                },
            };
            batch.push(first);
            while batch.len() < self.sink.batch_size() {
                match queue.try_recv() {
                    Ok(envelope) => batch.push(envelope),
                    Err(_) => break,
                }
            }
            let outcomes = self.sink.deliver(&batch, &stop).await;
            let done = self.positions_done(&batch);
            for (index, envelope) in batch.drain(..).enumerate() {
                match outcomes.get(index) {
                    Some(Outcome::Delivered) => {
                        Counters::add(&self.counters.forwarded);
                        forwarded.inc();
                        self.metrics.forward_latency(envelope.received_at.elapsed());
                    }
                    Some(Outcome::DeadLetter { reason, attempts }) => {
                        self.dead_letter(&envelope, reason, *attempts).await;
                    }
                    None => self.dead_letter(&envelope, SHUTDOWN_REASON, 0).await,
                }
            }
            self.commit(done).await;
        }
        queue.close();
        while let Ok(envelope) = queue.try_recv() {
            self.dead_letter(&envelope, SHUTDOWN_REASON, 0).await;
        }
    }

    /// The last replay id per channel in a batch: every message of the batch is delivered
    /// or dead-lettered once the batch is through, in order.
    fn positions_done(&self, batch: &[Envelope]) -> Vec<(String, i64)> {
        if self.replay.is_none() {
            return Vec::new();
        }
        let mut last: Vec<(String, i64)> = Vec::new();
        for envelope in batch {
            if let Some(replay_id) = envelope.replay_id {
                match last.iter_mut().find(|(channel, _)| *channel == envelope.message.channel) {
                    Some(entry) => entry.1 = replay_id,
                    None => last.push((envelope.message.channel.clone(), replay_id)),
                }
            }
        }
        last
    }

    /// Advances and stores the committed positions.
    async fn commit(&self, done: Vec<(String, i64)>) {
        let Some(replay) = &self.replay else { return };
        let mut positions = None;
        for (channel, replay_id) in done {
            positions = replay.commit(&self.subscription, &channel, replay_id).or(positions);
        }
        if let Some(positions) = positions
            && let Err(error) = self.store.put_positions(&self.subscription, &positions).await
        {
            tracing::error!(subscription = %self.subscription, error = %error, "could not store the replay position; a restart replays from the last stored one");
        }
    }

    async fn dead_letter(&self, envelope: &Envelope, reason: &str, attempts: u32) {
        if dead_letter(&*self.store, &self.metrics, envelope, reason, attempts).await {
            Counters::add(&self.counters.dead_letters);
        }
    }
}

/// Stores `envelope` as a dead letter; a store failure is logged at ERROR, since the
/// message is then lost. Returns whether it was stored.
pub async fn dead_letter(
    store: &dyn Store,
    metrics: &Metrics,
    envelope: &Envelope,
    reason: &str,
    attempts: u32,
) -> bool {
    let letter = DeadLetter {
        id: record_id(&envelope.delivery_id()),
        subscription: envelope.subscription.to_string(),
        source: envelope.source.to_string(),
        session: envelope.session.to_string(),
        sequence: envelope.sequence,
        replay_id: envelope.replay_id,
        message: envelope.to_json(),
        reason: reason.to_string(),
        attempts,
        failed_at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
    };
    match store.add_dead_letter(&letter).await {
        Ok(()) => {
            tracing::warn!(subscription = %envelope.subscription, id = %letter.id, reason, "message stored as a dead letter");
            metrics.dead_lettered(&envelope.subscription);
            true
        }
        Err(error) => {
            tracing::error!(subscription = %envelope.subscription, id = %letter.id, reason, error = %error, message = %letter.message, "could not store a dead letter; the message is lost");
            false
        }
    }
}
