//! The NATS store: the same records as the file store, in three JetStream key-value buckets
//! (`<bucket>-subscriptions`, `<bucket>-dead-letters`, `<bucket>-positions`) on the
//! bridge's NATS connection, and a fourth (`<bucket>-sessions`) for the CometD sessions
//! one replica hands to the next. It suits a bridge without a persistent disk (a container that
//! may be rescheduled anywhere), and keeps the state where the forwarded messages go.
//!
//! A write returns once the server has stored it. Keys are the record ids in base64url,
//! since ids may hold characters a key may not; each record keeps its own id.
//!
//! Spools are JetStream streams, one per subscription (see [`NatsSpool`]).
//!
//! The bound on dead letters (`state.dead_letters_max_bytes`) is kept in memory: each
//! letter's age and size, read once when the store opens (one get per dead letter), then
//! followed by every write. A KV bucket has no transactions, so an eviction is a purge
//! per evicted letter after the put that caused it (a crash in between leaves the bucket
//! over its bound until the next put).
//!
//! A requeue is atomic across processes without a transaction: the letter's current
//! revision is read, its record appended with the message id `dl.<key>.<revision>` (the
//! spool stream stores one append per id within its duplicate window, and answers a
//! second one as a duplicate: that caller gets `None`), then the letter purged only if it
//! still has that revision. A crash between append and purge leaves it in both (delivered
//! and retried again with the same delivery id) rather than neither. Removals are
//! revision-checked too, so that a letter stored again meanwhile (a batch repeated after a
//! crash) is not removed unseen. A requeue repeated within the window after a crash
//! between its append and its purge finds the letter already appended (`None`); after the
//! window it appends it again.
//!
//! A settlement's positions only move forward: each channel gets the greater of the
//! stored and the new position, written with the revision read (merged again on a
//! conflict), so two settlements racing never leave the older one.
//!
//! A dead letter larger than the server's `max_payload` is stored without its data: its
//! `message` keeps `source`, `subscription`, `channel` and `id`, and gains `truncated`
//! (`bytes`: the data's size, `head`: its first 1 KiB of JSON); its reason says so. It can
//! be listed and discarded, not retried.

use async_nats::jetstream::{self, kv};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::TryStreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::bound::LetterBound;
use super::letter_order::{self, Age};
use super::nats_spool::Appended;
use super::unreadable::Unreadable;
use super::{
    DeadLetter, NatsSpool, Positions, Settlement, SpoolAppend, SpoolEntry, SpoolSummary, Store, StoreError,
    SubscriptionChange, SubscriptionChanges,
};
use crate::config::RawSubscription;
use crate::store::{DeadLetterRecords, PositionRecords, SessionRecords, Spools, SubscriptionRecords};

/// State kept in NATS JetStream key-value buckets.
#[derive(Clone, Debug)]
pub struct NatsKvStore {
    subscriptions: Bucket,
    dead_letters: Bucket,
    positions: Bucket,
    sessions: Bucket,
    spool: Arc<NatsSpool>,
    letters: Arc<Letters>,
}

/// The dead letters' bound, and the lock that serialises their requeues and removals.
#[derive(Debug)]
struct Letters {
    bound: std::sync::Mutex<LetterBound>,
    max_bytes: AtomicU64,
    evicted: AtomicU64,
    changing: tokio::sync::Mutex<()>,
}

impl Letters {
    fn bound(&self) -> std::sync::MutexGuard<'_, LetterBound> {
        self.bound.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One bucket and its name, for error messages.
#[derive(Clone, Debug)]
struct Bucket {
    name: String,
    store: kv::Store,
    /// Records skipped as unreadable, shared by the store's buckets.
    unreadable: Arc<Unreadable>,
}

impl NatsKvStore {
    /// Opens the buckets named after `bucket` on `client`'s server, creating those that do
    /// not exist yet (file storage, one value per key).
    ///
    /// # Errors
    /// [`StoreError::Nats`] when a bucket can be neither found nor created, e.g. when the
    /// server is unreachable or has no JetStream.
    pub async fn open(client: async_nats::Client, bucket: &str) -> Result<Self, StoreError> {
        Self::open_with(client, bucket, 1).await
    }

