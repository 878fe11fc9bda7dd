//! Spools in JetStream, for the NATS backend: one stream per subscription,
//! `<bucket>-spool-<hex of the id>` (file storage, direct gets allowed), whose sequences
//! are the spool's sequences: consecutive, never reused, and trimmed by purging below a
//! sequence. A message is spooled once the stream acknowledged it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_nats::jetstream::{self, stream};
use futures_util::TryStreamExt;

use super::{SpoolAppend, SpoolEntry, SpoolSummary, StoreError};

/// Bytes a spooled record may take below the server's `max_payload` (room for headers).
const PAYLOAD_MARGIN: usize = 1024;

/// The spools of one bucket name.
#[derive(Debug)]
pub struct NatsSpool {
    jetstream: jetstream::Context,
    client: async_nats::Client,
    bucket: String,
    streams: Mutex<HashMap<String, stream::Stream>>,
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
    /// The spools of `bucket` on `client`'s server.
    pub fn new(client: async_nats::Client, bucket: &str) -> Self {
        NatsSpool {
            jetstream: jetstream::new(client.clone()),
            client,
            bucket: bucket.to_string(),
            streams: Mutex::new(HashMap::new()),
        }
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
                ..stream::Config::default()
            })
            .await
            .map_err(|error| self.error(subscription, "cannot be opened", error))?;
        self.cached().insert(subscription.to_string(), stream.clone());
        Ok(stream)
    }

    /// Appends in order; a record over the server's `max_payload` cannot be spooled here:
    /// it is logged with its content and gets no sequence.
    pub async fn append(&self, appends: &[SpoolAppend]) -> Result<Vec<Option<u64>>, StoreError> {
        let max = self.client.server_info().max_payload.saturating_sub(PAYLOAD_MARGIN);
        let mut acks = Vec::with_capacity(appends.len());
        for append in appends {
            if max > 0 && append.record.len() > max {
                tracing::error!(subscription = %append.subscription, bytes = append.record.len(), max_payload = max, record = %String::from_utf8_lossy(&append.record), "a received message is too large for the NATS spool; it is lost");
                acks.push(None);
                continue;
            }
            self.stream(&append.subscription).await?;
            let ack = self
                .jetstream
                .publish(self.subject(&append.subscription), append.record.clone().into())
                .await
                .map_err(|error| self.error(&append.subscription, "append", error))?;
            acks.push(Some((append.subscription.clone(), ack)));
        }
        let mut sequences = Vec::with_capacity(acks.len());
        for ack in acks {
            sequences.push(match ack {
                None => None,
                Some((subscription, ack)) => {
                    Some(ack.await.map_err(|error| self.error(&subscription, "append", error))?.sequence)
                }
            });
        }
        Ok(sequences)
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
        let mut entries = Vec::new();
        let mut bytes = 0;
        let mut sequence = from.max(info.state.first_sequence);
        while sequence <= info.state.last_sequence && entries.len() < max && bytes < super::SPOOL_READ_BYTES {
            match stream.direct_get(sequence).await {
                Ok(message) => {
                    bytes += message.payload.len();
                    entries.push(SpoolEntry { sequence, record: message.payload.to_vec() });
                }
                // Purged since the info was read.
                Err(error) if error.kind() == stream::DirectGetErrorKind::NotFound => {}
                Err(error) => return Err(self.error(subscription, "read", error)),
            }
            sequence += 1;
        }
        Ok(entries)
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
