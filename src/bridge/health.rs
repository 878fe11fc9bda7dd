//! Readiness and metrics: why the bridge is not ready, and the gauges refreshed before the
//! metrics are rendered.

use super::*;

impl Bridge {
    /// Updates the spool gauges, before metrics are rendered.
    pub fn refresh_metrics(&self) {
        self.metrics.state_errors(self.store.unreadable_records());
        self.metrics.store_healthy(self.store.unhealthy().is_none());
        self.metrics.dead_letters_evicted(self.store.dead_letters_evicted());
        self.subscriptions.all(|entry| {
            let backlog = BacklogView::from(entry.spool.backlog());
            let age = Duration::from_secs_f64(backlog.oldest_age_seconds);
            self.metrics.spool(&entry.config.id, backlog.messages, backlog.bytes, age);
            self.metrics.subscription_full(&entry.config.id, entry.spool.full().is_some());
        });
    }

    /// Why the bridge is not ready: the state store failing, a source not connected or not
    /// subscribed, NATS not connected. Empty when ready.
    pub fn unready_reasons(&self) -> Vec<Unready> {
        let mut reasons = Vec::new();
        if let Some(why) = self.store.unhealthy() {
            reasons.push(Unready::new(
                "the state store is failing",
                format!("the state store is failing: {why}"),
            ));
        }
        if let Some(ownership) = &self.ownership
            && !ownership.started()
        {
            reasons.push(Unready::new(
                "the source leases are not read yet",
                "the source leases are not read yet: which sources this replica runs is not known".into(),
            ));
        }
        for source in self.source_list() {
            if let Some(reason) = source.health.unready_reason() {
                reasons.push(Unready::new(TASK_FAILED, format!("source {}'s task {reason}", source.name)));
            }
            if !*source.owned.borrow() {
                // Another replica's (or nobody's yet): a healthy standby is ready.
                continue;
            }
            let status = source.client.status();
            if status.state != SessionState::Connected {
                let mut reason =
                    format!("source {} is {}", source.name, format!("{:?}", status.state).to_lowercase());
                if let Some(error) = status.last_error {
                    reason.push_str(&format!(": {}", crate::redact::mask_urls_in(&error)));
                }
                reasons.push(Unready::new("a source is not connected", reason));
                continue;
            }
            for route in source.routes().snapshot().iter() {
                let held = route.spool.full().is_some_and(|episode| episode.held);
                if !held && !status.subscriptions.contains(route.pattern.as_str()) {
                    let reason = format!("source {} is not subscribed to {}", source.name, route.pattern);
                    reasons.push(Unready::new("a source is not subscribed to every channel", reason));
                }
            }
        }
        let forwarders =
            self.subscriptions.all(|entry| (entry.config.id.clone(), entry.counters.health.unready_reason()));
        for (id, reason) in forwarders {
            if let Some(reason) = reason {
                reasons.push(Unready::new(TASK_FAILED, format!("subscription {id}'s forwarder {reason}")));
            }
        }
        if let Some(nats) = &self.nats
            && nats.connection_state() != async_nats::connection::State::Connected
        {
            reasons.push(Unready::new("NATS is not connected", "NATS is not connected".into()));
        }
        reasons
    }
}
