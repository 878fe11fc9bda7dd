//! Durable state: subscriptions added through the API, replay positions, dead letters
//! (messages that could not be delivered, kept with the reason so that nothing is dropped
//! silently), and each subscription's spool (the messages received and not yet settled).
//!
//! Callers use the [`Store`] trait; [`EmbeddedStore`] is the default, one transactional
//! database file that needs no server; [`NatsKvStore`] keeps the records in NATS
//! JetStream key-value buckets and streams; [`MemoryStore`] keeps nothing across a
//! restart (for measuring what durability costs). The first release's one-file-per-record store is imported
//! by the embedded store on its first start.
//!
//! What every backend does the same way is written once here: the dead letters' order
//! (`letter_order.rs`), a spool read's bounds (`spool_read.rs`) and the skipping of
//! unreadable records (`unreadable.rs`).

mod batch;
mod bound;
mod disk;
mod embedded;
#[cfg(test)]
mod faulty;
mod letter_order;
mod memory;
mod nats_kv;
mod nats_spool;
mod spool_read;
mod unreadable;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use embedded::{EmbeddedStore, FILE_NAME};
pub use memory::MemoryStore;
pub use nats_kv::NatsKvStore;
pub use nats_spool::NatsSpool;

use crate::config::RawSubscription;

/// A delivery id as a record id: characters other than letters, digits, `-`, `_` and `.`
/// become `_`, and an id of dots only is prefixed, so ids are safe as file names and URL
/// path segments.
pub fn record_id(id: &str) -> String {
    let safe: String =
        id.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    if safe.chars().all(|c| c == '.') { format!("_{safe}") } else { safe }
}

/// A message that could not be delivered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeadLetter {
    /// Unique id of this dead letter.
    pub id: String,
    /// The subscription it was for.
    pub subscription: String,
    /// The source it came from.
    pub source: String,
    /// The CometD session it arrived on.
    pub session: String,
    /// Its arrival order in the source.
    pub sequence: u64,
    /// Its replay id, on a source with replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_id: Option<i64>,
    /// The delivery as the sink would have received it (`source`, `subscription`,
    /// `channel`, `id`, `data`, `ext`).
    #[schema(value_type = Object)]
    pub message: serde_json::Value,
    /// Why it was not delivered.
    pub reason: String,
    /// Delivery attempts made.
    pub attempts: u32,
    /// When it was stored, RFC 3339.
    pub failed_at: String,
    /// The message exactly as its spool held it (the JSON text of the spooled record), so
    /// that a retry requeues the bytes of the first attempt rather than a rebuild of
    /// `message`. Kept by the store, not shown by the API; absent on dead letters stored
    /// before it was kept (their retry rebuilds the message from `message`).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "raw_record")]
    #[schema(ignore)]
    pub record: Option<String>,
}

impl DeadLetter {
    /// The size it counts against `state.dead_letters_max_bytes`: its stored form.
    pub fn stored_size(&self) -> u64 {
        serde_json::to_vec(self).map_or(0, |bytes| bytes.len() as u64)
    }
}

/// A dead letter's spooled record written into the dead letter's JSON as the JSON it is
/// (not as an escaped string), and read back as its exact text.
mod raw_record {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::value::RawValue;

    // serde's `with` hands the field by reference.
    #[allow(clippy::ref_option)]
    pub fn serialize<S: Serializer>(record: &Option<String>, serializer: S) -> Result<S::Ok, S::Error> {
        match record.as_deref().map(|text| (text, serde_json::from_str::<&RawValue>(text))) {
            Some((_, Ok(raw))) => raw.serialize(serializer),
            // Not JSON (never written by the bridge): kept as a string, which a retry
            // cannot read as a record and rebuilds from `message` (logged).
            Some((text, Err(_))) => serializer.serialize_str(text),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
        Ok(Option::<Box<RawValue>>::deserialize(deserializer)?.map(|raw| String::from(Box::<str>::from(raw))))
    }
}

/// Which dead letters a bulk retry or discard takes; every field given must match.
#[derive(Clone, Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterFilter {
    /// Only the dead letters of this subscription (its id, exactly).
    #[serde(default)]
    pub subscription: Option<String>,
    /// Only those whose reason contains this text (case-sensitive substring).
    #[serde(default)]
    pub reason: Option<String>,
    /// Only those stored before this instant (RFC 3339, e.g. `2026-01-01T00:00:00Z` or
    /// with an offset).
    #[serde(default)]
    #[schema(format = DateTime)]
    pub before: Option<String>,
}

