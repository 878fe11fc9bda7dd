//! The bridge: a source task per CometD server that spools what it receives, a forwarder
//! task per subscription that delivers its spool, the registry that adds and removes
//! subscriptions at runtime, reloading the configuration, and the shutdown that stops them
//! in the contract's order. This file holds the [`Bridge`] and its start; each other
//! concept has its file:
//!
//! - `source` (the source task and its spooling), `commit` (its group commit, pipelined),
//!   `sources` (a source's lifecycle and client), `replay` (replay positions);
//! - `spool`, `forwarder` (delivery from a spool), `subscriptions` (a subscription's
//!   lifecycle), `registry` (the running subscriptions);
//! - `changes` (what the admin API changes), `reload`, `dead_letters`, `ownership` and
//!   `follow` (leases among replicas, and the changes other replicas' APIs make);
//! - `views` (what the API shows), `health` (readiness and metrics), `supervise`
//!   (restarting a failed task), `shutdown`.

mod changes;
mod commit;
mod dead_letters;
mod follow;
pub mod forwarder;
pub mod gate;
mod handover;
mod health;
mod ownership;
mod registry;
mod reload;
pub mod replay;
mod shutdown;
pub mod source;
mod sources;
pub mod spool;
mod subscriptions;
mod supervise;
mod views;

use std::collections::BTreeSet;
use std::sync::Arc;
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
use sources::{SourceClient, source_client};
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
    /// Whether this replica owns the source (always, without replicas).
    owned: tokio::sync::watch::Sender<bool>,
    /// How many of its tasks (session, forwarders) run for it.
    busy: tokio::sync::watch::Sender<usize>,
    /// Until when this replica may write for it.
    lease: Arc<gate::LeaseClock>,
    /// The session its next run continues (left by the previous owner).
    ticket: handover::TicketSlot,
}

impl SourceEntry {
    /// The gate its tasks pass while this replica owns it.
    fn gate(&self) -> gate::Gate {
        gate::Gate::new(self.owned.subscribe(), self.busy.clone())
    }

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
    /// Leases among replicas, with the `nats` state backend.
    ownership: Option<ownership::Ownership>,
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
            ownership: config.cluster.clone().map(ownership::Ownership::new),
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
        if let config::StateBackend::NatsKv { bucket, replicas } = &config.state.backend {
            bridge.start_ownership(bucket, *replicas).await?;
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
}
