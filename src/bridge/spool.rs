//! A subscription's spool as the bridge sees it: the durable queue in the state store
//! plus what the forwarder needs to read it cheaply. Recent messages are also kept in
//! memory (bounded), so a forwarder that keeps up never reads the store back; one that
//! fell behind reads the store from where it is. [`SpoolLimit`] counts the bytes of all
//! spools against `state.spool_max_bytes`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::Notify;

use crate::delivery::Envelope;
use crate::store::{SpoolSummary, Store, StoreError};

/// Memory a spool's cache of recent messages may take, counted as each message's
/// stored size plus [`CACHE_OVERHEAD`].
const CACHE_BYTES: u64 = 8 << 20;

/// What a cached message costs beyond its stored size: the envelope, the parsed message
/// and their allocations.
const CACHE_OVERHEAD: u64 = 512;

/// One message in a spool.
#[derive(Clone, Debug)]
pub struct Spooled {
    /// Its place in the spool.
    pub sequence: u64,
    /// Its size in the store.
    pub bytes: u64,
    /// The message.
    pub envelope: Envelope,
}

/// The room left in all spools together.
#[derive(Debug)]
pub struct SpoolLimit {
    used: AtomicU64,
    max: u64,
    room: Notify,
}

impl SpoolLimit {
    /// A limit of `max` bytes.
    pub fn new(max: u64) -> Arc<Self> {
        Arc::new(SpoolLimit { used: AtomicU64::new(0), max, room: Notify::new() })
    }

    /// Whether the spools are full.
    pub fn is_full(&self) -> bool {
        self.used.load(Ordering::Relaxed) >= self.max
    }

    /// Waits until the spools are no longer full.
    pub async fn wait_for_room(&self) {
        loop {
            let room = self.room.notified();
            if !self.is_full() {
                return;
            }
            room.await;
        }
    }

    fn add(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    fn release(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| Some(used.saturating_sub(bytes)));
        self.room.notify_waiters();
    }
}

/// What a spool holds, for the API and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Messages not yet settled.
    pub messages: u64,
    /// Their size in the store.
    pub bytes: u64,
    /// When the oldest of them was received.
    pub oldest: Option<SystemTime>,
}

#[derive(Debug, Default)]
struct State {
    /// The last sequence appended (0 before any).
    last_appended: u64,
    /// Where delivery resumes: after the last settled sequence.
    resume_from: u64,
    /// Recent messages, with consecutive sequences.
    cached: VecDeque<Spooled>,
    cached_bytes: u64,
    /// Set when a message did not fit in the cache: later ones stay out of it too, until
    /// the forwarder emptied it, so that it keeps consecutive sequences.
    overflowed: bool,
    backlog: Backlog,
}

/// One subscription's spool.
pub struct Spool {
    subscription: Arc<str>,
    store: Arc<dyn Store>,
    limit: Arc<SpoolLimit>,
    state: Mutex<State>,
    appended: Notify,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Spool").field("subscription", &self.subscription).finish_non_exhaustive()
    }
}

