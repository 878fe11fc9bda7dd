//! A source's replay state: each subscription's start position and its committed
//! positions (per channel, advanced only after the sink acknowledged or the message was
//! dead-lettered). The source's replay extension asks it where each channel starts.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::cometd::{ChannelPattern, ReplayPosition, ReplayPositions};
use crate::store::Positions;

struct SubscriptionPositions {
    pattern: ChannelPattern,
    start: ReplayPosition,
    committed: Positions,
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

    /// Tracks a subscription, with the positions committed before (from the store).
    pub fn add(&self, id: &str, pattern: ChannelPattern, start: ReplayPosition, committed: Positions) {
        self.write().insert(id.to_string(), SubscriptionPositions { pattern, start, committed });
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
    /// to persist.
    pub fn reset(&self, id: &str, position: ReplayPosition) -> Option<Positions> {
        let mut subscriptions = self.write();
        let subscription = subscriptions.get_mut(id)?;
        subscription.committed = Positions::from([(subscription.pattern.to_string(), position.as_id())]);
        Some(subscription.committed.clone())
    }

    /// `id`'s committed positions.
    pub fn committed(&self, id: &str) -> Positions {
        self.read().get(id).map(|subscription| subscription.committed.clone()).unwrap_or_default()
    }

    /// Where `channel` starts: each subscription on it wants its committed position, or
    /// its start position when nothing is committed; the earliest wins, so no
    /// subscription misses an event (the others get some twice, which their delivery ids
    /// let the sinks drop).
    pub fn position(&self, channel: &str) -> ReplayPosition {
        let wanted: Vec<ReplayPosition> = self
            .read()
            .values()
            .filter(|subscription| subscription.pattern.matches(channel))
            .map(|subscription| {
                subscription
                    .committed
                    .get(channel)
                    .map_or(subscription.start, |id| ReplayPosition::from_id(*id))
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
        state.add("a", pattern("/event/A"), ReplayPosition::New, Positions::new());
        assert_eq!(state.position("/event/A"), ReplayPosition::New);
        state.add("b", pattern("/event/A"), ReplayPosition::After(40), Positions::new());
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
}
