//! The NATS store: the same records as the file store, in three JetStream key-value buckets
//! (`<bucket>-subscriptions`, `<bucket>-dead-letters`, `<bucket>-positions`) on the
//! bridge's NATS connection. It suits a bridge without a persistent disk (a container that
//! may be rescheduled anywhere), and keeps the state where the forwarded messages go.
//!
//! A write returns once the server has stored it. Keys are the record ids in base64url,
//! since ids may hold characters a key may not; each record keeps its own id.
//!
//! Spools are JetStream streams, one per subscription (see [`NatsSpool`]).

use async_nats::jetstream::{self, kv};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::TryStreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{
    DeadLetter, NatsSpool, Positions, Settlement, SpoolAppend, SpoolEntry, SpoolSummary, Store, StoreError,
};
use crate::config::RawSubscription;

/// State kept in NATS JetStream key-value buckets.
#[derive(Clone, Debug)]
pub struct NatsKvStore {
    subscriptions: Bucket,
    dead_letters: Bucket,
    positions: Bucket,
    spool: Arc<NatsSpool>,
}

/// One bucket and its name, for error messages.
#[derive(Clone, Debug)]
struct Bucket {
    name: String,
    store: kv::Store,
    /// Records skipped as unreadable, shared by the store's buckets.
    unreadable: Arc<std::sync::atomic::AtomicU64>,
}

impl NatsKvStore {
    /// Opens the buckets named after `bucket` on `client`'s server, creating those that do
    /// not exist yet (file storage, one value per key).
    ///
    /// # Errors
    /// [`StoreError::Nats`] when a bucket can be neither found nor created, e.g. when the
    /// server is unreachable or has no JetStream.
    pub async fn open(client: async_nats::Client, bucket: &str) -> Result<Self, StoreError> {
        let jetstream = jetstream::new(client.clone());
        let mut subscriptions = Bucket::open(&jetstream, format!("{bucket}-subscriptions")).await?;
        let mut dead_letters = Bucket::open(&jetstream, format!("{bucket}-dead-letters")).await?;
        let mut positions = Bucket::open(&jetstream, format!("{bucket}-positions")).await?;
        let unreadable = Arc::new(std::sync::atomic::AtomicU64::new(0));
        for bucket in [&mut subscriptions, &mut dead_letters, &mut positions] {
            bucket.unreadable = unreadable.clone();
        }
        Ok(NatsKvStore {
            subscriptions,
            dead_letters,
            positions,
            spool: Arc::new(NatsSpool::new(client, bucket)),
        })
    }
}

impl Bucket {
    async fn open(jetstream: &jetstream::Context, name: String) -> Result<Self, StoreError> {
        let store = match jetstream.get_key_value(name.as_str()).await {
            Ok(store) => store,
            // Anything but "no such bucket" (the server unreachable, no JetStream) would
            // only fail again, after another timeout, when creating it.
            Err(error) if !is_missing(&error) => return Err(nats_error(&name, "cannot be opened", error)),
            Err(_) => jetstream
                .create_key_value(kv::Config {
                    bucket: name.clone(),
                    description: "cometd-bridge state".into(),
                    history: 1,
                    storage: jetstream::stream::StorageType::File,
                    ..kv::Config::default()
                })
                .await
                .map_err(|error| nats_error(&name, "cannot be created", error))?,
        };
        Ok(Bucket { name, store, unreadable: Arc::default() })
    }

