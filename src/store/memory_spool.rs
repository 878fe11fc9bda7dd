//! Spools kept in memory, for a backend that has no durable spool of its own yet (the
//! NATS backend): they survive neither a restart nor a crash, which the README says.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{SpoolAppend, SpoolEntry, SpoolSummary};

/// In-memory spools: messages by (subscription, sequence), and each spool's next sequence.
#[derive(Debug, Default)]
pub struct MemorySpool {
    inner: Mutex<Spools>,
}

#[derive(Debug, Default)]
struct Spools {
    messages: BTreeMap<(String, u64), Vec<u8>>,
    next: BTreeMap<String, u64>,
}

impl MemorySpool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Spools> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends; returns each message's sequence.
    pub fn append(&self, appends: &[SpoolAppend]) -> Vec<u64> {
        let mut spools = self.lock();
        appends
            .iter()
            .map(|append| {
                let next = spools.next.entry(append.subscription.to_string()).or_insert(1);
                let sequence = *next;
                *next += 1;
                spools.messages.insert((append.subscription.to_string(), sequence), append.record.clone());
                sequence
            })
            .collect()
    }

    /// Up to `max` messages from `from` on.
    pub fn read(&self, subscription: &str, from: u64, max: usize) -> Vec<SpoolEntry> {
        self.lock()
            .messages
            .range((subscription.to_string(), from)..=(subscription.to_string(), u64::MAX))
            .take(max)
            .map(|((_, sequence), record)| SpoolEntry { sequence: *sequence, record: record.clone() })
            .collect()
    }

    /// Removes a spool's messages through `through`.
    pub fn trim(&self, subscription: &str, through: u64) {
        let mut spools = self.lock();
        let keys: Vec<(String, u64)> = spools
            .messages
            .range((subscription.to_string(), 0)..=(subscription.to_string(), through))
            .map(|(key, _)| key.clone())
            .collect();
        for key in keys {
            spools.messages.remove(&key);
        }
    }

    /// What each non-empty spool holds.
    pub fn summaries(&self) -> BTreeMap<String, SpoolSummary> {
        let mut summaries: BTreeMap<String, SpoolSummary> = BTreeMap::new();
        for ((subscription, sequence), record) in &self.lock().messages {
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
        summaries
    }

    /// Drops a spool.
    pub fn delete(&self, subscription: &str) {
        self.trim(subscription, u64::MAX);
        self.lock().next.remove(subscription);
    }
}
