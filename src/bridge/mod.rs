//! The bridge: a source task per CometD server, a forwarder task per subscription, and the
//! shutdown that drains them in the contract's order.

pub mod envelope;
pub mod forwarder;
pub mod source;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cometd::{ChannelPattern, Client, Error, SessionState};
use crate::config::{Config, SinkConfig};
use crate::sink::{NatsSink, Sink, WebhookSink};
use crate::store::FileStore;
use crate::telemetry::metrics::Metrics;
use envelope::Envelope;
use forwarder::{Forwarder, dead_letter};
use source::{Route, Source};

/// Why a message still pending in a session at disconnect was not forwarded.
const DISCONNECT_REASON: &str = "shutdown: received but not yet forwarded when the session closed";

/// What the bridge needs from the outside.
pub struct Parts {
    /// The validated configuration.
    pub config: Config,
    /// The dead-letter store.
    pub store: FileStore,
    /// The NATS connection, when a subscription uses NATS.
    pub nats: Option<async_nats::Client>,
    /// Metrics.
    pub metrics: Metrics,
    /// HTTP client for webhooks.
    pub http: reqwest::Client,
}

/// A running bridge.
pub struct Bridge {
    /// Each source's name and client, for health checks and the API.
    pub sources: Vec<(Arc<str>, Client)>,
    /// Each source's subscriptions (aligned with `sources`), to dead-letter what a session
    /// still holds at shutdown under the right subscription.
    patterns: Vec<Vec<(ChannelPattern, Arc<str>)>>,
    nats: Option<async_nats::Client>,
    source_tasks: std::sync::Mutex<Vec<JoinHandle<Client>>>,
    forwarders: TaskTracker,
    stop_taking: CancellationToken,
    stop_delivering: CancellationToken,
    grace: Duration,
    store: FileStore,
    metrics: Metrics,
}

impl Bridge {
    /// Starts every source and forwarder.
    ///
    /// # Errors
    /// [`Error`] when a source's client options cannot work (validation makes this rare).
    pub fn start(parts: Parts) -> Result<Bridge, Error> {
        let Parts {
            config,
            store,
            nats,
            metrics,
            http,
        } = parts;
        let forwarders = TaskTracker::new();
        let stop_taking = CancellationToken::new();
        let stop_delivering = CancellationToken::new();
        let mut routes: Vec<(String, Route)> = Vec::new();
        for subscription in &config.subscriptions {
            let (queue, receiver) = mpsc::channel::<Envelope>(config.bridge.queue_capacity);
            let sink = match &subscription.sink {
                SinkConfig::Nats(nats_sink) => Sink::Nats(Box::new(NatsSink::new(
                    nats.clone()
                        .expect("NATS is connected when a subscription uses it"),
                    nats_sink.subject.clone(),
                    nats_sink.jetstream,
                    nats_sink.payload,
                    metrics.clone(),
                ))),
                SinkConfig::Webhook(webhook) => Sink::Webhook(WebhookSink::new(
                    http.clone(),
                    webhook.clone(),
                    metrics.clone(),
                )),
            };
            let id: Arc<str> = subscription.id.as_str().into();
            let forwarder = Forwarder {
                subscription: id.clone(),
                sink,
                sink_kind: subscription.sink.kind(),
                store: store.clone(),
                metrics: metrics.clone(),
            };
            forwarders.spawn(forwarder.run(receiver, stop_delivering.clone()));
            routes.push((
                subscription.source.clone(),
                Route {
                    subscription: id,
                    pattern: subscription.channel.clone(),
                    queue,
                },
            ));
        }
        forwarders.close();

        let mut sources = Vec::new();
        let mut patterns = Vec::new();
        let mut source_tasks = Vec::new();
        for source_config in &config.sources {
            let client = source_config.client_options().build()?;
            let name: Arc<str> = source_config.name.as_str().into();
            metrics.source_connected(&name, false);
            let (mine, others): (Vec<_>, Vec<_>) = routes
                .into_iter()
                .partition(|(source, _)| *source == source_config.name);
            routes = others;
            patterns.push(
                mine.iter()
                    .map(|(_, route)| (route.pattern.clone(), route.subscription.clone()))
                    .collect(),
            );
            let source = Source {
                name: name.clone(),
                client: client.clone(),
                routes: mine.into_iter().map(|(_, route)| route).collect(),
                store: store.clone(),
                metrics: metrics.clone(),
            };
            source_tasks.push(tokio::spawn(source.run(stop_taking.clone())));
            sources.push((name, client));
        }
        Ok(Bridge {
            sources,
            patterns,
            nats,
            source_tasks: std::sync::Mutex::new(source_tasks),
            forwarders,
            stop_taking,
            stop_delivering,
            grace: config.bridge.shutdown_grace,
            store,
            metrics,
        })
    }

