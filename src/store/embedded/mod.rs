//! The embedded store: one redb database file, `state.redb` under `state.path`, holding
//! subscriptions, replay positions, dead letters and the subscriptions' spools. Every
//! write is one transaction made durable (fsynced) before it returns, so a crash at any
//! moment, `kill -9` included, leaves each write whole or absent; a delivered batch's
//! spool trim, its position and its dead letters commit together. Settlements are the
//! one exception: committed without a sync (a crash undoes one whole, and its batch is
//! delivered again), they are durable with the next synced write, or within about a
//! second when none comes (the keeper thread syncs them). One write transaction runs at a
//! time (redb's writer lock).
//!
//! After an I/O error (a full disk, a failed write) the database is closed and reopened
//! in the background, with backoff, without a restart; meanwhile every call fails at once
//! with [`StoreError::Unavailable`] and [`Store::unhealthy`] says why. Below
//! `state.min_free_bytes` free on the filesystem, spool appends are refused with
//! [`StoreError::Full`].
//!
//! redb locks its file, so a second daemon on the same state directory fails to open it
//! instead of forwarding everything twice. A state directory written by the first
//! release's file store (`subscriptions/`, `dead-letters/`, `positions/`) is imported on
//! the first start and moved aside to `migrated-file-store/`.
//!
//! Here: the handle, its tables and its transactions. Beside it: `spool.rs` (the spools),
//! `dead_letters.rs` (dead letters and their index), `keeper.rs` (the keeper thread: reopening
//! and syncing) and `migrate.rs` (older layouts imported on open).

mod dead_letters;
mod keeper;
mod migrate;
mod spool;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use async_trait::async_trait;
use redb::{Durability, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::disk::FreeSpace;
use super::unreadable::Unreadable;
use super::{DeadLetter, Positions, Settlement, SpoolAppend, SpoolEntry, SpoolSummary, Store, StoreError};
use crate::config::RawSubscription;
use crate::store::{DeadLetterRecords, PositionRecords, SessionRecords, Spools, SubscriptionRecords};
use keeper::{KEEPER_TICK, Keeper, Shared};

const SUBSCRIPTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("subscriptions");
const DEAD_LETTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("dead_letters");
const POSITIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("positions");
/// The dead letters' ids by age (the order they were stored in): ids are delivery ids,
/// whose order is not their age.
const DEAD_LETTER_AGES: TableDefinition<u64, &str> = TableDefinition::new("dead_letter_ages");
/// Each dead letter's age and stored size, by id.
const DEAD_LETTER_SIZES: TableDefinition<&str, (u64, u64)> = TableDefinition::new("dead_letter_sizes");
/// [`BYTES`] (the dead letters' total size) and [`NEXT_AGE`]: with the two tables above,
/// a dead letter is stored and the oldest evicted without reading the others.
const DEAD_LETTER_TOTALS: TableDefinition<&str, u64> = TableDefinition::new("dead_letter_totals");
const BYTES: &str = "bytes";
const NEXT_AGE: &str = "next_age";
/// Spooled messages, one record per appended batch, by (subscription, the batch's first
/// sequence): a range scan per subscription reads its spool in order. One record per
/// batch rather than per message makes an append one B-tree insert (see [`batch`]).
const SPOOL: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("spool_batches");
/// The first release candidate's spool, one record per message: imported on open.
const SPOOL_PER_MESSAGE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("spool");
/// Each spool's next sequence: sequences never repeat, even after a spool emptied.
const SPOOL_NEXT: TableDefinition<&str, u64> = TableDefinition::new("spool_next");
/// Each spool's last settled sequence, so that a batch settled in part resumes after it.
const SPOOL_SETTLED: TableDefinition<&str, u64> = TableDefinition::new("spool_settled");

/// The database's file name under `state.path`.
pub const FILE_NAME: &str = "state.redb";

/// State in one embedded transactional database.
///
/// It heals: an I/O error (a full disk, a failed write) makes redb fail every later call
/// until the database is closed and opened again, so on such an error the store drops its
/// database and a keeper thread reopens it, with backoff (100 ms doubling to 5 s,
/// jittered), while every call fails at once with
/// [`StoreError::Unavailable`]. redb refuses a second open of the file while any handle
/// of the first is alive, so the database sits in one slot that each call clones for its
/// duration only; the reopen succeeds once the calls in flight on the failed one are done.
/// The same thread makes settlements durable within about a second on a quiet source.
#[derive(Clone)]
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    /// Dropped with the last handle: stops the keeper and closes the database.
    _keeper: Arc<Keeper>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("EmbeddedStore").field("path", &self.shared.path).finish()
    }
}

