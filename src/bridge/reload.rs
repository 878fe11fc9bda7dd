//! Reloading the configuration: what changed is worked out and checked first, then
//! applied all or nothing, touching only the sources and subscriptions that changed.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{
    Bridge, BridgeError, Origin, ReloadReport, SourceClient, SourceEntry, SpoolOrigin, source_client,
};
use crate::config::{self, Config, SinkConfig, SourceConfig, SubscriptionConfig};
use crate::store::SpoolSummary;

/// What a reload does, worked out and checked before anything changes.
#[derive(Default)]
struct ReloadPlan {
    sources_removed: Vec<Arc<SourceEntry>>,
    /// The running entry and its new configuration.
    sources_changed: Vec<(Arc<SourceEntry>, SourceConfig)>,
    sources_added: Vec<SourceConfig>,
    /// The clients of the changed and added sources, built.
    built: Vec<(SourceConfig, SourceClient)>,
    subscriptions_removed: Vec<String>,
    /// Their new configuration.
    subscriptions_changed: Vec<SubscriptionConfig>,
    /// Unchanged, on a source that changed: restarted on its new session.
    subscriptions_moved: Vec<String>,
    subscriptions_added: Vec<SubscriptionConfig>,
    /// What the store holds for the added ones.
    summaries: BTreeMap<String, SpoolSummary>,
}

impl Bridge {
    /// Applies a new configuration, all or nothing: the sources and subscriptions of the
    /// file that are new start, those gone stop, those changed restart alone; everything
    /// else keeps running untouched (same session, same forwarder, same spool).
    /// Subscriptions added through the API stay, restarted on their source if it changed.
    /// A changed subscription goes on from its own spool, so nothing received meanwhile is
    /// lost; a removed one's backlog stays in the state store.
    ///
    /// # Errors
    /// [`BridgeError::RestartRequired`] when `[admin]`, `[state]` or `[nats]` changed;
    /// [`BridgeError::InvalidConfig`] when the configuration cannot be applied as it is;
    /// nothing changed in either case. [`BridgeError::Store`] when the store cannot be read.
    pub async fn reload(&self, new: Config) -> Result<ReloadReport, BridgeError> {
        let _one_at_a_time = self.reloading.lock().await;
        let changed_sections: Vec<&str> = [
            ("[admin]", new.fingerprints.admin == self.fingerprints.admin),
            ("[state]", new.fingerprints.state == self.fingerprints.state),
            ("[nats]", new.fingerprints.nats == self.fingerprints.nats),
            ("[cluster]", new.fingerprints.cluster == self.fingerprints.cluster),
        ]
        .into_iter()
        .filter(|(_, same)| !same)
        .map(|(section, _)| section)
        .collect();
        if !changed_sections.is_empty() {
            return Err(BridgeError::RestartRequired(format!(
                "{} changed, which only a restart applies; nothing was changed",
                changed_sections.join(" and ")
            )));
        }
        let plan = self.plan_reload(&new).await?;
        Ok(self.apply_reload(new, plan).await)
    }

