//! A subscription's spool as the bridge sees it: the durable queue in the state store
//! plus what the forwarder needs to read it cheaply. Recent messages are also kept in
//! memory (bounded), so a forwarder that keeps up never reads the store back; one that
//! fell behind reads the store from where it is. [`SpoolLimit`] counts the bytes of all
//! spools against `state.spool_max_bytes`; each spool also has its own quota (the
//! subscription's `spool_max_bytes`). A spool that cannot take a message is **full**: the
//! spool keeps the episode (why, since when, what it cost) so that the source can drop
//! and count, or hold the channel upstream, and the API and metrics can show it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

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
}

impl SpoolLimit {
    /// A limit of `max` bytes.
    pub fn new(max: u64) -> Arc<Self> {
        Arc::new(SpoolLimit { used: AtomicU64::new(0), max })
    }

    /// Whether `bytes` more fit in all spools together.
    pub fn fits(&self, bytes: u64) -> bool {
        self.used.load(Ordering::Relaxed).saturating_add(bytes) <= self.max
    }

    /// Whether the spools together are under `fraction` of their bound (a held
    /// subscription resumes only then, so that it does not flap at the edge).
    fn below(&self, fraction: f64) -> bool {
        (self.used.load(Ordering::Relaxed) as f64) < self.max as f64 * fraction
    }

    fn add(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    fn release(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| Some(used.saturating_sub(bytes)));
    }
}

/// Why a subscription cannot take a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FullCause {
    /// Its own `spool_max_bytes`.
    Quota(u64),
    /// `state.spool_max_bytes`, all spools together.
    Total(u64),
    /// The state store refused or failed the append (a full disk, `state.min_free_bytes`,
    /// an I/O error).
    Store(String),
}

impl FullCause {
    /// The `reason` label of `cometd_bridge_messages_dropped_total`.
    pub fn label(&self) -> &'static str {
        match self {
            FullCause::Quota(_) | FullCause::Total(_) => "spool_full",
            FullCause::Store(_) => "store_unavailable",
        }
    }
}

impl std::fmt::Display for FullCause {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FullCause::Quota(max) => write!(formatter, "its spool_max_bytes ({max} bytes) is reached"),
            FullCause::Total(max) => {
                write!(formatter, "all spools together reached state.spool_max_bytes ({max} bytes)")
            }
            FullCause::Store(error) => write!(formatter, "the state store cannot take messages: {error}"),
        }
    }
}

/// A subscription's time of being full.
#[derive(Clone, Debug)]
pub struct FullEpisode {
    /// Why it started.
    pub cause: FullCause,
    /// When.
    pub since: Instant,
    /// Messages dropped during it (without replay).
    pub dropped: u64,
    /// With replay: its channel is unsubscribed upstream, and subscribed again from the
    /// newest spooled replay id once there is room (nothing is dropped).
    pub held: bool,
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
    /// Set while the subscription is full.
    full: Option<FullEpisode>,
}

/// One subscription's spool.
pub struct Spool {
    subscription: Arc<str>,
    store: Arc<dyn Store>,
    limit: Arc<SpoolLimit>,
    /// The most this spool may hold (the subscription's `spool_max_bytes`).
    quota: u64,
    state: Mutex<State>,
    appended: Notify,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Spool").field("subscription", &self.subscription).finish_non_exhaustive()
    }
}

impl Spool {
    /// The spool of `subscription`, holding at most `quota` bytes, resuming from what the
    /// store holds (`summary`).
    pub fn new(
        subscription: Arc<str>,
        store: Arc<dyn Store>,
        limit: Arc<SpoolLimit>,
        quota: u64,
        summary: Option<SpoolSummary>,
    ) -> Arc<Self> {
        let mut state = State { resume_from: summary.map_or(1, |summary| summary.first), ..State::default() };
        if let Some(summary) = summary {
            state.last_appended = summary.last;
            state.backlog.messages = summary.messages;
            state.backlog.bytes = summary.bytes;
            limit.add(summary.bytes);
        }
        Arc::new(Spool {
            subscription,
            store,
            limit,
            quota,
            state: Mutex::new(state),
            appended: Notify::new(),
        })
    }

    /// Whether `bytes` more fit, beside `pending` bytes already promised to this spool in
    /// the same append; why not otherwise. A message larger than the quota still fits an
    /// empty spool, so that no quota refuses one message for ever.
    pub fn room_for(&self, pending: u64, bytes: u64) -> Result<(), FullCause> {
        let held = self.lock().backlog.bytes.saturating_add(pending);
        if held > 0 && held.saturating_add(bytes) > self.quota {
            return Err(FullCause::Quota(self.quota));
        }
        if !self.limit.fits(pending.saturating_add(bytes)) {
            return Err(FullCause::Total(self.limit.max));
        }
        Ok(())
    }