    async fn put<T: Serialize>(&self, id: &str, record: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).expect("records serialize");
        self.store.put(key(id), bytes.into()).await.map_err(|error| nats_error(&self.name, "put", error))?;
        Ok(())
    }

    async fn get<T: DeserializeOwned>(&self, id: &str) -> Result<Option<T>, StoreError> {
        let key = key(id);
        match self.store.get(key.as_str()).await.map_err(|error| nats_error(&self.name, "get", error))? {
            Some(bytes) => self.parse(&key, &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Every id, in order.
    async fn ids(&self) -> Result<Vec<String>, StoreError> {
        let keys: Vec<String> = match self.store.keys().await {
            Ok(keys) => keys.try_collect().await.map_err(|error| nats_error(&self.name, "keys", error))?,
            Err(error) => return Err(nats_error(&self.name, "keys", error)),
        };
        let mut ids: Vec<String> = keys
            .iter()
            .filter_map(|key| URL_SAFE_NO_PAD.decode(key).ok().and_then(|id| String::from_utf8(id).ok()))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Every record, in the order of their ids.
    async fn all<T: DeserializeOwned>(&self) -> Result<Vec<T>, StoreError> {
        let keys: Vec<String> = match self.store.keys().await {
            Ok(keys) => keys.try_collect().await.map_err(|error| nats_error(&self.name, "keys", error))?,
            Err(error) => return Err(nats_error(&self.name, "keys", error)),
        };
        let mut keyed = Vec::with_capacity(keys.len());
        for key in keys {
            // A record deleted since the keys were listed is skipped.
            if let Some(bytes) =
                self.store.get(key.as_str()).await.map_err(|error| nats_error(&self.name, "get", error))?
            {
                let id = URL_SAFE_NO_PAD.decode(&key).ok().and_then(|id| String::from_utf8(id).ok());
                match self.parse(&key, &bytes) {
                    Ok(record) => keyed.push((id.unwrap_or_else(|| key.clone()), record)),
                    Err(error) => self.skip(&error),
                }
            }
        }
        keyed.sort_by(|(a, _), (b, _)| a.cmp(b));
        Ok(keyed.into_iter().map(|(_, record)| record).collect())
    }

    /// Removes a record; `false` when there was none.
    async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let key = key(id);
        let existed = self
            .store
            .get(key.as_str())
            .await
            .map_err(|error| nats_error(&self.name, "get", error))?
            .is_some();
        if existed {
            self.store.purge(key.as_str()).await.map_err(|error| nats_error(&self.name, "purge", error))?;
        }
        Ok(existed)
    }

    /// Reports and counts an unreadable record that a listing leaves out.
    fn skip(&self, error: &StoreError) {
        tracing::error!(error = %error, "skipping an unreadable record");
        self.unreadable.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn parse<T: DeserializeOwned>(&self, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
        serde_json::from_slice(bytes).map_err(|error| StoreError::Corrupt {
            path: format!("NATS KV {}/{key}", self.name),
            message: error.to_string(),
        })
    }
}

/// Whether opening a bucket failed because it does not exist.
fn is_missing(error: &jetstream::context::KeyValueError) -> bool {
    use jetstream::context::{GetStreamError, GetStreamErrorKind};
    std::error::Error::source(error).and_then(|source| source.downcast_ref::<GetStreamError>()).is_some_and(
        |error| {
            matches!(error.kind(), GetStreamErrorKind::JetStream(error)
                if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
        },
    )
}

/// A record id as a key: base64url, which every id can be written in and a key may hold.
fn key(id: &str) -> String {
    URL_SAFE_NO_PAD.encode(id)
}

fn nats_error(bucket: &str, action: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Nats { bucket: bucket.to_string(), message: format!("{action}: {error}") }
}

#[async_trait::async_trait]
impl Store for NatsKvStore {
    async fn subscriptions(&self) -> Result<Vec<RawSubscription>, StoreError> {
        self.subscriptions.all().await
    }

    async fn put_subscription(&self, subscription: &RawSubscription) -> Result<(), StoreError> {
        self.subscriptions.put(&subscription.id, subscription).await
    }

    async fn delete_subscription(&self, id: &str) -> Result<bool, StoreError> {
        self.subscriptions.delete(id).await
    }

    async fn add_dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        self.dead_letters.put(&letter.id, letter).await
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let mut letters: Vec<DeadLetter> = self.dead_letters.all().await?;
        letters.sort_by(|a, b| (&a.failed_at, a.sequence).cmp(&(&b.failed_at, b.sequence)));
        Ok(letters)
    }

    async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        self.dead_letters.get(id).await
    }

    /// Lists the keys, then reads only the page's records.
    async fn dead_letters_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, bool), StoreError> {
        use futures_util::{FutureExt, StreamExt};
        // KV has no range reads: the key names are listed (names only), and only the
        // page's values are fetched, several requests in flight at once, in id order.
        const IN_FLIGHT: usize = 32;
        let ids = self.dead_letters.ids().await?;
        let start = after.map_or(0, |after| ids.partition_point(|id| id.as_str() <= after));
        let bucket = &self.dead_letters;
        let page: Vec<String> = ids.iter().skip(start).take(limit).cloned().collect();
        let gets: Vec<_> =
            page.into_iter().map(|id| async move { bucket.get::<DeadLetter>(&id).await }.boxed()).collect();
        let mut fetched = futures_util::stream::iter(gets).buffered(IN_FLIGHT);
        let mut letters = Vec::with_capacity(limit.min(ids.len()));
        while let Some(result) = fetched.next().await {
            // One removed since the keys were listed, or unreadable, is skipped.
            match result {
                Ok(Some(letter)) => letters.push(letter),
                Ok(None) => {}
                Err(error @ StoreError::Corrupt { .. }) => self.dead_letters.skip(&error),
                Err(error) => return Err(error),
            }
        }
        Ok((letters, ids.len() > start + limit))
    }

    async fn delete_dead_letter(&self, id: &str) -> Result<bool, StoreError> {
        self.dead_letters.delete(id).await
    }

    async fn positions(&self, subscription: &str) -> Result<Positions, StoreError> {
        Ok(self.positions.get(subscription).await?.unwrap_or_default())
    }

    async fn put_positions(&self, subscription: &str, positions: &Positions) -> Result<(), StoreError> {
        self.positions.put(subscription, positions).await
    }

    async fn delete_positions(&self, subscription: &str) -> Result<(), StoreError> {
        self.positions.delete(subscription).await.map(drop)
    }

    async fn spool_append(&self, appends: Arc<[SpoolAppend]>) -> Result<Vec<Option<u64>>, StoreError> {
        self.spool.append(&appends).await
    }

    async fn spool_read(
        &self,
        subscription: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<SpoolEntry>, StoreError> {
        self.spool.read(subscription, from, max).await
    }

    /// Dead letters and positions first, the trim last: a failure in between repeats
    /// deliveries (with their delivery ids) rather than losing them.
    async fn spool_settle(&self, settlement: Settlement) -> Result<(), StoreError> {
        for letter in &settlement.dead_letters {
            self.dead_letters.put(&letter.id, letter).await?;
        }
        if let Some(positions) = &settlement.positions {
            self.positions.put(&settlement.subscription, positions).await?;
        }
        self.spool.trim(&settlement.subscription, settlement.through).await
    }

    async fn spool_summaries(&self) -> Result<BTreeMap<String, SpoolSummary>, StoreError> {
        self.spool.summaries().await
    }

    async fn spool_delete(&self, subscription: &str) -> Result<(), StoreError> {
        self.spool.delete(subscription).await
    }

    /// Appended first, then removed from the dead letters: a crash in between leaves it in
    /// both (delivered, and retried again with the same delivery id) rather than neither.
    fn unreadable_records(&self) -> u64 {
        self.subscriptions.unreadable.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn requeue_dead_letter(&self, id: &str, append: SpoolAppend) -> Result<Option<u64>, StoreError> {
        if self.dead_letters.get::<DeadLetter>(id).await?.is_none() {
            return Ok(None);
        }
        let subscription = append.subscription.clone();
        let Some(sequence) = self.spool.append(&[append]).await?.pop().flatten() else {
            return Err(StoreError::Nats {
                bucket: self.dead_letters.name.clone(),
                message: format!("dead letter {id:?} of {subscription:?} is too large for the NATS spool"),
            });
        };
        self.dead_letters.delete(id).await?;
        Ok(Some(sequence))
    }
}
