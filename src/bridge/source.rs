//! The source task: one per CometD server. It keeps the session open (re-opening it if the
//! server closes it), subscribes to every channel its subscriptions need, and appends each
//! message to the spool of every subscription whose pattern matches, in one durable
//! transaction per batch of what has arrived. It never waits on a sink: only full spools
//! (`state.spool_max_bytes`) pause it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;

use super::forwarder::Counters;
use super::spool::{Spool, SpoolLimit, Spooled};
use crate::cometd::{
    AckConfirmer, Backoff, ChannelPattern, Client, Error, Message, SessionState, TransportErrorKind,
    replay_id,
};
use crate::delivery::Envelope;
use crate::sink::pause;
use crate::store::{SpoolAppend, Store};
use crate::telemetry::metrics::Metrics;

/// Messages taken from the session at most per spool transaction.
const BATCH: usize = 512;

/// One subscription's route: its pattern and its spool.
#[derive(Clone)]
pub struct Route {
    /// The subscription's id.
    pub subscription: Arc<str>,
    /// The channel pattern it subscribed to.
    pub pattern: ChannelPattern,
    /// Its spool.
    pub spool: Arc<Spool>,
    /// Its counts.
    pub counters: Arc<Counters>,
    /// Its `cometd_bridge_messages_received_total` series, looked up once.
    pub received: Counter,
}

/// A source's routes. The admin API adds and removes routes while the source runs; the
/// source takes a snapshot per batch, which costs one reference count.
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

    /// Adds a route, or replaces the subscription's route in one step (a reload that
    /// changes its channel: no message falls between the two).
    pub fn put(&self, route: Route) {
        self.replace(|routes| {
            match routes.iter_mut().find(|existing| existing.subscription == route.subscription) {
                Some(existing) => *existing = route,
                None => routes.push(route),
            }
        });
    }

    /// Removes a subscription's route.
    pub fn remove(&self, subscription: &str) {
        self.replace(|routes| routes.retain(|route| &*route.subscription != subscription));
    }
}

/// Appends a source's messages to the spools of the subscriptions they match. The source
/// task uses it while it runs, and shutdown for what the session still held.
#[derive(Clone)]
pub struct Spooler {
    /// The source's name.
    pub name: Arc<str>,
    /// Where messages go.
    pub routes: Routes,
    /// The store holding the spools.
    pub store: Arc<dyn Store>,
    /// Whether events carry replay ids to track.
    pub replay: bool,
    /// Arrival order within the source, over the process's life.
    pub sequence: Arc<AtomicU64>,
    /// With the ack extension: told once messages are spooled, so that the server drops
    /// a batch only then.
    pub ack: Option<AckConfirmer>,
}

impl Spooler {
    /// Appends `messages` to the matching spools, durably, retrying a failing store until
    /// `stop` (after which one last try is made and a failure is logged with the content).
    pub async fn spool(&self, messages: Vec<Message>, session: &Arc<str>, stop: &CancellationToken) {
        let count = messages.len() as u64;
        if self.append(messages, session, stop).await
            && let Some(ack) = &self.ack
        {
            ack.confirm(count);
        }
    }

    /// Appends; `false` when the messages could not be spooled (and are lost).
    async fn append(&self, messages: Vec<Message>, session: &Arc<str>, stop: &CancellationToken) -> bool {
        let received_at = SystemTime::now();
        let routes = self.routes.snapshot();
        let mut appends = Vec::with_capacity(messages.len());
        let mut targets: Vec<(usize, Envelope, u64)> = Vec::with_capacity(messages.len());
        for message in messages {
            let sequence = self.sequence.fetch_add(1, Ordering::Relaxed) + 1;
            let replay_id = if self.replay { replay_id(&message) } else { None };
            let message = Arc::new(message);
            for (index, route) in
                routes.iter().enumerate().filter(|(_, route)| route.pattern.matches(&message.channel))
            {
                let envelope = Envelope {
                    source: self.name.clone(),
                    subscription: route.subscription.clone(),
                    session: session.clone(),
                    sequence,
                    replay_id,
                    message: message.clone(),
                    received_at,
                };
                let record = envelope.to_record();
                let bytes = record.len() as u64;
                appends.push(SpoolAppend { subscription: route.subscription.clone(), record });
                targets.push((index, envelope, bytes));
                route.received.inc();
                route.counters.received.fetch_add(1, Ordering::Relaxed);
            }
        }
        if appends.is_empty() {
            return true;
        }
        let appends: Arc<[SpoolAppend]> = appends.into();
        let mut failures = 0;
        let sequences = loop {
            match self.store.spool_append(appends.clone()).await {
                Ok(sequences) => break sequences,
                Err(error) if stop.is_cancelled() => {
                    for append in appends.iter() {
                        tracing::error!(source = %self.name, subscription = %append.subscription, error = %error, record = %String::from_utf8_lossy(&append.record), "cannot spool a received message while stopping; it is lost");
                    }
                    return false;
                }
                Err(error) => {
                    tracing::error!(source = %self.name, error = %error, "cannot append received messages to the spool; trying again");
                    failures += 1;
                    let _ = pause(Duration::from_millis(100 * 2u64.pow(failures.min(6))), stop).await;
                }
            }
        };
        let mut per_route: Vec<Vec<Spooled>> = vec![Vec::new(); routes.len()];
        for ((index, envelope, bytes), sequence) in targets.into_iter().zip(sequences) {
            if let Some(sequence) = sequence {
                per_route[index].push(Spooled { sequence, bytes, envelope });
            }
        }
        for (route, spooled) in routes.iter().zip(per_route) {
            if !spooled.is_empty() {
                route.spool.appended(spooled);
            }
        }
        true
    }
}