/// A failure of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store's files could not be read or written.
    #[error("state store {path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The NATS key-value bucket could not be reached, read or written.
    #[error("state store (NATS KV bucket {bucket}): {message}")]
    Nats {
        /// The bucket.
        bucket: String,
        /// What failed.
        message: String,
    },
    /// Another process has the embedded database open.
    #[error(
        "state store {path} is in use by another process: two bridges on one state directory would forward everything twice; stop the other one or give this one its own state.path"
    )]
    Locked {
        /// The database file.
        path: String,
    },
    /// The embedded database failed.
    #[error("state store {path}: {message}")]
    Database {
        /// The database file.
        path: String,
        /// What failed.
        message: String,
    },
    /// The embedded database failed on an I/O error and is being reopened; until it is,
    /// every call fails at once with this error.
    #[error("state store {path} is failing and is being reopened: {reason}")]
    Unavailable {
        /// The database file.
        path: String,
        /// The failure that broke it (and the last reopen's, when that failed too).
        reason: String,
    },
    /// The filesystem holding the state has less free space than `state.min_free_bytes`:
    /// the store takes no more messages until there is room (nothing is broken).
    #[error(
        "state store {path}: only {} free on its filesystem, under state.min_free_bytes ({}): no more messages are spooled until there is room",
        disk::human(*free),
        disk::human(*min)
    )]
    Full {
        /// The database file.
        path: String,
        /// Free bytes on its filesystem.
        free: u64,
        /// `state.min_free_bytes`.
        min: u64,
    },
    /// A stored record could not be read back.
    #[error("state store {path}: corrupt record: {message}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// A change to the stored subscriptions, seen by [`SubscriptionRecords::watch_subscriptions`].
#[derive(Clone, Debug)]
pub enum SubscriptionChange {
    /// A subscription stored (added through an API).
    Stored(Box<RawSubscription>),
    /// The subscription of this id removed.
    Removed(String),
}

/// The changes [`SubscriptionRecords::watch_subscriptions`] yields, until the watch breaks.
pub type SubscriptionChanges =
    futures_util::stream::BoxStream<'static, Result<SubscriptionChange, StoreError>>;

/// The subscriptions added at runtime (through the API), which survive restarts.
#[async_trait]
pub trait SubscriptionRecords: Send + Sync {
    /// The subscriptions added through the API.
    async fn subscriptions(&self) -> Result<Vec<RawSubscription>, StoreError>;
    /// Stores (or replaces) a subscription.
    async fn put_subscription(&self, subscription: &RawSubscription) -> Result<(), StoreError>;
    /// Removes a subscription; `false` when there was none.
    async fn delete_subscription(&self, id: &str) -> Result<bool, StoreError>;
    /// The changes to the stored subscriptions from now on, made by this process or by
    /// another sharing the store (a replica's API), so that the owner of a source follows
    /// them; `None` for a store no other process shares. The stream ends or fails when
    /// the store cannot be watched any more (an outage): what changed meanwhile must be
    /// read again.
    async fn watch_subscriptions(&self) -> Result<Option<SubscriptionChanges>, StoreError> {
        Ok(None)
    }
}

/// Dead letters: messages a sink refused for good or that ran out of retries, kept
/// (bounded) for an operator to retry or discard.
#[async_trait]
pub trait DeadLetterRecords: Send + Sync {
    /// Stores a dead letter.
    async fn add_dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError>;
    /// Every dead letter, oldest first.
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError>;
    /// Up to `limit` dead letters in id order, after the id `after` (exclusive); the
    /// second value says whether more follow.
    async fn dead_letters_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, bool), StoreError>;
    /// One dead letter.
    async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, StoreError>;
    /// Removes a dead letter; `false` when there was none.
    async fn delete_dead_letter(&self, id: &str) -> Result<bool, StoreError>;
    /// Removes a dead letter and appends it to its subscription's spool, both or neither;
    /// `None` when the dead letter was not there (already retried or discarded).
    async fn requeue_dead_letter(&self, id: &str, append: SpoolAppend) -> Result<Option<u64>, StoreError> {
        Ok(self.requeue_dead_letters(vec![(id.to_string(), append)]).await?.pop().flatten())
    }
    /// [`requeue_dead_letter`](DeadLetterRecords::requeue_dead_letter) for many at once, in one
    /// transaction where the store has them: each one's spool sequence, or `None` for one
    /// that was not there. Of two concurrent requeues of one dead letter, one gets `None`.
    async fn requeue_dead_letters(
        &self,
        requeues: Vec<(String, SpoolAppend)>,
    ) -> Result<Vec<Option<u64>>, StoreError>;
    /// Removes these dead letters (in one transaction where the store has them); how many
    /// were there.
    async fn delete_dead_letters(&self, ids: Vec<String>) -> Result<u64, StoreError>;
    /// Bounds the dead letters to `max_bytes` of stored size: from then on, storing one
    /// beyond it evicts the oldest (in the same transaction where the store has them),
    /// logs their ids and counts them in [`dead_letters_evicted`](DeadLetterRecords::dead_letters_evicted).
    fn limit_dead_letters(&self, max_bytes: u64);
    /// Dead letters evicted since the store opened, for
    /// `cometd_bridge_dead_letters_evicted_total`.
    fn dead_letters_evicted(&self) -> u64;
}

