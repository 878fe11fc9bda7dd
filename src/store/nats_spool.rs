//! Spools in JetStream, for the NATS backend: one stream per subscription,
//! `<bucket>-spool-<hex of the id>` (file storage, direct gets allowed), whose sequences
//! are the spool's sequences: consecutive, never reused, and trimmed by purging below a
//! sequence. A message is spooled once the stream acknowledged it.
//!
//! Every append carries a `Nats-Msg-Id`: the hash of the subscription and the record (which
//! holds the delivery's source, session and sequence), so that the same append sent again
//! (after a timeout, a lost acknowledgement, or a batch that failed in its middle and is
//! retried whole) within the stream's duplicate window ([`DUPLICATE_WINDOW`]) is stored
//! once, and answered with the sequence it was stored at. A backlog is read through an
//! ordered consumer (the messages streamed in batches), not one request per message.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::{StreamExt, TryStreamExt};

use super::spool_read::SpoolRead;
use super::{SpoolAppend, SpoolEntry, SpoolSummary, StoreError};

/// Bytes a spooled record may take below the server's `max_payload` (room for headers).
pub const PAYLOAD_MARGIN: usize = 1024;

/// How long a spool stream remembers the `Nats-Msg-Id` of an append, to store a repeated
/// append once (JetStream's default, set explicitly).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// How many messages a read asks the server for at once.
const READ_BATCH: usize = 1000;

/// How long a read waits for the next message: then it returns what it has (or fails,
/// when it has nothing).
const READ_IDLE: Duration = Duration::from_secs(5);

/// The spools of one bucket name.
#[derive(Debug)]
pub struct NatsSpool {
    jetstream: jetstream::Context,
    client: async_nats::Client,
    bucket: String,
    replicas: usize,
    streams: Mutex<HashMap<String, stream::Stream>>,
}

/// What became of one append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// Stored at this sequence.
    Stored(u64),
    /// An append with the same message id was stored before, at this sequence.
    Duplicate(u64),
    /// Over the server's `max_payload`: not sent.
    TooLarge,
}

impl Appended {
    /// Its sequence, new or not.
    pub fn sequence(self) -> Option<u64> {
        match self {
            Appended::Stored(sequence) | Appended::Duplicate(sequence) => Some(sequence),
            Appended::TooLarge => None,
        }
    }
}

/// The message id of an append: its subscription and record, hashed (SHA-256, 128 bits).
pub fn message_id(append: &SpoolAppend) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(append.subscription.as_bytes());
    context.update(&[0]);
    context.update(&append.record);
    let digest = context.finish();
    digest.as_ref()[..16].iter().map(|byte| format!("{byte:02x}")).collect()
}

fn hex(id: &str) -> String {
    id.bytes().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..text.len())
        .step_by(2)
        .map(|at| text.get(at..at + 2).and_then(|pair| u8::from_str_radix(pair, 16).ok()))
        .collect();
    bytes.and_then(|bytes| String::from_utf8(bytes).ok())
}

impl NatsSpool {
    /// The spools of `bucket` on `client`'s server, their streams created with `replicas`
    /// replicas.
    pub fn new(client: async_nats::Client, bucket: &str, replicas: usize) -> Self {
        NatsSpool {
            jetstream: jetstream::new(client.clone()),
            client,
            bucket: bucket.to_string(),
            replicas,
            streams: Mutex::new(HashMap::new()),
        }
    }

    /// The largest record an append takes: the server's `max_payload` less room for
    /// headers; `None` when the server did not say.
    pub fn max_record(&self) -> Option<usize> {
        let max = self.client.server_info().max_payload;
        (max > 0).then(|| max.saturating_sub(PAYLOAD_MARGIN))
    }

    fn prefix(&self) -> String {
        format!("{}-spool-", self.bucket)
    }

    fn stream_name(&self, subscription: &str) -> String {
        format!("{}{}", self.prefix(), hex(subscription))
    }

