//! Deadlines that never overflow the clock, and a sleep for an optional one.

use std::time::Duration;

use tokio::time::Instant;

/// `wait` after `from`, or about thirty years after it when a configured wait is too long
/// for the clock to add (saturating: a timeout of `"300000000000y"` must not panic).
pub(crate) fn deadline(from: Instant, wait: Duration) -> Instant {
    from.checked_add(wait).unwrap_or_else(|| from + Duration::from_secs(30 * 365 * 24 * 3600))
}

/// Waits until `at`, or for ever when there is no `at`.
pub(crate) async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_too_far_for_the_clock_saturates() {
        let now = Instant::now();
        assert!(deadline(now, Duration::MAX) > now + Duration::from_secs(365 * 24 * 3600));
        assert_eq!(deadline(now, Duration::from_secs(1)), now + Duration::from_secs(1));
    }
}
