//! The NATS sink: core publishes confirmed by a flush, or JetStream publishes confirmed by
//! the stream's ack, with a bounded window of acks in flight. A NATS outage is a transient
//! failure (async-nats reconnects by itself and the forwarder retries in order); a message
//! NATS can never take is a permanent one.

use std::collections::VecDeque;

use async_nats::jetstream;
use async_nats::{HeaderMap, Subject};
use tokio_util::sync::CancellationToken;

use super::settings::Payload;
use super::subject::{SubjectTemplate, SubjectValues};
use super::{Attempted, Failure};
use crate::delivery::{Envelope, without_controls};

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
#[derive(Clone)]
pub struct NatsSink {
    client: async_nats::Client,
    jetstream: Option<jetstream::Context>,
    subject: SubjectTemplate,
    payload: Payload,
    /// A prefix no subject may start with: `<state.bucket>.`, where the NATS state
    /// backend keeps the spools.
    reserved: Option<String>,
}

impl NatsSink {
    /// A sink publishing through `client`.
    pub fn new(
        client: async_nats::Client,
        subject: SubjectTemplate,
        use_jetstream: bool,
        payload: Payload,
    ) -> Self {
        let jetstream = use_jetstream.then(|| jetstream::new(client.clone()));
        NatsSink { client, jetstream, subject, payload, reserved: None }
    }

    /// Refuses (as a dead letter) every message whose subject starts with `prefix`.
    pub fn reserving(self, prefix: Option<String>) -> Self {
        NatsSink { reserved: prefix, ..self }
    }

