//! One spool read and its bounds, the same in every backend: at most the messages asked
//! for, and no more than [`SPOOL_READ_BYTES`] of them beyond the first, so that a forwarder
//! reads a backlog in parts of bounded memory whatever the messages' size.

use super::{SPOOL_READ_BYTES, SpoolEntry};

/// The messages of one spool read, in order, taken until it is full.
#[derive(Debug)]
pub(super) struct SpoolRead {
    entries: Vec<SpoolEntry>,
    max: usize,
    bytes: usize,
}

impl SpoolRead {
    /// A read of at most `max` messages.
    pub(super) fn new(max: usize) -> Self {
        SpoolRead { entries: Vec::new(), max, bytes: 0 }
    }

    /// Whether it takes no more: `max` messages, or [`SPOOL_READ_BYTES`] reached (the
    /// first message is taken however large).
    pub(super) fn is_full(&self) -> bool {
        self.entries.len() >= self.max || self.bytes >= SPOOL_READ_BYTES
    }

    /// Takes the next message unless the read is full; `false` when it is, and the reader
    /// stops.
    pub(super) fn take(&mut self, sequence: u64, record: &[u8]) -> bool {
        if self.is_full() {
            return false;
        }
        self.bytes += record.len();
        self.entries.push(SpoolEntry { sequence, record: record.to_vec() });
        true
    }

    /// Whether it took nothing yet.
    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The messages taken, in order.
    pub(super) fn into_entries(self) -> Vec<SpoolEntry> {
        self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_stops_at_its_count_or_its_bytes_but_takes_a_first_message_however_large() {
        let mut read = SpoolRead::new(2);
        assert!(read.take(1, b"a") && read.take(2, b"b"));
        assert!(!read.take(3, b"c"), "two asked for");
        assert_eq!(read.into_entries().iter().map(|entry| entry.sequence).collect::<Vec<_>>(), [1, 2]);

        let huge = vec![0u8; SPOOL_READ_BYTES + 1];
        let mut read = SpoolRead::new(10);
        assert!(read.take(1, &huge), "the first however large");
        assert!(read.is_full() && !read.take(2, b"small"));

        let part = vec![0u8; SPOOL_READ_BYTES / 2];
        let mut read = SpoolRead::new(10);
        assert!(read.take(1, &part) && read.take(2, &part), "under the bound until reached");
        assert!(!read.take(3, b"x"));
        assert_eq!(read.into_entries().len(), 2);
    }
}