impl EmbeddedStore {
    /// Opens (creating if needed) the database in `dir`, importing a first-release file
    /// store found there, with no free-space guard (see [`open_with`](Self::open_with)).
    ///
    /// # Errors
    /// As [`open_with`](Self::open_with).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, 0)
    }

    /// Opens (creating if needed) the database in `dir`, importing a first-release file
    /// store found there. Spool appends are refused with [`StoreError::Full`] while the
    /// filesystem holding `dir` has less than `min_free_bytes` free (0: never).
    ///
    /// # Errors
    /// [`StoreError::Locked`] when another process has it open, [`StoreError::Io`] when the
    /// directory or the file cannot be created or read, [`StoreError::Corrupt`] when the
    /// file is not a database.
    pub fn open_with(dir: &Path, min_free_bytes: u64) -> Result<Self, StoreError> {
        Self::start(dir, min_free_bytes, |_| {})
    }

    /// [`open`](Self::open) on a file that fails every write and sync with `ENOSPC` while
    /// `full` is set, as a full disk does (for tests of the healing).
    #[cfg(test)]
    pub(crate) fn open_failing(dir: &Path, full: Arc<AtomicBool>) -> Result<Self, StoreError> {
        Self::start(dir, 0, |shared| shared.fail_writes = Some(full))
    }

    fn start(
        dir: &Path,
        min_free_bytes: u64,
        configure: impl FnOnce(&mut Shared),
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| StoreError::Io { path: dir.display().to_string(), source })?;
        let file = dir.join(FILE_NAME);
        let mut shared = Shared {
            path: file.display().to_string().into(),
            file,
            db: RwLock::new(None),
            failure: Mutex::new(None),
            unreadable: Unreadable::default(),
            max_letter_bytes: AtomicU64::new(super::DEAD_LETTERS_MAX_BYTES),
            evicted: AtomicU64::new(0),
            unsynced_since: AtomicU64::new(0),
            epoch: Instant::now(),
            free: FreeSpace::new(dir.to_path_buf(), min_free_bytes),
            #[cfg(test)]
            fail_writes: None,
        };
        configure(&mut shared);
        let db = shared.open_database().map_err(|error| match error {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked { path: shared.path.to_string() },
            redb::DatabaseError::Storage(redb::StorageError::Io(source)) => {
                StoreError::Io { path: shared.path.to_string(), source }
            }
            other => StoreError::Corrupt { path: shared.path.to_string(), message: other.to_string() },
        })?;
        *shared.slot_mut() = Some(Arc::new(db));
        let shared = Arc::new(shared);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("store-keeper".into())
            .spawn({
                let (shared, stop) = (shared.clone(), stop.clone());
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::park_timeout(KEEPER_TICK);
                        if !stop.load(Ordering::Relaxed) {
                            shared.tend();
                        }
                    }
                }
            })
            .map_err(|source| StoreError::Io { path: shared.path.to_string(), source })?;
        let keeper = Keeper { shared: shared.clone(), stop, thread: Some(thread) };
        let store = EmbeddedStore { shared, _keeper: Arc::new(keeper) };
        store.write(|txn| {
            // Created up front, so that reads never meet a missing table.
            txn.open_table(SUBSCRIPTIONS)?;
            txn.open_table(DEAD_LETTERS)?;
            txn.open_table(POSITIONS)?;
            txn.open_table(SPOOL)?;
            txn.open_table(SPOOL_NEXT)?;
            txn.open_table(SPOOL_SETTLED)?;
            txn.open_table(DEAD_LETTER_AGES)?;
            txn.open_table(DEAD_LETTER_SIZES)?;
            txn.open_table(DEAD_LETTER_TOTALS)?;
            Ok(())
        })?;
        store.migrate_file_store(dir)?;
        store.migrate_per_message_spool()?;
        store.index_dead_letters()?;
        Ok(store)
    }

    /// Runs `work` in one write transaction and commits it durably.
    fn write<T>(
        &self,
        work: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        self.write_with(Durability::Immediate, work)
    }

    /// Runs `work` in one write transaction committed with `durability`. A commit without
    /// durability is atomic and ordered like any other, and becomes durable with the next
    /// durable one (the keeper makes one within about a second); a crash before that
    /// undoes it whole.
    fn write_with<T>(
        &self,
        durability: Durability,
        work: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        self.shared.write_with(durability, work)
    }

    fn read<T>(
        &self,
        work: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let db = self.shared.database()?;
        let txn = db.begin_read().map_err(|error| self.shared.failed(&db, error.into()))?;
        work(&txn).map_err(|error| self.shared.failed(&db, error))
    }

    /// Runs blocking database work off the async runtime.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(EmbeddedStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || work(store)).await.map_err(|error| StoreError::Database {
            path: self.shared.path.to_string(),
            message: error.to_string(),
        })?
    }

    fn corrupt(&self, table: &str, key: &str, error: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt {
            path: format!("{} ({table} {key:?})", self.shared.path),
            message: error.to_string(),
        }
    }

    async fn put<T: Serialize>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        id: &str,
        record: &T,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).expect("records serialize");
        let id = id.to_string();
        self.blocking(move |store| {
            store.write(|txn| {
                txn.open_table(table)?.insert(id.as_str(), bytes.as_slice())?;
                Ok(())
            })
        })
        .await
    }

    async fn get<T: DeserializeOwned + Send + 'static>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        id: &str,
    ) -> Result<Option<T>, StoreError> {
        let id = id.to_string();
        self.blocking(move |store| {
            let bytes =
                store.read(|txn| Ok(txn.open_table(table)?.get(id.as_str())?.map(|v| v.value().to_vec())))?;
            bytes
                .map(|bytes| {
                    serde_json::from_slice(&bytes).map_err(|error| store.corrupt(table.name(), &id, error))
                })
                .transpose()
        })
        .await
    }

    /// Every record of `table` that parses; one that does not is reported and skipped,
    /// so that it breaks no listing and no start.
    async fn all<T: DeserializeOwned + Send + 'static>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
    ) -> Result<Vec<T>, StoreError> {
        self.blocking(move |store| {
            let raw: Vec<(String, Vec<u8>)> = store.read(|txn| {
                let table = txn.open_table(table)?;
                let mut records = Vec::new();
                for entry in table.iter()? {
                    let (key, value) = entry?;
                    records.push((key.value().to_string(), value.value().to_vec()));
                }
                Ok(records)
            })?;
            Ok(store.readable(table.name(), raw))
        })
        .await
    }

    /// The records of `table` that parse; one that does not is reported, counted and
    /// skipped, so that it breaks no listing and no start.
    fn readable<T: DeserializeOwned>(
        &self,
        table: &str,
        raw: impl IntoIterator<Item = (String, Vec<u8>)>,
    ) -> Vec<T> {
        raw.into_iter()
            .filter_map(|(key, bytes)| {
                let read = serde_json::from_slice(&bytes).map_err(|error| self.corrupt(table, &key, error));
                self.shared.unreadable.keep(read)
            })
            .collect()
    }

    async fn remove(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        id: &str,
    ) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.blocking(move |store| {
            store.write(|txn| Ok(txn.open_table(table)?.remove(id.as_str())?.is_some()))
        })
        .await
    }
}