    /// Why the bridge is not ready: a source not connected, NATS not connected. Empty when
    /// ready.
    pub fn unready_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        for ((name, client), patterns) in self.sources.iter().zip(&self.patterns) {
            let status = client.status();
            if status.state != SessionState::Connected {
                let mut reason = format!(
                    "source {name} is {}",
                    format!("{:?}", status.state).to_lowercase()
                );
                if let Some(error) = status.last_error {
                    reason.push_str(&format!(": {error}"));
                }
                reasons.push(reason);
                continue;
            }
            for (pattern, _) in patterns {
                if !status.subscriptions.contains(pattern.as_str()) {
                    reasons.push(format!("source {name} is not subscribed to {pattern}"));
                }
            }
        }
        if let Some(nats) = &self.nats
            && nats.connection_state() != async_nats::connection::State::Connected
        {
            reasons.push("NATS is not connected".into());
        }
        reasons
    }

    /// Shuts down in the contract's order: stop taking messages; let the forwarders drain
    /// for the grace period, then dead-letter what is left; disconnect every session
    /// (dead-lettering what it still held); flush NATS.
    pub async fn shut_down(&self) {
        let started = Instant::now();
        tracing::info!(grace = ?self.grace, "stopping: no new messages are taken");
        self.stop_taking.cancel();
        let tasks = std::mem::take(
            &mut *self
                .source_tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let mut clients = Vec::new();
        for task in tasks {
            match task.await {
                Ok(client) => clients.push(client),
                Err(error) => tracing::error!(error = %error, "a source task failed"),
            }
        }
        let remaining = self.grace.saturating_sub(started.elapsed());
        if tokio::time::timeout(remaining, self.forwarders.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "the grace period ended with deliveries in flight; storing them as dead letters"
            );
            self.stop_delivering.cancel();
            self.forwarders.wait().await;
        }
        for ((name, client), patterns) in self.sources.iter().zip(&self.patterns) {
            client.close().await;
            // Own key space, so these never share a delivery id with a routed message.
            let session: Arc<str> =
                format!("{}-shutdown", client.status().client_id.unwrap_or_default()).into();
            let mut drained = 0;
            loop {
                let message = match client.receive().await {
                    Ok(message) => Arc::new(message),
                    Err(Error::Closed) => break,
                    Err(_) => continue,
                };
                drained += 1;
                for (_, subscription) in patterns
                    .iter()
                    .filter(|(pattern, _)| pattern.matches(&message.channel))
                {
                    let envelope = Envelope {
                        source: name.clone(),
                        subscription: subscription.clone(),
                        session: session.clone(),
                        sequence: drained,
                        message: message.clone(),
                        received_at: Instant::now(),
                    };
                    dead_letter(&self.store, &self.metrics, &envelope, DISCONNECT_REASON, 0).await;
                }
            }
        }
        drop(clients);
        if let Some(nats) = &self.nats
            && let Err(error) = tokio::time::timeout(Duration::from_secs(5), nats.flush())
                .await
                .map_err(|_| "timed out".to_string())
                .and_then(|flushed| flushed.map_err(|error| error.to_string()))
        {
            tracing::warn!(error = %error, "could not flush NATS");
        }
        tracing::info!("stopped");
    }
}