    /// [`open`](Self::open), creating the missing buckets and spool streams with `replicas`
    /// replicas (`state.replicas`; existing ones keep theirs).
    ///
    /// # Errors
    /// [`StoreError::Nats`] as for [`open`](Self::open), and when the server cannot place
    /// that many replicas (fewer servers in its cluster).
    pub async fn open_with(
        client: async_nats::Client,
        bucket: &str,
        replicas: usize,
    ) -> Result<Self, StoreError> {
        // A cluster busy placing replicated buckets (several replicas starting at once, a
        // meta leader being elected) can take longer than a request's timeout: a timed-out
        // open is tried again, for a while.
        let started = std::time::Instant::now();
        loop {
            match Self::try_open(client.clone(), bucket, replicas).await {
                // Only while connected: a server that cannot be reached is said at once.
                Err(StoreError::Nats { message, .. })
                    if message.contains("timed out")
                        && started.elapsed() < OPEN_PATIENCE
                        && client.connection_state() == async_nats::connection::State::Connected =>
                {
                    tracing::warn!(error = %message, "the NATS state is slow to open; trying again");
                }
                opened => return opened,
            }
        }
    }

    async fn try_open(client: async_nats::Client, bucket: &str, replicas: usize) -> Result<Self, StoreError> {
        let jetstream = jetstream::new(client.clone());
        let mut subscriptions = Bucket::open(&jetstream, format!("{bucket}-subscriptions"), replicas).await?;
        let mut dead_letters = Bucket::open(&jetstream, format!("{bucket}-dead-letters"), replicas).await?;
        let mut positions = Bucket::open(&jetstream, format!("{bucket}-positions"), replicas).await?;
        let mut sessions = Bucket::open(&jetstream, format!("{bucket}-sessions"), replicas).await?;
        let unreadable = Arc::new(Unreadable::default());
        for bucket in [&mut subscriptions, &mut dead_letters, &mut positions, &mut sessions] {
            bucket.unreadable = unreadable.clone();
        }
        let bound = index_dead_letters(&dead_letters).await?;
        Ok(NatsKvStore {
            subscriptions,
            dead_letters,
            positions,
            sessions,
            spool: Arc::new(NatsSpool::new(client, bucket, replicas)),
            letters: Arc::new(Letters {
                bound: std::sync::Mutex::new(bound),
                max_bytes: AtomicU64::new(super::DEAD_LETTERS_MAX_BYTES),
                evicted: AtomicU64::new(0),
                changing: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Stores dead letters, then purges what they evicted (logged and counted).
    async fn put_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        let _changing = self.letters.changing.lock().await;
        let max = self.letters.max_bytes.load(Ordering::Relaxed);
        for letter in letters {
            let mut bytes = serde_json::to_vec(letter).expect("records serialize");
            if let Some(max) = self.spool.max_record()
                && bytes.len() > max
            {
                bytes = serde_json::to_vec(&without_data(letter, max)).expect("records serialize");
            }
            let size = bytes.len() as u64;
            self.dead_letters
                .store
                .put(key(&letter.id), bytes.into())
                .await
                .map_err(|error| nats_error(&self.dead_letters.name, "put", error))?;
            let evicted = self.letters.bound().insert(&letter.id, size, max);
            for id in &evicted {
                self.dead_letters
                    .store
                    .purge(key(id))
                    .await
                    .map_err(|error| nats_error(&self.dead_letters.name, "purge", error))?;
            }
            self.letters.evicted.fetch_add(evicted.len() as u64, Ordering::Relaxed);
            super::log_evicted(&evicted, max);
        }
        Ok(())
    }
}

/// How long opening the buckets is tried again while their requests time out.
const OPEN_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// How much of an oversize dead letter's data is kept, as JSON text.
const TRUNCATED_HEAD: usize = 1024;

/// `letter` without its data and spooled record, to fit a server's `max_payload`: its
/// `message` keeps its other fields and gains `truncated` (`bytes`, `head`); the reason
/// says so.
fn without_data(letter: &DeadLetter, max_payload: usize) -> DeadLetter {
    let data = letter.message.get("data").map(ToString::to_string).unwrap_or_default();
    let mut head = data.as_str();
    while head.len() > TRUNCATED_HEAD {
        let mut end = TRUNCATED_HEAD;
        while !head.is_char_boundary(end) {
            end -= 1;
        }
        head = &head[..end];
    }
    let mut message = serde_json::Map::new();
    if let Some(fields) = letter.message.as_object() {
        for (name, value) in fields {
            if !matches!(name.as_str(), "data" | "ext") {
                message.insert(name.clone(), value.clone());
            }
        }
    }
    message.insert("truncated".into(), serde_json::json!({ "bytes": data.len(), "head": head }));
    DeadLetter {
        message: serde_json::Value::Object(message),
        reason: format!(
            "{}; stored without its data ({} bytes), over the NATS server's max_payload ({max_payload} bytes with headers)",
            letter.reason,
            data.len()
        ),
        record: None,
        ..letter.clone()
    }
}

/// Whether a stored dead letter lost its data to `max_payload` (it cannot be retried).
fn is_truncated(letter: &serde_json::Value) -> bool {
    letter.get("record").is_none_or(serde_json::Value::is_null)
        && letter.get("message").and_then(|message| message.get("truncated")).is_some()
}

/// The ages and sizes of the dead letters in `bucket`, oldest first by `failed_at`.
async fn index_dead_letters(bucket: &Bucket) -> Result<LetterBound, StoreError> {
    use futures_util::{FutureExt, StreamExt};
    const IN_FLIGHT: usize = 32;
    let ids = bucket.ids().await?;
    let gets: Vec<_> = ids
        .into_iter()
        .map(|id| {
            async move {
                let bytes = bucket
                    .store
                    .get(key(&id))
                    .await
                    .map_err(|error| nats_error(&bucket.name, "get", error))?;
                Ok::<_, StoreError>(bytes.map(|bytes| (id, bytes)))
            }
            .boxed()
        })
        .collect();
    let mut fetched = futures_util::stream::iter(gets).buffered(IN_FLIGHT);
    let mut letters = Vec::new();
    while let Some(result) = fetched.next().await {
        if let Some((id, bytes)) = result? {
            letters.push((id, bytes.len() as u64, Age::of(&bytes)));
        }
    }
    letter_order::index_order(&mut letters);
    let mut bound = LetterBound::default();
    for (id, size, _) in letters {
        bound.insert(&id, size, u64::MAX);
    }
    Ok(bound)
}

impl Bucket {
    async fn open(jetstream: &jetstream::Context, name: String, replicas: usize) -> Result<Self, StoreError> {
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
                    num_replicas: replicas,
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
                if let Some(record) = self.unreadable.keep(self.parse(&key, &bytes)) {
                    keyed.push((id.unwrap_or_else(|| key.clone()), record));
                }
            }
        }
        keyed.sort_by(|(a, _), (b, _)| a.cmp(b));
        Ok(keyed.into_iter().map(|(_, record)| record).collect())
    }

    /// The current value and revision of a record; `None` when there is none.
    async fn entry(&self, key: &str) -> Result<Option<kv::Entry>, StoreError> {
        let entry = self.store.entry(key).await.map_err(|error| nats_error(&self.name, "get", error))?;
        Ok(entry.filter(|entry| entry.operation == kv::Operation::Put))
    }

    /// Removes a record if it still has `revision`; `false` when it had another (stored
    /// again, or removed, since).
    async fn purge_at(&self, key: &str, revision: u64) -> Result<bool, StoreError> {
        match self.store.purge_expect_revision(key, Some(revision)).await {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(error) => Err(nats_error(&self.name, "purge", error)),
        }
    }

    /// Removes a record; `false` when there was none. Of two concurrent removals, one
    /// gets `true`; a record stored again after it was read is left alone (`false`).
    async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let key = key(id);
        match self.entry(&key).await? {
            Some(entry) => self.purge_at(&key, entry.revision).await,
            None => Ok(false),
        }
    }

    /// Stores a settlement's positions so that none moves backwards, whoever else writes
    /// them at the same time (two settlements racing, from this process or another): each
    /// channel gets the greater of the stored and the new position, written only if the
    /// record still has the revision read (`update`/`create` with the expected revision),
    /// else read and merged again. A position reset through the API (a plain put) is
    /// read like any other value.
    async fn advance_positions(&self, subscription: &str, positions: &Positions) -> Result<(), StoreError> {
        const TRIES: u32 = 16;
        let key = key(subscription);
        for _ in 0..TRIES {
            let current = self.entry(&key).await?;
            let mut merged: Positions = match &current {
                Some(entry) => self.parse(&key, &entry.value).unwrap_or_default(),
                None => Positions::new(),
            };
            for (channel, position) in positions {
                let kept = merged.entry(channel.clone()).or_insert(*position);
                *kept = (*kept).max(*position);
            }
            let bytes: bytes::Bytes = serde_json::to_vec(&merged).expect("records serialize").into();
            let written = match &current {
                Some(entry) => {
                    self.store.update(&key, bytes, entry.revision).await.map(drop).map_err(|error| {
                        (
                            error.kind() == kv::UpdateErrorKind::WrongLastRevision,
                            nats_error(&self.name, "update", error),
                        )
                    })
                }
                None => self.store.create(&key, bytes).await.map(drop).map_err(|error| {
                    (
                        error.kind() == kv::CreateErrorKind::AlreadyExists,
                        nats_error(&self.name, "create", error),
                    )
                }),
            };
            match written {
                Ok(()) => return Ok(()),
                Err((true, _)) => {}
                Err((false, error)) => return Err(error),
            }
        }
        Err(nats_error(&self.name, "update", format!("{subscription:?}: still changing after {TRIES} tries")))
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
impl SubscriptionRecords for NatsKvStore {
    async fn subscriptions(&self) -> Result<Vec<RawSubscription>, StoreError> {
        self.subscriptions.all().await
    }

    async fn put_subscription(&self, subscription: &RawSubscription) -> Result<(), StoreError> {
        self.subscriptions.put(&subscription.id, subscription).await
    }

    async fn delete_subscription(&self, id: &str) -> Result<bool, StoreError> {
        self.subscriptions.delete(id).await
    }

    /// A KV watch on `<bucket>-subscriptions` (updates only, from now on); a record that
    /// cannot be read is logged, counted and skipped like in a listing.
    async fn watch_subscriptions(&self) -> Result<Option<SubscriptionChanges>, StoreError> {
        use futures_util::StreamExt;
        let bucket = self.subscriptions.clone();
        let watch =
            bucket.store.watch_all().await.map_err(|error| nats_error(&bucket.name, "watch", error))?;
        let changes = watch.filter_map(move |entry| {
            let change = match entry {
                Err(error) => Some(Err(nats_error(&bucket.name, "watch", error))),
                Ok(entry) => {
                    let id =
                        URL_SAFE_NO_PAD.decode(&entry.key).ok().and_then(|id| String::from_utf8(id).ok());
                    match (entry.operation, id) {
                        // A key that is no record id is nothing the bridge wrote.
                        (_, None) => None,
                        (kv::Operation::Put, Some(_)) => bucket
                            .unreadable
                            .keep(bucket.parse::<RawSubscription>(&entry.key, &entry.value))
                            .map(|record| Ok(SubscriptionChange::Stored(Box::new(record)))),
                        (kv::Operation::Delete | kv::Operation::Purge, Some(id)) => {
                            Some(Ok(SubscriptionChange::Removed(id)))
                        }
                    }
                }
            };
            std::future::ready(change)
        });
        Ok(Some(changes.boxed()))
    }
}

#[async_trait::async_trait]
impl DeadLetterRecords for NatsKvStore {
    async fn add_dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        self.put_dead_letters(std::slice::from_ref(letter)).await
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let mut letters: Vec<DeadLetter> = self.dead_letters.all().await?;
        letter_order::oldest_first(&mut letters);
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
                Err(error @ StoreError::Corrupt { .. }) => self.dead_letters.unreadable.skip(&error),
                Err(error) => return Err(error),
            }
        }
        Ok((letters, ids.len() > start + limit))
    }