#[async_trait]
impl SubscriptionRecords for EmbeddedStore {
    async fn subscriptions(&self) -> Result<Vec<RawSubscription>, StoreError> {
        self.all(SUBSCRIPTIONS).await
    }

    async fn put_subscription(&self, subscription: &RawSubscription) -> Result<(), StoreError> {
        self.put(SUBSCRIPTIONS, &subscription.id, subscription).await
    }

    async fn delete_subscription(&self, id: &str) -> Result<bool, StoreError> {
        self.remove(SUBSCRIPTIONS, id).await
    }
}

#[async_trait]
impl DeadLetterRecords for EmbeddedStore {
    async fn add_dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(letter).expect("records serialize");
        self.put_dead_letters(vec![(letter.id.clone(), bytes)]).await
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        self.letters_oldest_first().await
    }

    async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        self.get(DEAD_LETTERS, id).await
    }

    async fn dead_letters_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, bool), StoreError> {
        self.letters_page(after, limit).await
    }

    async fn delete_dead_letter(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.delete_dead_letters(vec![id.to_string()]).await? == 1)
    }

    async fn delete_dead_letters(&self, ids: Vec<String>) -> Result<u64, StoreError> {
        self.delete_letters(ids).await
    }

    fn limit_dead_letters(&self, max_bytes: u64) {
        self.shared.max_letter_bytes.store(max_bytes, Ordering::Relaxed);
    }

    fn dead_letters_evicted(&self) -> u64 {
        self.shared.evicted.load(Ordering::Relaxed)
    }

    async fn requeue_dead_letters(
        &self,
        requeues: Vec<(String, SpoolAppend)>,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        self.requeue_letters(requeues).await
    }
}

