//! What a failed delivery means, and how long it is retried: one place every sink uses.
//! A sink classifies each failure as transient (worth retrying, perhaps after the
//! server's `Retry-After`) or permanent (a dead letter at once); the forwarder retries
//! transient failures from the spool with capped, jittered exponential backoff until the
//! subscription's `retry.max_elapsed` has passed.

use std::time::{Duration, Instant};

use crate::cometd::Backoff;

/// How long and how patiently a subscription's transient failures are retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryConfig {
    /// A message still failing after this long becomes a dead letter.
    pub max_elapsed: Duration,
    /// The longest wait between two attempts.
    pub max_backoff: Duration,
    /// A message still failing after this many attempts becomes a dead letter (the first
    /// release's `sink.max_attempts`; unlimited by default).
    pub max_attempts: Option<u32>,
}

/// Why one message was not delivered this time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// What happened, for the operator (logs and dead letters).
    pub reason: String,
    /// A short, bounded label for `cometd_bridge_delivery_failures_total{reason}`.
    pub label: &'static str,
    /// Whether trying again may help.
    pub kind: FailureKind,
}

/// Whether a failure is worth retrying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// It may work later: retry, not before `retry_after` when the server said so.
    Transient {
        /// The server's `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// It will not work: a dead letter at once.
    Permanent,
}

impl Failure {
    /// A failure worth retrying.
    pub fn transient(label: &'static str, reason: impl Into<String>) -> Self {
        Failure { reason: reason.into(), label, kind: FailureKind::Transient { retry_after: None } }
    }

    /// A failure not worth retrying.
    pub fn permanent(label: &'static str, reason: impl Into<String>) -> Self {
        Failure { reason: reason.into(), label, kind: FailureKind::Permanent }
    }

    /// Whether it is a dead letter at once.
    pub fn is_permanent(&self) -> bool {
        self.kind == FailureKind::Permanent
    }

    /// The server's `Retry-After`, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self.kind {
            FailureKind::Transient { retry_after } => retry_after,
            FailureKind::Permanent => None,
        }
    }
}

/// When to try a failing delivery again, and when to give up.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    backoff: Backoff,
    config: RetryConfig,
}

/// The first wait after a failure; it doubles up to `retry.max_backoff`.
const FIRST_DELAY: Duration = Duration::from_millis(100);

impl RetryPolicy {
    /// The policy of a subscription's `retry` settings.
    pub fn new(config: RetryConfig) -> Self {
        let backoff =
            Backoff::try_new(FIRST_DELAY, config.max_backoff.max(FIRST_DELAY)).expect("a valid backoff");
        RetryPolicy { backoff, config }
    }

    /// The wait before the next attempt after `failures` failures in a row: jittered
    /// exponential, never under the server's `retry_after`, never over `max_backoff`
    /// (a receiver's `Retry-After` is honoured up to it, never beyond).
    pub fn delay(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        let asked = retry_after.unwrap_or_default().min(self.config.max_backoff);
        self.backoff.delay(failures.saturating_sub(1)).max(asked)
    }

    /// Whether a message first failing at `since`, after `attempts` attempts, is given up
    /// on rather than tried again after `delay`.
    pub fn exhausted(&self, since: Instant, attempts: u32, delay: Duration) -> bool {
        since.elapsed().saturating_add(delay) > self.config.max_elapsed
            || self.config.max_attempts.is_some_and(|max| attempts >= max)
    }
}

/// Sleeps `delay` unless `stop` is cancelled first; returns whether it slept the whole time.
pub async fn pause(delay: Duration, stop: &tokio_util::sync::CancellationToken) -> bool {
    tokio::select! {
        biased;
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_elapsed: u64, max_backoff: u64, max_attempts: Option<u32>) -> RetryPolicy {
        RetryPolicy::new(RetryConfig {
            max_elapsed: Duration::from_secs(max_elapsed),
            max_backoff: Duration::from_secs(max_backoff),
            max_attempts,
        })
    }

    #[test]
    fn delays_honour_the_server_up_to_max_backoff() {
        let policy = policy(3600, 2, None);
        for failures in 1..40 {
            assert!(policy.delay(failures, None) <= Duration::from_secs(2), "{failures}");
        }
        for failures in 1..5 {
            assert!(policy.delay(failures, Some(Duration::from_secs(1))) >= Duration::from_secs(1));
        }
        assert_eq!(policy.delay(30, Some(Duration::from_secs(9))), Duration::from_secs(2));
        assert_eq!(policy.delay(1, Some(Duration::from_secs(u64::MAX))), Duration::from_secs(2));
    }

    #[test]
    fn a_huge_delay_does_not_overflow() {
        let policy = policy(60, 5, None);
        assert!(policy.exhausted(Instant::now(), 1, Duration::MAX));
    }

    #[test]
    fn a_message_is_given_up_on_after_max_elapsed_or_max_attempts() {
        let now = Instant::now();
        assert!(!policy(60, 5, None).exhausted(now, 1000, Duration::from_secs(1)));
        assert!(policy(60, 5, None).exhausted(now, 1, Duration::from_secs(61)));
        assert!(policy(60, 5, Some(3)).exhausted(now, 3, Duration::ZERO));
        assert!(!policy(60, 5, Some(3)).exhausted(now, 2, Duration::ZERO));
    }
}
