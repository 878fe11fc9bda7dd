//! The running subscriptions by id. One owner, changed only in short synchronous steps,
//! never across an await, so that a slow upstream or sink never holds up the API, the
//! metrics or shutdown. An id being added is reserved first: two concurrent adds of one
//! id conflict, and nobody sees a subscription before it runs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::task::JoinHandle;

use super::forwarder::{Counters, Stop};
use super::spool::Spool;
use super::views::Origin;
use crate::config::SubscriptionConfig;

/// One running subscription.
pub(super) struct SubscriptionEntry {
    pub(super) config: SubscriptionConfig,
    pub(super) origin: Origin,
    pub(super) spool: Arc<Spool>,
    pub(super) counters: Arc<Counters>,
    pub(super) forwarder: JoinHandle<()>,
    pub(super) stop: Stop,
}

/// Why an id cannot be reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refused {
    /// A subscription of that id runs or is being added.
    Taken,
    /// As many subscriptions as allowed run or are being added.
    Full,
}

#[derive(Default)]
struct Entries {
    running: BTreeMap<String, SubscriptionEntry>,
    reserved: BTreeSet<String>,
}

/// The running subscriptions.
#[derive(Default)]
pub(super) struct Registry {
    entries: Mutex<Entries>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reserves `id` for a subscription being added, when it is free and fewer than
    /// `limit` subscriptions run or are being added.
    pub(super) fn reserve(&self, id: &str, limit: usize) -> Result<(), Refused> {
        let mut entries = self.lock();
        if entries.running.contains_key(id) || entries.reserved.contains(id) {
            Err(Refused::Taken)
        } else if entries.running.len() + entries.reserved.len() >= limit {
            Err(Refused::Full)
        } else {
            entries.reserved.insert(id.to_string());
            Ok(())
        }
    }

    /// Gives up a reservation (the add failed).
    pub(super) fn release(&self, id: &str) {
        self.lock().reserved.remove(id);
    }

    /// Adds a running subscription (ending its reservation, if any). An id that already
    /// runs is refused, never replaced: the newcomer's forwarder is stopped and the one
    /// running goes on (replacing it would orphan its forwarder and spool).
    pub(super) fn insert(&self, entry: SubscriptionEntry) -> Result<(), Refused> {
        let mut entries = self.lock();
        entries.reserved.remove(&entry.config.id);
        if entries.running.contains_key(&entry.config.id) {
            drop(entries);
            tracing::error!(id = %entry.config.id, "a subscription of this id already runs; the second one is stopped");
            entry.stop.soon.cancel();
            entry.stop.now.cancel();
            return Err(Refused::Taken);
        }
        entries.running.insert(entry.config.id.clone(), entry);
        Ok(())
    }

    /// Whether `id` runs or is being added.
    pub(super) fn contains(&self, id: &str) -> bool {
        let entries = self.lock();
        entries.running.contains_key(id) || entries.reserved.contains(id)
    }

    /// Takes `id` out when `check` allows it; `None` when it does not run.
    pub(super) fn remove<E>(
        &self,
        id: &str,
        check: impl FnOnce(&SubscriptionEntry) -> Result<(), E>,
    ) -> Option<Result<SubscriptionEntry, E>> {
        let mut entries = self.lock();
        let entry = entries.running.get(id)?;
        Some(check(entry).map(|()| entries.running.remove(id).expect("checked above")))
    }

    /// What `read` makes of `id`'s entry, if it runs.
    pub(super) fn get<T>(&self, id: &str, read: impl FnOnce(&SubscriptionEntry) -> T) -> Option<T> {
        self.lock().running.get(id).map(read)
    }

    /// What `read` makes of every entry, in id order.
    pub(super) fn all<T>(&self, read: impl FnMut(&SubscriptionEntry) -> T) -> Vec<T> {
        self.lock().running.values().map(read).collect()
    }
}