impl Spool {
    /// The spool of `subscription`, resuming from what the store holds (`summary`).
    pub fn new(
        subscription: Arc<str>,
        store: Arc<dyn Store>,
        limit: Arc<SpoolLimit>,
        summary: Option<SpoolSummary>,
    ) -> Arc<Self> {
        let mut state = State { resume_from: summary.map_or(1, |summary| summary.first), ..State::default() };
        if let Some(summary) = summary {
            state.last_appended = summary.last;
            state.backlog.messages = summary.messages;
            state.backlog.bytes = summary.bytes;
            limit.add(summary.bytes);
        }
        Arc::new(Spool { subscription, store, limit, state: Mutex::new(state), appended: Notify::new() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records messages the store has just appended (with their sequences) and wakes the
    /// forwarder.
    pub fn appended(&self, messages: impl IntoIterator<Item = Spooled>) {
        let mut state = self.lock();
        let mut added = 0;
        for spooled in messages {
            added += spooled.bytes;
            state.backlog.messages += 1;
            state.backlog.bytes += spooled.bytes;
            state.last_appended = state.last_appended.max(spooled.sequence);
            if state.cached.back().is_some_and(|last| spooled.sequence != last.sequence + 1) {
                // Appended out of order (a retried dead letter): the store has them all.
                state.cached.clear();
                state.cached_bytes = 0;
                state.overflowed = true;
            }
            if state.cached.is_empty() {
                state.overflowed = false;
            }
            if !state.overflowed && state.cached_bytes + spooled.bytes + CACHE_OVERHEAD <= CACHE_BYTES {
                state.cached_bytes += spooled.bytes + CACHE_OVERHEAD;
                state.cached.push_back(spooled);
            } else {
                state.overflowed = true;
            }
        }
        drop(state);
        self.limit.add(added);
        self.appended.notify_one();
    }

    /// Up to `max` messages from sequence `next` on, waiting until there is one. Reads
    /// the memory cache when it holds `next`, else the store. An empty batch means that
    /// unreadable records were dropped (and logged): the caller asks again.
    ///
    /// # Errors
    /// [`StoreError`] when the store cannot be read.
    pub async fn next_batch(&self, next: u64, max: usize) -> Result<Vec<Spooled>, StoreError> {
        let mut next = next;
        loop {
            let appended = self.appended.notified();
            let read_until = {
                let mut state = self.lock();
                while state.cached.front().is_some_and(|first| first.sequence < next) {
                    let stale = state.cached.pop_front().expect("checked");
                    state.cached_bytes -= stale.bytes + CACHE_OVERHEAD;
                }
                if state.cached.is_empty() {
                    state.overflowed = false;
                }
                if next <= state.last_appended {
                    match state.cached.front() {
                        Some(first) if first.sequence == next => {
                            let count = max.min(state.cached.len());
                            let batch: Vec<Spooled> = state.cached.drain(..count).collect();
                            state.cached_bytes -=
                                batch.iter().map(|spooled| spooled.bytes + CACHE_OVERHEAD).sum::<u64>();
                            return Ok(batch);
                        }
                        Some(first) => Some(first.sequence),
                        None => Some(u64::MAX),
                    }
                } else {
                    None
                }
            };
            if let Some(until) = read_until {
                let max = max.min(usize::try_from(until - next).unwrap_or(usize::MAX));
                let entries = self.store.spool_read(&self.subscription, next, max).await?;
                let mut batch = Vec::with_capacity(entries.len());
                let mut unreadable: Option<(u64, u64, u64)> = None;
                for entry in entries {
                    let bytes = entry.record.len() as u64;
                    match Envelope::from_record(&entry.record) {
                        Ok(envelope) => batch.push(Spooled { sequence: entry.sequence, bytes, envelope }),
                        Err(error) => {
                            tracing::error!(subscription = %self.subscription, sequence = entry.sequence, error = %error, "an unreadable spooled message is skipped");
                            let (count, size, _) = unreadable.unwrap_or_default();
                            unreadable = Some((count + 1, size + bytes, entry.sequence));
                            if !batch.is_empty() {
                                break;
                            }
                        }
                    }
                }
                if !batch.is_empty() {
                    return Ok(batch);
                }
                if let Some((count, bytes, through)) = unreadable {
                    let settlement = crate::store::Settlement {
                        subscription: self.subscription.to_string(),
                        through,
                        positions: None,
                        dead_letters: Vec::new(),
                    };
                    self.store.spool_settle(settlement).await?;
                    self.settled(through, count, bytes);
                    return Ok(Vec::new());
                }
                if until != u64::MAX {
                    // Nothing left before the cache (settled already): serve the cache.
                    next = until;
                    continue;
                }
            }
            appended.await;
        }
    }

    /// Where a forwarder starts: after the last settled message.
    pub fn resume_from(&self) -> u64 {
        self.lock().resume_from
    }

    /// Marks `messages` messages of `bytes`, through sequence `through`, as settled
    /// (delivered or dead-lettered).
    pub fn settled(&self, through: u64, messages: u64, bytes: u64) {
        let mut state = self.lock();
        state.resume_from = state.resume_from.max(through + 1);
        state.backlog.messages = state.backlog.messages.saturating_sub(messages);
        state.backlog.bytes = state.backlog.bytes.saturating_sub(bytes);
        if state.backlog.messages == 0 {
            state.backlog.oldest = None;
        }
        drop(state);
        self.limit.release(bytes);
    }

    /// Notes when the oldest unsettled message was received.
    pub fn set_oldest(&self, oldest: Option<SystemTime>) {
        self.lock().backlog.oldest = oldest;
    }

    /// What the spool holds now.
    pub fn backlog(&self) -> Backlog {
        self.lock().backlog
    }

    /// Forgets the spool's bytes against the limit (its subscription was removed).
    pub fn release_all(&self) {
        let bytes = std::mem::take(&mut *self.lock()).backlog.bytes;
        self.limit.release(bytes);
    }
}
