//! Older layouts imported on open: the first release's file store, and the first release
//! candidate's spool of one record per message.

use std::path::{Path, PathBuf};

use redb::ReadableTable;

use super::{
    DEAD_LETTER_TOTALS, DEAD_LETTERS, EmbeddedStore, FILE_NAME, NEXT_AGE, POSITIONS, SPOOL,
    SPOOL_PER_MESSAGE, SUBSCRIPTIONS,
};
use crate::store::{StoreError, batch};

impl EmbeddedStore {
    /// Moves a spool written one record per message (before spools were kept by batch)
    /// into batches of one, in one transaction, and drops the old table.
    pub(super) fn migrate_per_message_spool(&self) -> Result<(), StoreError> {
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
    pub(super) fn migrate_file_store(&self, dir: &Path) -> Result<(), StoreError> {
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

#[cfg(test)]
mod tests {
    use crate::store::Spools;
    use redb::Database;

    use super::*;
    use crate::store::SpoolSummary;
    use crate::store::embedded::{SPOOL_NEXT, append};

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
}
