//! The bridge: a source task per CometD server that spools what it receives, a forwarder
//! task per subscription that delivers its spool, the registry that adds and removes
//! subscriptions at runtime, reloading the configuration (`reload`), and the shutdown
//! that stops them in the contract's order.

mod dead_letters;
pub mod forwarder;
mod registry;
mod reload;
pub mod replay;
pub mod source;
pub mod spool;
mod supervise;
mod views;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cometd::{
    AckConfirmer, AckExtension, Client, DEFAULT_CONFIRM_WAIT, Error, ReplayExtension, ReplayPosition,
    SalesforceAuth, SessionState,
};
use crate::config::{
    self, Config, Env, RawSink, RawSubscription, SectionFingerprints, SinkConfig, SourceConfig,
    SubscriptionConfig,
};
use crate::sink::destination::WebhookClients;
use crate::sink::{NatsSink, RetryPolicy, Sink, WebhookSink};
use crate::store::{SpoolSummary, Store};
use crate::telemetry::metrics::Metrics;
pub use dead_letters::{FilterError, LetterFilter, parse_rfc3339};
use forwarder::{Counters, Forwarder, Stop};
use registry::{Registry, SubscriptionEntry};
use replay::{ReplayState, SourcePositions};
use source::{Route, Routes, Source, Spooler};
use spool::{Spool, SpoolLimit};
use views::TASK_FAILED;
pub use views::{BacklogView, BridgeError, Origin, ReloadReport, SourceView, SubscriptionView, Unready};

/// How long shutdown waits at most for the servers' answers to `/meta/disconnect`.
const DISCONNECT_WAIT: Duration = Duration::from_secs(2);

/// How long removing a subscription waits for its delivery in flight.
const REMOVE_WAIT: Duration = Duration::from_secs(5);

/// Which spool a starting subscription delivers from.
enum SpoolOrigin {
    /// A new one, holding what the store's summary says.
    Fresh(Option<SpoolSummary>),
    /// The one a stopped forwarder of the same subscription left, with its counters.
    Kept { spool: Arc<Spool>, counters: Arc<Counters> },
}

/// What the bridge needs from the outside.
pub struct Parts {
    /// The validated configuration.
    pub config: Config,
    /// The state store.
    pub store: Arc<dyn Store>,
    /// The NATS connection, when NATS is configured to be used.
    pub nats: Option<async_nats::Client>,
    /// Metrics.
    pub metrics: Metrics,
    /// HTTP clients for webhooks: the configuration's, and the API's (checked).
    pub http: WebhookClients,
}

