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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockWriteGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::backends::FileBackend;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::disk::FreeSpace;
#[cfg(test)]
use super::faulty;
use super::{
    DeadLetter, Positions, SPOOL_READ_BYTES, Settlement, SpoolAppend, SpoolEntry, SpoolSummary, Store,
    StoreError, batch,
};
use crate::config::RawSubscription;

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
/// The free space a reopened store needs to count as working again.
const REOPEN_HEADROOM: u64 = 1 << 20;

/// A write made after each reopen, to know the store takes writes again.
const STORE_PROBE: TableDefinition<&str, u64> = TableDefinition::new("store_probe");
/// Each spool's last settled sequence, so that a batch settled in part resumes after it.
const SPOOL_SETTLED: TableDefinition<&str, u64> = TableDefinition::new("spool_settled");

/// The database's page cache (redb's default is 1 GiB).
const CACHE_BYTES: usize = 16 << 20;

/// The database's file name under `state.path`.
pub const FILE_NAME: &str = "state.redb";

/// How often the keeper thread looks at the store (reopen due, settlements to sync).
const KEEPER_TICK: Duration = Duration::from_millis(100);
/// A settlement committed without a sync is synced by the keeper once it is this old and
/// nothing synced it meanwhile: with [`KEEPER_TICK`], durable within about 0.6 s.
const SYNC_AFTER: Duration = Duration::from_millis(500);
/// The first wait before reopening a failed database; it doubles on each failed reopen.
const REOPEN_FIRST: Duration = Duration::from_millis(100);
/// The longest wait between two reopens.
const REOPEN_MAX: Duration = Duration::from_secs(5);

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

