//! Restarting what fails: a forwarder or source task that ends in a panic (a bug, or a
//! dependency's assertion reached by odd input) is logged with the reason, counted in
//! `cometd_bridge_task_restarts_total{task}`, shown in `/readyz` for a while, and started
//! again with backoff. A forwarder's messages stay in its spool meanwhile; a source's
//! session and the spools are untouched.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::cometd::Backoff;
use crate::sink::pause;
use crate::telemetry::metrics::Metrics;

/// How long a failure keeps `/readyz` at 503.
const SHOWN_FOR: Duration = Duration::from_secs(60);

/// The last unexpected failure of a task.
#[derive(Debug, Default)]
pub struct TaskHealth {
    last_failure: Mutex<Option<(Instant, String)>>,
}

impl TaskHealth {
    fn failed(&self, reason: String) {
        *self.last_failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((Instant::now(), reason));
    }

    /// Why the task is not ready: it failed within the last minute.
    pub fn unready_reason(&self) -> Option<String> {
        let last = self.last_failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (when, reason) = last.as_ref()?;
        (when.elapsed() < SHOWN_FOR)
            .then(|| format!("failed {} s ago and was restarted: {reason}", when.elapsed().as_secs()))
    }
}

/// The text of a task's panic.
fn panic_reason(error: tokio::task::JoinError) -> String {
    match error.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|text| (*text).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into()),
        Err(error) => error.to_string(),
    }
}

/// Runs the task `start` makes until it ends normally (its value is returned), starting it
/// again after each panic, until `stop`; `None` when stopped or cancelled.
pub async fn supervise<T, F, Fut>(
    task: String,
    health: &TaskHealth,
    metrics: &Metrics,
    stop: &CancellationToken,
    mut start: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let backoff =
        Backoff::try_new(Duration::from_millis(100), Duration::from_secs(30)).expect("a valid backoff");
    let mut failures = 0;
    loop {
        match tokio::spawn(start()).await {
            Ok(value) => return Some(value),
            Err(error) if error.is_cancelled() => return None,
            Err(error) => {
                let reason = panic_reason(error);
                tracing::error!(task = %task, reason = %reason, "a task failed unexpectedly; restarting it");
                metrics.task_restarted(&task);
                health.failed(reason);
                if !pause(backoff.delay(failures), stop).await {
                    return None;
                }
                failures += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_task_that_panics_is_restarted_and_reported() {
        let runs = Arc::new(AtomicU32::new(0));
        let health = TaskHealth::default();
        let metrics = Metrics::new();
        let stop = CancellationToken::new();
        let value = supervise("forwarder orders".into(), &health, &metrics, &stop, || {
            let runs = runs.clone();
            async move {
                if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("assertion failed: is_valid_header(value)");
                }
                7
            }
        })
        .await;
        assert_eq!(value, Some(7));
        assert_eq!(runs.load(Ordering::SeqCst), 2, "started again once");
        let reason = health.unready_reason().expect("shown as unready");
        assert!(reason.contains("is_valid_header"), "{reason}");
        assert!(metrics.render().contains("cometd_bridge_task_restarts_total{task=\"forwarder orders\"} 1"));
    }

    #[tokio::test]
    async fn a_stop_ends_the_restarts() {
        let health = TaskHealth::default();
        let stop = CancellationToken::new();
        stop.cancel();
        let value: Option<()> =
            supervise("source demo".into(), &health, &Metrics::new(), &stop, || async { panic!("always") })
                .await;
        assert_eq!(value, None);
    }
}
