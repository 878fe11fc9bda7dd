//! The NATS sink: core publishes confirmed by a flush, or JetStream publishes confirmed by
//! the stream's ack, with a bounded window of acks in flight. A NATS outage is waited out;
//! async-nats reconnects by itself and the batch is retried in order.

use std::collections::VecDeque;

use async_nats::jetstream;
use async_nats::{HeaderMap, Subject};
use tokio_util::sync::CancellationToken;

use super::subject::{SubjectTemplate, SubjectValues};
use super::{Outcome, pause, retry_backoff};
use crate::bridge::envelope::Envelope;
use crate::config::Payload;
use crate::telemetry::metrics::Metrics;

/// JetStream acks awaited at most at once per subscription.
pub const ACK_WINDOW: usize = 256;

/// The contract's header names as async-nats names, built at compile time: no
/// validation or allocation per message.
mod names {
    use async_nats::HeaderName;

    pub const SOURCE: HeaderName = HeaderName::from_static(super::headers::SOURCE);
    pub const SUBSCRIPTION: HeaderName = HeaderName::from_static(super::headers::SUBSCRIPTION);
    pub const CHANNEL: HeaderName = HeaderName::from_static(super::headers::CHANNEL);
    pub const MESSAGE_ID: HeaderName = HeaderName::from_static(super::headers::MESSAGE_ID);
    pub const NATS_MSG_ID: HeaderName = HeaderName::from_static(super::headers::NATS_MSG_ID);
}

/// Header names of the contract.
pub mod headers {
    /// The source's name.
    pub const SOURCE: &str = "CometD-Source";
    /// The subscription's id.
    pub const SUBSCRIPTION: &str = "CometD-Subscription";
    /// The message's concrete channel.
    pub const CHANNEL: &str = "CometD-Channel";
    /// The Bayeux message's own `id`, when it has one.
    pub const MESSAGE_ID: &str = "CometD-Message-Id";
    /// JetStream's de-duplication key.
    pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
}

/// Publishes a subscription's messages on NATS.
pub struct NatsSink {
    client: async_nats::Client,
    jetstream: Option<jetstream::Context>,
    subject: SubjectTemplate,
    payload: Payload,
    metrics: Metrics,
}

impl NatsSink {
    /// A sink publishing through `client`.
    pub fn new(
        client: async_nats::Client,
        subject: SubjectTemplate,
        use_jetstream: bool,
        payload: Payload,
        metrics: Metrics,
    ) -> Self {
        let jetstream = use_jetstream.then(|| jetstream::new(client.clone()));
        NatsSink { client, jetstream, subject, payload, metrics }
    }