/// What the handles and the keeper thread share.
struct Shared {
    /// The database file.
    file: PathBuf,
    /// The same, for messages.
    path: Arc<str>,
    /// The open database; `None` from an I/O error until it is reopened.
    db: RwLock<Option<Arc<Database>>>,
    /// Why the database is not open, while it is not.
    failure: Mutex<Option<Failure>>,
    /// Records skipped because they could not be read.
    unreadable: AtomicU64,
    /// `state.dead_letters_max_bytes`.
    max_letter_bytes: AtomicU64,
    /// Dead letters evicted since the store opened.
    evicted: AtomicU64,
    /// When the oldest settlement not yet synced was committed, in milliseconds after
    /// `epoch` (at least 1); 0 when everything committed is durable.
    unsynced_since: AtomicU64,
    epoch: Instant,
    /// `state.min_free_bytes`.
    free: FreeSpace,
    /// Makes the file fail to write with `ENOSPC` while set (tests only).
    #[cfg(test)]
    fail_writes: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// A failed database waiting to be reopened.
struct Failure {
    /// The error that broke it.
    reason: String,
    /// Why the last reopen failed, when one did.
    reopen_error: Option<String>,
    /// Reopens tried so far.
    attempts: u32,
    /// When the next reopen is due.
    next_attempt: Instant,
}

/// The keeper thread, stopped and joined when the last handle goes.
struct Keeper {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
        // The last handle is gone and so is the keeper: close the file now, so that it can
        // be opened again at once.
        drop(self.shared.slot_mut().take());
    }
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
            unreadable: AtomicU64::new(0),
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
            .filter_map(|(key, bytes)| match serde_json::from_slice(&bytes) {
                Ok(record) => Some(record),
                Err(error) => {
                    let error = self.corrupt(table, &key, error);
                    tracing::error!(error = %error, "skipping an unreadable record");
                    self.shared.unreadable.fetch_add(1, Ordering::Relaxed);
                    None
                }
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

    /// Indexes the dead letters by age with their sizes when the database has no index yet
    /// (written before dead letters were bounded, or just imported), oldest first by
    /// `failed_at`.
    fn index_dead_letters(&self) -> Result<(), StoreError> {
        #[derive(serde::Deserialize)]
        struct Age {
            #[serde(default)]
            failed_at: String,
            #[serde(default)]
            sequence: u64,
        }
        let indexed = self.read(|txn| Ok(txn.open_table(DEAD_LETTER_TOTALS)?.get(NEXT_AGE)?.is_some()))?;
        if indexed {
            return Ok(());
        }
        let count = self.write(|txn| {
            let mut letters: Vec<(String, u64, Age)> = Vec::new();
            for entry in txn.open_table(DEAD_LETTERS)?.iter()? {
                let (key, value) = entry?;
                let age = serde_json::from_slice(value.value())
                    .unwrap_or(Age { failed_at: String::new(), sequence: 0 });
                letters.push((key.value().to_string(), value.value().len() as u64, age));
            }
            letters.sort_by(|a, b| {
                (&a.2.failed_at, a.2.sequence, &a.0).cmp(&(&b.2.failed_at, b.2.sequence, &b.0))
            });
            let mut ages = txn.open_table(DEAD_LETTER_AGES)?;
            let mut sizes = txn.open_table(DEAD_LETTER_SIZES)?;
            ages.retain(|_, _| false)?;
            sizes.retain(|_, _| false)?;
            let mut total = 0;
            for (age, (id, size, _)) in (0u64..).zip(&letters) {
                ages.insert(age, id.as_str())?;
                sizes.insert(id.as_str(), (age, *size))?;
                total += size;
            }
            let mut totals = txn.open_table(DEAD_LETTER_TOTALS)?;
            totals.insert(BYTES, total)?;
            totals.insert(NEXT_AGE, letters.len() as u64)?;
            Ok(letters.len())
        })?;
        if count > 0 {
            tracing::info!(dead_letters = count, "indexed the dead letters by age and size");
        }
        Ok(())
    }

    /// Logs and counts evicted dead letters, once their transaction committed.
    fn evicted(&self, evicted: &[String]) {
        self.shared.evicted.fetch_add(evicted.len() as u64, Ordering::Relaxed);
        super::log_evicted(evicted, self.shared.max_letter_bytes.load(Ordering::Relaxed));
    }

    /// Stores dead letters (`(id, stored form)`) in one synced transaction; what they
    /// evicted is logged and counted.
    async fn put_dead_letters(&self, letters: Vec<(String, Vec<u8>)>) -> Result<(), StoreError> {
        let max = self.shared.max_letter_bytes.load(Ordering::Relaxed);
        let evicted = self
            .blocking(move |store| {
                store.write(|txn| {
                    let mut tables = LetterTables::open(txn)?;
                    let mut evicted = Vec::new();
                    for (id, bytes) in &letters {
                        evicted.extend(tables.insert(id, bytes, max)?);
                    }
                    tables.finish()?;
                    Ok(evicted)
                })
            })
            .await?;
        self.evicted(&evicted);
        Ok(())
    }

    /// Moves a spool written one record per message (before spools were kept by batch)
    /// into batches of one, in one transaction, and drops the old table.
    fn migrate_per_message_spool(&self) -> Result<(), StoreError> {
        let present = self.read(|txn| match txn.open_table(SPOOL_PER_MESSAGE) {
            Ok(table) => Ok(table.first()?.is_some()),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
            Err(error) => Err(error.into()),
        })?;
        if !present {
            return Ok(());
        }
        let moved = self.write(|txn| {
            let mut moved = 0u64;
            {
                let old = txn.open_table(SPOOL_PER_MESSAGE)?;
                let mut new = txn.open_table(SPOOL)?;
                for entry in old.iter()? {
                    let (key, value) = entry?;
                    let (subscription, sequence) = key.value();
                    new.insert((subscription, sequence), batch::encode([value.value()]).as_slice())?;
                    moved += 1;
                }
            }
            txn.delete_table(SPOOL_PER_MESSAGE)?;
            Ok(moved)
        })?;
        tracing::info!(messages = moved, "moved the spooled messages into batch records");
        Ok(())
    }

    /// Imports the records of a first-release file store in `dir`, in one transaction,
    /// then moves its directories aside so they are not imported again.
    fn migrate_file_store(&self, dir: &Path) -> Result<(), StoreError> {
        let kinds = ["subscriptions", "dead-letters", "positions"];
        let present: Vec<PathBuf> =
            kinds.iter().map(|kind| dir.join(kind)).filter(|path| path.is_dir()).collect();
        if present.is_empty() {
            return Ok(());
        }
        let read = |kind: &str| -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            let path = dir.join(kind);
            let Ok(entries) = std::fs::read_dir(&path) else { return Ok(Vec::new()) };
            let mut records = Vec::new();
            for entry in entries.filter_map(Result::ok) {
                let file = entry.path();
                let Some(id) = file
                    .file_name()
                    .and_then(|name| name.to_str())
                    .and_then(|name| name.strip_suffix(".json"))
                else {
                    continue;
                };
                let bytes = std::fs::read(&file)
                    .map_err(|source| StoreError::Io { path: file.display().to_string(), source })?;
                records.push((id.to_string(), bytes));
            }
            Ok(records)
        };
        let subscriptions = read("subscriptions")?;
        let letters = read("dead-letters")?;
        let positions = read("positions")?;
        // Records keep their own ids: a file name is a sanitised id.
        let id_of = |bytes: &[u8], fallback: &str| {
            serde_json::from_slice::<serde_json::Value>(bytes)
                .ok()
                .and_then(|value| value["id"].as_str().map(str::to_string))
                .unwrap_or_else(|| fallback.to_string())
        };
        let counts = (subscriptions.len(), letters.len(), positions.len());
        self.write(|txn| {
            let mut table = txn.open_table(SUBSCRIPTIONS)?;
            for (name, bytes) in &subscriptions {
                table.insert(id_of(bytes, name).as_str(), bytes.as_slice())?;
            }
            let mut table = txn.open_table(DEAD_LETTERS)?;
            for (name, bytes) in &letters {
                table.insert(id_of(bytes, name).as_str(), bytes.as_slice())?;
            }
            let mut table = txn.open_table(POSITIONS)?;
            for (name, bytes) in &positions {
                table.insert(name.as_str(), bytes.as_slice())?;
            }
            // The dead letters are indexed by age again, these included.
            txn.open_table(DEAD_LETTER_TOTALS)?.remove(NEXT_AGE)?;
            Ok(())
        })?;
        let aside = dir.join("migrated-file-store");
        std::fs::create_dir_all(&aside)
            .map_err(|source| StoreError::Io { path: aside.display().to_string(), source })?;
        for path in present {
            let target = aside.join(path.file_name().expect("a directory name"));
            std::fs::rename(&path, &target)
                .map_err(|source| StoreError::Io { path: path.display().to_string(), source })?;
        }
        tracing::info!(
            subscriptions = counts.0,
            dead_letters = counts.1,
            positions = counts.2,
            moved_to = %aside.display(),
            "imported the state of the file store into {FILE_NAME}"
        );
        Ok(())
    }
}

impl Shared {
    fn slot_mut(&self) -> RwLockWriteGuard<'_, Option<Arc<Database>>> {
        self.db.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn failure(&self) -> MutexGuard<'_, Option<Failure>> {
        self.failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Opens the database file (a small page cache: the spool is written once and read
    /// back once, in order).
    fn open_database(&self) -> Result<Database, redb::DatabaseError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.file)?;
        let builder = {
            let mut builder = Database::builder();
            builder.set_cache_size(CACHE_BYTES);
            builder
        };
        #[cfg(test)]
        if let Some(fail) = &self.fail_writes {
            return builder.create_with_backend(faulty::Backend::new(FileBackend::new(file)?, fail.clone()));
        }
        builder.create_with_backend(FileBackend::new(file)?)
    }