/// A source's task state; a clone runs on the same session (a supervisor starts a clone
/// again after a failure).
#[derive(Clone)]
pub struct Source {
    /// The source's name.
    pub name: Arc<str>,
    /// The CometD client.
    pub client: Client,
    /// Where messages go.
    pub spooler: Spooler,
    /// The room left in the spools.
    pub limit: Arc<SpoolLimit>,
    /// Metrics.
    pub metrics: Metrics,
    /// Channels being subscribed in the background, so that none is asked twice.
    pub subscribing: Arc<std::sync::Mutex<BTreeSet<String>>>,
}

/// How often a source checks that every route's channel is subscribed upstream.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);

impl Source {
    /// Runs until `stop` is cancelled; returns the client, still open, so that shutdown can
    /// disconnect it after the forwarders drained.
    pub async fn run(self, stop: CancellationToken) -> Client {
        let mut known_session: Option<Arc<str>> = None;
        'session: loop {
            if !self.open(&stop).await {
                return self.client;
            }
            let mut status = self.client.watch_status().expect("the client was opened");
            let mut session: Arc<str> =
                status.borrow_and_update().client_id.clone().unwrap_or_default().into();
            self.session_changed(&mut known_session, &session);
            self.metrics.source_connected(&self.name, true);
            let window = self.spooler.store.append_window();
            let mut last_append: Option<Instant> = None;
            let mut reconcile = tokio::time::interval(RECONCILE_EVERY);
            reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                if self.limit.is_full() && !self.wait_for_room(&stop).await {
                    return self.client;
                }
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
                        let connected = status.state == SessionState::Connected;
                        self.metrics.source_connected(&self.name, connected);
                        if let Some(client_id) = &status.client_id && **client_id != *session {
                            session = client_id.as_str().into();
                            self.session_changed(&mut known_session, &session);
                        }
                        drop(status);
                        if connected {
                            self.reconcile();
                        }
                        continue;
                    }
                    _ = reconcile.tick() => {
                        self.reconcile();
                        continue;
                    }
                    item = self.client.receive() => item,
                };
                match item {
                    Ok(message) => {
                        let mut batch = vec![message];
                        // Whatever else has arrived goes in the same transaction.
                        let mut deferred = None;
                        while batch.len() < BATCH {
                            match self.client.receive().now_or_never() {
                                Some(Ok(message)) => batch.push(message),
                                Some(Err(error)) => {
                                    deferred = Some(error);
                                    break;
                                }
                                None => break,
                            }
                        }
                        // Group commit: while messages keep coming, at most one append per
                        // window, so a synced append serves many messages.
                        let window_ends = last_append.map(|started| started + window);
                        if deferred.is_none()
                            && let Some(ends) = window_ends.filter(|ends| *ends > Instant::now())
                        {
                            deferred = self.gather_until(&mut batch, ends, &stop).await;
                        }
                        last_append = Some(Instant::now());
                        self.metrics.pending(&self.name, self.client.pending_count());
                        self.spooler.spool(batch, &session, &stop).await;
                        match deferred {
                            Some(Error::Closed) => continue 'session,
                            Some(error) => {
                                tracing::error!(source = %self.name, error = %crate::redact::mask_urls_in(&error.to_string()), "the CometD server reported an error")
                            }
                            None => {}
                        }
                    }
                    Err(Error::Transport { kind: TransportErrorKind::ConnectionTimeout, .. }) => {
                        tracing::warn!(source = %self.name, "lost the connection to the CometD server; reconnecting");
                    }
                    Err(Error::Closed) => continue 'session,
                    Err(error) => {
                        tracing::error!(source = %self.name, error = %crate::redact::mask_urls_in(&error.to_string()), "the CometD server reported an error");
                    }
                }
            }
        }
    }

    /// Adds what the session delivers to `batch` until `ends`, a full batch or `stop`;
    /// returns an error the session reported meanwhile (for the caller to handle after
    /// spooling the batch).
    async fn gather_until(
        &self,
        batch: &mut Vec<Message>,
        ends: Instant,
        stop: &CancellationToken,
    ) -> Option<Error> {
        let deadline = tokio::time::sleep_until(ends.into());
        tokio::pin!(deadline);
        while batch.len() < BATCH {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return None,
                () = &mut deadline => return None,
                item = self.client.receive() => match item {
                    Ok(message) => batch.push(message),
                    Err(error) => return Some(error),
                },
            }
        }
        None
    }

    /// Opens the session and subscribes, retrying with backoff; `false` when stopped first.
    async fn open(&self, stop: &CancellationToken) -> bool {
        let backoff = open_backoff();
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
                    tracing::error!(source = %self.name, error = %crate::redact::mask_urls_in(&error.to_string()), "cannot open a CometD session; retrying");
                    self.metrics.source_connected(&self.name, false);
                    if !pause(backoff.delay(failures), stop).await {
                        return false;
                    }
                    failures += 1;
                }
            }
        }
        let channels: BTreeSet<String> =
            self.spooler.routes.snapshot().iter().map(|route| route.pattern.as_str().to_string()).collect();
        for channel in &channels {
            match self.client.subscribe(channel).await {
                Ok(()) => tracing::info!(source = %self.name, channel = %channel, "subscribed"),
                Err(error) => {
                    tracing::error!(source = %self.name, channel = %channel, error = %crate::redact::mask_urls_in(&error.to_string()), "subscription refused")
                }
            }
        }
        true
    }

    /// Subscribes upstream, in the background, every route's channel the session does not
    /// have: one added while the session was down, or whose subscribe failed on the way.
    fn reconcile(&self) {
        if self.client.status().state != SessionState::Connected {
            return;
        }
        let subscribed = self.client.subscriptions();
        let routes = self.spooler.routes.snapshot();
        for pattern in routes.iter().map(|route| route.pattern.as_str()) {
            if subscribed.contains(pattern) {
                continue;
            }
            if !self
                .subscribing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(pattern.to_string())
            {
                continue;
            }
            let (client, subscribing, source, channel) =
                (self.client.clone(), self.subscribing.clone(), self.name.clone(), pattern.to_string());
            tokio::spawn(async move {
                match client.subscribe(&channel).await {
                    Ok(()) => tracing::info!(source = %source, channel = %channel, "subscribed"),
                    Err(error) => {
                        tracing::warn!(source = %source, channel = %channel, error = %crate::redact::mask_urls_in(&error.to_string()), "subscribe failed; trying again later")
                    }
                }
                subscribing.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&channel);
            });
        }
    }

    /// Counts and reports a session the server forgot: any new session after the first.
    fn session_changed(&self, known: &mut Option<Arc<str>>, session: &Arc<str>) {
        if session.is_empty() {
            return;
        }
        if let Some(previous) = known.replace(session.clone())
            && previous != *session
        {
            self.metrics.session_lost(&self.name);
            tracing::warn!(source = %self.name, previous = %previous, session = %session, "the CometD session was lost and a new one started: messages published meanwhile may be lost unless the source uses replay");
        }
    }

    /// Pauses while the spools are full; `false` when stopped first.
    async fn wait_for_room(&self, stop: &CancellationToken) -> bool {
        tracing::error!(source = %self.name, "the spools are full (state.spool_max_bytes): this source stops polling until sinks catch up");
        self.metrics.source_paused(&self.name, true);
        let resumed = tokio::select! {
            biased;
            _ = stop.cancelled() => false,
            _ = self.limit.wait_for_room() => true,
        };
        self.metrics.source_paused(&self.name, false);
        if resumed {
            tracing::info!(source = %self.name, "the spools have room again; polling resumes");
        }
        resumed
    }
}

/// The delays between attempts to open a session: 100 ms doubling to 30 s, with jitter.
fn open_backoff() -> Backoff {
    Backoff::try_new(Duration::from_millis(100), Duration::from_secs(30)).expect("a valid backoff")
}