    fn subject(&self, subscription: &str) -> String {
        format!("{}.spool.{}", self.bucket, hex(subscription))
    }

    fn error(&self, subscription: &str, action: &str, error: impl std::fmt::Display) -> StoreError {
        StoreError::Nats { bucket: self.stream_name(subscription), message: format!("{action}: {error}") }
    }

    fn cached(&self) -> std::sync::MutexGuard<'_, HashMap<String, stream::Stream>> {
        self.streams.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The stream of `subscription`'s spool, created when missing.
    async fn stream(&self, subscription: &str) -> Result<stream::Stream, StoreError> {
        if let Some(stream) = self.cached().get(subscription) {
            return Ok(stream.clone());
        }
        let stream = self
            .jetstream
            .get_or_create_stream(stream::Config {
                name: self.stream_name(subscription),
                description: Some(format!("cometd-bridge spool of subscription {subscription:?}")),
                subjects: vec![self.subject(subscription)],
                storage: stream::StorageType::File,
                allow_direct: true,
                num_replicas: self.replicas,
                duplicate_window: DUPLICATE_WINDOW,
                ..stream::Config::default()
            })
            .await
            .map_err(|error| self.error(subscription, "cannot be opened", error))?;
        self.cached().insert(subscription.to_string(), stream.clone());
        Ok(stream)
    }

    /// Appends in order, each with its message id (a hash of its subscription and record);
    /// a record over the server's `max_payload` cannot be spooled here and gets no
    /// sequence (the caller dead-letters it). A repeated append gets the sequence it was
    /// first stored at.
    pub async fn append(&self, appends: &[SpoolAppend]) -> Result<Vec<Option<u64>>, StoreError> {
        let keyed: Vec<(&SpoolAppend, String)> =
            appends.iter().map(|append| (append, message_id(append))).collect();
        Ok(self.append_with_ids(&keyed).await?.into_iter().map(Appended::sequence).collect())
    }

    /// Appends in order, each with the message id given: all are sent, then their
    /// acknowledgements awaited.
    pub async fn append_with_ids(
        &self,
        appends: &[(&SpoolAppend, String)],
    ) -> Result<Vec<Appended>, StoreError> {
        let max = self.max_record();
        let mut acks = Vec::with_capacity(appends.len());
        for (append, id) in appends {
            if max.is_some_and(|max| append.record.len() > max) {
                tracing::warn!(subscription = %append.subscription, bytes = append.record.len(), max_record = max, "a message too large for the NATS spool (over the server's max_payload) is not spooled");
                acks.push(None);
                continue;
            }
            self.stream(&append.subscription).await?;
            let publish = jetstream::message::PublishMessage::build()
                .message_id(id)
                .payload(append.record.clone().into());
            let ack = self
                .jetstream
                .send_publish(self.subject(&append.subscription), publish)
                .await
                .map_err(|error| self.error(&append.subscription, "append", error))?;
            acks.push(Some((append.subscription.clone(), ack)));
        }
        let mut appended = Vec::with_capacity(acks.len());
        for ack in acks {
            appended.push(match ack {
                None => Appended::TooLarge,
                Some((subscription, ack)) => {
                    let ack = ack.await.map_err(|error| self.error(&subscription, "append", error))?;
                    if ack.duplicate {
                        Appended::Duplicate(ack.sequence)
                    } else {
                        Appended::Stored(ack.sequence)
                    }
                }
            });
        }
        Ok(appended)
    }

