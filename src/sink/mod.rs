//! Sinks: where a subscription's messages go. Each decides for itself which failures are
//! worth retrying (like vector's `RetryLogic`); what it cannot deliver comes back as a
//! dead letter with the reason, never dropped.

mod nats;
pub mod subject;
mod webhook;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use nats::{ACK_WINDOW, NatsSink};
pub use webhook::WebhookSink;

use crate::bridge::envelope::Envelope;
use crate::cometd::Backoff;

/// What became of one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The sink acknowledged it.
    Delivered,
    /// It will not be delivered: store it as a dead letter.
    DeadLetter {
        /// Why, for the operator.
        reason: String,
        /// Attempts made.
        attempts: u32,
    },
}

/// A subscription's sink.
pub enum Sink {
    /// NATS, core or JetStream.
    Nats(Box<NatsSink>),
    /// An HTTP endpoint.
    Webhook(WebhookSink),
}

impl Sink {
    /// The most messages worth handing over at once: NATS publishes a batch and flushes
    /// (or collects acks) once; a webhook takes one request per message.
    pub fn batch_size(&self) -> usize {
        match self {
            Sink::Nats(_) => 512,
            Sink::Webhook(_) => 1,
        }
    }

    /// Delivers `batch` in order and returns one outcome per message, in order. When
    /// `stop` is cancelled it returns early: the messages without an outcome were not
    /// delivered.
    pub async fn deliver(&self, batch: &[Envelope], stop: &CancellationToken) -> Vec<Outcome> {
        match self {
            Sink::Nats(sink) => sink.deliver(batch, stop).await,
            Sink::Webhook(sink) => match batch.first() {
                Some(envelope) => sink.deliver(envelope, stop).await.into_iter().collect(),
                None => Vec::new(),
            },
        }
    }
}

/// The retry delays of every sink: 100 ms doubling to 30 s, with full jitter.
pub(crate) fn retry_backoff() -> Backoff {
    Backoff::try_new(Duration::from_millis(100), Duration::from_secs(30)).expect("a valid backoff")
}

/// Sleeps `delay` unless `stop` is cancelled first; returns whether it slept the whole time.
pub(crate) async fn pause(delay: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        biased;
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}
