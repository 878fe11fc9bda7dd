//! The free-disk guard of the embedded store: `state.min_free_bytes`. Below it, the store
//! takes no more messages, so that a filling disk turns into a refused append the caller
//! can tell apart from a broken database, long before the database itself fails to write.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::StoreError;

/// How long a reading of the free space is used before the filesystem is asked again: a
/// `statvfs` per append would cost a syscall for every batch on a busy source.
const FRESH_FOR: Duration = Duration::from_secs(1);

/// The free space of the filesystem holding a directory, read at most once a second.
#[derive(Debug)]
pub(super) struct FreeSpace {
    dir: PathBuf,
    min: u64,
    /// The last reading and when it was taken; `None` bytes when it could not be read.
    last: Mutex<Option<(Instant, Option<u64>)>>,
}

impl FreeSpace {
    /// Guards `dir`'s filesystem against falling under `min` free bytes (0: no guard).
    pub(super) fn new(dir: PathBuf, min: u64) -> Self {
        FreeSpace { dir, min, last: Mutex::new(None) }
    }

    /// Free bytes for an unprivileged writer, at most [`FRESH_FOR`] old; `None` when the
    /// filesystem does not say (then nothing is refused: the guard must not break a store
    /// that works).
    fn available(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, bytes)) = *last
            && at.elapsed() < FRESH_FOR
        {
            return bytes;
        }
        let bytes = match rustix::fs::statvfs(&self.dir) {
            Ok(stat) => Some(stat.f_bavail.saturating_mul(stat.f_frsize)),
            Err(error) => {
                // Once: it would not change from one second to the next.
                if last.is_none() {
                    tracing::warn!(dir = %self.dir.display(), %error, "cannot read the free space of the state directory's filesystem; state.min_free_bytes is not enforced");
                }
                None
            }
        };
        *last = Some((Instant::now(), bytes));
        bytes
    }

    /// The free bytes when they are under `bytes` (`None` when there are at least that
    /// many, or the filesystem does not say).
    pub(super) fn short_of(&self, bytes: u64) -> Option<u64> {
        self.available().filter(|free| *free < bytes)
    }

    /// `Ok` when there is room for more messages.
    ///
    /// # Errors
    /// [`StoreError::Full`] while the free space is under the minimum.
    pub(super) fn check(&self, path: &str) -> Result<(), StoreError> {
        if self.min == 0 {
            return Ok(());
        }
        match self.available() {
            Some(free) if free < self.min => {
                Err(StoreError::Full { path: path.to_string(), free, min: self.min })
            }
            _ => Ok(()),
        }
    }
}

/// `bytes` for people: `"1.5 GiB"`, `"812 B"`.
pub(super) fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(812), "812 B");
        assert_eq!(human(256 << 20), "256.0 MiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }

    #[test]
    fn a_minimum_above_the_free_space_refuses_and_zero_never_does() {
        let dir = tempfile::tempdir().unwrap();
        let huge = FreeSpace::new(dir.path().to_path_buf(), 1 << 60);
        let error = huge.check("state.redb").unwrap_err();
        assert!(matches!(error, StoreError::Full { min, .. } if min == 1 << 60), "{error:?}");
        assert!(error.to_string().contains("state.min_free_bytes"), "{error}");
        assert!(FreeSpace::new(dir.path().to_path_buf(), 0).check("state.redb").is_ok());
        assert!(FreeSpace::new(dir.path().to_path_buf(), 1).check("state.redb").is_ok());
    }
}
