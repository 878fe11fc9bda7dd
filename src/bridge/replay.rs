//! A source's replay state: each subscription's start position, its committed positions
//! (per channel, advanced only after the sink acknowledged or the message was
//! dead-lettered) and its spooled positions (the newest replay id already in its spool, per
//! channel). The source's replay extension asks it where each channel starts: from what is
//! spooled, never from what was delivered, so that a new session, a restart or a reload
//! replays nothing a spool already holds; and the source asks it whether a replayed event
//! is already spooled for a subscription, so that each is spooled once per subscription.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::cometd::{ChannelPattern, ReplayPosition, ReplayPositions};
use crate::store::Positions;

struct SubscriptionPositions {
    pattern: ChannelPattern,
    start: ReplayPosition,
    committed: Positions,
    /// The newest replay id spooled, per channel.
    spooled: Positions,
}

/// Replay positions of one source's subscriptions.
#[derive(Default)]
pub struct ReplayState {
    subscriptions: RwLock<BTreeMap<String, SubscriptionPositions>>,
}

impl ReplayState {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, SubscriptionPositions>> {
        self.subscriptions.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, SubscriptionPositions>> {
        self.subscriptions.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Tracks a subscription, with the positions committed before and the newest replay
    /// ids its spool holds (both from the store). Spooled positions already known (a
    /// reload that keeps the spool) are kept where they are newer.
    pub fn add(
        &self,
        id: &str,
        pattern: ChannelPattern,
        start: ReplayPosition,
        committed: Positions,
        spooled: Positions,
    ) {
        let mut subscriptions = self.write();
        let mut spooled = spooled;
        if let Some(previous) = subscriptions.get(id) {
            for (channel, replay_id) in &previous.spooled {
                let kept = spooled.entry(channel.clone()).or_insert(*replay_id);
                *kept = (*kept).max(*replay_id);
            }
        }
        subscriptions.insert(id.to_string(), SubscriptionPositions { pattern, start, committed, spooled });
    }

    /// Whether the event `replay_id` of `channel` is already in `id`'s spool (or was
    /// delivered): a replay from a neighbour's older position, or a batch the server sent
    /// again.
    pub fn already_spooled(&self, id: &str, channel: &str, replay_id: i64) -> bool {
        self.read().get(id).is_some_and(|subscription| {
            let spooled = subscription.spooled.get(channel).copied();
            let committed = subscription.committed.get(channel).copied().filter(|id| *id >= 0);
            spooled.max(committed).is_some_and(|newest| replay_id <= newest)
        })
    }

    /// Notes that `id`'s spool now holds the event `replay_id` of `channel`.
    pub fn spooled(&self, id: &str, channel: &str, replay_id: i64) {
        if let Some(subscription) = self.write().get_mut(id) {
            let newest = subscription.spooled.entry(channel.to_string()).or_insert(replay_id);
            *newest = (*newest).max(replay_id);
        }
    }

    /// Stops tracking a subscription.
    pub fn remove(&self, id: &str) {
        self.write().remove(id);
    }

    /// Records that everything up to `replay_id` on `channel` is done for `id`; returns
    /// the subscription's positions to persist. A position never moves backwards (a
    /// retried dead letter carries an old replay id).
    pub fn commit(&self, id: &str, channel: &str, replay_id: i64) -> Option<Positions> {
        let mut subscriptions = self.write();
        let subscription = subscriptions.get_mut(id)?;
        let committed = subscription.committed.entry(channel.to_string()).or_insert(replay_id);
        *committed = (*committed).max(replay_id);
        Some(subscription.committed.clone())
    }

    /// Sets `id`'s position on its channel (an operator's reset); returns the positions
    /// to persist. What is spooled no longer counts: the operator asked for these events
    /// again.
    pub fn reset(&self, id: &str, position: ReplayPosition) -> Option<Positions> {
        let mut subscriptions = self.write();
        let subscription = subscriptions.get_mut(id)?;
        subscription.committed = Positions::from([(subscription.pattern.to_string(), position.as_id())]);
        subscription.spooled.clear();
        Some(subscription.committed.clone())
    }

    /// `id`'s committed positions.
    pub fn committed(&self, id: &str) -> Positions {
        self.read().get(id).map(|subscription| subscription.committed.clone()).unwrap_or_default()
    }

    /// Where `channel` starts: each subscription on it wants the newest replay id it has
    /// spooled or delivered, else its committed reset (`-1`/`-2`), else its start
    /// position; the earliest wins, so no subscription misses an event (the others skip
    /// what they already spooled, see [`already_spooled`](Self::already_spooled)).
    pub fn position(&self, channel: &str) -> ReplayPosition {
        let wanted: Vec<ReplayPosition> = self
            .read()
            .values()
            .filter(|subscription| subscription.pattern.matches(channel))
            .map(|subscription| {
                let committed = subscription.committed.get(channel).copied();
                let spooled = subscription.spooled.get(channel).copied();
                match (committed, spooled) {
                    (Some(committed), Some(spooled)) => ReplayPosition::from_id(committed.max(spooled)),
                    (None, Some(spooled)) => ReplayPosition::from_id(spooled),
                    (Some(committed), None) => ReplayPosition::from_id(committed),
                    (None, None) => subscription.start,
                }
            })
            .collect();
        earliest(&wanted)
    }
}

fn earliest(wanted: &[ReplayPosition]) -> ReplayPosition {
    if wanted.contains(&ReplayPosition::All) {
        return ReplayPosition::All;
    }
    wanted
        .iter()
        .filter_map(|position| match position {
            ReplayPosition::After(id) => Some(*id),
            _ => None,
        })
        .min()
        .map_or(ReplayPosition::New, ReplayPosition::After)
}

/// The [`ReplayPositions`] the source's replay extension reads.
pub struct SourcePositions(pub Arc<ReplayState>);

impl ReplayPositions for SourcePositions {
    fn position(&self, channel: &str) -> ReplayPosition {
        self.0.position(channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> ChannelPattern {
        ChannelPattern::new(text).unwrap()
    }

    #[test]
    fn the_earliest_wanted_position_wins() {
        let state = ReplayState::default();
        assert_eq!(state.position("/event/A"), ReplayPosition::New, "nobody wants it");
        state.add("a", pattern("/event/A"), ReplayPosition::New, Positions::new(), Positions::new());
        assert_eq!(state.position("/event/A"), ReplayPosition::New);
        state.add("b", pattern("/event/A"), ReplayPosition::After(40), Positions::new(), Positions::new());
        assert_eq!(state.position("/event/A"), ReplayPosition::After(40));
        state.commit("b", "/event/A", 52);
        state.commit("a", "/event/A", 47);
        assert_eq!(state.position("/event/A"), ReplayPosition::After(47));
        state.reset("a", ReplayPosition::All);
        assert_eq!(state.position("/event/A"), ReplayPosition::All);
        state.remove("a");
        assert_eq!(state.position("/event/A"), ReplayPosition::After(52));
        assert_eq!(state.committed("b"), Positions::from([("/event/A".to_string(), 52)]));
        assert_eq!(state.position("/event/B"), ReplayPosition::New);
    }

    #[test]
    fn a_channel_starts_after_what_is_spooled_and_each_event_is_spooled_once() {
        let state = ReplayState::default();
        let committed = Positions::from([("/event/A".to_string(), 10)]);
        state.add("a", pattern("/event/A"), ReplayPosition::New, committed, Positions::new());
        assert_eq!(state.position("/event/A"), ReplayPosition::After(10), "delivered through 10");
        for replay_id in 11..=210 {
            assert!(!state.already_spooled("a", "/event/A", replay_id));
            state.spooled("a", "/event/A", replay_id);
        }
        assert_eq!(
            state.position("/event/A"),
            ReplayPosition::After(210),
            "not from 10: 11-210 wait in the spool"
        );
        assert!(state.already_spooled("a", "/event/A", 150), "a replay of a spooled event is skipped");
        assert!(!state.already_spooled("a", "/event/A", 211));
        // A restart: the spool's newest ids come from the store.
        let restarted = ReplayState::default();
        restarted.add(
            "a",
            pattern("/event/A"),
            ReplayPosition::New,
            Positions::from([("/event/A".to_string(), 10)]),
            Positions::from([("/event/A".to_string(), 210)]),
        );
        assert_eq!(restarted.position("/event/A"), ReplayPosition::After(210));
        // A reset asks for the events again.
        restarted.reset("a", ReplayPosition::All);
        assert_eq!(restarted.position("/event/A"), ReplayPosition::All);
        assert!(!restarted.already_spooled("a", "/event/A", 150));
    }
}
