//! Following the shared store's subscriptions (replicas on the `nats` state backend): a
//! subscription added or removed through one replica's API is stored, and every other
//! replica watches the store's subscription records (a KV watch) and applies the change
//! at once. The owner of the source subscribes or unsubscribes upstream; a standby only
//! starts or stops its (gated) forwarder, so that its API shows the same subscriptions and
//! it runs them when it takes the source. When the watch breaks (a NATS outage) it starts
//! again, and what changed meanwhile is read from the store whole.

use std::collections::BTreeSet;

use futures_util::StreamExt;

use super::*;
use crate::store::SubscriptionChange;

/// How long the watch waits before starting again after it broke.
const WATCH_RETRY: Duration = Duration::from_secs(1);

impl Bridge {
    /// Applies the changes to the stored subscriptions, until `stop` or the bridge stops
    /// taking messages (shutdown). Nothing to do for a store no other process shares.
    pub(super) async fn follow_subscriptions(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let watched = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = self.stop_taking.cancelled() => return,
                watched = self.store.watch_subscriptions() => watched,
            };
            match watched {
                Ok(None) => return,
                Ok(Some(mut changes)) => {
                    // What changed while nothing watched: before this start, or during an
                    // outage. Read once the watch is open, so that nothing falls between.
                    match self.follow_stored_subscriptions(None).await {
                        Ok(()) => loop {
                            let change = tokio::select! {
                                biased;
                                _ = stop.cancelled() => return,
                                _ = self.stop_taking.cancelled() => return,
                                change = changes.next() => change,
                            };
                            match change {
                                Some(Ok(change)) => self.follow_change(change).await,
                                Some(Err(error)) => {
                                    tracing::warn!(error = %error, "the watch on the stored subscriptions broke; watching again");
                                    break;
                                }
                                None => {
                                    tracing::warn!(
                                        "the watch on the stored subscriptions ended; watching again"
                                    );
                                    break;
                                }
                            }
                        },
                        Err(error) => {
                            tracing::warn!(error = %error, "cannot read the stored subscriptions; watching again")
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %error, "cannot watch the stored subscriptions; trying again")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.stop_taking.cancelled() => return,
                () = tokio::time::sleep(WATCH_RETRY) => {}
            }
        }
    }

    /// One change another replica's API made (or this one's, already applied).
    async fn follow_change(&self, change: SubscriptionChange) {
        let _one_change = self.reloading.lock().await;
        let source = match change {
            SubscriptionChange::Stored(raw) => match self.start_stored(&raw).await {
                Ok(started) => started,
                Err(error) => {
                    tracing::error!(id = %raw.id, error = %error, "cannot start a subscription another replica added");
                    None
                }
            },
            SubscriptionChange::Removed(id) => self.stop_removed(&id).await,
        };
        if let Some(source) = source.and_then(|source| self.source(&source)) {
            self.follow_routes_upstream(&source).await;
        }
    }

    /// Starts the stored subscriptions (of `source`, or of every source) that do not run
    /// here, and stops those added through an API whose records are gone.
    pub(super) async fn follow_stored_subscriptions(&self, source: Option<&str>) -> Result<(), BridgeError> {
        let _one_change = self.reloading.lock().await;
        let stored: Vec<RawSubscription> = self
            .store
            .subscriptions()
            .await?
            .into_iter()
            .filter(|raw| source.is_none_or(|source| raw.source == source))
            .collect();
        let mut touched = BTreeSet::new();
        for raw in &stored {
            touched.extend(self.start_stored(raw).await?);
        }
        let ids: BTreeSet<&str> = stored.iter().map(|raw| raw.id.as_str()).collect();
        let removed = self.subscriptions.all(|entry| {
            (entry.origin == Origin::Api
                && source.is_none_or(|source| entry.config.source == source)
                && !ids.contains(entry.config.id.as_str()))
            .then(|| entry.config.id.clone())
        });
        for id in removed.into_iter().flatten() {
            touched.extend(self.stop_removed(&id).await);
        }
        for source in touched.iter().filter_map(|source| self.source(source)) {
            self.follow_routes_upstream(&source).await;
        }
        Ok(())
    }

    /// Starts a stored subscription unless it runs here already; its source when started.
    async fn start_stored(&self, raw: &RawSubscription) -> Result<Option<String>, BridgeError> {
        if self.subscriptions.contains(&raw.id) {
            return Ok(None);
        }
        match config::validate_subscription(raw, "", &self.source_names(), &Env::new()) {
            Ok(subscription) => {
                let entry = self.start_subscription(subscription, Origin::Api, None).await?;
                tracing::info!(id = %raw.id, source = %raw.source, "a subscription another replica added runs here now");
                let _ = self.subscriptions.insert(entry);
                Ok(Some(raw.source.clone()))
            }
            Err(problems) => {
                let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
                tracing::error!(id = %raw.id, problems = ?problems, "a stored subscription is no longer valid; ignoring it");
                Ok(None)
            }
        }
    }

    /// Stops a subscription added through an API whose record another replica removed
    /// (with its spool and positions); its source when stopped. A configured one stays.
    async fn stop_removed(&self, id: &str) -> Option<String> {
        let entry = self
            .subscriptions
            .remove(id, |entry| if entry.origin == Origin::Api { Ok(()) } else { Err(()) })?
            .ok()?;
        let source = self.source(&entry.config.source);
        if let Some(source) = &source {
            source.routes().remove(id);
        }
        let entry = Self::stop_forwarder(entry).await;
        if let Some(replay) = source.as_ref().and_then(|source| source.replay.as_ref()) {
            replay.remove(id);
        }
        entry.spool.release_all();
        self.metrics.forget_subscription(id);
        tracing::info!(id = %id, source = %entry.config.source, "a subscription another replica removed stops here too");
        Some(entry.config.source.clone())
    }
}
