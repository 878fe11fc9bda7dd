//! The gate a source's tasks pass while this replica owns the source: its session and
//! its subscriptions' forwarders run only while it is open, and count themselves while
//! they run, so that a replica giving a source up knows when they have stopped.

use tokio::sync::watch;

/// Whether this replica owns a source, and how many of its tasks run for it. Without
/// replicas it is open for good.
#[derive(Clone, Debug)]
pub struct Gate {
    owned: watch::Receiver<bool>,
    busy: watch::Sender<usize>,
}

impl Gate {
    /// A gate over `owned`, counting running tasks in `busy`.
    pub fn new(owned: watch::Receiver<bool>, busy: watch::Sender<usize>) -> Self {
        Gate { owned, busy }
    }

    /// Waits until the source is owned; `false` when it never will be again.
    pub async fn opened(&mut self) -> bool {
        let gone = self.owned.wait_for(|owned| *owned).await.is_err();
        // The sender is gone: what it said last still holds.
        !gone || *self.owned.borrow()
    }

    /// Waits until the source is no longer owned (never, once the sender is gone and it
    /// was owned last).
    pub async fn closed(&mut self) {
        let gone = self.owned.wait_for(|owned| !*owned).await.is_err();
        if gone && *self.owned.borrow() {
            std::future::pending::<()>().await;
        }
    }

    /// Counts a task as running until the guard is dropped.
    pub fn enter(&self) -> Running {
        self.busy.send_modify(|running| *running += 1);
        Running { busy: self.busy.clone() }
    }
}

/// A task counted as running.
pub struct Running {
    busy: watch::Sender<usize>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.busy.send_modify(|running| *running = running.saturating_sub(1));
    }
}

/// Until when this replica may write for a source (append, deliver, settle): until its
/// lease could have expired, as last renewed. A replica paused (SIGSTOP) past it, or cut
/// from NATS, writes nothing when it wakes, even before it learns that another replica
/// took the source. Measured on the monotonic clock, which counts the time stopped.
#[derive(Debug)]
pub struct LeaseClock {
    base: std::time::Instant,
    /// Milliseconds after `base`; `u64::MAX` for ever (one process alone).
    until: std::sync::atomic::AtomicU64,
}

impl LeaseClock {
    /// Writes allowed for good: no replicas.
    pub fn forever() -> std::sync::Arc<Self> {
        std::sync::Arc::new(LeaseClock { base: std::time::Instant::now(), until: u64::MAX.into() })
    }

    /// No writes until a lease is taken.
    pub fn lapsed() -> std::sync::Arc<Self> {
        std::sync::Arc::new(LeaseClock { base: std::time::Instant::now(), until: 0.into() })
    }

    /// Writes allowed until `until`.
    pub fn extend_to(&self, until: std::time::Instant) {
        let millis =
            u64::try_from(until.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX - 1);
        self.until.store(millis, std::sync::atomic::Ordering::Release);
    }

    /// No more writes.
    pub fn revoke(&self) {
        self.until.store(0, std::sync::atomic::Ordering::Release);
    }

    /// How long writes stay allowed from now (zero once lapsed; `Duration::MAX` for ever).
    pub fn remaining(&self) -> std::time::Duration {
        let until = self.until.load(std::sync::atomic::Ordering::Acquire);
        if until == u64::MAX {
            return std::time::Duration::MAX;
        }
        let elapsed = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        std::time::Duration::from_millis(until.saturating_sub(elapsed))
    }

    /// Whether a write may start now.
    pub fn may_write(&self) -> bool {
        let until = self.until.load(std::sync::atomic::Ordering::Acquire);
        until == u64::MAX || u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX) < until
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::LeaseClock;

    #[test]
    fn the_remaining_time_follows_the_lease() {
        assert_eq!(LeaseClock::forever().remaining(), Duration::MAX);
        assert_eq!(LeaseClock::lapsed().remaining(), Duration::ZERO);
        let clock = LeaseClock::lapsed();
        clock.extend_to(Instant::now() + Duration::from_secs(60));
        let remaining = clock.remaining();
        assert!(remaining > Duration::from_secs(50) && remaining <= Duration::from_secs(60), "{remaining:?}");
        clock.revoke();
        assert_eq!(clock.remaining(), Duration::ZERO);
        assert!(!clock.may_write());
    }
}