    /// The open database, for the duration of one call.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] while it failed and is not reopened yet.
    fn database(&self) -> Result<Arc<Database>, StoreError> {
        if let Some(db) = self.db.read().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref() {
            return Ok(db.clone());
        }
        let reason = self.unhealthy().unwrap_or_else(|| "it is closed".into());
        Err(StoreError::Unavailable { path: self.path.to_string(), reason })
    }

    /// Why the database is not open, while it is not.
    fn unhealthy(&self) -> Option<String> {
        self.failure().as_ref().map(|failure| match &failure.reopen_error {
            Some(reopen) => format!("{} (reopening failed: {reopen})", failure.reason),
            None => failure.reason.clone(),
        })
    }

    /// `error` as a [`StoreError`]; an I/O error (or redb's latch of an earlier one) also
    /// takes `db` out of service, for the keeper to reopen.
    fn failed(&self, db: &Arc<Database>, error: redb::Error) -> StoreError {
        let broken = matches!(
            error,
            redb::Error::Io(_)
                | redb::Error::Backend(_)
                | redb::Error::PreviousIo
                | redb::Error::DatabaseClosed
        );
        let message = error.to_string();
        if broken {
            let mut slot = self.slot_mut();
            if slot.as_ref().is_some_and(|current| Arc::ptr_eq(current, db)) {
                *slot = None;
                tracing::error!(
                    path = %self.path,
                    error = %message,
                    "the state store failed; it is reopened in the background, and calls fail until it works"
                );
                *self.failure() = Some(Failure {
                    reason: message.clone(),
                    reopen_error: None,
                    attempts: 0,
                    next_attempt: Instant::now() + jittered(REOPEN_FIRST),
                });
            }
        }
        StoreError::Database { path: self.path.to_string(), message }
    }

    fn write_with<T>(
        &self,
        durability: Durability,
        work: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let db = self.database()?;
        let synced = matches!(durability, Durability::Immediate);
        let result = (|| {
            let mut txn = db.begin_write()?;
            txn.set_durability(durability)?;
            let result = work(&txn)?;
            // Every commit before this one becomes durable with it.
            let unsynced = if synced { self.unsynced_since.swap(0, Ordering::AcqRel) } else { 0 };
            if let Err(error) = txn.commit() {
                if unsynced != 0 {
                    let _ = self.unsynced_since.compare_exchange(
                        0,
                        unsynced,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    );
                }
                return Err(redb::Error::from(error));
            }
            if !synced {
                let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX).max(1);
                let _ = self.unsynced_since.compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed);
            }
            Ok(result)
        })();
        result.map_err(|error| self.failed(&db, error))
    }

    /// The keeper's round: reopens a failed database when it is due; syncs settlements
    /// that waited [`SYNC_AFTER`] for a synced commit.
    fn tend(&self) {
        let due = self.failure().as_ref().map(|failure| failure.next_attempt <= Instant::now());
        match due {
            Some(true) => self.reopen(),
            Some(false) => {}
            None => {
                let since = self.unsynced_since.load(Ordering::Acquire);
                let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
                if since != 0 && now.saturating_sub(since) >= SYNC_AFTER.as_millis() as u64 {
                    // An error is handled (and logged) like any call's.
                    let _ = self.write_with(Durability::Immediate, |_| Ok(()));
                }
            }
        }
    }

    fn reopen(&self) {
        let reopened = self.open_database().map_err(|error| error.to_string()).and_then(|db| {
            // It works again once it takes a synced write: on a disk still full the file
            // reopens fine and fails the next write.
            let probe = (|| -> Result<(), redb::Error> {
                let mut txn = db.begin_write()?;
                txn.set_durability(Durability::Immediate)?;
                let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
                txn.open_table(STORE_PROBE)?.insert("reopened", now)?;
                txn.commit()?;
                Ok(())
            })();
            probe.map_err(|error| format!("reopened, but a write fails: {error}"))?;
            // A full disk may still take a small write in the file's free pages, and fail
            // the next append: not working again until there is some room.
            match self.free.short_of(REOPEN_HEADROOM) {
                Some(free) => {
                    Err(format!("reopened, but its filesystem has only {} free", super::disk::human(free)))
                }
                None => Ok(db),
            }
        });
        match reopened {
            Ok(db) => {
                *self.slot_mut() = Some(Arc::new(db));
                let failure = self.failure().take();
                // What was committed and not synced on the failed database is gone with it.
                self.unsynced_since.store(0, Ordering::Release);
                tracing::info!(
                    path = %self.path,
                    failed_with = failure.map(|failure| failure.reason).unwrap_or_default(),
                    "the state store was reopened and works again"
                );
            }
            Err(error) => {
                let mut failure = self.failure();
                if let Some(failure) = failure.as_mut() {
                    failure.attempts = failure.attempts.saturating_add(1);
                    let wait = REOPEN_FIRST.saturating_mul(1 << failure.attempts.min(16)).min(REOPEN_MAX);
                    failure.next_attempt = Instant::now() + jittered(wait);
                    if failure.reopen_error.as_ref() != Some(&error) {
                        tracing::warn!(path = %self.path, %error, "reopening the state store failed; trying again");
                    }
                    failure.reopen_error = Some(error);
                }
            }
        }
    }
}

