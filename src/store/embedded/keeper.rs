//! What the store's handles and its keeper thread share: the database slot, its failure
//! and reopening with backoff, and the sync of settlements committed without one.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockWriteGuard};
use std::time::{Duration, Instant};

use redb::backends::FileBackend;
use redb::{Database, Durability, TableDefinition};

use crate::store::StoreError;
use crate::store::disk::FreeSpace;
#[cfg(test)]
use crate::store::faulty;
use crate::store::unreadable::Unreadable;

/// The free space a reopened store needs to count as working again.
const REOPEN_HEADROOM: u64 = 1 << 20;

/// A write made after each reopen, to know the store takes writes again.
const STORE_PROBE: TableDefinition<&str, u64> = TableDefinition::new("store_probe");

/// The database's page cache (redb's default is 1 GiB).
const CACHE_BYTES: usize = 16 << 20;

/// How often the keeper thread looks at the store (reopen due, settlements to sync).
pub(super) const KEEPER_TICK: Duration = Duration::from_millis(100);
/// A settlement committed without a sync is synced by the keeper once it is this old and
/// nothing synced it meanwhile: with [`KEEPER_TICK`], durable within about 0.6 s.
const SYNC_AFTER: Duration = Duration::from_millis(500);
/// The first wait before reopening a failed database; it doubles on each failed reopen.
const REOPEN_FIRST: Duration = Duration::from_millis(100);
/// The longest wait between two reopens.
const REOPEN_MAX: Duration = Duration::from_secs(5);

/// What the handles and the keeper thread share.
pub(super) struct Shared {
    /// The database file.
    pub(super) file: PathBuf,
    /// The same, for messages.
    pub(super) path: Arc<str>,
    /// The open database; `None` from an I/O error until it is reopened.
    pub(super) db: RwLock<Option<Arc<Database>>>,
    /// Why the database is not open, while it is not.
    pub(super) failure: Mutex<Option<Failure>>,
    /// Records skipped because they could not be read.
    pub(super) unreadable: Unreadable,
    /// `state.dead_letters_max_bytes`.
    pub(super) max_letter_bytes: AtomicU64,
    /// Dead letters evicted since the store opened.
    pub(super) evicted: AtomicU64,
    /// When the oldest settlement not yet synced was committed, in milliseconds after
    /// `epoch` (at least 1); 0 when everything committed is durable.
    pub(super) unsynced_since: AtomicU64,
    pub(super) epoch: Instant,
    /// `state.min_free_bytes`.
    pub(super) free: FreeSpace,
    /// Makes the file fail to write with `ENOSPC` while set (tests only).
    #[cfg(test)]
    pub(super) fail_writes: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// A failed database waiting to be reopened.
pub(super) struct Failure {
    /// The error that broke it.
    pub(super) reason: String,
    /// Why the last reopen failed, when one did.
    pub(super) reopen_error: Option<String>,
    /// Reopens tried so far.
    pub(super) attempts: u32,
    /// When the next reopen is due.
    pub(super) next_attempt: Instant,
}

/// The keeper thread, stopped and joined when the last handle goes.
pub(super) struct Keeper {
    pub(super) shared: Arc<Shared>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
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

impl Shared {
    pub(super) fn slot_mut(&self) -> RwLockWriteGuard<'_, Option<Arc<Database>>> {
        self.db.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn failure(&self) -> MutexGuard<'_, Option<Failure>> {
        self.failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Opens the database file (a small page cache: the spool is written once and read
    /// back once, in order).
    pub(super) fn open_database(&self) -> Result<Database, redb::DatabaseError> {
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
    pub(super) fn database(&self) -> Result<Arc<Database>, StoreError> {
        if let Some(db) = self.db.read().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref() {
            return Ok(db.clone());
        }
        let reason = self.unhealthy().unwrap_or_else(|| "it is closed".into());
        Err(StoreError::Unavailable { path: self.path.to_string(), reason })
    }

    /// Why the database is not open, while it is not.
    pub(super) fn unhealthy(&self) -> Option<String> {
        self.failure().as_ref().map(|failure| match &failure.reopen_error {
            Some(reopen) => format!("{} (reopening failed: {reopen})", failure.reason),
            None => failure.reason.clone(),
        })
    }

    /// `error` as a [`StoreError`]; an I/O error (or redb's latch of an earlier one) also
    /// takes `db` out of service, for the keeper to reopen.
    pub(super) fn failed(&self, db: &Arc<Database>, error: redb::Error) -> StoreError {
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

    pub(super) fn write_with<T>(
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
    pub(super) fn tend(&self) {
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

    pub(super) fn reopen(&self) {
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
                Some(free) => Err(format!(
                    "reopened, but its filesystem has only {} free",
                    crate::store::disk::human(free)
                )),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PositionRecords;
    use crate::store::Spools;
    use crate::store::embedded::{EmbeddedStore, append};
    use crate::store::{Positions, Settlement, Store};

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
}
