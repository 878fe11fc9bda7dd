//! Exponential backoff with full jitter and a cap, for reconnects and re-handshakes.
//!
//! Full jitter (a uniformly random delay between zero and the exponential bound) spreads
//! the reconnects of many clients after a server restart, so they do not arrive together.

use std::time::Duration;

use super::error::Error;

/// Delays that double after each failure, randomised, never above the cap. The client
/// uses it for reconnects; it is public so that code around the client can back off the
/// same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
}

impl Backoff {
    /// A backoff starting at `initial` and capped at `max`.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] when `initial` is zero or above `max`.
    pub fn try_new(initial: Duration, max: Duration) -> Result<Self, Error> {
        if initial.is_zero() || initial > max {
            return Err(Error::InvalidOptions(format!(
                "backoff: the initial delay ({initial:?}) must be above zero and at most the cap ({max:?})"
            )));
        }
        Ok(Backoff { initial, max })
    }

    /// The upper bound of the delay after `failures` consecutive failures (0 for the first).
    pub fn bound(&self, failures: u32) -> Duration {
        let factor = 1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// A random delay in `[0, bound(failures)]`.
    pub fn delay(&self, failures: u32) -> Duration {
        self.delay_within(failures, Duration::MAX)
    }

    /// A random delay in `[0, min(bound(failures), cap)]`: the client caps its reconnect
    /// delays so that several attempts fit in `connection_timeout`.
    pub fn delay_within(&self, failures: u32, cap: Duration) -> Duration {
        let bound = self.bound(failures).min(cap);
        let nanos = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(fastrand::u64(0..=nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_double_up_to_the_cap() {
        let backoff = Backoff::try_new(Duration::from_millis(100), Duration::from_secs(1)).unwrap();
        let bounds: Vec<u128> = (0..6).map(|n| backoff.bound(n).as_millis()).collect();
        assert_eq!(bounds, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff.bound(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn delays_stay_within_their_bound() {
        let backoff = Backoff::try_new(Duration::from_millis(10), Duration::from_millis(80)).unwrap();
        for failures in 0..10 {
            for _ in 0..200 {
                assert!(backoff.delay(failures) <= backoff.bound(failures));
            }
        }
    }

    #[test]
    fn a_cap_bounds_the_delay() {
        let backoff = Backoff::try_new(Duration::from_millis(10), Duration::from_secs(30)).unwrap();
        for _ in 0..200 {
            assert!(backoff.delay_within(20, Duration::from_millis(25)) <= Duration::from_millis(25));
        }
    }

    #[test]
    fn a_zero_or_inverted_backoff_is_rejected() {
        assert!(Backoff::try_new(Duration::ZERO, Duration::from_secs(1)).is_err());
        assert!(Backoff::try_new(Duration::from_secs(2), Duration::from_secs(1)).is_err());
    }
}
