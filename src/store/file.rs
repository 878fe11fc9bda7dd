//! The embedded store: dead letters appended as JSON lines to `dead-letters.jsonl` in the
//! state directory, each write flushed to disk before it counts.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{DeadLetter, StoreError};

/// File-based state store.
#[derive(Clone)]
pub struct FileStore {
    dead_letters: PathBuf,
    /// Serialises appends, so lines never interleave.
    lock: Arc<Mutex<()>>,
}

impl FileStore {
    /// Opens (creating if needed) the store in `dir`.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the directory cannot be created.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let dead_letters = dir.join("dead-letters.jsonl");
        drop_torn_tail(&dead_letters)?;
        Ok(FileStore {
            dead_letters,
            lock: Arc::new(Mutex::new(())),
        })
    }

    /// Stores a dead letter durably (written and synced before this returns).
    ///
    /// # Errors
    /// [`StoreError::Io`] when it cannot be written.
    pub async fn add_dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        let mut line = serde_json::to_vec(letter).expect("dead letters serialize");
        line.push(b'\n');
        let path = self.dead_letters.clone();
        let lock = self.lock.clone();
        tokio::task::spawn_blocking(move || {
            let _guard = lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let io = |source| StoreError::Io {
                path: path.display().to_string(),
                source,
            };
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io)?;
            file.write_all(&line).map_err(io)?;
            file.sync_data().map_err(io)
        })
        .await
        .expect("the write task does not panic")
    }

    /// Every stored dead letter, oldest first. A torn last line (a crash mid-write) is
    /// skipped, since its write never completed.
    ///
    /// # Errors
    /// [`StoreError`] when the file cannot be read or a complete line is corrupt.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let path = self.dead_letters.clone();
        tokio::task::spawn_blocking(move || {
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(source) => {
                    return Err(StoreError::Io {
                        path: path.display().to_string(),
                        source,
                    });
                }
            };
            let complete = text.rfind('\n').map_or("", |end| &text[..end]);
            complete
                .lines()
                .filter(|line| !line.is_empty())
                .map(|line| {
                    serde_json::from_str(line).map_err(|error| StoreError::Corrupt {
                        path: path.display().to_string(),
                        message: error.to_string(),
                    })
                })
                .collect()
        })
        .await
        .expect("the read task does not panic")
    }
}

/// Cuts a last line whose write never completed (a crash mid-append), so the next append
/// starts on a line of its own. Every completed write ends with a newline.
fn drop_torn_tail(path: &Path) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    };
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(io(source)),
    };
    if bytes.last().is_none_or(|last| *last == b'\n') {
        return Ok(());
    }
    let keep = bytes
        .iter()
        .rposition(|byte| *byte == b'\n')
        .map_or(0, |end| end + 1);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io)?;
    file.set_len(keep as u64).map_err(io)?;
    file.sync_data().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(id: &str) -> DeadLetter {
        DeadLetter {
            id: id.into(),
            subscription: "s".into(),
            source: "src".into(),
            message: serde_json::json!({"data": 1}),
            reason: "HTTP 400".into(),
            attempts: 1,
            failed_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[tokio::test]
    async fn dead_letters_survive_reopening_and_a_torn_last_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        store.add_dead_letter(&letter("a")).await.unwrap();
        store.add_dead_letter(&letter("b")).await.unwrap();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("dead-letters.jsonl"))
            .unwrap();
        file.write_all(b"{\"id\":\"torn").unwrap();
        let reopened = FileStore::open(dir.path()).unwrap();
        reopened.add_dead_letter(&letter("c")).await.unwrap();
        let ids: Vec<String> = reopened
            .dead_letters()
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.id)
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
    }
}
