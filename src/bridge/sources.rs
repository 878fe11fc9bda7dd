//! The source lifecycle: building a source's CometD client (with its replay, ack and
//! Salesforce extensions), starting its task under supervision, stopping it (spooling what
//! its session still held) and following its routes upstream after a reload.

use super::*;

impl Bridge {
    /// A source's client and spooler, not yet running.
    pub(super) fn build_source(&self, source_config: &SourceConfig) -> Result<Arc<SourceEntry>, BridgeError> {
        let name: Arc<str> = source_config.name.as_str().into();
        let client = source_client(source_config, &name, &self.metrics, self.ownership.is_none())
            .map_err(|error| BridgeError::Conflict(format!("source {}: {error}", source_config.name)))?;
        Ok(self.source_entry(source_config, client))
    }

    /// A source entry around a built client.
    pub(super) fn source_entry(
        &self,
        source_config: &SourceConfig,
        source_client: SourceClient,
    ) -> Arc<SourceEntry> {
        let SourceClient { client, replay, ack, lease } = source_client;
        let name: Arc<str> = source_config.name.as_str().into();
        self.metrics.source_added(&name);
        // With replicas a source waits for its lease; alone, it is this process's.
        let owned = self.ownership.is_none();
        self.metrics.source_owned(&name, owned);
        let spooler = Spooler {
            name: name.clone(),
            routes: Routes::default(),
            store: self.store.clone(),
            replay: replay.clone(),
            metrics: self.metrics.clone(),
            sequence: Arc::default(),
            ack,
            lease: lease.clone(),
            incarnation: self.ownership.as_ref().map(|_| fastrand::u64(..)),
        };
        Arc::new(SourceEntry {
            config: source_config.clone(),
            name,
            client,
            spooler,
            replay,
            health: Arc::default(),
            subscribing: Arc::default(),
            stop: self.stop_taking.child_token(),
            task: std::sync::Mutex::new(None),
            owned: tokio::sync::watch::Sender::new(owned),
            busy: tokio::sync::watch::Sender::new(0),
            lease,
            ticket: Arc::default(),
        })
    }

    /// What a source's task runs on.
    fn source_task(&self, entry: &SourceEntry) -> Source {
        Source {
            name: entry.name.clone(),
            client: entry.client.clone(),
            spooler: entry.spooler.clone(),
            metrics: self.metrics.clone(),
            subscribing: entry.subscribing.clone(),
            ticket: entry.ticket.clone(),
            hands_over: self.ownership.is_some(),
        }
    }

    /// Starts a source's task, supervised.
    pub(super) fn spawn_source(&self, entry: &Arc<SourceEntry>) {
        let source = self.source_task(entry);
        let (health, metrics, stop) = (entry.health.clone(), self.metrics.clone(), entry.stop.clone());
        let task = format!("source {}", entry.name);
        let gate = entry.gate();
        let handle = tokio::spawn(async move {
            supervise::supervise(task, &health, &metrics, &stop, || {
                source.clone().run_while_owned(stop.clone(), gate.clone())
            })
            .await;
        });
        *entry.task.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(handle);
    }

    /// Stops a source's task, closes its session (with replicas and `hand_over`, while
    /// this replica owns the source: detaches it for the next owner instead; waiting at most `close_within` for the
    /// server's answer: a frozen server must not hold up a reload or shutdown) and spools
    /// what the session still held (its routes still in place).
    pub(super) async fn stop_source(&self, source: &SourceEntry, close_within: Duration, hand_over: bool) {
        source.stop.cancel();
        let task = source.task.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(task) = task
            && let Err(error) = task.await
        {
            tracing::error!(source = %source.name, error = %error, "a source task failed");
        }
        if hand_over && self.ownership.is_some() && *source.owned.borrow() {
            // Another replica continues the session; it is not ended here.
            self.source_task(source).hand_over(&self.stop_taking).await;
            return;
        }
        if tokio::time::timeout(close_within, source.client.close()).await.is_err() {
            tracing::warn!(source = %source.name, waited = ?close_within, "the CometD server did not answer the disconnect in time; leaving the session to expire");
        }
        let session: Arc<str> = source.client.status().client_id.unwrap_or_default().into();
        let mut held = Vec::new();
        while let Some(item) = futures_util::FutureExt::now_or_never(source.client.receive()) {
            match item {
                Ok(message) => held.push(message),
                Err(Error::Closed) => break,
                Err(_) => continue,
            }
        }
        if !held.is_empty() {
            tracing::info!(source = %source.name, messages = held.len(), "spooling what the session still held");
            let _ = source.spooler.spool(held, &session, &self.stop_taking).await;
        }
    }