/// `wait` less up to a quarter, so that stores failing together do not retry in step.
fn jittered(wait: Duration) -> Duration {
    wait.mul_f64(1.0 - fastrand::f64() / 4.0)
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn subscriptions(&self) -> Result<Vec<RawSubscription>, StoreError> {
        self.all(SUBSCRIPTIONS).await
    }

    async fn put_subscription(&self, subscription: &RawSubscription) -> Result<(), StoreError> {
        self.put(SUBSCRIPTIONS, &subscription.id, subscription).await
    }

    async fn delete_subscription(&self, id: &str) -> Result<bool, StoreError> {
        self.remove(SUBSCRIPTIONS, id).await
    }

    async fn add_dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(letter).expect("records serialize");
        self.put_dead_letters(vec![(letter.id.clone(), bytes)]).await
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let mut letters: Vec<DeadLetter> = self.all(DEAD_LETTERS).await?;
        letters.sort_by(|a, b| (&a.failed_at, a.sequence).cmp(&(&b.failed_at, b.sequence)));
        Ok(letters)
    }

    async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        self.get(DEAD_LETTERS, id).await
    }

    async fn dead_letters_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, bool), StoreError> {
        let after = after.map(str::to_string);
        self.blocking(move |store| {
            let raw: Vec<(String, Vec<u8>)> = store.read(|txn| {
                let table = txn.open_table(DEAD_LETTERS)?;
                let range = match &after {
                    Some(after) => table.range::<&str>((
                        std::ops::Bound::Excluded(after.as_str()),
                        std::ops::Bound::Unbounded,
                    ))?,
                    None => table.range::<&str>(..)?,
                };
                let mut records = Vec::new();
                for entry in range.take(limit + 1) {
                    let (key, value) = entry?;
                    records.push((key.value().to_string(), value.value().to_vec()));
                }
                Ok(records)
            })?;
            let more = raw.len() > limit;
            Ok((store.readable(DEAD_LETTERS.name(), raw.into_iter().take(limit)), more))
        })
        .await
    }

    async fn delete_dead_letter(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.delete_dead_letters(vec![id.to_string()]).await? == 1)
    }

    async fn delete_dead_letters(&self, ids: Vec<String>) -> Result<u64, StoreError> {
        self.blocking(move |store| {
            store.write(|txn| {
                let mut tables = LetterTables::open(txn)?;
                let mut removed = 0;
                for id in &ids {
                    removed += u64::from(tables.remove(id)?);
                }
                tables.finish()?;
                Ok(removed)
            })
        })
        .await
    }

    fn limit_dead_letters(&self, max_bytes: u64) {
        self.shared.max_letter_bytes.store(max_bytes, Ordering::Relaxed);
    }

    fn dead_letters_evicted(&self) -> u64 {
        self.shared.evicted.load(Ordering::Relaxed)
    }

    async fn positions(&self, subscription: &str) -> Result<Positions, StoreError> {
        Ok(self.get(POSITIONS, subscription).await?.unwrap_or_default())
    }

    async fn put_positions(&self, subscription: &str, positions: &Positions) -> Result<(), StoreError> {
        self.put(POSITIONS, subscription, positions).await
    }

    async fn delete_positions(&self, subscription: &str) -> Result<(), StoreError> {
        self.remove(POSITIONS, subscription).await.map(drop)
    }

    async fn spool_append(&self, appends: Arc<[SpoolAppend]>) -> Result<Vec<Option<u64>>, StoreError> {
        self.blocking(move |store| {
            store.shared.free.check(&store.shared.path)?;
            store.write(|txn| {
                let mut table = txn.open_table(SPOOL)?;
                let mut counters = txn.open_table(SPOOL_NEXT)?;
                // Each subscription's messages in this append, with the sequence of the first.
                let mut batches: BTreeMap<&str, (u64, Vec<&[u8]>)> = BTreeMap::new();
                let mut sequences = Vec::with_capacity(appends.len());
                for append in appends.iter() {
                    let subscription = append.subscription.as_ref();
                    if append.record.len() > batch::MAX_RECORD_BYTES {
                        tracing::error!(
                            subscription,
                            bytes = append.record.len(),
                            "a message too large for the spool is not spooled"
                        );
                        sequences.push(None);
                        continue;
                    }
                    let (first, records) = match batches.entry(subscription) {
                        std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
                        std::collections::btree_map::Entry::Vacant(entry) => {
                            entry.insert((next_sequence(&counters, subscription)?, Vec::new()))
                        }
                    };
                    sequences.push(Some(*first + records.len() as u64));
                    records.push(append.record.as_slice());
                }
                for (subscription, (first, records)) in batches {
                    let mut sequence = first;
                    for part in split_by_size(&records) {
                        table.insert(
                            (subscription, sequence),
                            batch::encode(part.iter().copied()).as_slice(),
                        )?;
                        sequence += part.len() as u64;
                    }
                    counters.insert(subscription, sequence)?;
                }
                Ok(sequences)
            })
        })
        .await
    }

    async fn spool_read(
        &self,
        subscription: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<SpoolEntry>, StoreError> {
        let subscription = subscription.to_string();
        self.blocking(move |store| {
            store.read(|txn| {
                let subscription = subscription.as_str();
                let settled =
                    txn.open_table(SPOOL_SETTLED)?.get(subscription)?.map_or(0, |through| through.value());
                let from = from.max(settled + 1);
                let table = txn.open_table(SPOOL)?;
                // The batch holding `from` may start before it.
                let start = match table.range((subscription, 0)..=(subscription, from))?.next_back() {
                    Some(entry) => {
                        let (key, value) = entry?;
                        let first = key.value().1;
                        if first + batch::count(value.value()) > from { first } else { from }
                    }
                    None => from,
                };
                let mut entries = Vec::new();
                let mut bytes = 0;
                'batches: for entry in table.range((subscription, start)..=(subscription, u64::MAX))? {
                    let (key, value) = entry?;
                    for (sequence, record) in (key.value().1..).zip(batch::records(value.value())) {
                        if sequence < from {
                            continue;
                        }
                        if entries.len() >= max || bytes >= SPOOL_READ_BYTES {
                            break 'batches;
                        }
                        bytes += record.len();
                        entries.push(SpoolEntry { sequence, record: record.to_vec() });
                    }
                }
                Ok(entries)
            })
        })
        .await
    }

    async fn spool_settle(&self, settlement: Settlement) -> Result<(), StoreError> {
        let letters: Vec<(String, Vec<u8>)> = settlement
            .dead_letters
            .iter()
            .map(|letter| (letter.id.clone(), serde_json::to_vec(letter).expect("records serialize")))
            .collect();
        let positions = settlement
            .positions
            .as_ref()
            .map(|positions| serde_json::to_vec(positions).expect("positions serialize"));
        // Not synced: a crash before the next synced write undoes the trim together with the
        // batch's dead letters and position, so the batch is delivered again (under the same
        // delivery ids) and nothing is lost; syncing each settlement would double the syncs.
        // The next append syncs it, or else the keeper within about a second.
        let max = self.shared.max_letter_bytes.load(Ordering::Relaxed);
        let evicted = self
            .blocking(move |store| {
                store.write_with(Durability::None, |txn| {
                    let subscription = settlement.subscription.as_str();
                    let through = settlement.through;
                    // Batches settled whole go; one settled in part stays, read from after
                    // `through`.
                    txn.open_table(SPOOL)?
                        .retain_in((subscription, 0)..=(subscription, through), |key, value| {
                            key.1 + batch::count(value) - 1 > through
                        })?;
                    txn.open_table(SPOOL_SETTLED)?.insert(subscription, through)?;
                    let mut evicted = Vec::new();
                    if !letters.is_empty() {
                        let mut tables = LetterTables::open(txn)?;
                        for (id, bytes) in &letters {
                            evicted.extend(tables.insert(id, bytes, max)?);
                        }
                        tables.finish()?;
                    }
                    if let Some(positions) = &positions {
                        txn.open_table(POSITIONS)?.insert(subscription, positions.as_slice())?;
                    }
                    Ok(evicted)
                })
            })
            .await?;
        self.evicted(&evicted);
        Ok(())
    }

    /// Each append is a synced commit, which costs redb a few hundred microseconds of CPU
    /// whatever it holds: at most one every 2 ms while messages keep coming puts tens of
    /// messages in each at high rates, for at most 2 ms of delay (a message after a quiet
    /// spell is appended at once). 1 ms left commits as frequent as the sync allows on a
    /// busy machine; 3 ms saved little more (bench/HISTORY.md).
    fn append_window(&self) -> std::time::Duration {
        std::time::Duration::from_millis(2)
    }

    fn unreadable_records(&self) -> u64 {
        self.shared.unreadable.load(Ordering::Relaxed)
    }

    fn unhealthy(&self) -> Option<String> {
        self.shared.unhealthy()
    }

    async fn sync(&self) -> Result<(), StoreError> {
        self.blocking(move |store| store.write(|_| Ok(()))).await
    }

    async fn spool_summaries(&self) -> Result<BTreeMap<String, SpoolSummary>, StoreError> {
        self.blocking(move |store| {
            store.read(|txn| {
                let settled_table = txn.open_table(SPOOL_SETTLED)?;
                let table = txn.open_table(SPOOL)?;
                let mut summaries: BTreeMap<String, SpoolSummary> = BTreeMap::new();
                let mut settled: Option<(String, u64)> = None;
                for entry in table.iter()? {
                    let (key, value) = entry?;
                    let (subscription, first) = key.value();
                    if settled.as_ref().is_none_or(|(name, _)| name != subscription) {
                        let through = settled_table.get(subscription)?.map_or(0, |through| through.value());
                        settled = Some((subscription.to_string(), through));
                    }
                    let through = settled.as_ref().map_or(0, |(_, through)| *through);
                    for (sequence, record) in (first..).zip(batch::records(value.value())) {
                        if sequence <= through {
                            continue;
                        }
                        let summary = summaries.entry(subscription.to_string()).or_insert(SpoolSummary {
                            first: sequence,
                            last: sequence,
                            messages: 0,
                            bytes: 0,
                        });
                        summary.last = sequence;
                        summary.messages += 1;
                        summary.bytes += record.len() as u64;
                    }
                }
                Ok(summaries)
            })
        })
        .await
    }

    async fn spool_delete(&self, subscription: &str) -> Result<(), StoreError> {
        let subscription = subscription.to_string();
        self.blocking(move |store| {
            store.write(|txn| {
                let subscription = subscription.as_str();
                txn.open_table(SPOOL)?
                    .retain_in((subscription, 0)..=(subscription, u64::MAX), |_, _| false)?;
                txn.open_table(SPOOL_NEXT)?.remove(subscription)?;
                txn.open_table(SPOOL_SETTLED)?.remove(subscription)?;
                Ok(())
            })
        })
        .await
    }

    /// One synced transaction for all of them: each requeued one is a batch of one in its
    /// spool (the spool reads them in order like any other).
    async fn requeue_dead_letters(
        &self,
        requeues: Vec<(String, SpoolAppend)>,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        self.blocking(move |store| {
            store.shared.free.check(&store.shared.path)?;
            store.write(|txn| {
                let mut tables = LetterTables::open(txn)?;
                let mut counters = txn.open_table(SPOOL_NEXT)?;
                let mut spool = txn.open_table(SPOOL)?;
                let mut sequences = Vec::with_capacity(requeues.len());
                for (id, append) in &requeues {
                    if !tables.remove(id)? {
                        sequences.push(None);
                        continue;
                    }
                    let subscription = append.subscription.as_ref();
                    let sequence = next_sequence(&counters, subscription)?;
                    spool.insert(
                        (subscription, sequence),
                        batch::encode([append.record.as_slice()]).as_slice(),
                    )?;
                    counters.insert(subscription, sequence + 1)?;
                    sequences.push(Some(sequence));
                }
                tables.finish()?;
                Ok(sequences)
            })
        })
        .await
    }
}