#[async_trait]
impl PositionRecords for EmbeddedStore {
    async fn positions(&self, subscription: &str) -> Result<Positions, StoreError> {
        Ok(self.get(POSITIONS, subscription).await?.unwrap_or_default())
    }

    async fn put_positions(&self, subscription: &str, positions: &Positions) -> Result<(), StoreError> {
        self.put(POSITIONS, subscription, positions).await
    }

    async fn delete_positions(&self, subscription: &str) -> Result<(), StoreError> {
        self.remove(POSITIONS, subscription).await.map(drop)
    }
}

#[async_trait]
impl Spools for EmbeddedStore {
    async fn spool_append(&self, appends: Arc<[SpoolAppend]>) -> Result<Vec<Option<u64>>, StoreError> {
        self.append_batches(appends).await
    }

    async fn spool_read(
        &self,
        subscription: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<SpoolEntry>, StoreError> {
        self.read_batches(subscription, from, max).await
    }

    async fn spool_settle(&self, settlement: Settlement) -> Result<(), StoreError> {
        self.settle_batch(settlement).await
    }

    /// Each append is a synced commit, which costs redb a few hundred microseconds of CPU
    /// whatever it holds: at most one every 2 ms while messages keep coming puts tens of
    /// messages in each at high rates, for at most 2 ms of delay (a message after a quiet
    /// spell is appended at once). 1 ms left commits as frequent as the sync allows on a
    /// busy machine; 3 ms saved little more (bench/HISTORY.md).
    fn append_window(&self) -> std::time::Duration {
        std::time::Duration::from_millis(2)
    }

    async fn spool_summaries(&self) -> Result<BTreeMap<String, SpoolSummary>, StoreError> {
        self.summarize_spools().await
    }

    async fn spool_delete(&self, subscription: &str) -> Result<(), StoreError> {
        self.delete_spool(subscription).await
    }
}

impl SessionRecords for EmbeddedStore {}

#[async_trait]
impl Store for EmbeddedStore {
    fn unreadable_records(&self) -> u64 {
        self.shared.unreadable.count()
    }

    fn unhealthy(&self) -> Option<String> {
        self.shared.unhealthy()
    }

    async fn sync(&self) -> Result<(), StoreError> {
        self.blocking(move |store| store.write(|_| Ok(()))).await
    }
}

/// A spool append of `text` (for the tests).
#[cfg(test)]
fn append(subscription: &str, text: &str) -> SpoolAppend {
    SpoolAppend { subscription: subscription.into(), record: text.as_bytes().to_vec() }
}