/// Committed replay positions, per subscription and channel.
#[async_trait]
pub trait PositionRecords: Send + Sync {
    /// A subscription's committed replay positions, by channel.
    async fn positions(&self, subscription: &str) -> Result<Positions, StoreError>;
    /// Replaces a subscription's committed replay positions.
    async fn put_positions(&self, subscription: &str, positions: &Positions) -> Result<(), StoreError>;
    /// Forgets a subscription's positions.
    async fn delete_positions(&self, subscription: &str) -> Result<(), StoreError>;
}

/// The CometD sessions replicas hand to each other (nothing where the store is not
/// shared among replicas).
#[async_trait]
pub trait SessionRecords: Send + Sync {
    /// The CometD session a source's last owner left for the next one (its session
    /// ticket), where the store is shared among replicas; `None` elsewhere.
    async fn session(&self, source: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let _ = source;
        Ok(None)
    }
    /// Keeps a source's session ticket for the replica that owns the source next (nothing
    /// where the store is not shared among replicas).
    async fn put_session(&self, source: &str, ticket: &serde_json::Value) -> Result<(), StoreError> {
        let _ = (source, ticket);
        Ok(())
    }
}

/// Per-subscription spools: what was received and not yet delivered, in order, with the
/// settlement of a delivered batch (trim, dead letters, positions) as one change.
#[async_trait]
pub trait Spools: Send + Sync {
    /// Appends messages to their subscriptions' spools, durably; returns each one's spool
    /// sequence, in order, or `None` for one this store cannot hold (too large; the caller
    /// dead-letters it, with [`refused_reason`](Spools::refused_reason)). Sequences of a spool are consecutive and never repeat. On an error, any
    /// of them may have been appended (the embedded store appends all or none).
    async fn spool_append(&self, appends: Arc<[SpoolAppend]>) -> Result<Vec<Option<u64>>, StoreError>;
    /// Up to `max` messages of a spool, from sequence `from` on, in order, stopping once
    /// they reach [`SPOOL_READ_BYTES`] (at least one is read however large).
    async fn spool_read(
        &self,
        subscription: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<SpoolEntry>, StoreError>;
    /// Settles a delivered batch at once: trims the spool through a sequence, stores the
    /// batch's dead letters and the new committed positions. A store may make it durable
    /// only with its next write or [`sync`](Store::sync), as long as a crash undoes it whole
    /// and it is durable within about a second even when nothing else is written.
    async fn spool_settle(&self, settlement: Settlement) -> Result<(), StoreError>;
    /// Why [`spool_append`](Spools::spool_append) gave no sequence to a record of `bytes`
    /// bytes: the reason of the dead letter it becomes.
    fn refused_reason(&self, bytes: u64) -> String {
        format!("too large for the state store's spool ({bytes} bytes)")
    }
    /// How long a source may hold a small batch to join the next one into one append, while
    /// messages keep coming: worth it where each append costs a sync (group commit).
    fn append_window(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
    /// What each non-empty spool holds, to resume after a start.
    async fn spool_summaries(&self) -> Result<BTreeMap<String, SpoolSummary>, StoreError>;
    /// Drops a spool (its subscription was removed).
    async fn spool_delete(&self, subscription: &str) -> Result<(), StoreError>;
}

/// Where the bridge keeps what must survive a restart, one trait a concern (the
/// subscriptions, dead letters, replay positions, handed-over sessions and spools); this
/// one adds the store's health and durability. Every write is durable when it returns: a
/// crash (even `kill -9`) right after leaves it readable and present. The logic every
/// backend shares (dead-letter order and paging, the spool's read cap, skipping
/// unreadable records) lives above the backends, in this module's other files.
#[async_trait]
pub trait Store:
    SubscriptionRecords + DeadLetterRecords + PositionRecords + SessionRecords + Spools + 'static
{
    /// Records skipped since the store opened because they could not be read (each is
    /// logged); for `cometd_bridge_state_errors_total`.
    fn unreadable_records(&self) -> u64 {
        0
    }
    /// Why the store is failing, while it is (it heals by itself: see
    /// [`EmbeddedStore`]); `None` when it works. For `/readyz` and
    /// `cometd_bridge_store_healthy`.
    fn unhealthy(&self) -> Option<String> {
        None
    }
    /// Makes every settlement so far durable (at shutdown).
    async fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Logs dead letters evicted to stay within `state.dead_letters_max_bytes`.
fn log_evicted(evicted: &[String], max_bytes: u64) {
    for id in evicted {
        tracing::warn!(id = %id, max_bytes, "dead letter evicted: the dead letters are over state.dead_letters_max_bytes");
    }
}

/// The default bound on dead letters, until [`DeadLetterRecords::limit_dead_letters`] sets one.
pub const DEAD_LETTERS_MAX_BYTES: u64 = 256 << 20;

/// How many bytes of messages one spool read returns at most (beyond its first message):
/// a forwarder that fell behind reads its backlog in parts of bounded memory, whatever
/// the messages' size.
pub const SPOOL_READ_BYTES: usize = 8 << 20;

/// A message to append to a spool.
#[derive(Clone, Debug)]
pub struct SpoolAppend {
    /// The subscription whose spool it joins.
    pub subscription: Arc<str>,
    /// The spooled message, serialized.
    pub record: Vec<u8>,
}

/// A message read from a spool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolEntry {
    /// Its place in the spool.
    pub sequence: u64,
    /// The spooled message, serialized.
    pub record: Vec<u8>,
}

/// The outcome of a delivered batch, committed at once.
#[derive(Clone, Debug)]
pub struct Settlement {
    /// The subscription.
    pub subscription: String,
    /// The spool is trimmed through this sequence.
    pub through: u64,
    /// The committed replay positions after the batch, when they moved.
    pub positions: Option<Positions>,
    /// The batch's messages that will not be delivered.
    pub dead_letters: Vec<DeadLetter>,
}

/// What a spool holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpoolSummary {
    /// Its first sequence.
    pub first: u64,
    /// Its last sequence.
    pub last: u64,
    /// Messages in it.
    pub messages: u64,
    /// Their size.
    pub bytes: u64,
}

/// Committed replay positions by channel: the replay id below which (and at which)
/// everything was delivered or dead-lettered; `-1`/`-2` for a reset to new/all.
pub type Positions = std::collections::BTreeMap<String, i64>;

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(record: Option<&str>) -> DeadLetter {
        DeadLetter {
            id: "demo.orders.s.1".into(),
            subscription: "orders".into(),
            source: "demo".into(),
            session: "s".into(),
            sequence: 1,
            replay_id: None,
            message: serde_json::json!({"channel": "/orders"}),
            reason: "rejected: HTTP 400".into(),
            attempts: 1,
            failed_at: "2026-01-01T00:00:00.000Z".into(),
            record: record.map(str::to_string),
        }
    }

    #[test]
    fn a_record_is_stored_as_json_and_read_back_as_its_exact_text() {
        let record = r#"{"message":{"data":{"n":12345678901234567890123, "b":1,"a":2}}}"#;
        let stored = serde_json::to_string(&letter(Some(record))).expect("serializes");
        assert!(stored.contains(&format!(r#""record":{record}"#)), "not escaped: {stored}");
        let back: DeadLetter = serde_json::from_str(&stored).expect("reads back");
        assert_eq!(back.record.as_deref(), Some(record));
        assert_eq!(back.stored_size(), stored.len() as u64);
        // Without a record (stored before records were kept), or with one that is not JSON.
        let without: DeadLetter =
            serde_json::from_str(&serde_json::to_string(&letter(None)).expect("serializes")).expect("reads");
        assert_eq!(without.record, None);
        let odd = serde_json::to_string(&letter(Some("not json"))).expect("serializes all the same");
        assert!(serde_json::from_str::<DeadLetter>(&odd).is_ok());
    }
}
