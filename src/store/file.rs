//! The embedded store: one JSON file per record, under `subscriptions/` and
//! `dead-letters/` in the state directory. Each write goes to a temporary file that is
//! synced, renamed into place and made durable by syncing the directory, so a crash at
//! any moment leaves either the old record or the new one, never a torn one.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{DeadLetter, Positions, Store, StoreError};
use crate::config::RawSubscription;

/// File-based state store.
#[derive(Clone, Debug)]
pub struct FileStore {
    subscriptions: PathBuf,
    dead_letters: PathBuf,
    positions: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.display().to_string(), source }
}

/// A record id as a file name that cannot escape its directory.
fn file_name(id: &str) -> String {
    super::record_id(id)
}

impl FileStore {
    /// Opens (creating if needed) the store in `dir`.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the directories cannot be created.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let store = FileStore {
            subscriptions: dir.join("subscriptions"),
            dead_letters: dir.join("dead-letters"),
            positions: dir.join("positions"),
        };
        for path in [&store.subscriptions, &store.dead_letters, &store.positions] {
            std::fs::create_dir_all(path).map_err(io(path))?;
        }
        Ok(store)
    }

    async fn write<T: Serialize>(dir: &Path, id: &str, record: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(record).expect("records serialize");
        let dir = dir.to_path_buf();
        let name = file_name(id);
        blocking(move || {
            let final_path = dir.join(format!("{name}.json"));
            let temporary = dir.join(format!("{name}.json.tmp"));
            let mut file = std::fs::File::create(&temporary).map_err(io(&temporary))?;
            std::io::Write::write_all(&mut file, &bytes).map_err(io(&temporary))?;
            file.sync_all().map_err(io(&temporary))?;
            std::fs::rename(&temporary, &final_path).map_err(io(&final_path))?;
            sync_dir(&dir)
        })
        .await
    }

    async fn read_all<T: DeserializeOwned + Send + 'static>(dir: &Path) -> Result<Vec<T>, StoreError> {
        let dir = dir.to_path_buf();
        blocking(move || {
            let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(io(&dir))?
                .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
                .collect();
            paths.sort();
            paths.iter().map(|path| read(path)).collect()
        })
        .await
    }

    async fn read_one<T: DeserializeOwned + Send + 'static>(
        dir: &Path,
        id: &str,
    ) -> Result<Option<T>, StoreError> {
        let path = dir.join(format!("{}.json", file_name(id)));
        blocking(move || if path.is_file() { read(&path).map(Some) } else { Ok(None) }).await
    }

    async fn delete(dir: &Path, id: &str) -> Result<bool, StoreError> {
        let dir = dir.to_path_buf();
        let path = dir.join(format!("{}.json", file_name(id)));
        blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(&dir).map(|()| true),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(io(&path)(error)),
        })
        .await
    }
}

fn read<T: DeserializeOwned>(path: &Path) -> Result<T, StoreError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&bytes)
        .map_err(|error| StoreError::Corrupt { path: path.display().to_string(), message: error.to_string() })
}

/// Makes a rename or removal in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir).and_then(|handle| handle.sync_all()).map_err(io(dir))
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work).await.expect("store I/O does not panic")
}

#[async_trait]
impl Store for FileStore {
    async fn subscriptions(&self) -> Result<Vec<RawSubscription>, StoreError> {
        Self::read_all(&self.subscriptions).await
    }

    async fn put_subscription(&self, subscription: &RawSubscription) -> Result<(), StoreError> {
        Self::write(&self.subscriptions, &subscription.id, subscription).await
    }

    async fn delete_subscription(&self, id: &str) -> Result<bool, StoreError> {
        Self::delete(&self.subscriptions, id).await
    }

    async fn add_dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        Self::write(&self.dead_letters, &letter.id, letter).await
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let mut letters: Vec<DeadLetter> = Self::read_all(&self.dead_letters).await?;
        letters.sort_by(|a, b| (&a.failed_at, a.sequence).cmp(&(&b.failed_at, b.sequence)));
        Ok(letters)
    }

    async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        Self::read_one(&self.dead_letters, id).await
    }

    async fn delete_dead_letter(&self, id: &str) -> Result<bool, StoreError> {
        Self::delete(&self.dead_letters, id).await
    }

    async fn positions(&self, subscription: &str) -> Result<Positions, StoreError> {
        Ok(Self::read_one(&self.positions, subscription).await?.unwrap_or_default())
    }

    async fn put_positions(&self, subscription: &str, positions: &Positions) -> Result<(), StoreError> {
        Self::write(&self.positions, subscription, positions).await
    }

    async fn delete_positions(&self, subscription: &str) -> Result<(), StoreError> {
        Self::delete(&self.positions, subscription).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(id: &str, sequence: u64) -> DeadLetter {
        DeadLetter {
            id: id.into(),
            subscription: "s".into(),
            source: "src".into(),
            session: "abc".into(),
            sequence,
            replay_id: None,
            message: serde_json::json!({"data": 1}),
            reason: "rejected: HTTP 400".into(),
            attempts: 1,
            failed_at: "2026-01-01T00:00:00.000Z".into(),
        }
    }

    #[tokio::test]
    async fn records_survive_reopening_and_a_torn_temporary_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        store.add_dead_letter(&letter("b", 2)).await.unwrap();
        store.add_dead_letter(&letter("a", 1)).await.unwrap();
        // A crash between writing and renaming leaves only a temporary file.
        std::fs::write(dir.path().join("dead-letters/c.json.tmp"), b"{\"id\":").unwrap();
        let reopened = FileStore::open(dir.path()).unwrap();
        let ids: Vec<String> = reopened.dead_letters().await.unwrap().into_iter().map(|l| l.id).collect();
        assert_eq!(ids, ["a", "b"], "oldest first");
        assert_eq!(reopened.dead_letter("a").await.unwrap().map(|l| l.sequence), Some(1));
        assert!(reopened.delete_dead_letter("a").await.unwrap());
        assert!(!reopened.delete_dead_letter("a").await.unwrap());
        assert_eq!(reopened.dead_letter("a").await.unwrap(), None);
    }

    #[test]
    fn ids_cannot_escape_the_store_directory() {
        assert_eq!(file_name("../../etc/passwd"), ".._.._etc_passwd");
        assert_eq!(file_name(".."), "_..");
        assert_eq!(file_name("demo.orders.x1y.7"), "demo.orders.x1y.7");
    }
}