/// One source's session and routes.
struct SourceEntry {
    config: SourceConfig,
    name: Arc<str>,
    client: Client,
    spooler: Spooler,
    replay: Option<Arc<ReplayState>>,
    health: Arc<supervise::TaskHealth>,
    /// Channels being (re)subscribed, shared with the source task so that it does not
    /// subscribe one in the middle of an operator's unsubscribe and subscribe.
    subscribing: Arc<std::sync::Mutex<BTreeSet<String>>>,
    /// Stops this source alone (a reload), and with the bridge (shutdown).
    stop: CancellationToken,
    /// Its task, once started.
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl SourceEntry {
    fn routes(&self) -> &Routes {
        &self.spooler.routes
    }
}

/// A running bridge.
pub struct Bridge {
    /// The sources, in the configuration's order; a reload replaces entries.
    sources: std::sync::Mutex<Vec<Arc<SourceEntry>>>,
    subscriptions: Registry,
    store: Arc<dyn Store>,
    nats: Option<async_nats::Client>,
    http: WebhookClients,
    metrics: Metrics,
    limit: Arc<SpoolLimit>,
    forwarders: TaskTracker,
    stop_taking: CancellationToken,
    stop_delivering: Stop,
    grace: std::sync::Mutex<Duration>,
    allow_private_webhooks: bool,
    /// The most subscriptions the API lets exist (`admin.max_subscriptions`).
    max_subscriptions: usize,
    /// The subject prefix the NATS state backend keeps, which no sink may publish under.
    reserved_subjects: Option<String>,
    /// What the sections a reload cannot change said at start.
    fingerprints: SectionFingerprints,
    /// One change at a time: a reload, or a change through the API (add, remove, position
    /// reset, dead-letter retry), so that they never interleave.
    reloading: tokio::sync::Mutex<()>,
}

impl Bridge {
    /// Starts every source, the configured subscriptions and those stored by the API.
    ///
    /// # Errors
    /// [`BridgeError`] when a source's client cannot be built or the store cannot be read.
    pub async fn start(parts: Parts) -> Result<Arc<Bridge>, BridgeError> {
        let Parts { config, store, nats, metrics, http } = parts;
        let mut summaries = store.spool_summaries().await?;
        let bridge = Arc::new(Bridge {
            sources: std::sync::Mutex::new(Vec::new()),
            subscriptions: Registry::default(),
            store,
            nats,
            http,
            metrics,
            limit: SpoolLimit::new(config.state.spool_max_bytes),
            forwarders: TaskTracker::new(),
            stop_taking: CancellationToken::new(),
            stop_delivering: Stop::default(),
            grace: std::sync::Mutex::new(config.bridge.shutdown_grace),
            allow_private_webhooks: config.admin.allow_private_webhooks,
            max_subscriptions: config.admin.max_subscriptions,
            reserved_subjects: config::reserved_subject_prefix(&config.state.backend),
            fingerprints: config.fingerprints.clone(),
            reloading: tokio::sync::Mutex::new(()),
        });
        for source_config in &config.sources {
            let entry = bridge.build_source(source_config)?;
            bridge.lock_sources().push(entry);
        }
        {
            let subscriptions = &bridge.subscriptions;
            for subscription in &config.subscriptions {
                let summary = summaries.remove(&subscription.id);
                let entry = bridge.start_subscription(subscription.clone(), Origin::Config, summary).await?;
                let _ = subscriptions.insert(entry);
            }
            let names = bridge.source_names();
            for raw in bridge.store.subscriptions().await? {
                if subscriptions.contains(&raw.id) {
                    tracing::error!(id = %raw.id, "a stored subscription has the id of a configured one; ignoring it");
                    continue;
                }
                match config::validate_subscription(&raw, "", &names, &Env::new()) {
                    Ok(subscription) => match bridge
                        .start_subscription(subscription, Origin::Api, summaries.remove(&raw.id))
                        .await
                    {
                        Ok(entry) => {
                            let _ = subscriptions.insert(entry);
                        }
                        Err(error) => {
                            tracing::error!(id = %raw.id, error = %error, "cannot start a stored subscription")
                        }
                    },
                    Err(problems) => {
                        let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
                        tracing::error!(id = %raw.id, problems = ?problems, "a stored subscription is no longer valid; ignoring it");
                    }
                }
            }
        }
        for (subscription, summary) in summaries {
            tracing::error!(subscription = %subscription, messages = summary.messages, "a spool belongs to no subscription any more (removed from the configuration); its messages stay in the state store, not delivered");
        }
        for entry in bridge.source_list() {
            bridge.spawn_source(&entry);
        }
        Ok(bridge)
    }

    fn lock_sources(&self) -> std::sync::MutexGuard<'_, Vec<Arc<SourceEntry>>> {
        self.sources.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The sources as they are now.
    fn source_list(&self) -> Vec<Arc<SourceEntry>> {
        self.lock_sources().clone()
    }

    fn source_names(&self) -> BTreeSet<String> {
        self.lock_sources().iter().map(|source| source.config.name.clone()).collect()
    }

    fn source(&self, name: &str) -> Option<Arc<SourceEntry>> {
        self.lock_sources().iter().find(|source| source.config.name == name).cloned()
    }

    /// A source's client and spooler, not yet running.
    fn build_source(&self, source_config: &SourceConfig) -> Result<Arc<SourceEntry>, BridgeError> {
        let name: Arc<str> = source_config.name.as_str().into();
        let client = source_client(source_config, &name, &self.metrics)
            .map_err(|error| BridgeError::Conflict(format!("source {}: {error}", source_config.name)))?;
        Ok(self.source_entry(source_config, client))
    }