    async fn delete_dead_letter(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.delete_dead_letters(vec![id.to_string()]).await? == 1)
    }

    /// One purge per dead letter.
    async fn delete_dead_letters(&self, ids: Vec<String>) -> Result<u64, StoreError> {
        let _changing = self.letters.changing.lock().await;
        let mut removed = 0;
        for id in &ids {
            if self.dead_letters.delete(id).await? {
                removed += 1;
            }
            self.letters.bound().remove(id);
        }
        Ok(removed)
    }

    fn limit_dead_letters(&self, max_bytes: u64) {
        self.letters.max_bytes.store(max_bytes, Ordering::Relaxed);
    }

    fn dead_letters_evicted(&self) -> u64 {
        self.letters.evicted.load(Ordering::Relaxed)
    }

    /// Each one's revision read (one get each), all appended at once with the message id
    /// `dl.<key>.<revision>` (a concurrent requeue of the same letter, here or in another
    /// process, is answered as a duplicate and gets `None`), then each purged if it still
    /// has that revision; gets and purges run 32 at a time.
    async fn requeue_dead_letters(
        &self,
        requeues: Vec<(String, SpoolAppend)>,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        use futures_util::{FutureExt, StreamExt, TryStreamExt};
        const IN_FLIGHT: usize = 32;
        let _changing = self.letters.changing.lock().await;
        let bucket = &self.dead_letters;
        let gets: Vec<_> = requeues
            .iter()
            .map(|(id, _)| {
                let key = key(id);
                async move {
                    let Some(entry) = bucket.entry(&key).await? else { return Ok(None) };
                    let letter: serde_json::Value = serde_json::from_slice(&entry.value).unwrap_or_default();
                    if is_truncated(&letter) {
                        tracing::error!(key = %key, "a dead letter stored without its data cannot be retried; discard it");
                        return Ok(None);
                    }
                    Ok::<_, StoreError>(Some(entry.revision))
                }
                .boxed()
            })
            .collect();
        let revisions: Vec<Option<u64>> =
            futures_util::stream::iter(gets).buffered(IN_FLIGHT).try_collect().await?;
        let appends: Vec<(&SpoolAppend, String)> = requeues
            .iter()
            .zip(&revisions)
            .filter_map(|((id, append), revision)| {
                revision.map(|revision| (append, format!("dl.{}.{revision}", key(id))))
            })
            .collect();
        let mut appended = self.spool.append_with_ids(&appends).await?.into_iter();
        let mut requeued = Vec::with_capacity(requeues.len());
        let mut moved = Vec::new();
        for ((id, _), revision) in requeues.iter().zip(revisions) {
            let Some(revision) = revision else {
                requeued.push(None);
                continue;
            };
            match appended.next() {
                Some(Appended::Stored(sequence)) => {
                    moved.push((id.as_str(), revision));
                    requeued.push(Some(sequence));
                }
                // Another requeue of this revision appended it.
                Some(Appended::Duplicate(_)) => requeued.push(None),
                Some(Appended::TooLarge) | None => {
                    tracing::error!(id = %id, "a dead letter too large for the NATS spool stays a dead letter");
                    requeued.push(None);
                }
            }
        }
        let purges: Vec<_> = moved
            .iter()
            .map(|(id, revision)| {
                let key = key(id);
                async move { bucket.purge_at(&key, *revision).await }.boxed()
            })
            .collect();
        let purged: Vec<bool> = futures_util::stream::iter(purges).buffered(IN_FLIGHT).try_collect().await?;
        let mut bound = self.letters.bound();
        for ((id, _), purged) in moved.into_iter().zip(purged) {
            // One stored again since it was read stays, and stays counted.
            if purged {
                bound.remove(id);
            }
        }
        Ok(requeued)
    }
}

