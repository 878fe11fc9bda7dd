//! Ownership among replicas (the `nats` state backend): a task that holds this replica's
//! share of the source leases (`crate::cluster`), renews them, takes a source whose lease
//! is free and gives one up when it cannot renew in time or holds more than its share. A
//! source runs (its session, its subscriptions' forwarders) only while owned; a replica
//! that takes one first reads the spools and positions the previous owner left in the
//! shared store.

use std::collections::BTreeMap;

use super::*;
use crate::cluster::Leases;
use crate::config::ClusterConfig;

/// The lease task and what it knows, for the API.
pub(super) struct Ownership {
    pub(super) config: ClusterConfig,
    /// Who holds each source's lease, as last seen.
    owners: std::sync::Mutex<BTreeMap<String, String>>,
    stop: CancellationToken,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// The task that follows the subscriptions other replicas' APIs change (`follow.rs`).
    follower: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// Set once the first round of leases is done: until then the replica does not know
    /// which sources are its own, and is not ready.
    started: std::sync::atomic::AtomicBool,
}

/// A lease this replica holds.
struct Held {
    revision: u64,
    renewed: Instant,
}

impl Ownership {
    pub(super) fn new(config: ClusterConfig) -> Self {
        Ownership {
            config,
            owners: std::sync::Mutex::default(),
            stop: CancellationToken::new(),
            task: std::sync::Mutex::new(None),
            follower: std::sync::Mutex::new(None),
            started: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether the first round of leases is done.
    pub(super) fn started(&self) -> bool {
        self.started.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The replica that holds `source`'s lease, as last seen.
    pub(super) fn owner(&self, source: &str) -> Option<String> {
        self.owners.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(source).cloned()
    }
}

impl Bridge {
    /// Starts the lease task: from now on sources start as their leases are taken.
    pub(super) async fn start_ownership(
        self: &Arc<Self>,
        bucket: &str,
        replicas: u8,
    ) -> Result<(), BridgeError> {
        let Some(ownership) = &self.ownership else { return Ok(()) };
        let nats = self.nats.clone().ok_or_else(|| {
            BridgeError::Unavailable("the nats state backend has no NATS connection".into())
        })?;
        let config = &ownership.config;
        let leases = Leases::open(&nats, bucket, usize::from(replicas), config.lease_ttl, &config.replica)
            .await
            .map_err(|error| BridgeError::Unavailable(error.to_string()))?;
        tracing::info!(replica = %config.replica, lease_ttl = ?config.lease_ttl, "sharing the sources with the other replicas of this state");
        let bridge = self.clone();
        let task = tokio::spawn(async move { bridge.hold_leases(leases).await });
        *ownership.task.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task);
        let (bridge, stop) = (self.clone(), ownership.stop.clone());
        let follower = tokio::spawn(async move { bridge.follow_subscriptions(stop).await });
        *ownership.follower.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(follower);
        Ok(())
    }

    /// Gives every lease up (the sources are stopped), so that other replicas take them
    /// at once rather than when they expire.
    pub(super) async fn release_leases(&self, within: Duration) {
        let Some(ownership) = &self.ownership else { return };
        let until = tokio::time::Instant::now() + within;
        ownership.stop.cancel();
        let task = ownership.task.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(task) = task
            && tokio::time::timeout_at(until, task).await.is_err()
        {
            tracing::warn!("the leases were not released in time; they expire on their own");
        }
        let follower = ownership.follower.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(follower) = follower
            && tokio::time::timeout_at(until, follower).await.is_err()
        {
            tracing::warn!("the watch on the stored subscriptions did not stop in time");
        }
    }

    async fn hold_leases(self: Arc<Self>, leases: Leases) {
        let Some(ownership) = &self.ownership else { return };
        let ttl = ownership.config.lease_ttl;
        let mut held: BTreeMap<String, Held> = BTreeMap::new();
        let mut ticks =
            tokio::time::interval((ttl / 5).clamp(Duration::from_millis(100), Duration::from_secs(1)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = ownership.stop.cancelled() => break,
                _ = ticks.tick() => {}
            }
            self.lease_round(&leases, &mut held, ttl).await;
            ownership.started.store(true, std::sync::atomic::Ordering::Release);
        }
        for (source, lease) in held {
            self.give_up(&source, true).await;
            if let Err(error) = leases.release(&source, lease.revision).await {
                tracing::warn!(source = %source, error = %error, "could not release the lease; it expires on its own");
            }
        }
    }

    /// One round: say this replica lives, renew what it holds, give up what it lost or
    /// holds beyond its share, take free sources up to its share.
    async fn lease_round(&self, leases: &Leases, held: &mut BTreeMap<String, Held>, ttl: Duration) {
        let Some(ownership) = &self.ownership else { return };
        if let Err(error) = leases.announce().await {
            tracing::warn!(error = %error, "cannot announce this replica");
        }
        let mut lost = Vec::new();
        for (source, lease) in held.iter_mut() {
            // Timed from before the request: the server's copy can only be younger.
            let renewed = Instant::now();
            match leases.renew(source, lease.revision).await {
                Ok(Some(revision)) => {
                    *lease = Held { revision, renewed };
                    if let Some(entry) = self.source(source) {
                        entry.lease.extend_to(renewed + ttl.mul_f64(0.6));
                    }
                }
                Ok(None) => lost.push((source.clone(), "another replica holds its lease now".to_string())),
                // Stopped well before the lease can expire: never two owners at once.
                Err(error) if lease.renewed.elapsed() >= ttl.mul_f64(0.6) => {
                    lost.push((source.clone(), format!("its lease cannot be renewed in time: {error}")))
                }
                Err(error) => {
                    tracing::warn!(source = %source, error = %error, "cannot renew the lease; trying again")
                }
            }
        }
        for (source, why) in lost {
            held.remove(&source);
            tracing::warn!(source = %source, why = %why, "giving the source up");
            self.give_up(&source, false).await;
        }
        // A source a reload built anew (its settings changed) starts unowned: this replica
        // holds its lease, so it runs it.
        let rebuilt: Vec<String> = held
            .keys()
            .filter(|source| self.source(source).is_some_and(|entry| !*entry.owned.borrow()))
            .cloned()
            .collect();
        for source in rebuilt {
            if let Some(entry) = self.source(&source) {
                entry.lease.extend_to(held[&source].renewed + ttl.mul_f64(0.6));
            }
            if !self.take_over(&source).await
                && let Some(lease) = held.remove(&source)
            {
                self.give_up(&source, true).await;
                if let Err(error) = leases.release(&source, lease.revision).await {
                    tracing::warn!(source = %source, error = %error, "could not release the lease; it expires on its own");
                }
            }
        }
        let (replicas, holders) = match leases.view().await {
            Ok(view) => view,
            Err(error) => {
                tracing::warn!(error = %error, "cannot read the leases");
                return;
            }
        };
        *ownership.owners.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            holders.iter().map(|(source, (holder, _))| (source.clone(), holder.replica.clone())).collect();
        let names = self.source_names();
        let share = names.len().div_ceil(replicas.max(1));
        // A source gone from the configuration, or one more than this replica's share
        // (another replica joined): given up, one a round, so that the others settle.
        let extra = held
            .keys()
            .find(|source| !names.contains(*source))
            .cloned()
            .or_else(|| (held.len() > share).then(|| held.keys().next_back().cloned()).flatten());
        if let Some(source) = extra
            && let Some(lease) = held.remove(&source)
        {
            tracing::info!(source = %source, share, "handing the source over to another replica");
            self.give_up(&source, true).await;
            if let Err(error) = leases.release(&source, lease.revision).await {
                tracing::warn!(source = %source, error = %error, "could not release the lease; it expires on its own");
            }
        }
        for source in &names {
            if held.len() >= share {
                break;
            }
            let taken_by_other =
                holders.get(source).is_some_and(|(holder, _)| holder.replica != leases.me().replica);
            if held.contains_key(source) || taken_by_other {
                continue;
            }
            let asked = Instant::now();
            match leases.acquire(source).await {
                Ok(Some(revision)) => {
                    if let Some(entry) = self.source(source) {
                        entry.lease.extend_to(asked + ttl.mul_f64(0.6));
                    }
                    if self.take_over(source).await {
                        held.insert(source.clone(), Held { revision, renewed: asked });
                    } else if let Some(entry) = self.source(source).inspect(|entry| entry.lease.revoke())
                        && let Err(error) = leases.release(&entry.config.name, revision).await
                    {
                        tracing::warn!(source = %source, error = %error, "could not release the lease; it expires on its own");
                    }
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(source = %source, error = %error, "cannot take the lease"),
            }
        }
    }

    /// Starts `source` on this replica: its spools and replay positions read again from
    /// the shared store, then its session and forwarders. `false` if the store cannot be
    /// read (the lease is given back).
    async fn take_over(&self, source: &str) -> bool {
        let Some(entry) = self.source(source) else { return false };
        if let Err(error) = self.follow_stored_subscriptions(Some(source)).await {
            tracing::error!(source = %source, error = %error, "cannot read the stored subscriptions to take the source over");
            return false;
        }
        let summaries = match self.store.spool_summaries().await {
            Ok(summaries) => summaries,
            Err(error) => {
                tracing::error!(source = %source, error = %error, "cannot read the spools to take the source over");
                return false;
            }
        };
        let subscriptions = self.subscriptions.all(|subscription| {
            (subscription.config.source == source)
                .then(|| (subscription.config.clone(), subscription.spool.clone()))
        });
        for (config, spool) in subscriptions.into_iter().flatten() {
            let summary = summaries.get(&config.id).copied();
            spool.refresh(summary);
            if let Some(replay) = &entry.replay {
                let id: Arc<str> = config.id.as_str().into();
                let committed = self.store.positions(&config.id).await.map_err(BridgeError::from);
                let spooled = match summary {
                    Some(summary) => {
                        super::subscriptions::newest_spooled_replay_ids(
                            &self.store,
                            &id,
                            &config.channel,
                            summary,
                        )
                        .await
                    }
                    None => Ok(crate::store::Positions::new()),
                };
                match (committed, spooled) {
                    (Ok(committed), Ok(spooled)) => {
                        replay.add(&config.id, config.channel.clone(), config.replay_from, committed, spooled)
                    }
                    (Err(error), _) | (_, Err(error)) => {
                        tracing::error!(source = %source, error = %error, "cannot read the replay positions to take the source over");
                        return false;
                    }
                }
            }
        }
        match self.store.session(source).await {
            Ok(Some(ticket)) => match serde_json::from_value::<crate::cometd::SessionTicket>(ticket) {
                Ok(ticket) => {
                    *entry.ticket.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(ticket)
                }
                Err(error) => {
                    tracing::warn!(source = %source, error = %error, "the stored session is unreadable; opening a new one")
                }
            },
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(source = %source, error = %error, "cannot read the session the previous owner left; opening a new one")
            }
        }
        tracing::info!(source = %source, "this replica owns the source now");
        self.metrics.lease_changed(source);
        self.metrics.source_owned(source, true);
        entry.owned.send_replace(true);
        true
    }

    /// Stops `source` on this replica, waiting (up to `cluster.handover_wait`) until its
    /// session is handed over and its forwarders settled what they delivered. A lease lost
    /// (`voluntary` false) stops every write at once; one given up still lets them finish
    /// within the wait, while the lease holds.
    async fn give_up(&self, source: &str, voluntary: bool) {
        let Some(entry) = self.source(source) else { return };
        if !voluntary {
            entry.lease.revoke();
        }
        if !entry.owned.send_replace(false) {
            entry.lease.revoke();
            return;
        }
        self.metrics.lease_changed(source);
        self.metrics.source_owned(source, false);
        let wait = self.ownership.as_ref().map_or(Duration::ZERO, |ownership| ownership.config.handover_wait);
        let mut busy = entry.busy.subscribe();
        if tokio::time::timeout(wait, busy.wait_for(|running| *running == 0)).await.is_err() {
            tracing::warn!(source = %source, "the source's tasks did not stop within handover_wait");
        }
        // Given up of its own accord, the replica still held the lease while its tasks
        // spooled, settled and handed the session over; not from now on.
        entry.lease.revoke();
    }
}
