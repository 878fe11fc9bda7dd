//! State in memory only (`state.backend = "memory"`): nothing survives a restart, not even
//! the backlog. It exists to measure what durability costs (the benchmarks run the bridge
//! on it beside the embedded store) and for throwaway bridges that accept losing the
//! backlog on a stop.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::bound::LetterBound;
use super::spool_read::SpoolRead;
use super::{DeadLetter, Positions, Settlement, SpoolAppend, SpoolEntry, SpoolSummary, Store, StoreError};
use crate::config::RawSubscription;
use crate::store::{DeadLetterRecords, PositionRecords, SessionRecords, Spools, SubscriptionRecords};

#[derive(Debug, Default)]
struct State {
    subscriptions: BTreeMap<String, RawSubscription>,
    dead_letters: BTreeMap<String, DeadLetter>,
    positions: BTreeMap<String, Positions>,
    spools: BTreeMap<(String, u64), Vec<u8>>,
    next: BTreeMap<String, u64>,
    bound: LetterBound,
}

impl State {
    fn append(&mut self, append: &SpoolAppend) -> u64 {
        let next = self.next.entry(append.subscription.to_string()).or_insert(1);
        let sequence = *next;
        *next += 1;
        self.spools.insert((append.subscription.to_string(), sequence), append.record.clone());
        sequence
    }

    /// Stores a dead letter within `max` bytes; the ids evicted for it.
    fn add_dead_letter(&mut self, letter: DeadLetter, max: u64) -> Vec<String> {
        let evicted = self.bound.insert(&letter.id, letter.stored_size(), max);
        self.dead_letters.insert(letter.id.clone(), letter);
        for id in &evicted {
            self.dead_letters.remove(id);
        }
        evicted
    }

    fn remove_dead_letter(&mut self, id: &str) -> bool {
        self.bound.remove(id);
        self.dead_letters.remove(id).is_some()
    }

    fn spool_keys(&self, subscription: &str, from: u64, through: u64) -> Vec<(String, u64)> {
        self.spools
            .range((subscription.to_string(), from)..=(subscription.to_string(), through))
            .map(|(key, _)| key.clone())
            .collect()
    }
}

/// State in memory.
#[derive(Debug)]
pub struct MemoryStore {
    state: Mutex<State>,
    max_letter_bytes: AtomicU64,
    evicted: AtomicU64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            state: Mutex::default(),
            max_letter_bytes: AtomicU64::new(super::DEAD_LETTERS_MAX_BYTES),
            evicted: AtomicU64::new(0),
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stores dead letters under the bound (in `state`, locked by the caller); returns
    /// what they evicted, for [`evicted`](MemoryStore::evicted) once the lock is released.
    fn add_dead_letters(
        &self,
        state: &mut State,
        letters: impl IntoIterator<Item = DeadLetter>,
    ) -> Vec<String> {
        let max = self.max_letter_bytes.load(Ordering::Relaxed);
        letters.into_iter().flat_map(|letter| state.add_dead_letter(letter, max)).collect()
    }

    /// Logs and counts evicted dead letters.
    fn evicted(&self, evicted: &[String]) {
        self.evicted.fetch_add(evicted.len() as u64, Ordering::Relaxed);
        super::log_evicted(evicted, self.max_letter_bytes.load(Ordering::Relaxed));
    }
}

#[async_trait]
impl SubscriptionRecords for MemoryStore {
    async fn subscriptions(&self) -> Result<Vec<RawSubscription>, StoreError> {
        Ok(self.lock().subscriptions.values().cloned().collect())
    }

    async fn put_subscription(&self, subscription: &RawSubscription) -> Result<(), StoreError> {
        self.lock().subscriptions.insert(subscription.id.clone(), subscription.clone());
        Ok(())
    }

    async fn delete_subscription(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.lock().subscriptions.remove(id).is_some())
    }
}