#[async_trait::async_trait]
impl PositionRecords for NatsKvStore {
    async fn positions(&self, subscription: &str) -> Result<Positions, StoreError> {
        Ok(self.positions.get(subscription).await?.unwrap_or_default())
    }

    async fn put_positions(&self, subscription: &str, positions: &Positions) -> Result<(), StoreError> {
        self.positions.put(subscription, positions).await
    }

    async fn delete_positions(&self, subscription: &str) -> Result<(), StoreError> {
        self.positions.delete(subscription).await.map(drop)
    }
}

#[async_trait::async_trait]
impl SessionRecords for NatsKvStore {
    async fn session(&self, source: &str) -> Result<Option<serde_json::Value>, StoreError> {
        self.sessions.get(source).await
    }

    async fn put_session(&self, source: &str, ticket: &serde_json::Value) -> Result<(), StoreError> {
        self.sessions.put(source, ticket).await
    }
}

#[async_trait::async_trait]
impl Spools for NatsKvStore {
    async fn spool_append(&self, appends: Arc<[SpoolAppend]>) -> Result<Vec<Option<u64>>, StoreError> {
        self.spool.append(&appends).await
    }

    fn refused_reason(&self, bytes: u64) -> String {
        let max_payload = self.spool.max_record().map_or(0, |max| max + super::nats_spool::PAYLOAD_MARGIN);
        format!(
            "too large for the NATS spool: {bytes} bytes, over the NATS server's max_payload ({max_payload} bytes, of which {} are kept for headers)",
            super::nats_spool::PAYLOAD_MARGIN
        )
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
    /// deliveries (with their delivery ids) rather than losing them. The positions only
    /// move forward: each channel keeps the greater position, written revision-checked.
    /// The trim is a purge below a sequence, which a later, lower one cannot undo.
    async fn spool_settle(&self, settlement: Settlement) -> Result<(), StoreError> {
        self.put_dead_letters(&settlement.dead_letters).await?;
        if let Some(positions) = &settlement.positions {
            self.positions.advance_positions(&settlement.subscription, positions).await?;
        }
        self.spool.trim(&settlement.subscription, settlement.through).await
    }

    async fn spool_summaries(&self) -> Result<BTreeMap<String, SpoolSummary>, StoreError> {
        self.spool.summaries().await
    }

    async fn spool_delete(&self, subscription: &str) -> Result<(), StoreError> {
        self.spool.delete(subscription).await
    }
}

#[async_trait::async_trait]
impl Store for NatsKvStore {
    fn unreadable_records(&self) -> u64 {
        self.subscriptions.unreadable.count()
    }
}