    /// A source entry around a built client.
    fn source_entry(&self, source_config: &SourceConfig, source_client: SourceClient) -> Arc<SourceEntry> {
        let SourceClient { client, replay, ack } = source_client;
        let name: Arc<str> = source_config.name.as_str().into();
        self.metrics.source_added(&name);
        let spooler = Spooler {
            name: name.clone(),
            routes: Routes::default(),
            store: self.store.clone(),
            replay: replay.clone(),
            metrics: self.metrics.clone(),
            sequence: Arc::default(),
            ack,
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
        })
    }

    /// Starts a source's task, supervised.
    fn spawn_source(&self, entry: &Arc<SourceEntry>) {
        let source = Source {
            name: entry.name.clone(),
            client: entry.client.clone(),
            spooler: entry.spooler.clone(),
            metrics: self.metrics.clone(),
            subscribing: entry.subscribing.clone(),
        };
        let (health, metrics, stop) = (entry.health.clone(), self.metrics.clone(), entry.stop.clone());
        let task = format!("source {}", entry.name);
        let handle = tokio::spawn(async move {
            supervise::supervise(task, &health, &metrics, &stop, || source.clone().run(stop.clone())).await;
        });
        *entry.task.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(handle);
    }

    /// Stops a source's task, closes its session (waiting at most `close_within` for the
    /// server's answer: a frozen server must not hold up a reload or shutdown) and spools
    /// what the session still held (its routes still in place).
    async fn stop_source(&self, source: &SourceEntry, close_within: Duration) {
        source.stop.cancel();
        let task = source.task.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(task) = task
            && let Err(error) = task.await
        {
            tracing::error!(source = %source.name, error = %error, "a source task failed");
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

    /// Starts a subscription's forwarder on its spool (resuming what `summary` says the
    /// store holds) and adds its route to its source.
    async fn start_subscription(
        &self,
        config: SubscriptionConfig,
        origin: Origin,
        summary: Option<SpoolSummary>,
    ) -> Result<SubscriptionEntry, BridgeError> {
        self.start_subscription_on(config, origin, SpoolOrigin::Fresh(summary)).await
    }

    /// [`start_subscription`](Self::start_subscription), on a new spool or on the one a
    /// stopped forwarder of the same subscription left (a reload).
    async fn start_subscription_on(
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
            self.forwarders.spawn(async move {
                supervise::supervise(task, &counters.health, &metrics, &stop.soon, || {
                    let first = forwarder.spool.resume_from();
                    forwarder.clone().run(first, stop.clone())
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
    async fn stop_forwarder(entry: SubscriptionEntry) -> SubscriptionEntry {
        entry.stop.soon.cancel();
        let mut entry = entry;
        if tokio::time::timeout(REMOVE_WAIT, &mut entry.forwarder).await.is_err() {
            entry.stop.now.cancel();
            let _ = (&mut entry.forwarder).await;
        }
        entry
    }

    /// Adds a subscription at runtime: validates it, stores it, starts its forwarder and
    /// subscribes upstream. It is `active` once the server confirmed the channel, else
    /// `pending` (the source subscribes when it reconnects).
    ///
    /// # Errors
    /// [`BridgeError::Invalid`], [`BridgeError::UnknownSource`], [`BridgeError::Conflict`]
    /// (id taken), [`BridgeError::Upstream`] (refused by the server), [`BridgeError::Store`].
    pub async fn add_subscription(&self, raw: RawSubscription) -> Result<SubscriptionView, BridgeError> {
        self.check_posted(&raw)?;
        self.check_resolved(&raw).await?;
        let _one_change = self.reloading.lock().await;
        // Every source name counts as known here, so an unknown one gets its own 404.
        let mut names = self.source_names();
        names.insert(raw.source.clone());
        let config =
            config::validate_subscription(&raw, "", &names, &Env::new()).map_err(BridgeError::Invalid)?;
        if let Some(prefix) = &self.reserved_subjects
            && let Some(problem) = config::reserved_subject_problem(&config, prefix, "")
        {
            return Err(BridgeError::Invalid(vec![problem]));
        }
        let source =
            self.source(&config.source).ok_or_else(|| BridgeError::UnknownSource(config.source.clone()))?;
        match self.subscriptions.reserve(&config.id, self.max_subscriptions) {
            Ok(()) => {}
            Err(registry::Refused::Taken) => {
                return Err(BridgeError::Conflict(format!("a subscription with id {:?} exists", config.id)));
            }
            Err(registry::Refused::Full) => return Err(BridgeError::TooMany(self.max_subscriptions)),
        }
        let entry = match self.start_added(&raw, config, &source).await {
            Ok(entry) => entry,
            Err(error) => {
                self.subscriptions.release(&raw.id);
                return Err(error);
            }
        };
        let view = self.view(&entry);
        self.subscriptions
            .insert(entry)
            .map_err(|_| BridgeError::Conflict(format!("a subscription with id {:?} exists", view.id)))?;
        Ok(view)
    }

    /// What the API refuses that the (trusted) configuration file may do: secret
    /// references, which would let a caller read the bridge's environment or files, and
    /// webhooks to loopback, link-local or private addresses, unless allowed.
    fn check_posted(&self, raw: &RawSubscription) -> Result<(), BridgeError> {
        let RawSink::Webhook { url, secret, .. } = &raw.sink else { return Ok(()) };
        if let Some(secret) = secret
            && (secret.starts_with("env:") || secret.starts_with("file:"))
        {
            return Err(BridgeError::Invalid(vec![config::Problem::new(
                "sink.secret",
                "secret references (env:, file:) are not accepted through the API; give the secret itself, or define the subscription in the configuration file",
            )]));
        }
        if !self.allow_private_webhooks
            && let Ok(parsed) = reqwest::Url::parse(url)
            && let Some(kind) = config::private_destination(&parsed)
        {
            return Err(BridgeError::Forbidden(format!(
                "sink.url: {:?} is a {kind} address; webhooks posted through the API may not target it (set admin.allow_private_webhooks = true to allow it)",
                crate::redact::mask_url(url)
            )));
        }
        Ok(())
    }

    /// A posted webhook whose host name resolves to a private address now is refused at
    /// once (its connections would be refused anyway, every one checked again when made).
    async fn check_resolved(&self, raw: &RawSubscription) -> Result<(), BridgeError> {
        let RawSink::Webhook { url, .. } = &raw.sink else { return Ok(()) };
        let Some(name) = reqwest::Url::parse(url).ok().and_then(|url| url.domain().map(str::to_string))
        else {
            return Ok(());
        };
        match self.http.resolver.refusal(&name).await {
            Some(refused) => Err(BridgeError::Forbidden(format!("sink.url: {refused}"))),
            None => Ok(()),
        }
    }

    /// Stores, starts and subscribes upstream a reserved subscription.
    async fn start_added(
        &self,
        raw: &RawSubscription,
        config: SubscriptionConfig,
        source: &SourceEntry,
    ) -> Result<SubscriptionEntry, BridgeError> {
        self.store.put_subscription(raw).await?;
        let entry = match self.start_subscription(config.clone(), Origin::Api, None).await {
            Ok(entry) => entry,
            Err(error) => {
                self.store.delete_subscription(&config.id).await?;
                return Err(error);
            }
        };
        let pattern = config.channel.as_str();
        if source.client.status().state == SessionState::Connected
            && !source.client.subscriptions().contains(pattern)
            && let Err(error) = source.client.subscribe(pattern).await
            && matches!(error, Error::Server(_))
        {
            source.routes().remove(&config.id);
            let entry = Self::stop_forwarder(entry).await;
            entry.spool.release_all();
            self.store.spool_delete(&config.id).await?;
            self.store.delete_subscription(&config.id).await?;
            return Err(BridgeError::Upstream(error));
        }
        tracing::info!(id = %config.id, source = %config.source, channel = %pattern, "subscription added");
        Ok(entry)
    }

    /// Removes a subscription added through the API: its route goes first, its forwarder
    /// finishes the delivery in flight, then the channel is unsubscribed upstream unless
    /// another subscription of the source still uses it, and the record and its spool are
    /// deleted (what was still spooled is discarded, and counted in the log).
    ///
    /// # Errors
    /// [`BridgeError::NotFound`], [`BridgeError::Conflict`] for a configured subscription,
    /// [`BridgeError::Store`].
    pub async fn remove_subscription(&self, id: &str) -> Result<(), BridgeError> {
        let _one_change = self.reloading.lock().await;
        let entry = self
            .subscriptions
            .remove(id, |entry| match entry.origin {
                Origin::Config => Err(BridgeError::Conflict(format!(
                    "subscription {id:?} is defined in the configuration file; remove it there and restart the bridge"
                ))),
                Origin::Api => Ok(()),
            })
            .ok_or_else(|| BridgeError::NotFound(format!("subscription {id:?}")))??;
        // Its source may be gone (a reload removed it): what is left of it is removed.
        let source = self.source(&entry.config.source);
        if let Some(source) = &source {
            source.routes().remove(id);
        }
        let entry = Self::stop_forwarder(entry).await;
        let pattern = entry.config.channel.as_str();
        if let Some(source) = &source {
            let still_needed =
                source.routes().snapshot().iter().any(|route| route.pattern.as_str() == pattern);
            if !still_needed
                && source.client.subscriptions().contains(pattern)
                && let Err(error) = source.client.unsubscribe(pattern).await
            {
                tracing::warn!(id, channel = %pattern, error = %error, "could not unsubscribe upstream");
            }
            if let Some(replay) = &source.replay {
                replay.remove(id);
            }
        }
        if source.as_ref().is_none_or(|source| source.replay.is_some()) {
            self.store.delete_positions(id).await?;
        }
        let backlog = entry.spool.backlog();
        entry.spool.release_all();
        self.store.spool_delete(id).await?;
        self.store.delete_subscription(id).await?;
        self.metrics.forget_subscription(id);
        if backlog.messages > 0 {
            tracing::warn!(
                id,
                discarded = backlog.messages,
                "subscription removed with messages still spooled; they are discarded"
            );
        } else {
            tracing::info!(id, "subscription removed");
        }
        Ok(())
    }

    /// Subscribes upstream to the routes' channels a connected session lacks, and
    /// unsubscribes from those no route uses any more. What fails here, the source task
    /// tries again when it reconnects.
    async fn follow_routes_upstream(&self, source: &SourceEntry) {
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

    /// Every subscription.
    pub fn subscriptions(&self) -> Vec<SubscriptionView> {
        self.subscriptions.all(|entry| self.view(entry))
    }

    /// One subscription.
    pub fn subscription(&self, id: &str) -> Option<SubscriptionView> {
        self.subscriptions.get(id, |entry| self.view(entry))
    }

    fn view(&self, entry: &SubscriptionEntry) -> SubscriptionView {
        let config = &entry.config;
        let active = self.source(&config.source).is_some_and(|source| {
            let status = source.client.status();
            status.state == SessionState::Connected && status.subscriptions.contains(config.channel.as_str())
        });
        let mut sink = config.raw.sink.clone();
        if let RawSink::Webhook { url, secret, .. } = &mut sink {
            *url = crate::redact::mask_url(url);
            if let Some(secret) = secret {
                *secret = "***".into();
            }
        }
        SubscriptionView {
            id: config.id.clone(),
            source: config.source.clone(),
            channel: config.channel.to_string(),
            sink,
            origin: entry.origin,
            state: if active { "active" } else { "pending" },
            received: entry.counters.received.load(Ordering::Relaxed),
            forwarded: entry.counters.forwarded.load(Ordering::Relaxed),
            dead_letters: entry.counters.dead_letters.load(Ordering::Relaxed),
            dropped: entry.counters.dropped.load(Ordering::Relaxed),
            full: entry.spool.full().is_some(),
            backlog: entry.spool.backlog().into(),
            positions: self
                .source(&config.source)
                .and_then(|source| source.replay.as_ref().map(|replay| replay.committed(&config.id))),
        }
    }

    /// Sets a subscription's replay position (an operator's reset), stores it, and makes
    /// the live session subscribe again from it.
    ///
    /// # Errors
    /// [`BridgeError::NotFound`], [`BridgeError::Conflict`] when its source does not use
    /// replay, [`BridgeError::Store`].
    pub async fn reset_position(
        &self,
        id: &str,
        position: ReplayPosition,
    ) -> Result<SubscriptionView, BridgeError> {
        let _one_change = self.reloading.lock().await;
        let (source, channel) = self
            .subscriptions
            .get(id, |entry| (entry.config.source.clone(), entry.config.channel.to_string()))
            .ok_or_else(|| BridgeError::NotFound(format!("subscription {id:?}")))?;
        let source = self.source(&source).ok_or_else(|| {
            BridgeError::Conflict(format!("the source {source:?} of subscription {id:?} is gone"))
        })?;
        let replay = source.replay.as_ref().ok_or_else(|| {
            BridgeError::Conflict(format!(
                "source {:?} does not use replay (set replay = true)",
                source.config.name
            ))
        })?;
        let positions = replay.reset(id, position).expect("the subscription is tracked");
        self.store.put_positions(id, &positions).await?;
        let channel = channel.as_str();
        let lock = || source.subscribing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if source.client.subscriptions().contains(channel) && lock().insert(channel.to_string()) {
            let resubscribed = async {
                source.client.unsubscribe(channel).await?;
                source.client.subscribe(channel).await
            };
            let resubscribed = resubscribed.await;
            lock().remove(channel);
            if let Err(error) = resubscribed {
                tracing::warn!(id, channel, error = %error, "could not subscribe again from the new position; it applies on the next subscribe");
            }
        }
        tracing::info!(id, position = %position, "replay position reset");
        self.subscriptions
            .get(id, |entry| self.view(entry))
            .ok_or_else(|| BridgeError::NotFound(format!("subscription {id:?}")))
    }

    /// Every source with its live state.
    pub fn sources(&self) -> Vec<SourceView> {
        self.source_list()
            .iter()
            .map(|source| {
                let status = source.client.status();
                SourceView {
                    name: source.config.name.clone(),
                    url: crate::redact::mask_url(&source.config.url),
                    state: match status.state {
                        SessionState::Connected => "connected",
                        SessionState::Unconnected
                        | SessionState::Handshaking
                        | SessionState::Reconnecting => "connecting",
                        SessionState::Disconnecting | SessionState::Closed => "disconnected",
                    },
                    connection_type: status.connection_type.map(|kind| kind.as_str()),
                    client_id: status.client_id,
                    last_error: status.last_error.map(|error| crate::redact::mask_urls_in(&error)),
                    subscriptions: status.subscriptions.into_iter().collect(),
                }
            })
            .collect()
    }

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
        for source in self.source_list() {
            if let Some(reason) = source.health.unready_reason() {
                reasons.push(Unready::new(TASK_FAILED, format!("source {}'s task {reason}", source.name)));
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

    /// Shuts down in the contract's order, all of it within `bridge.shutdown_grace`: stop
    /// taking messages; let each forwarder finish the delivery in flight, then abandon it
    /// (what is not delivered stays in the spool); disconnect every source at once, with a
    /// short deadline, spooling what each session still held; make the last settlements
    /// durable and flush NATS. Returns the deadline, for what the caller stops after.
    pub async fn shut_down(&self) -> Instant {
        let started = Instant::now();
        let grace = *self.grace.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let deadline = started + grace;
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
        futures_util::future::join_all(sources.iter().map(|source| self.stop_source(source, close_within)))
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

/// The newest replay id per channel in a subscription's spool, so that a new session
/// subscribes after what is already spooled. A channel without wildcards needs only the
/// spool's last message; a pattern is read whole (once, at start).
async fn newest_spooled_replay_ids(
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

/// A source's client and the handles of its extensions.
struct SourceClient {
    client: Client,
    /// The replay state its replay extension reads, with replay.
    replay: Option<Arc<ReplayState>>,
    /// Confirms spooled messages to its ack extension, unless `ack = false`.
    ack: Option<AckConfirmer>,
}

/// A source's client: its options, plus the replay extension (reading the source's replay
/// state), the ack extension (acknowledging a batch once it is spooled) and Salesforce auth
/// when configured.
fn source_client(config: &SourceConfig, name: &Arc<str>, metrics: &Metrics) -> Result<SourceClient, Error> {
    let mut options = config.client_options();
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
    Ok(SourceClient { client: options.build()?, replay, ack })
}
