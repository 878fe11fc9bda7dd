//! The retry schedule of channels the server refused to subscribe again after a new
//! handshake, kept by the machine: each is tried again with its own backoff while the
//! session is connected, until it succeeds or the application unsubscribes.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::clock::deadline;

/// How far off a channel's next try is put while its current try is in flight: its
/// answer schedules the next one.
const IN_FLIGHT: Duration = Duration::from_secs(24 * 3600);

/// When a refused resubscription is tried next, and how many times it failed.
#[derive(Clone, Copy, Debug)]
struct Retry {
    at: Instant,
    failures: u32,
}

/// The refused channels and when each is tried again.
#[derive(Clone, Debug, Default)]
pub(crate) struct Refused {
    retries: BTreeMap<String, Retry>,
}

impl Refused {
    /// Records that the server refused `channel` (once more) at `now`, and schedules its
    /// next try after the backoff of its earlier refusals: `backoff(failures)` is the
    /// session's jittered delay after that many failures (the machine stays deterministic).
    pub(crate) fn refuse(&mut self, channel: String, now: Instant, backoff: impl FnOnce(u32) -> Duration) {
        let failures = self.retries.get(&channel).map_or(0, |retry| retry.failures);
        let at = deadline(now, backoff(failures));
        self.retries.insert(channel, Retry { at, failures: failures.saturating_add(1) });
    }

    /// When the next try is due.
    pub(crate) fn next_at(&self) -> Option<Instant> {
        self.retries.values().map(|retry| retry.at).min()
    }

    /// The channels due at `now`, marked as in flight.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<String> {
        let mut due = Vec::new();
        for (channel, retry) in &mut self.retries {
            if retry.at <= now {
                retry.at = now + IN_FLIGHT;
                due.push(channel.clone());
            }
        }
        due
    }

    /// Forgets `channel` (subscribed at last, or unsubscribed).
    pub(crate) fn remove(&mut self, channel: &str) {
        self.retries.remove(channel);
    }

    /// Whether `channel` waits for a retry.
    pub(crate) fn contains(&self, channel: &str) -> bool {
        self.retries.contains_key(channel)
    }

    /// Whether no channel waits for a retry.
    pub(crate) fn is_empty(&self) -> bool {
        self.retries.is_empty()
    }

    /// The channels waiting for a retry.
    pub(crate) fn channels(&self) -> impl Iterator<Item = &String> {
        self.retries.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(failures: u32) -> Duration {
        Duration::from_millis(100 << failures)
    }

    #[test]
    fn each_refused_channel_backs_off_on_its_own_and_is_tried_once_at_a_time() {
        let start = Instant::now();
        let mut refused = Refused::default();
        refused.refuse("/a".into(), start, millis);
        refused.refuse("/a".into(), start, millis);
        refused.refuse("/b".into(), start, millis);
        assert_eq!(refused.next_at(), Some(start + Duration::from_millis(100)), "/b after its first refusal");
        assert_eq!(refused.due(start + Duration::from_millis(150)), ["/b"]);
        assert_eq!(refused.due(start + Duration::from_millis(150)), Vec::<String>::new(), "in flight");
        assert_eq!(refused.due(start + Duration::from_millis(200)), ["/a"], "/a after its second");
        refused.remove("/a");
        assert!(!refused.contains("/a") && refused.contains("/b") && !refused.is_empty());
        assert_eq!(refused.channels().collect::<Vec<_>>(), ["/b"]);
    }
}
