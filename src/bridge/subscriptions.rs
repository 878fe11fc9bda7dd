//! The subscription lifecycle: starting a subscription's forwarder on its spool (new, or
//! the one a reload kept) and its route on its source, and stopping the forwarder.

use super::*;

impl Bridge {
    /// Starts a subscription's forwarder on its spool (resuming what `summary` says the
    /// store holds) and adds its route to its source.
    pub(super) async fn start_subscription(
        &self,
        config: SubscriptionConfig,
        origin: Origin,
        summary: Option<SpoolSummary>,
    ) -> Result<SubscriptionEntry, BridgeError> {
        self.start_subscription_on(config, origin, SpoolOrigin::Fresh(summary)).await
    }

    /// [`start_subscription`](Self::start_subscription), on a new spool or on the one a
    /// stopped forwarder of the same subscription left (a reload).
    pub(super) async fn start_subscription_on(
        &self,
        config: SubscriptionConfig,
        origin: Origin,
        spooled: SpoolOrigin,
    ) -> Result<SubscriptionEntry, BridgeError> {
        let source =
            self.source(&config.source).ok_or_else(|| BridgeError::UnknownSource(config.source.clone()))?;
        let sink = match &config.sink {
            SinkConfig::Nats(nats_sink) => {
                let nats = self.nats.clone().ok_or_else(|| {
                    BridgeError::Unavailable("the bridge has no NATS connection: add a [nats] section to the configuration and restart it".into())
                })?;
                Sink::Nats(Box::new(
                    NatsSink::new(nats, nats_sink.subject.clone(), nats_sink.jetstream, nats_sink.payload)
                        .reserving(self.reserved_subjects.clone()),
                ))
            }
            SinkConfig::Webhook(webhook) => Sink::Webhook(match origin {
                Origin::Config => WebhookSink::new(self.http.trusted.clone(), webhook.clone()),
                Origin::Api => WebhookSink::posted(&self.http, webhook.clone()),
            }),
        };
        let id: Arc<str> = config.id.as_str().into();
        let (spool, counters, summary) = match spooled {
            SpoolOrigin::Fresh(summary) => (
                Spool::new(
                    id.clone(),
                    self.store.clone(),
                    self.limit.clone(),
                    config.spool_max_bytes,
                    summary,
                ),
                Arc::new(Counters::default()),
                summary,
            ),
            SpoolOrigin::Kept { spool, counters } => (spool, counters, None),
        };
        let forwarder = Forwarder {
            subscription: id.clone(),
            sink,
            spool: spool.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            counters: counters.clone(),
            replay: source.replay.clone(),
            retry: RetryPolicy::new(config.retry),
            lease: source.lease.clone(),
        };
        if let Some(replay) = &source.replay {
            let committed = self.store.positions(&config.id).await?;
            let spooled = match summary {
                Some(summary) => {
                    newest_spooled_replay_ids(&self.store, &id, &config.channel, summary).await?
                }
                None => crate::store::Positions::new(),
            };
            replay.add(&config.id, config.channel.clone(), config.replay_from, committed, spooled);
        }
        if let Some(summary) = summary {
            tracing::info!(subscription = %id, messages = summary.messages, "resuming delivery of the spooled messages");
        }
        let stop = Stop::child(&self.stop_delivering);
        let forwarder = {
            let (stop, metrics, counters) = (stop.clone(), self.metrics.clone(), counters.clone());
            let task = format!("forwarder {id}");
            let gate = source.gate();
            self.forwarders.spawn(async move {
                supervise::supervise(task, &counters.health, &metrics, &stop.soon, || {
                    forwarder.clone().run_while_owned(stop.clone(), gate.clone())
                })
                .await;
            })
        };
        source.routes().put(Route {
            received: self.metrics.received_counter(&source.name, &id),
            subscription: id,
            pattern: config.channel.clone(),
            spool: spool.clone(),
            counters: counters.clone(),
        });
        Ok(SubscriptionEntry { config, origin, spool, counters, forwarder, stop })
    }

    /// Stops a subscription's forwarder: it finishes the delivery in flight, or abandons
    /// it after [`REMOVE_WAIT`].
    pub(super) async fn stop_forwarder(entry: SubscriptionEntry) -> SubscriptionEntry {
        entry.stop.soon.cancel();
        let mut entry = entry;
        if tokio::time::timeout(REMOVE_WAIT, &mut entry.forwarder).await.is_err() {
            entry.stop.now.cancel();
            let _ = (&mut entry.forwarder).await;
        }
        entry
    }
}

/// The newest replay id per channel in a subscription's spool, so that a new session
/// subscribes after what is already spooled. A channel without wildcards needs only the
/// spool's last message; a pattern is read whole (once, at start).
pub(super) async fn newest_spooled_replay_ids(
    store: &Arc<dyn Store>,
    subscription: &str,
    pattern: &crate::cometd::ChannelPattern,
    summary: SpoolSummary,
) -> Result<crate::store::Positions, BridgeError> {
    let mut newest = crate::store::Positions::new();
    let note = |newest: &mut crate::store::Positions, record: &[u8]| {
        if let Ok(envelope) = crate::delivery::Envelope::from_record(record)
            && let Some(replay_id) = envelope.replay_id
        {
            let id = newest.entry(envelope.message.channel.clone()).or_insert(replay_id);
            *id = (*id).max(replay_id);
        }
    };
    if !pattern.as_str().contains('*') {
        for entry in store.spool_read(subscription, summary.last, 1).await? {
            note(&mut newest, &entry.record);
        }
        if !newest.is_empty() {
            return Ok(newest);
        }
    }
    let mut next = summary.first;
    while next <= summary.last {
        let entries = store.spool_read(subscription, next, 4096).await?;
        let Some(last) = entries.last() else { break };
        next = last.sequence + 1;
        for entry in &entries {
            note(&mut newest, &entry.record);
        }
    }
    Ok(newest)
}