/// The dead letters and their index by age and size, open in one write transaction.
struct LetterTables<'txn> {
    letters: redb::Table<'txn, &'static str, &'static [u8]>,
    ages: redb::Table<'txn, u64, &'static str>,
    sizes: redb::Table<'txn, &'static str, (u64, u64)>,
    totals: redb::Table<'txn, &'static str, u64>,
    bytes: u64,
    next_age: u64,
}

impl<'txn> LetterTables<'txn> {
    fn open(txn: &'txn redb::WriteTransaction) -> Result<Self, redb::Error> {
        let totals = txn.open_table(DEAD_LETTER_TOTALS)?;
        let bytes = totals.get(BYTES)?.map_or(0, |bytes| bytes.value());
        let next_age = totals.get(NEXT_AGE)?.map_or(0, |next| next.value());
        Ok(LetterTables {
            letters: txn.open_table(DEAD_LETTERS)?,
            ages: txn.open_table(DEAD_LETTER_AGES)?,
            sizes: txn.open_table(DEAD_LETTER_SIZES)?,
            totals,
            bytes,
            next_age,
        })
    }

    /// Stores a dead letter (replacing one of its id) as the newest, then evicts the
    /// oldest while the total is over `max` (the new one too when it alone is larger);
    /// returns the evicted ids. Reads only the index entries it removes.
    fn insert(&mut self, id: &str, bytes: &[u8], max: u64) -> Result<Vec<String>, redb::Error> {
        self.remove(id)?;
        let age = self.next_age;
        self.next_age += 1;
        let size = bytes.len() as u64;
        self.letters.insert(id, bytes)?;
        self.ages.insert(age, id)?;
        self.sizes.insert(id, (age, size))?;
        self.bytes += size;
        let mut evicted = Vec::new();
        while self.bytes > max {
            let Some((_, oldest)) = self.ages.pop_first()? else { break };
            let oldest = oldest.value().to_string();
            self.letters.remove(oldest.as_str())?;
            if let Some(entry) = self.sizes.remove(oldest.as_str())? {
                self.bytes = self.bytes.saturating_sub(entry.value().1);
            }
            evicted.push(oldest);
        }
        Ok(evicted)
    }