    /// `nats` or `jetstream`, for metrics labels.
    pub fn kind(&self) -> &'static str {
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
        // Values a server or a publisher chose never carry a line break into a header.
        headers.insert(names::CHANNEL, &*without_controls(&message.channel));
        if let Some(id) = &message.id {
            headers.insert(names::MESSAGE_ID, &*without_controls(id));
        }
        if self.jetstream.is_some() {
            headers.insert(names::NATS_MSG_ID, &*without_controls(&envelope.delivery_id()));
        }
        // The data goes out as the JSON text it came in, without being parsed.
        let payload = match (self.payload, &message.data) {
            (Payload::Data, Some(data)) => data.json_bytes(),
            (Payload::Data, None) => bytes::Bytes::from_static(b"null"),
            (Payload::Envelope, _) => serde_json::to_vec(&**message).expect("messages serialize").into(),
        };
        (subject, headers, payload)
    }

    /// Makes one attempt at `batch`: core publishes confirmed by one flush, or JetStream
    /// publishes with up to [`ACK_WINDOW`] acks in flight. A message that can never be
    /// published (its subject starts with `$` or the state's reserved prefix, it is over the server's `max_payload`, no
    /// stream takes its subject) fails permanently and the others go on; a transient
    /// failure ends the attempt there, so that order is kept.
    pub(super) async fn attempt(&self, batch: &[&Envelope], stop: &CancellationToken) -> Attempted {
        match &self.jetstream {
            None => self.attempt_core(batch, stop).await,
            Some(jetstream) => self.attempt_jetstream(jetstream, batch, stop).await,
        }
    }

    /// A message ready to publish, or why it can never be. (A message over the server's
    /// `max_payload` is refused by async-nats itself, payload and headers counted, which
    /// the publish below classifies as permanent.)
    fn prepare(
        &self,
        envelope: &Envelope,
        last_subject: &mut Option<(String, Subject)>,
    ) -> Result<(Subject, HeaderMap, bytes::Bytes), Failure> {
        let (subject, headers, payload) = self.message(envelope, last_subject);
        if subject.starts_with('$') {
            return Err(Failure::permanent(
                "invalid_subject",
                format!("the subject {subject:?} starts with `$`, which NATS keeps for its own APIs"),
            ));
        }
        if let Some(reserved) = self.reserved.as_deref().filter(|reserved| subject.starts_with(reserved)) {
            return Err(Failure::permanent(
                "invalid_subject",
                format!("the subject {subject:?} starts with {reserved:?}, where the bridge keeps its state"),
            ));
        }
        Ok((subject, headers, payload))
    }

    async fn attempt_core(&self, batch: &[&Envelope], stop: &CancellationToken) -> Attempted {
        let mut results = Vec::with_capacity(batch.len());
        let mut last_subject = None;
        for envelope in batch {
            let (subject, headers, payload) = match self.prepare(envelope, &mut last_subject) {
                Ok(message) => message,
                Err(failure) => {
                    results.push(Err(failure));
                    continue;
                }
            };
            // A publish waits while the client's buffer is full (NATS down): never past a stop.
            let published = tokio::select! {
                biased;
                _ = stop.cancelled() => return Vec::new(),
                published = self.client.publish_with_headers(subject, headers, payload) => published,
            };
            match published {
                Ok(()) => results.push(Ok(())),
                Err(error) => {
                    let failure = match error.kind() {
                        async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
                            Failure::permanent("too_large", error.to_string())
                        }
                        async_nats::client::PublishErrorKind::InvalidSubject => {
                            Failure::permanent("invalid_subject", error.to_string())
                        }
                        async_nats::client::PublishErrorKind::Send => {
                            Failure::transient("unavailable", format!("NATS publish failed: {error}"))
                        }
                    };
                    let transient = !failure.is_permanent();
                    results.push(Err(failure));
                    if transient {
                        break;
                    }
                }
            }
        }
        let flushed = tokio::select! {
            biased;
            _ = stop.cancelled() => return Vec::new(),
            flushed = self.client.flush() => flushed,
        };
        if let Err(error) = flushed {
            // Nothing published since the last flush is known to have arrived.
            let failure = Failure::transient("unavailable", format!("NATS flush failed: {error}"));
            if let Some(first) = results.iter().position(Result::is_ok) {
                results.truncate(first);
                results.push(Err(failure));
            }
        }
        results
    }

    /// Publishes through JetStream; a failed publish or ack is classified (a missing
    /// stream is checked with the server before it counts as permanent, so a restarting
    /// server is waited out).
    async fn attempt_jetstream(
        &self,
        jetstream: &jetstream::Context,
        batch: &[&Envelope],
        stop: &CancellationToken,
    ) -> Attempted {
        let mut results: Vec<Option<Result<(), Failure>>> = Vec::with_capacity(batch.len());
        let mut pending: VecDeque<(usize, Subject, jetstream::context::PublishAckFuture)> = VecDeque::new();
        let mut last_subject = None;
        for (index, envelope) in batch.iter().enumerate() {
            if stop.is_cancelled() {
                break;
            }
            let (subject, headers, payload) = match self.prepare(envelope, &mut last_subject) {
                Ok(message) => message,
                Err(failure) => {
                    results.push(Some(Err(failure)));
                    continue;
                }
            };
            let published = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                published = jetstream.publish_with_headers(subject.clone(), headers, payload) => published,
            };
            match published {
                Ok(ack) => {
                    results.push(None);
                    pending.push_back((index, subject, ack));
                }
                Err(error) => {
                    let failure = self.classify(jetstream, &subject, &error).await;
                    let transient = !failure.is_permanent();
                    results.push(Some(Err(failure)));
                    if transient {
                        break;
                    }
                }
            }
            while pending.len() >= ACK_WINDOW {
                let (index, subject, ack) = pending.pop_front().expect("the window is full");
                results[index] = Some(self.settle(jetstream, &subject, ack).await);
            }
        }
        while let Some((index, subject, ack)) = pending.pop_front() {
            results[index] = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                settled = self.settle(jetstream, &subject, ack) => Some(settled),
            };
        }
        // Up to the first message without a result or with a transient failure.
        let mut attempted = Vec::with_capacity(results.len());
        for result in results {
            match result {
                Some(Ok(())) => attempted.push(Ok(())),
                Some(Err(failure)) => {
                    let transient = !failure.is_permanent();
                    attempted.push(Err(failure));
                    if transient {
                        break;
                    }
                }
                None => break,
            }
        }
        attempted
    }

    async fn settle(
        &self,
        jetstream: &jetstream::Context,
        subject: &Subject,
        ack: jetstream::context::PublishAckFuture,
    ) -> Result<(), Failure> {
        match ack.await {
            Ok(_) => Ok(()),
            Err(error) => Err(self.classify(jetstream, subject, &error).await),
        }
    }

    async fn classify(
        &self,
        jetstream: &jetstream::Context,
        subject: &Subject,
        error: &jetstream::context::PublishError,
    ) -> Failure {
        use jetstream::context::{GetStreamByNameErrorKind, PublishErrorKind};
        match error.kind() {
            PublishErrorKind::MaxPayloadExceeded => Failure::permanent("too_large", error.to_string()),
            PublishErrorKind::StreamNotFound => {
                let lookup = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    jetstream.stream_by_subject(subject.to_string()),
                )
                .await;
                match lookup {
                    Ok(Err(lookup)) if matches!(lookup.kind(), GetStreamByNameErrorKind::NotFound) => {
                        Failure::permanent(
                            "no_stream",
                            format!("no JetStream stream takes the subject {subject:?}"),
                        )
                    }
                    _ => Failure::transient("unavailable", format!("JetStream publish failed: {error}")),
                }
            }
            _ => Failure::transient("unavailable", format!("JetStream publish failed: {error}")),
        }
    }
}
