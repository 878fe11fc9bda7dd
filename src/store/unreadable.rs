//! Records that cannot be read back, the same in every backend: each one is reported and
//! counted, and left out of the listing, so that one bad record breaks no listing and no
//! start (`cometd_bridge_state_errors_total` counts them).

use std::sync::atomic::{AtomicU64, Ordering};

use super::StoreError;

/// The records skipped since the store opened because they could not be read.
#[derive(Debug, Default)]
pub(super) struct Unreadable(AtomicU64);

impl Unreadable {
    /// Reports and counts an unreadable record that a listing leaves out.
    pub(super) fn skip(&self, error: &StoreError) {
        tracing::error!(error = %error, "skipping an unreadable record");
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The record read, or `None` once it is reported and counted as unreadable.
    pub(super) fn keep<T>(&self, read: Result<T, StoreError>) -> Option<T> {
        read.map_err(|error| self.skip(&error)).ok()
    }

    /// How many were skipped.
    pub(super) fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}