    /// Removes a dead letter; `false` when there was none.
    fn remove(&mut self, id: &str) -> Result<bool, redb::Error> {
        if let Some(entry) = self.sizes.remove(id)? {
            let (age, size) = entry.value();
            self.ages.remove(age)?;
            self.bytes = self.bytes.saturating_sub(size);
        }
        Ok(self.letters.remove(id)?.is_some())
    }

    /// Writes the totals back.
    fn finish(mut self) -> Result<(), redb::Error> {
        self.totals.insert(BYTES, self.bytes)?;
        self.totals.insert(NEXT_AGE, self.next_age)?;
        Ok(())
    }
}

/// A batch value holds at most about this many bytes of messages; a larger append is
/// split into several values.
const BATCH_VALUE_BYTES: usize = 8 << 20;

/// `records` in consecutive parts of at most [`BATCH_VALUE_BYTES`] each (a larger message
/// alone in its part).
fn split_by_size<'a, 'r>(records: &'r [&'a [u8]]) -> Vec<&'r [&'a [u8]]> {
    let mut parts = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (index, record) in records.iter().enumerate() {
        if index > start && bytes + record.len() > BATCH_VALUE_BYTES {
            parts.push(&records[start..index]);
            (start, bytes) = (index, 0);
        }
        bytes += record.len();
    }
    if start < records.len() {
        parts.push(&records[start..]);
    }
    parts
}

