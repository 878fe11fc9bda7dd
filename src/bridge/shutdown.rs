//! Shutdown in the contract's order, all of it within `bridge.shutdown_grace`.

use super::*;

impl Bridge {
    /// Shuts down in the contract's order, all of it within `bridge.shutdown_grace`: stop
    /// taking messages; let each forwarder finish the delivery in flight, then abandon it
    /// (what is not delivered stays in the spool); disconnect every source at once, with a
    /// short deadline, spooling what each session still held; make the last settlements
    /// durable and flush NATS. Returns the deadline, for what the caller stops after.
    pub async fn shut_down(&self) -> Instant {
        let started = Instant::now();
        let grace = *self.grace.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // A grace of centuries is the configuration's to give, not a reason to overflow.
        let deadline = started.checked_add(grace).unwrap_or(started + Duration::from_secs(86_400 * 365));
        // Kept for the disconnects and the final sync: a quarter of the grace, up to 2 s.
        let reserve = (grace / 4).min(Duration::from_secs(2));
        tracing::info!(grace = ?grace, "stopping: no new messages are taken");
        self.stop_taking.cancel();
        let sources = self.source_list();
        for source in &sources {
            let task = source.task.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            if let Some(task) = task {
                let until = (deadline - reserve).max(Instant::now());
                match tokio::time::timeout_at(until.into(), task).await {
                    Ok(Err(error)) => {
                        tracing::error!(source = %source.name, error = %error, "a source task failed")
                    }
                    Ok(Ok(())) => {}
                    Err(_) => tracing::warn!(source = %source.name, "the source task did not stop in time"),
                }
            }
        }
        self.stop_delivering.soon.cancel();
        self.forwarders.close();
        let forwarders_until = (deadline - reserve).max(Instant::now());
        if tokio::time::timeout_at(forwarders_until.into(), self.forwarders.wait()).await.is_err() {
            tracing::warn!("the grace period ended with deliveries in flight; they stay in the spool");
            self.stop_delivering.now.cancel();
            let _ = tokio::time::timeout_at(deadline.into(), self.forwarders.wait()).await;
        }
        // Every source at once; each waits for its server's answer to the disconnect at
        // most until three quarters of the reserve are gone, the rest is for the sync.
        let close_within =
            (deadline - reserve / 4).saturating_duration_since(Instant::now()).min(DISCONNECT_WAIT);
        futures_util::future::join_all(
            sources.iter().map(|source| self.stop_source(source, close_within, true)),
        )
        .await;
        let backlog: u64 = self.subscriptions.all(|entry| entry.spool.backlog().messages).into_iter().sum();
        if backlog > 0 {
            tracing::info!(messages = backlog, "spooled messages are kept for the next start");
        }
        let last = |floor: Duration| deadline.saturating_duration_since(Instant::now()).max(floor);
        match tokio::time::timeout(last(Duration::from_millis(200)), self.store.sync()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::error!(error = %error, "could not make the last settlements durable; their messages are delivered again after the restart")
            }
            Err(_) => tracing::error!(
                "making the last settlements durable took past the grace period; their messages may be delivered again after the restart"
            ),
        }
        // Given up once the settlements are durable, rather than left to expire: another
        // replica takes them at once, from where this one stopped.
        self.release_leases(last(Duration::from_millis(200))).await;
        if let Some(nats) = &self.nats
            && let Err(error) = tokio::time::timeout(last(Duration::from_millis(100)), nats.flush())
                .await
                .map_err(|_| "timed out".to_string())
                .and_then(|flushed| flushed.map_err(|error| error.to_string()))
        {
            tracing::warn!(error = %error, "could not flush NATS");
        }
        tracing::info!(took = ?started.elapsed(), "stopped");
        deadline
    }
}
