//! The source task: one per CometD server. It keeps the session open (re-opening it if the
//! server closes it), subscribes to every channel its subscriptions need, and routes each
//! message to every subscription whose pattern matches, waiting when a forwarder's queue
//! is full so that backpressure reaches the CometD side.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use prometheus_client::metrics::counter::Counter;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::envelope::Envelope;
use super::forwarder::{Counters, dead_letter};
use crate::cometd::{ChannelPattern, Client, Error, Message, SessionState, TransportErrorKind, replay_id};
use crate::sink::{pause, retry_backoff};
use crate::store::Store;
use crate::telemetry::metrics::Metrics;

/// Why a message taken from the session could not be handed to its forwarder.
const STOPPED_REASON: &str = "shutdown: received while the bridge was stopping";

/// One subscription's route: its pattern and its forwarder's queue.
#[derive(Clone)]
pub struct Route {
    /// The subscription's id.
    pub subscription: Arc<str>,
    /// The channel pattern it subscribed to.
    pub pattern: ChannelPattern,
    /// Its forwarder's queue.
    pub queue: mpsc::Sender<Envelope>,
    /// Its counts.
    pub counters: Arc<Counters>,
    /// Its `cometd_bridge_messages_received_total` series, looked up once.
    pub received: Counter,
}

/// A source's routes. The admin API adds and removes routes while the source runs; the
/// source takes a snapshot per message, which costs one reference count, and holds no
/// lock while it waits for a queue.
#[derive(Clone, Default)]
pub struct Routes(Arc<RwLock<Arc<Vec<Route>>>>);

impl Routes {
    /// The routes as they are now.
    pub fn snapshot(&self) -> Arc<Vec<Route>> {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn replace(&self, change: impl FnOnce(&mut Vec<Route>)) {
        let mut current = self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut routes = current.as_ref().clone();
        change(&mut routes);
        *current = Arc::new(routes);
    }

    /// Adds a route.
    pub fn add(&self, route: Route) {
        self.replace(|routes| routes.push(route));
    }

    /// Removes a subscription's route.
    pub fn remove(&self, subscription: &str) {
        self.replace(|routes| routes.retain(|route| &*route.subscription != subscription));
    }

    /// Removes every route (shutdown), returning them.
    pub fn take_all(&self) -> Vec<Route> {
        let mut current = self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::take(&mut *current).as_ref().clone()
    }
}

/// A source's task state.
pub struct Source {
    /// The source's name.
    pub name: Arc<str>,
    /// The CometD client.
    pub client: Client,
    /// Where messages go.
    pub routes: Routes,
    /// For messages that cannot be routed during shutdown.
    pub store: Arc<dyn Store>,
    /// Metrics.
    pub metrics: Metrics,
    /// Whether events carry replay ids to track.
    pub replay: bool,
}

impl Source {
    /// Runs until `stop` is cancelled; returns the client, still open, so that shutdown can
    /// disconnect it after the forwarders drained.
    pub async fn run(self, stop: CancellationToken) -> Client {
        let mut sequence = 0u64;
        'session: loop {
            if !self.open(&stop).await {
                return self.client;
            }
            let mut status = self.client.watch_status().expect("the client was opened");
            let mut session: Arc<str> =
                status.borrow_and_update().client_id.clone().unwrap_or_default().into();
            self.metrics.source_connected(&self.name, true);
            loop {
                let item = tokio::select! {
                    biased;
                    _ = stop.cancelled() => return self.client,
                    changed = status.changed() => {
                        let status = status.borrow_and_update();
                        if changed.is_err() || status.state == SessionState::Closed {
                            self.metrics.source_connected(&self.name, false);
                            drop(status);
                            continue 'session;
                        }
                        self.metrics.source_connected(&self.name, status.state == SessionState::Connected);
                        if let Some(client_id) = &status.client_id && **client_id != *session {
                            session = client_id.as_str().into();
                        }
                        continue;
                    }
                    item = self.client.receive() => item,
                };
                match item {
                    Ok(message) => {
                        sequence += 1;
                        self.metrics.pending(&self.name, self.client.pending_count());
                        self.route(message, &session, sequence, &stop).await;
                    }
                    Err(Error::Transport { kind: TransportErrorKind::ConnectionTimeout, .. }) => {
                        tracing::warn!(source = %self.name, "lost the connection to the CometD server; reconnecting");
                    }
                    Err(Error::Closed) => continue 'session,
                    Err(error) => {
                        tracing::error!(source = %self.name, error = %error, "the CometD server reported an error");
                    }
                }
            }
        }
    }

    /// Opens the session and subscribes, retrying with backoff; `false` when stopped first.
    async fn open(&self, stop: &CancellationToken) -> bool {
        let backoff = retry_backoff();
        let mut failures = 0;
        loop {
            let opened = tokio::select! {
                biased;
                _ = stop.cancelled() => return false,
                opened = self.client.open() => opened,
            };
            match opened.and(Ok(())) {
                Ok(()) => break,
                Err(error) => {
                    tracing::error!(source = %self.name, error = %error, "cannot open a CometD session; retrying");
                    self.metrics.source_connected(&self.name, false);
                    if !pause(backoff.delay(failures), stop).await {
                        return false;
                    }
                    failures += 1;
                }
            }
        }
        let channels: BTreeSet<String> =
            self.routes.snapshot().iter().map(|route| route.pattern.as_str().to_string()).collect();
        for channel in &channels {
            match self.client.subscribe(channel).await {
                Ok(()) => tracing::info!(source = %self.name, channel = %channel, "subscribed"),
                Err(error) => {
                    tracing::error!(source = %self.name, channel = %channel, error = %error, "subscription refused")
                }
            }
        }
        true
    }

    /// Hands the message to every matching subscription, in route order.
    async fn route(&self, message: Message, session: &Arc<str>, sequence: u64, stop: &CancellationToken) {
        let replay_id = if self.replay { replay_id(&message) } else { None };
        let message = Arc::new(message);
        let received_at = Instant::now();
        let routes = self.routes.snapshot();
        for route in routes.iter().filter(|route| route.pattern.matches(&message.channel)) {
            let envelope = Envelope {
                source: self.name.clone(),
                subscription: route.subscription.clone(),
                session: session.clone(),
                sequence,
                replay_id,
                message: message.clone(),
                received_at,
            };
            route.received.inc();
            route.counters.received.fetch_add(1, Ordering::Relaxed);
            let permit = tokio::select! {
                biased;
                _ = stop.cancelled() => None,
                permit = route.queue.reserve() => permit.ok(),
            };
            match permit {
                Some(permit) => permit.send(envelope),
                None => {
                    if dead_letter(&*self.store, &self.metrics, &envelope, STOPPED_REASON, 0).await {
                        route.counters.dead_letters.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}