    /// What a reload would change, with the new sources' clients built; checks that it
    /// can all be done before anything is touched.
    async fn plan_reload(&self, new: &Config) -> Result<ReloadPlan, BridgeError> {
        let mut problems = Vec::new();
        let old_sources = self.source_list();
        let mut plan = ReloadPlan::default();
        for old in &old_sources {
            match new.sources.iter().find(|source| source.name == old.config.name) {
                None => plan.sources_removed.push(old.clone()),
                Some(source) if source.fingerprint != old.config.fingerprint => {
                    plan.sources_changed.push((old.clone(), source.clone()))
                }
                Some(_) => {}
            }
        }
        let kept = |name: &str| old_sources.iter().any(|source| *source.config.name == *name);
        plan.sources_added = new.sources.iter().filter(|source| !kept(&source.name)).cloned().collect();
        let source_changed =
            |name: &str| plan.sources_changed.iter().any(|(old, _)| *old.config.name == *name);
        let source_removed = |name: &str| plan.sources_removed.iter().any(|old| *old.config.name == *name);

        let running = self.subscriptions.all(|entry| {
            (
                entry.config.id.clone(),
                entry.origin,
                entry.config.source.clone(),
                entry.config.fingerprint.clone(),
            )
        });
        for (id, origin, source, fingerprint) in &running {
            let wanted = new.subscriptions.iter().position(|subscription| subscription.id == *id);
            match (origin, wanted) {
                (Origin::Config, None) => plan.subscriptions_removed.push(id.clone()),
                (Origin::Config, Some(index)) if new.subscriptions[index].fingerprint != *fingerprint => {
                    plan.subscriptions_changed.push(new.subscriptions[index].clone())
                }
                (Origin::Api, Some(index)) => problems.push(config::Problem::new(
                    format!("subscriptions[{index}].id"),
                    format!("{id:?} is used by a subscription added through the API; delete that one first"),
                )),
                (Origin::Api, None) if source_removed(source) => problems.push(config::Problem::new(
                    "sources",
                    format!("source {source:?} is removed, but the subscription {id:?} added through the API uses it; delete that one first"),
                )),
                _ if source_changed(source) => plan.subscriptions_moved.push(id.clone()),
                _ => {}
            }
        }
        let running_id = |id: &str| running.iter().any(|(running, ..)| *running == *id);
        plan.subscriptions_added =
            new.subscriptions.iter().filter(|subscription| !running_id(&subscription.id)).cloned().collect();
        if self.nats.is_none() {
            let starting = plan.subscriptions_added.iter().chain(&plan.subscriptions_changed);
            for subscription in
                starting.filter(|subscription| matches!(subscription.sink, SinkConfig::Nats(_)))
            {
                problems.push(config::Problem::new(
                    format!("subscription {}", subscription.id),
                    "a NATS sink needs the NATS connection, which is made at start: add [nats] and restart",
                ));
            }
        }
        for (old, source) in &plan.sources_changed {
            match source_client(source, &old.name, &self.metrics, self.ownership.is_none()) {
                Ok(client) => plan.built.push((source.clone(), client)),
                Err(error) => {
                    problems.push(config::Problem::new(format!("source {}", source.name), error.to_string()))
                }
            }
        }
        for source in &plan.sources_added {
            let name: Arc<str> = source.name.as_str().into();
            match source_client(source, &name, &self.metrics, self.ownership.is_none()) {
                Ok(client) => plan.built.push((source.clone(), client)),
                Err(error) => {
                    problems.push(config::Problem::new(format!("source {}", source.name), error.to_string()))
                }
            }
        }
        if !problems.is_empty() {
            return Err(BridgeError::InvalidConfig(problems));
        }
        plan.summaries = self.store.spool_summaries().await?;
        Ok(plan)
    }

