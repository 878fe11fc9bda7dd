//! Dead letters in the embedded store: their table with an index by age and size, so that
//! storing one and evicting the oldest over `state.dead_letters_max_bytes` reads nothing else.

use std::sync::atomic::Ordering;

use redb::{ReadableTable, TableHandle};

use super::spool::next_sequence;
use super::{
    BYTES, DEAD_LETTER_AGES, DEAD_LETTER_SIZES, DEAD_LETTER_TOTALS, DEAD_LETTERS, EmbeddedStore, NEXT_AGE,
    SPOOL, SPOOL_NEXT,
};
use crate::store::letter_order::{self, Age};
use crate::store::{DeadLetter, SpoolAppend, StoreError, batch};

impl EmbeddedStore {
    /// Indexes the dead letters by age with their sizes when the database has no index yet
    /// (written before dead letters were bounded, or just imported), oldest first by
    /// `failed_at`.
    pub(super) fn index_dead_letters(&self) -> Result<(), StoreError> {
        let indexed = self.read(|txn| Ok(txn.open_table(DEAD_LETTER_TOTALS)?.get(NEXT_AGE)?.is_some()))?;
        if indexed {
            return Ok(());
        }
        let count = self.write(|txn| {
            let mut letters: Vec<(String, u64, Age)> = Vec::new();
            for entry in txn.open_table(DEAD_LETTERS)?.iter()? {
                let (key, value) = entry?;
                let age = Age::of(value.value());
                letters.push((key.value().to_string(), value.value().len() as u64, age));
            }
            letter_order::index_order(&mut letters);
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
    pub(super) fn evicted(&self, evicted: &[String]) {
        self.shared.evicted.fetch_add(evicted.len() as u64, Ordering::Relaxed);
        crate::store::log_evicted(evicted, self.shared.max_letter_bytes.load(Ordering::Relaxed));
    }

    /// Stores dead letters (`(id, stored form)`) in one synced transaction; what they
    /// evicted is logged and counted.
    pub(super) async fn put_dead_letters(&self, letters: Vec<(String, Vec<u8>)>) -> Result<(), StoreError> {
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

    /// Every dead letter, oldest first.
    pub(super) async fn letters_oldest_first(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let mut letters: Vec<DeadLetter> = self.all(DEAD_LETTERS).await?;
        letter_order::oldest_first(&mut letters);
        Ok(letters)
    }

    /// Up to `limit` dead letters in id order after `after`, and whether more follow.
    pub(super) async fn letters_page(
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

    /// Removes these dead letters in one transaction; how many were there.
    pub(super) async fn delete_letters(&self, ids: Vec<String>) -> Result<u64, StoreError> {
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

    /// One synced transaction for all of them: each requeued one is a batch of one in its
    /// spool (the spool reads them in order like any other).
    pub(super) async fn requeue_letters(
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
pub(super) struct LetterTables<'txn> {
    letters: redb::Table<'txn, &'static str, &'static [u8]>,
    ages: redb::Table<'txn, u64, &'static str>,
    sizes: redb::Table<'txn, &'static str, (u64, u64)>,
    totals: redb::Table<'txn, &'static str, u64>,
    bytes: u64,
    next_age: u64,
}

impl<'txn> LetterTables<'txn> {
    pub(super) fn open(txn: &'txn redb::WriteTransaction) -> Result<Self, redb::Error> {
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
    pub(super) fn insert(&mut self, id: &str, bytes: &[u8], max: u64) -> Result<Vec<String>, redb::Error> {
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
    pub(super) fn remove(&mut self, id: &str) -> Result<bool, redb::Error> {
        if let Some(entry) = self.sizes.remove(id)? {
            let (age, size) = entry.value();
            self.ages.remove(age)?;
            self.bytes = self.bytes.saturating_sub(size);
        }
        Ok(self.letters.remove(id)?.is_some())
    }

    /// Writes the totals back.
    pub(super) fn finish(mut self) -> Result<(), redb::Error> {
        self.totals.insert(BYTES, self.bytes)?;
        self.totals.insert(NEXT_AGE, self.next_age)?;
        Ok(())
    }
}