/// The sequence the next message of `subscription`'s spool gets (the first is 1).
fn next_sequence(
    counters: &impl ReadableTable<&'static str, u64>,
    subscription: &str,
) -> Result<u64, redb::Error> {
    Ok(counters.get(subscription)?.map_or(1, |next| next.value()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(subscription: &str, text: &str) -> SpoolAppend {
        SpoolAppend { subscription: subscription.into(), record: text.as_bytes().to_vec() }
    }

    #[tokio::test]
    async fn spools_append_in_order_settle_with_their_dead_letters_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            let sequences = store
                .spool_append(vec![append("a", "a1"), append("b", "b1"), append("a", "a2")].into())
                .await
                .unwrap();
            assert_eq!(sequences, [Some(1), Some(1), Some(2)]);
            assert_eq!(store.spool_append(vec![append("a", "a3")].into()).await.unwrap(), [Some(3)]);
            let read = store.spool_read("a", 2, 10).await.unwrap();
            assert_eq!(read.iter().map(|entry| entry.sequence).collect::<Vec<_>>(), [2, 3]);
            assert_eq!(read[0].record, b"a2");
            store
                .spool_settle(Settlement {
                    subscription: "a".into(),
                    through: 2,
                    positions: Some(Positions::from([("/x".to_string(), 7)])),
                    dead_letters: Vec::new(),
                })
                .await
                .unwrap();
            let second = EmbeddedStore::open(dir.path());
            assert!(matches!(second, Err(StoreError::Locked { .. })), "{second:?}");
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let summaries = store.spool_summaries().await.unwrap();
        assert_eq!(summaries["a"], SpoolSummary { first: 3, last: 3, messages: 1, bytes: 2 });
        assert_eq!(summaries["b"].messages, 1);
        assert_eq!(store.positions("a").await.unwrap()["/x"], 7);
        // Sequences keep increasing after a trim, even across an emptied spool.
        store
            .spool_settle(Settlement {
                subscription: "a".into(),
                through: 3,
                positions: None,
                dead_letters: Vec::new(),
            })
            .await
            .unwrap();
        assert!(store.spool_read("a", 0, 10).await.unwrap().is_empty());
        assert_eq!(store.spool_append(vec![append("a", "a4")].into()).await.unwrap(), [Some(4)]);
        store.spool_delete("a").await.unwrap();
        store.spool_delete("b").await.unwrap();
        assert!(store.spool_summaries().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_batch_settled_in_part_resumes_after_what_was_settled_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            let records = ["m1", "m2", "m3", "m4"].map(|text| append("a", text));
            assert_eq!(
                store.spool_append(records.to_vec().into()).await.unwrap(),
                [Some(1), Some(2), Some(3), Some(4)]
            );
            let settle = |through| Settlement {
                subscription: "a".into(),
                through,
                positions: None,
                dead_letters: Vec::new(),
            };
            store.spool_settle(settle(2)).await.unwrap();
            let read = store.spool_read("a", 0, 10).await.unwrap();
            assert_eq!(read.iter().map(|entry| entry.sequence).collect::<Vec<_>>(), [3, 4]);
            assert_eq!(read[0].record, b"m3");
            assert_eq!(store.spool_read("a", 4, 10).await.unwrap()[0].record, b"m4");
            assert_eq!(store.spool_read("a", 3, 1).await.unwrap().len(), 1, "at most max");
            store.sync().await.unwrap();
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(
            store.spool_summaries().await.unwrap()["a"],
            SpoolSummary { first: 3, last: 4, messages: 2, bytes: 4 }
        );
        store
            .spool_settle(Settlement {
                subscription: "a".into(),
                through: 4,
                positions: None,
                dead_letters: Vec::new(),
            })
            .await
            .unwrap();
        assert!(store.spool_summaries().await.unwrap().is_empty(), "the batch went once settled whole");
        assert_eq!(store.spool_append(vec![append("a", "m5")].into()).await.unwrap(), [Some(5)]);
    }

    #[tokio::test]
    async fn a_spool_kept_one_record_per_message_is_moved_into_batches_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut old = txn.open_table(SPOOL_PER_MESSAGE).unwrap();
                old.insert(("a", 7), b"a7".as_slice()).unwrap();
                old.insert(("a", 8), b"a8".as_slice()).unwrap();
                old.insert(("b", 1), b"b1".as_slice()).unwrap();
                txn.open_table(SPOOL_NEXT).unwrap().insert("a", 9).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let summaries = store.spool_summaries().await.unwrap();
        assert_eq!(summaries["a"], SpoolSummary { first: 7, last: 8, messages: 2, bytes: 4 });
        assert_eq!(summaries["b"], SpoolSummary { first: 1, last: 1, messages: 1, bytes: 2 });
        let read = store.spool_read("a", 7, 10).await.unwrap();
        assert_eq!(read.iter().map(|entry| entry.record.as_slice()).collect::<Vec<_>>(), [b"a7", b"a8"]);
        assert_eq!(store.spool_append(vec![append("a", "a9")].into()).await.unwrap(), [Some(9)]);
        let old_gone = store.read(|txn| Ok(txn.open_table(SPOOL_PER_MESSAGE).is_err())).unwrap();
        assert!(old_gone, "the old table is dropped");
    }

    #[tokio::test]
    async fn a_read_stops_at_its_byte_limit_but_returns_at_least_one_message() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let large = SpoolAppend { subscription: "a".into(), record: vec![b'x'; SPOOL_READ_BYTES * 5 / 8] };
        store.spool_append(vec![large.clone(), large.clone(), large].into()).await.unwrap();
        let read = store.spool_read("a", 1, 10).await.unwrap();
        assert_eq!(read.iter().map(|entry| entry.sequence).collect::<Vec<_>>(), [1, 2]);
        let huge = SpoolAppend { subscription: "b".into(), record: vec![b'y'; SPOOL_READ_BYTES + 1] };
        store.spool_append(vec![huge].into()).await.unwrap();
        assert_eq!(store.spool_read("b", 1, 10).await.unwrap().len(), 1);
    }

    /// Waits up to 10 s for `done`, checking every 20 ms.
    async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what} did not happen within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn after_a_full_disk_the_store_says_it_is_failing_then_heals_by_itself_keeping_what_it_held() {
        let dir = tempfile::tempdir().unwrap();
        let full = Arc::new(AtomicBool::new(false));
        let store = EmbeddedStore::open_failing(dir.path(), full.clone()).unwrap();
        store.spool_append(vec![append("a", "before")].into()).await.unwrap();
        store.put_positions("a", &Positions::from([("/x".to_string(), 3)])).await.unwrap();
        assert_eq!(store.unhealthy(), None);

        full.store(true, Ordering::SeqCst);
        let error = store.spool_append(vec![append("a", "during")].into()).await.unwrap_err();
        assert!(error.to_string().contains("No space left on device"), "{error}");
        let reason = store.unhealthy().expect("the store says it is failing");
        assert!(reason.contains("No space left on device"), "{reason}");
        // Meanwhile calls fail at once with the typed error, and reopening fails while the
        // disk stays full.
        let error = store.spool_read("a", 0, 10).await.unwrap_err();
        assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
        assert!(error.to_string().contains("No space left on device"), "{error}");
        eventually("a failed reopen", || {
            store.unhealthy().is_some_and(|why| why.contains("reopening failed"))
        })
        .await;
        assert!(store.spool_append(vec![append("a", "during")].into()).await.is_err());

        full.store(false, Ordering::SeqCst);
        eventually("the store healing", || store.unhealthy().is_none()).await;
        let read = store.spool_read("a", 0, 10).await.unwrap();
        assert_eq!(read.iter().map(|entry| entry.record.as_slice()).collect::<Vec<_>>(), [b"before"]);
        assert_eq!(store.positions("a").await.unwrap()["/x"], 3);
        assert_eq!(store.spool_append(vec![append("a", "after")].into()).await.unwrap(), [Some(2)]);
        let read = store.spool_read("a", 0, 10).await.unwrap();
        assert_eq!(
            read.iter().map(|entry| entry.record.as_slice()).collect::<Vec<_>>(),
            [&b"before"[..], b"after"]
        );
        drop(store);
        // Closed with its last handle: the file opens again at once, with everything.
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(store.spool_summaries().await.unwrap()["a"].messages, 2);
    }

    #[tokio::test]
    async fn a_settlement_is_synced_by_the_keeper_within_a_second_when_nothing_else_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store.spool_append(vec![append("a", "a1")].into()).await.unwrap();
        assert_eq!(store.shared.unsynced_since.load(Ordering::SeqCst), 0, "an append is synced");
        let settled = Instant::now();
        store
            .spool_settle(Settlement {
                subscription: "a".into(),
                through: 1,
                positions: None,
                dead_letters: Vec::new(),
            })
            .await
            .unwrap();
        assert_ne!(
            store.shared.unsynced_since.load(Ordering::SeqCst),
            0,
            "a settlement is not synced at once"
        );
        eventually("the keeper's sync", || store.shared.unsynced_since.load(Ordering::SeqCst) == 0).await;
        println!("synced {:?} after the settlement", settled.elapsed());
    }

    #[tokio::test]
    async fn appends_are_refused_with_a_typed_error_under_the_free_space_minimum() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = EmbeddedStore::open_with(dir.path(), 1000 << 40).unwrap();
            let error = store.spool_append(vec![append("a", "a1")].into()).await.unwrap_err();
            assert!(matches!(error, StoreError::Full { min, .. } if min == 1000 << 40), "{error:?}");
            assert!(error.to_string().contains("under state.min_free_bytes (1000.0 TiB)"), "{error}");
            assert!(store.spool_summaries().await.unwrap().is_empty(), "nothing was appended");
            assert_eq!(store.unhealthy(), None, "no room is not a failure");
        }
        let store = EmbeddedStore::open_with(dir.path(), 1 << 20).unwrap();
        assert_eq!(store.spool_append(vec![append("a", "a1")].into()).await.unwrap(), [Some(1)]);
    }

    #[test]
    fn appends_larger_than_a_value_are_split() {
        let big = vec![0u8; BATCH_VALUE_BYTES / 2 + 1];
        let records = [&b"small"[..], &big, &big, &b"tail"[..]];
        let parts = split_by_size(&records);
        assert_eq!(parts.iter().map(|part| part.len()).collect::<Vec<_>>(), [2, 2]);
        let alone = [&big[..]];
        assert_eq!(split_by_size(&alone).len(), 1);
    }
}
