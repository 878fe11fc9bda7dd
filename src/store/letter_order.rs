//! The order of dead letters, the same in every backend: oldest first, by when they failed,
//! then by their sequence (then by id, where an index needs a total order).

use serde::Deserialize;

use super::DeadLetter;

/// What of a dead letter's stored form gives its age.
#[derive(Debug, Default, Deserialize)]
pub(super) struct Age {
    #[serde(default)]
    failed_at: String,
    #[serde(default)]
    sequence: u64,
}

impl Age {
    /// The age of a dead letter from its stored form; one that cannot be read counts as the
    /// oldest (the first evicted).
    pub(super) fn of(stored: &[u8]) -> Age {
        serde_json::from_slice(stored).unwrap_or_default()
    }
}

/// Sorts dead letters oldest first (a stable sort: ties keep their order).
pub(super) fn oldest_first(letters: &mut [DeadLetter]) {
    letters.sort_by(|a, b| (&a.failed_at, a.sequence).cmp(&(&b.failed_at, b.sequence)));
}

/// Sorts stored dead letters, as `(id, stored size, age)`, oldest first and ties by id: the
/// order in which a bound on their size evicts them.
pub(super) fn index_order(letters: &mut [(String, u64, Age)]) {
    letters.sort_by(|a, b| (&a.2.failed_at, a.2.sequence, &a.0).cmp(&(&b.2.failed_at, b.2.sequence, &b.0)));
}
