//! State in memory only (`state.backend = "memory"`): nothing survives a restart, not even
//! the backlog. It exists to measure what durability costs (the benchmarks run the bridge
//! on it beside the embedded store) and for throwaway bridges that accept losing the
//! backlog on a stop.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{DeadLetter, Positions, Settlement, SpoolAppend, SpoolEntry, SpoolSummary, Store, StoreError};
use crate::config::RawSubscription;

#[derive(Debug, Default)]
struct State {
    subscriptions: BTreeMap<String, RawSubscription>,
    dead_letters: BTreeMap<String, DeadLetter>,
    positions: BTreeMap<String, Positions>,
    spools: BTreeMap<(String, u64), Vec<u8>>,
    next: BTreeMap<String, u64>,
}

impl State {
    fn append(&mut self, append: &SpoolAppend) -> u64 {
        let next = self.next.entry(append.subscription.to_string()).or_insert(1);
        let sequence = *next;
        *next += 1;
        self.spools.insert((append.subscription.to_string(), sequence), append.record.clone());
        sequence
    }

    fn spool_keys(&self, subscription: &str, from: u64, through: u64) -> Vec<(String, u64)> {
        self.spools
            .range((subscription.to_string(), from)..=(subscription.to_string(), through))
            .map(|(key, _)| key.clone())
            .collect()
    }
}

/// State in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl Store for MemoryStore {
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

    async fn add_dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        self.lock().dead_letters.insert(letter.id.clone(), letter.clone());
        Ok(())
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let mut letters: Vec<DeadLetter> = self.lock().dead_letters.values().cloned().collect();
        letters.sort_by(|a, b| (&a.failed_at, a.sequence).cmp(&(&b.failed_at, b.sequence)));
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
        Ok(self.lock().dead_letters.remove(id).is_some())
    }

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
        let mut entries = Vec::new();
        let mut bytes = 0;
        for ((_, sequence), record) in
            state.spools.range((subscription.to_string(), from)..=(subscription.to_string(), u64::MAX))
        {
            if entries.len() >= max || bytes >= super::SPOOL_READ_BYTES {
                break;
            }
            bytes += record.len();
            entries.push(SpoolEntry { sequence: *sequence, record: record.clone() });
        }
        Ok(entries)
    }

    async fn spool_settle(&self, settlement: Settlement) -> Result<(), StoreError> {
        let mut state = self.lock();
        for key in state.spool_keys(&settlement.subscription, 0, settlement.through) {
            state.spools.remove(&key);
        }
        for letter in settlement.dead_letters {
            state.dead_letters.insert(letter.id.clone(), letter);
        }
        if let Some(positions) = settlement.positions {
            state.positions.insert(settlement.subscription, positions);
        }
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

    async fn requeue_dead_letter(&self, id: &str, append: SpoolAppend) -> Result<Option<u64>, StoreError> {
        let mut state = self.lock();
        if state.dead_letters.remove(id).is_none() {
            return Ok(None);
        }
        Ok(Some(state.append(&append)))
    }
}