#[async_trait]
impl DeadLetterRecords for MemoryStore {
    async fn add_dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        let evicted = self.add_dead_letters(&mut self.lock(), [letter.clone()]);
        self.evicted(&evicted);
        Ok(())
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let mut letters: Vec<DeadLetter> = self.lock().dead_letters.values().cloned().collect();
        super::letter_order::oldest_first(&mut letters);
        Ok(letters)
    }

    async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        Ok(self.lock().dead_letters.get(id).cloned())
    }

    async fn dead_letters_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, bool), StoreError> {
        let state = self.lock();
        let from = match after {
            Some(after) => std::ops::Bound::Excluded(after.to_string()),
            None => std::ops::Bound::Unbounded,
        };
        let mut letters: Vec<DeadLetter> = state
            .dead_letters
            .range((from, std::ops::Bound::Unbounded))
            .take(limit + 1)
            .map(|(_, letter)| letter.clone())
            .collect();
        let more = letters.len() > limit;
        letters.truncate(limit);
        Ok((letters, more))
    }

    async fn delete_dead_letter(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.lock().remove_dead_letter(id))
    }

    async fn delete_dead_letters(&self, ids: Vec<String>) -> Result<u64, StoreError> {
        let mut state = self.lock();
        Ok(ids.iter().filter(|id| state.remove_dead_letter(id)).count() as u64)
    }

    fn limit_dead_letters(&self, max_bytes: u64) {
        self.max_letter_bytes.store(max_bytes, Ordering::Relaxed);
    }

    fn dead_letters_evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    async fn requeue_dead_letters(
        &self,
        requeues: Vec<(String, SpoolAppend)>,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        let mut state = self.lock();
        Ok(requeues
            .iter()
            .map(|(id, append)| state.remove_dead_letter(id).then(|| state.append(append)))
            .collect())
    }
}

#[async_trait]
impl PositionRecords for MemoryStore {
    async fn positions(&self, subscription: &str) -> Result<Positions, StoreError> {
        Ok(self.lock().positions.get(subscription).cloned().unwrap_or_default())
    }

    async fn put_positions(&self, subscription: &str, positions: &Positions) -> Result<(), StoreError> {
        self.lock().positions.insert(subscription.to_string(), positions.clone());
        Ok(())
    }

    async fn delete_positions(&self, subscription: &str) -> Result<(), StoreError> {
        self.lock().positions.remove(subscription);
        Ok(())
    }
}

#[async_trait]
impl Spools for MemoryStore {
    async fn spool_append(&self, appends: Arc<[SpoolAppend]>) -> Result<Vec<Option<u64>>, StoreError> {
        let mut state = self.lock();
        Ok(appends.iter().map(|append| Some(state.append(append))).collect())
    }

    async fn spool_read(
        &self,
        subscription: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<SpoolEntry>, StoreError> {
        let state = self.lock();
        let mut read = SpoolRead::new(max);
        for ((_, sequence), record) in
            state.spools.range((subscription.to_string(), from)..=(subscription.to_string(), u64::MAX))
        {
            if !read.take(*sequence, record) {
                break;
            }
        }
        Ok(read.into_entries())
    }

    async fn spool_settle(&self, settlement: Settlement) -> Result<(), StoreError> {
        let mut state = self.lock();
        for key in state.spool_keys(&settlement.subscription, 0, settlement.through) {
            state.spools.remove(&key);
        }
        if let Some(positions) = settlement.positions {
            state.positions.insert(settlement.subscription, positions);
        }
        let evicted = self.add_dead_letters(&mut state, settlement.dead_letters);
        drop(state);
        self.evicted(&evicted);
        Ok(())
    }

    async fn spool_summaries(&self) -> Result<BTreeMap<String, SpoolSummary>, StoreError> {
        let mut summaries: BTreeMap<String, SpoolSummary> = BTreeMap::new();
        for ((subscription, sequence), record) in &self.lock().spools {
            let summary = summaries.entry(subscription.clone()).or_insert(SpoolSummary {
                first: *sequence,
                last: *sequence,
                messages: 0,
                bytes: 0,
            });
            summary.last = *sequence;
            summary.messages += 1;
            summary.bytes += record.len() as u64;
        }
        Ok(summaries)
    }

    async fn spool_delete(&self, subscription: &str) -> Result<(), StoreError> {
        let mut state = self.lock();
        for key in state.spool_keys(subscription, 0, u64::MAX) {
            state.spools.remove(&key);
        }
        state.next.remove(subscription);
        Ok(())
    }
}

impl SessionRecords for MemoryStore {}

#[async_trait]
impl Store for MemoryStore {}