    fn kind(&self) -> &'static str {
        if self.jetstream.is_some() { "jetstream" } else { "nats" }
    }

    fn message(
        &self,
        envelope: &Envelope,
        last_subject: &mut Option<(String, Subject)>,
    ) -> (Subject, HeaderMap, bytes::Bytes) {
        let message = &envelope.message;
        // Consecutive messages usually share a channel: render its subject once.
        let subject = match last_subject {
            Some((channel, subject)) if *channel == message.channel => subject.clone(),
            _ => {
                let subject = Subject::from(self.subject.render(&SubjectValues {
                    channel: &message.channel,
                    source: &envelope.source,
                    subscription: &envelope.subscription,
                }));
                *last_subject = Some((message.channel.clone(), subject.clone()));
                subject
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert(names::SOURCE, &*envelope.source);
        headers.insert(names::SUBSCRIPTION, &*envelope.subscription);
        headers.insert(names::CHANNEL, message.channel.as_str());
        if let Some(id) = &message.id {
            headers.insert(names::MESSAGE_ID, id.as_str());
        }
        if self.jetstream.is_some() {
            headers.insert(names::NATS_MSG_ID, envelope.delivery_id());
        }
        // The data goes out as the JSON text it came in, without being parsed.
        let payload = match (self.payload, &message.data) {
            (Payload::Data, Some(data)) => data.json_bytes(),
            (Payload::Data, None) => bytes::Bytes::from_static(b"null"),
            (Payload::Envelope, _) => serde_json::to_vec(&**message).expect("messages serialize").into(),
        };
        (subject, headers, payload)
    }

    pub(super) async fn deliver(&self, batch: &[Envelope], stop: &CancellationToken) -> Vec<Outcome> {
        let delivered = match &self.jetstream {
            None => self.deliver_core(batch, stop).await,
            Some(jetstream) => self.deliver_jetstream(jetstream, batch, stop).await,
        };
        vec![Outcome::Delivered; delivered]
    }

    /// Publishes the batch, then flushes until the server has it all. Returns how many
    /// were delivered (all, or none when stopped).
    async fn deliver_core(&self, batch: &[Envelope], stop: &CancellationToken) -> usize {
        let backoff = retry_backoff();
        let mut last_subject = None;
        for envelope in batch {
            let mut failures = 0;
            // Built again only for a retry, so the usual path copies nothing.
            loop {
                let (subject, headers, payload) = self.message(envelope, &mut last_subject);
                match self.client.publish_with_headers(subject, headers, payload).await {
                    Ok(()) => break,
                    Err(error) => {
                        self.failed(&envelope.subscription, "unavailable", &error);
                        if !pause(backoff.delay(failures), stop).await {
                            return 0;
                        }
                        failures += 1;
                    }
                }
            }
        }
        let mut failures = 0;
        loop {
            let flushed = tokio::select! {
                biased;
                _ = stop.cancelled() => return 0,
                flushed = self.client.flush() => flushed,
            };
            match flushed {
                Ok(()) => return batch.len(),
                Err(error) => {
                    if let Some(envelope) = batch.first() {
                        self.failed(&envelope.subscription, "unavailable", &error);
                    }
                    if !pause(backoff.delay(failures), stop).await {
                        return 0;
                    }
                    failures += 1;
                }
            }
        }
    }

    /// Publishes through JetStream with up to [`ACK_WINDOW`] acks in flight. On a failed
    /// publish or ack, everything from that message on is published again, in order; the
    /// stream drops the copies it already has by their `Nats-Msg-Id`. Returns how many
    /// messages, from the start of the batch, were acknowledged.
    async fn deliver_jetstream(
        &self,
        jetstream: &jetstream::Context,
        batch: &[Envelope],
        stop: &CancellationToken,
    ) -> usize {
        let backoff = retry_backoff();
        let mut acked = 0;
        let mut failures = 0;
        while acked < batch.len() {
            match self.publish_window(jetstream, &batch[acked..], stop).await {
                Ok(count) => acked += count,
                Err((count, reason, error)) => {
                    acked += count;
                    self.failed(&batch[acked.min(batch.len() - 1)].subscription, reason, &error);
                    if !pause(backoff.delay(failures), stop).await {
                        return acked;
                    }
                    failures += 1;
                }
            }
            if stop.is_cancelled() {
                return acked;
            }
        }
        acked
    }

    /// Publishes `batch` keeping a window of pending acks; returns the number acked before
    /// the first failure, with the failure.
    async fn publish_window(
        &self,
        jetstream: &jetstream::Context,
        batch: &[Envelope],
        stop: &CancellationToken,
    ) -> Result<usize, (usize, &'static str, String)> {
        let mut pending = VecDeque::new();
        let mut acked = 0;
        let mut last_subject = None;
        for envelope in batch {
            if stop.is_cancelled() {
                break;
            }
            let (subject, headers, payload) = self.message(envelope, &mut last_subject);
            match jetstream.publish_with_headers(subject, headers, payload).await {
                Ok(ack) => pending.push_back(ack),
                Err(error) => {
                    return Err((acked + settle(&mut pending).await, "publish", error.to_string()));
                }
            }
            if pending.len() >= ACK_WINDOW {
                let ack = pending.pop_front().expect("the window is full");
                if let Err(error) = ack.await {
                    return Err((acked, "ack", error.to_string()));
                }
                acked += 1;
            }
        }
        while let Some(ack) = pending.pop_front() {
            if let Err(error) = ack.await {
                return Err((acked, "ack", error.to_string()));
            }
            acked += 1;
        }
        Ok(acked)
    }

    fn failed(&self, subscription: &str, reason: &str, error: &dyn std::fmt::Display) {
        tracing::warn!(subscription, sink = self.kind(), reason, error = %error, "NATS delivery failed; retrying");
        self.metrics.delivery_failed(subscription, self.kind(), reason);
    }
}

/// Awaits the acks still pending in order; returns how many succeeded before a failure.
async fn settle(pending: &mut VecDeque<jetstream::context::PublishAckFuture>) -> usize {
    let mut acked = 0;
    while let Some(ack) = pending.pop_front() {
        if ack.await.is_err() {
            pending.clear();
            break;
        }
        acked += 1;
    }
    acked
}
