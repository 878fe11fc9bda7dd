//! The bound on dead letters (`state.dead_letters_max_bytes`) as the memory and NATS KV
//! stores keep it: each letter's age and stored size in memory, with their running total,
//! so that storing one finds what to evict without reading the dead letters. (The
//! embedded store keeps the same in tables of its database, see `embedded.rs`.)

use std::collections::{BTreeMap, HashMap};

/// Dead letters by age with their sizes.
#[derive(Debug, Default)]
pub(super) struct LetterBound {
    /// Id by age (the order they were stored in).
    by_age: BTreeMap<u64, String>,
    /// Age and size by id.
    by_id: HashMap<String, (u64, u64)>,
    /// Their total size.
    bytes: u64,
    next: u64,
}

impl LetterBound {
    /// Notes a letter of `size` bytes stored under `id` (replacing one of that id), and
    /// returns the ids to evict, oldest first, so that the total stays within `max`: the
    /// new letter itself when it alone is larger.
    pub(super) fn insert(&mut self, id: &str, size: u64, max: u64) -> Vec<String> {
        self.remove(id);
        let age = self.next;
        self.next += 1;
        self.by_age.insert(age, id.to_string());
        self.by_id.insert(id.to_string(), (age, size));
        self.bytes += size;
        let mut evicted = Vec::new();
        while self.bytes > max {
            let Some((_, oldest)) = self.by_age.first_key_value() else { break };
            let oldest = oldest.clone();
            self.remove(&oldest);
            evicted.push(oldest);
        }
        evicted
    }

    /// Forgets a letter; `false` when it was not there.
    pub(super) fn remove(&mut self, id: &str) -> bool {
        match self.by_id.remove(id) {
            Some((age, size)) => {
                self.by_age.remove(&age);
                self.bytes -= size;
                true
            }
            None => false,
        }
    }

    /// The total size of the letters noted.
    #[cfg(test)]
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_go_first_and_the_total_follows_replacements_and_removals() {
        let mut bound = LetterBound::default();
        assert!(bound.insert("a", 40, 100).is_empty());
        assert!(bound.insert("b", 40, 100).is_empty());
        assert_eq!(bound.insert("c", 40, 100), ["a"]);
        assert_eq!(bound.bytes(), 80);
        // A replacement counts once, and is now the newest.
        assert!(bound.insert("b", 50, 100).is_empty());
        assert_eq!(bound.bytes(), 90);
        assert_eq!(bound.insert("d", 20, 100), ["c"]);
        assert!(bound.remove("d"));
        assert!(!bound.remove("d"));
        assert_eq!(bound.bytes(), 50);
        assert_eq!(bound.insert("huge", 500, 100), ["b", "huge"], "larger than the bound alone");
        assert_eq!(bound.bytes(), 0);
    }
}