    /// Subscribes upstream to the routes' channels a connected session lacks, and
    /// unsubscribes from those no route uses any more. What fails here, the source task
    /// tries again when it reconnects.
    pub(super) async fn follow_routes_upstream(&self, source: &SourceEntry) {
        if source.client.status().state != SessionState::Connected {
            return;
        }
        let wanted = source::wanted_channels(&source.routes().snapshot());
        let subscribed = source.client.subscriptions();
        for channel in wanted.difference(&subscribed) {
            match source.client.subscribe(channel).await {
                Ok(()) => tracing::info!(source = %source.name, channel = %channel, "subscribed"),
                Err(error) => {
                    tracing::warn!(source = %source.name, channel = %channel, error = %error, "could not subscribe after a reload; the source tries again")
                }
            }
        }
        for channel in subscribed.difference(&wanted) {
            if let Err(error) = source.client.unsubscribe(channel).await {
                tracing::warn!(source = %source.name, channel = %channel, error = %error, "could not unsubscribe after a reload");
            }
        }
    }
}

/// A source's client and the handles of its extensions.
pub(super) struct SourceClient {
    pub(super) client: Client,
    /// The replay state its replay extension reads, with replay.
    pub(super) replay: Option<Arc<ReplayState>>,
    /// Confirms spooled messages to its ack extension, unless `ack = false`.
    pub(super) ack: Option<AckConfirmer>,
    /// Until when this replica may write for the source, and talk to its server.
    pub(super) lease: Arc<gate::LeaseClock>,
}

/// A source's client: its options, plus the replay extension (reading the source's replay
/// state), the ack extension (acknowledging a batch once it is spooled) and Salesforce auth
/// when configured.
pub(super) fn source_client(
    config: &SourceConfig,
    name: &Arc<str>,
    metrics: &Metrics,
    alone: bool,
) -> Result<SourceClient, Error> {
    let mut options = config.client_options();
    // Alone, the source is this process's for good; among replicas it waits for its
    // lease, and sends nothing to its server while it does not hold one (see
    // `handover::LeaseFence`).
    let lease = if alone { gate::LeaseClock::forever() } else { gate::LeaseClock::lapsed() };
    if !alone {
        options = options.extension(super::handover::LeaseFence(lease.clone()));
    }
    let mut ack = None;
    if config.ack {
        let (extension, confirmer) = AckExtension::confirmed(DEFAULT_CONFIRM_WAIT);
        options = options.extension(extension);
        ack = Some(confirmer);
    }
    let mut replay = None;
    if let Some(fallback) = config.replay {
        let state = Arc::new(ReplayState::default());
        let metrics = metrics.clone();
        let source = name.clone();
        let extension = ReplayExtension::new(SourcePositions(state.clone()), fallback).on_fallback(move |applied| {
            tracing::warn!(source = %source, channel = %applied.channel, refused = ?applied.refused, fallback = %applied.fallback, "replay position refused by the server; fallback applied");
            metrics.replay_fallback(&source);
        });
        options = options.extension(extension);
        replay = Some(state);
    }
    if let Some(credentials) = &config.salesforce {
        options = options.auth(SalesforceAuth::with_tls(credentials.clone(), &config.tls)?);
    }
    Ok(SourceClient { client: options.build()?, replay, ack, lease })
}
