//! Sinks: where a subscription's messages go. A sink makes one attempt at a batch and says,
//! message by message, what became of it; each failure is classified (see [`retry`]) as
//! worth retrying or not. Retrying is the forwarder's job, from the spool.

pub mod destination;
mod nats;
pub mod retry;
pub mod settings;
pub mod subject;
mod webhook;

use tokio_util::sync::CancellationToken;

pub use nats::{ACK_WINDOW, NatsSink};
pub use retry::{Failure, FailureKind, RetryConfig, RetryPolicy, pause};
pub use webhook::WebhookSink;

use crate::delivery::Envelope;

/// What became of the messages of one attempt, in order: one result per message from
/// the start of the batch. A shorter list means the rest were not tried (the sink stops
/// at a transient failure to keep the order, or it was stopped).
pub type Attempted = Vec<Result<(), Failure>>;

/// A subscription's sink; a clone shares its connection.
#[derive(Clone)]
pub enum Sink {
    /// NATS, core or JetStream.
    Nats(Box<NatsSink>),
    /// An HTTP endpoint.
    Webhook(WebhookSink),
}

impl Sink {
    /// The most messages worth handing over at once: NATS publishes a batch and flushes
    /// (or collects acks) once; a webhook posts `max_in_flight` at a time through a batch.
    /// A batch leaves the spool in one transaction, so a larger one costs fewer syncs.
    /// JetStream waits for a batch's last acks before the next batch starts, so its batches
    /// are long enough (16 ack windows) that this pause is rare: at 512 the delivery stage
    /// went 0.6 of a plain publisher's rate, at 4096 0.68, close to a publisher that also
    /// sends `Nats-Msg-Id`. A spool read stops at 8 MiB, so a long batch is not a large one.
    pub fn batch_size(&self) -> usize {
        match self {
            Sink::Nats(sink) if sink.kind() == "jetstream" => 4096,
            Sink::Nats(_) => 512,
            Sink::Webhook(sink) => sink.max_in_flight().max(64),
        }
    }

    /// The metrics label of the sink.
    pub fn kind(&self) -> &'static str {
        match self {
            Sink::Nats(sink) => sink.kind(),
            Sink::Webhook(_) => "webhook",
        }
    }

    /// Makes one attempt at delivering `batch`. When `stop` is cancelled it returns early.
    pub async fn attempt(&self, batch: &[&Envelope], stop: &CancellationToken) -> Attempted {
        match self {
            Sink::Nats(sink) => sink.attempt(batch, stop).await,
            Sink::Webhook(sink) => sink.attempt(batch, stop).await,
        }
    }
}