    /// Carries out a checked plan.
    async fn apply_reload(&self, new: Config, mut plan: ReloadPlan) -> ReloadReport {
        // 1. The forwarders of what stops or restarts finish their delivery in flight; the
        //    routes stay, so nothing received meanwhile misses its spool.
        let stopping: Vec<String> = plan
            .subscriptions_removed
            .iter()
            .cloned()
            .chain(plan.subscriptions_changed.iter().map(|subscription| subscription.id.clone()))
            .chain(plan.subscriptions_moved.iter().cloned())
            .collect();
        let mut stopped = BTreeMap::new();
        for id in stopping {
            if let Some(Ok(entry)) = self.subscriptions.remove(&id, |_| Ok::<(), ()>(())) {
                stopped.insert(id, Self::stop_forwarder(entry).await);
            }
        }
        // 2. Sources that go or change stop; what their sessions held is spooled.
        let leaving: Vec<Arc<SourceEntry>> = plan
            .sources_removed
            .iter()
            .cloned()
            .chain(plan.sources_changed.iter().map(|(old, _)| old.clone()))
            .collect();
        for source in &leaving {
            self.stop_source(source, super::REMOVE_WAIT, false).await;
        }
        // 3. Removed subscriptions lose their route; their backlog stays in the store.
        for id in &plan.subscriptions_removed {
            let Some(entry) = stopped.remove(id) else { continue };
            if let Some(source) = self.source(&entry.config.source) {
                source.routes().remove(id);
                if let Some(replay) = &source.replay {
                    replay.remove(id);
                }
            }
            let backlog = entry.spool.backlog();
            entry.spool.release_all();
            self.metrics.forget_subscription(id);
            if backlog.messages > 0 {
                tracing::warn!(id = %id, messages = backlog.messages, "subscription removed by a reload; its spooled messages stay in the state store, not delivered");
            }
        }
        // 4. The new source entries replace the old ones (not running yet).
        let mut fresh = Vec::new();
        {
            let mut sources = self.lock_sources();
            sources.retain(|source| !plan.sources_removed.iter().any(|removed| Arc::ptr_eq(removed, source)));
            for (config, client) in plan.built.drain(..) {
                let entry = self.source_entry(&config, client);
                match sources.iter_mut().find(|source| source.config.name == config.name) {
                    Some(slot) => *slot = entry.clone(),
                    None => sources.push(entry.clone()),
                }
                fresh.push(entry);
            }
        }
        for source in &plan.sources_removed {
            self.metrics.forget_source(&source.name);
        }
        // 5. Subscriptions start: changed and moved ones on the spool they had, new ones
        //    on what the store holds for them.
        let restarts = plan
            .subscriptions_changed
            .iter()
            .cloned()
            .chain(
                plan.subscriptions_moved
                    .iter()
                    .filter_map(|id| stopped.get(id).map(|entry| entry.config.clone())),
            )
            .collect::<Vec<_>>();
        for config in restarts {
            let Some(old) = stopped.remove(&config.id) else { continue };
            if old.config.source != config.source
                && let Some(source) = self.source(&old.config.source)
            {
                source.routes().remove(&config.id);
            }
            let id = config.id.clone();
            let kept = SpoolOrigin::Kept { spool: old.spool, counters: old.counters };
            match self.start_subscription_on(config, old.origin, kept).await {
                Ok(entry) => {
                    let _ = self.subscriptions.insert(entry);
                }
                Err(error) => {
                    tracing::error!(id = %id, error = %error, "could not restart a subscription after a reload")
                }
            }
        }
        for config in plan.subscriptions_added.iter().cloned() {
            let id = config.id.clone();
            let summary = plan.summaries.remove(&id);
            match self.start_subscription(config, Origin::Config, summary).await {
                Ok(entry) => {
                    let _ = self.subscriptions.insert(entry);
                }
                Err(error) => {
                    tracing::error!(id = %id, error = %error, "could not start a subscription after a reload")
                }
            }
        }
        // 6. New and changed sources start, with their routes in place.
        for source in &fresh {
            self.spawn_source(source);
        }
        // 7. Sources that kept running follow their routes upstream.
        for source in self.source_list() {
            if fresh.iter().any(|entry| Arc::ptr_eq(entry, &source)) {
                continue;
            }
            self.follow_routes_upstream(&source).await;
        }
        *self.grace.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = new.bridge.shutdown_grace;
        let names = |sources: &[Arc<SourceEntry>]| {
            sources.iter().map(|source| source.config.name.clone()).collect::<Vec<_>>()
        };
        let mut report = ReloadReport {
            added: plan
                .subscriptions_added
                .iter()
                .map(|subscription| subscription.id.clone())
                .chain(plan.sources_added.iter().map(|source| source.name.clone()))
                .collect(),
            removed: plan.subscriptions_removed.clone(),
            changed: plan
                .subscriptions_changed
                .iter()
                .map(|subscription| subscription.id.clone())
                .chain(plan.subscriptions_moved.iter().cloned())
                .chain(plan.sources_changed.iter().map(|(old, _)| old.config.name.clone()))
                .collect(),
        };
        report.removed.extend(names(&plan.sources_removed));
        for list in [&mut report.added, &mut report.removed, &mut report.changed] {
            list.sort();
        }
        tracing::info!(added = ?report.added, removed = ?report.removed, changed = ?report.changed, "configuration reloaded");
        report
    }
}