    /// Up to `max` messages from `from` on.
    pub async fn read(
        &self,
        subscription: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<SpoolEntry>, StoreError> {
        let stream = self.stream(subscription).await?;
        let info = stream.get_info().await.map_err(|error| self.error(subscription, "info", error))?;
        let first = from.max(info.state.first_sequence);
        let last = info.state.last_sequence;
        if info.state.messages == 0 || first > last || max == 0 {
            return Ok(Vec::new());
        }
        let wanted = usize::try_from(last - first + 1).unwrap_or(usize::MAX).min(max);
        // An ordered consumer from `first`: the server streams the messages in batches; it
        // is ephemeral, deleted once read.
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.subject(subscription),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: first },
                max_batch: i64::try_from(wanted.min(READ_BATCH)).unwrap_or(1),
                ..consumer::pull::OrderedConfig::default()
            })
            .await
            .map_err(|error| self.error(subscription, "read", error))?;
        let name = consumer.cached_info().name.clone();
        if consumer.cached_info().num_pending == 0 {
            // Purged since the info was read.
            let _ = stream.delete_consumer(&name).await;
            return Ok(Vec::new());
        }
        let mut messages =
            consumer.messages().await.map_err(|error| self.error(subscription, "read", error))?;
        let mut read = SpoolRead::new(wanted);
        while !read.is_full() {
            let message = match tokio::time::timeout(READ_IDLE, messages.next()).await {
                Ok(Some(message)) => message.map_err(|error| self.error(subscription, "read", error))?,
                // Nothing more came: the rest was purged since the info was read, or the
                // server is slow; what was read is returned, and the next read goes on.
                Ok(None) | Err(_) if !read.is_empty() => break,
                Ok(None) | Err(_) => {
                    let _ = stream.delete_consumer(&name).await;
                    return Err(self.error(subscription, "read", format!("no message within {READ_IDLE:?}")));
                }
            };
            let info = message.info().map_err(|error| self.error(subscription, "read", error))?;
            let sequence = info.stream_sequence;
            let pending = info.pending;
            read.take(sequence, &message.payload);
            if sequence >= last || pending == 0 {
                break;
            }
        }
        drop(messages);
        // Deleted now rather than left to expire; a failure only leaves it to expire.
        let _ = stream.delete_consumer(&name).await;
        Ok(read.into_entries())
    }

    /// Removes the messages through `through`.
    pub async fn trim(&self, subscription: &str, through: u64) -> Result<(), StoreError> {
        let stream = self.stream(subscription).await?;
        stream
            .purge()
            .sequence(through + 1)
            .await
            .map_err(|error| self.error(subscription, "trim", error))?;
        Ok(())
    }

    /// What each non-empty spool holds.
    pub async fn summaries(&self) -> Result<BTreeMap<String, SpoolSummary>, StoreError> {
        let prefix = self.prefix();
        let names: Vec<String> = self.jetstream.stream_names().try_collect().await.map_err(|error| {
            StoreError::Nats { bucket: format!("{prefix}*"), message: format!("list: {error}") }
        })?;
        let mut summaries = BTreeMap::new();
        for name in names {
            let Some(subscription) = name.strip_prefix(&prefix).and_then(unhex) else { continue };
            let stream = self.stream(&subscription).await?;
            let state =
                stream.get_info().await.map_err(|error| self.error(&subscription, "info", error))?.state;
            if state.messages > 0 {
                summaries.insert(
                    subscription,
                    SpoolSummary {
                        first: state.first_sequence,
                        last: state.last_sequence,
                        messages: state.messages,
                        bytes: state.bytes,
                    },
                );
            }
        }
        Ok(summaries)
    }

    /// Deletes a spool's stream.
    pub async fn delete(&self, subscription: &str) -> Result<(), StoreError> {
        self.cached().remove(subscription);
        match self.jetstream.delete_stream(self.stream_name(subscription)).await {
            Ok(_) => Ok(()),
            Err(error)
                if matches!(error.kind(), jetstream::context::DeleteStreamErrorKind::JetStream(inner)
                    if inner.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                Ok(())
            }
            Err(error) => Err(self.error(subscription, "delete", error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_survive_the_stream_name() {
        for id in ["orders", "eu orders/1", "ü.*>"] {
            assert_eq!(unhex(&hex(id)).as_deref(), Some(id));
        }
    }
}