    /// Starts a full episode (or adds `dropped` to the current one); `true` when it
    /// starts now. Logged at ERROR once per episode.
    pub fn mark_full(&self, cause: FullCause, held: bool, dropped: u64) -> bool {
        let mut state = self.lock();
        if let Some(episode) = &mut state.full {
            episode.dropped += dropped;
            episode.held |= held;
            return false;
        }
        state.full = Some(FullEpisode { cause: cause.clone(), since: Instant::now(), dropped, held });
        drop(state);
        if held {
            tracing::error!(subscription = %self.subscription, cause = %cause, "the subscription is full: its channel is unsubscribed upstream until there is room, then subscribed again from the newest spooled replay id (nothing is lost within the server's retention)");
        } else {
            tracing::error!(subscription = %self.subscription, cause = %cause, "the subscription is full: its messages are dropped and counted (cometd_bridge_messages_dropped_total) until there is room; the session and the other subscriptions go on");
        }
        true
    }

    /// Ends the full episode, logging what it cost. Nothing happens when none is open.
    pub fn end_full(&self) {
        let Some(episode) = self.lock().full.take() else { return };
        let lasted =
            humantime::format_duration(std::time::Duration::from_secs(episode.since.elapsed().as_secs()));
        tracing::warn!(subscription = %self.subscription, lasted = %lasted, dropped = episode.dropped, cause = %episode.cause, "the subscription is no longer full");
    }

    /// Whether the subscription is held upstream (full, with replay). Cheaper than
    /// [`full`](Self::full): asked for every message routed to it.
    pub fn is_held(&self) -> bool {
        self.lock().full.as_ref().is_some_and(|episode| episode.held)
    }

    /// Ends a full episode caused by a quota, now that a message fits (one caused by the
    /// store ends when an append succeeds; a held one when it is subscribed again).
    pub fn end_quota_episode(&self) {
        let ended = {
            let state = self.lock();
            state
                .full
                .as_ref()
                .is_some_and(|episode| !episode.held && !matches!(episode.cause, FullCause::Store(_)))
        };
        if ended {
            self.end_full();
        }
    }

    /// Ends a full episode caused by the store, now that an append succeeded.
    pub fn end_store_episode(&self) {
        let ended = matches!(self.lock().full.as_ref(), Some(episode) if matches!(episode.cause, FullCause::Store(_)));
        if ended {
            self.end_full();
        }
    }

    /// Whether a full episode is open. Cheaper than [`full`](Self::full).
    pub fn is_full(&self) -> bool {
        self.lock().full.is_some()
    }

    /// The current full episode, if any.
    pub fn full(&self) -> Option<FullEpisode> {
        self.lock().full.clone()
    }

    /// Whether a held subscription (replay) has room enough to subscribe again: its
    /// spool at most half its quota and all spools under 90 % of theirs.
    pub fn has_room_to_resume(&self) -> bool {
        let state = self.lock();
        state.backlog.bytes <= self.quota / 2 && self.limit.below(0.9)
    }

    /// Ends a full episode that was not held upstream, once a message fits again (so the
    /// gauge falls without waiting for the next message).
    fn end_full_if_room(&self) {
        let ended = {
            let state = self.lock();
            match &state.full {
                Some(episode) if !episode.held && !matches!(episode.cause, FullCause::Store(_)) => {
                    state.backlog.bytes < self.quota && self.limit.below(1.0)
                }
                _ => false,
            }
        };
        if ended {
            self.end_full();
        }
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
        self.end_full_if_room();
    }

    /// Notes when the oldest unsettled message was received.
    pub fn set_oldest(&self, oldest: Option<SystemTime>) {
        let mut state = self.lock();
        // Unknown to the forwarder (its batches are all settled): the next cached message,
        // when the cache holds it, else the forwarder sets it when it reads the next batch.
        let next = state.cached.front().map(|spooled| spooled.envelope.received_at);
        state.backlog.oldest = if state.backlog.messages == 0 { None } else { oldest.or(next) };
    }

    /// What the spool holds now.
    pub fn backlog(&self) -> Backlog {
        self.lock().backlog
    }

    /// Starts again from what the store holds (`summary`): another replica owned the
    /// subscription's source meanwhile, and appended and settled in the shared store.
    pub fn refresh(&self, summary: Option<SpoolSummary>) {
        let mut state = self.lock();
        let released = state.backlog.bytes;
        let full = state.full.take();
        *state = State {
            resume_from: summary.map_or(state.last_appended + 1, |summary| summary.first),
            last_appended: summary.map_or(state.last_appended, |summary| summary.last),
            backlog: Backlog {
                messages: summary.map_or(0, |summary| summary.messages),
                bytes: summary.map_or(0, |summary| summary.bytes),
                oldest: None,
            },
            full,
            ..State::default()
        };
        let added = state.backlog.bytes;
        drop(state);
        self.limit.release(released);
        self.limit.add(added);
        self.end_full_if_room();
        self.appended.notify_one();
    }

    /// Forgets the spool's bytes against the limit (its subscription was removed).
    pub fn release_all(&self) {
        let bytes = std::mem::take(&mut *self.lock()).backlog.bytes;
        self.limit.release(bytes);
    }
}
