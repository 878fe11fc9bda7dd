//! Spools in the embedded store: each subscription's messages, one record per appended
//! batch, read in order from a sequence on and trimmed as batches are settled.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use redb::{Durability, ReadableTable};

use super::dead_letters::LetterTables;
use super::{EmbeddedStore, POSITIONS, SPOOL, SPOOL_NEXT, SPOOL_SETTLED};
use crate::store::spool_read::SpoolRead;
use crate::store::{Settlement, SpoolAppend, SpoolEntry, SpoolSummary, StoreError, batch};

impl EmbeddedStore {
    /// Appends in one synced transaction, a batch record per subscription (split by size).
    pub(super) async fn append_batches(
        &self,
        appends: Arc<[SpoolAppend]>,
    ) -> Result<Vec<Option<u64>>, StoreError> {
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

    /// Up to `max` messages of a spool from `from` on, within [`SPOOL_READ_BYTES`].
    pub(super) async fn read_batches(
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
                let mut read = SpoolRead::new(max);
                'batches: for entry in table.range((subscription, start)..=(subscription, u64::MAX))? {
                    let (key, value) = entry?;
                    for (sequence, record) in (key.value().1..).zip(batch::records(value.value())) {
                        if sequence < from {
                            continue;
                        }
                        if !read.take(sequence, record) {
                            break 'batches;
                        }
                    }
                }
                Ok(read.into_entries())
            })
        })
        .await
    }

    /// Trims a spool through a sequence with the batch's dead letters and positions.
    pub(super) async fn settle_batch(&self, settlement: Settlement) -> Result<(), StoreError> {
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

    /// What each non-empty spool holds.
    pub(super) async fn summarize_spools(&self) -> Result<BTreeMap<String, SpoolSummary>, StoreError> {
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

    /// Drops a spool and its counters.
    pub(super) async fn delete_spool(&self, subscription: &str) -> Result<(), StoreError> {
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
pub(super) fn next_sequence(
    counters: &impl ReadableTable<&'static str, u64>,
    subscription: &str,
) -> Result<u64, redb::Error> {
    Ok(counters.get(subscription)?.map_or(1, |next| next.value()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PositionRecords;
    use crate::store::Spools;
    use crate::store::embedded::append;
    use crate::store::{Positions, SPOOL_READ_BYTES, Store};

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
