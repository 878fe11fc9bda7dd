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

/// Messages taken from the session and not yet appended, at most: while an append runs
/// the source keeps taking messages, so that the session keeps polling.
const STAGED_MAX: usize = 8192;

/// A batch this large is appended at once, without waiting out the store's append window.
const GROUP_MIN: usize = 32;

/// Appends of a source: what is staged for the next one, and the one running.
#[derive(Default)]
struct Appends {
    staged: Vec<(Arc<str>, Message)>,
    in_flight: Option<tokio::task::JoinHandle<()>>,
    started: Option<Instant>,
    paused: bool,
}

impl Appends {
    /// When the store's append window after the last append ends, if one started.
    fn window_ends(&self, window: Duration) -> Option<Instant> {
        self.started.map(|started| started + window)
    }

    /// Waits until the append in flight is done (for ever when none is).
    async fn appended(&mut self) {
        match &mut self.in_flight {
            Some(task) => {
                if let Err(error) = task.await {
                    tracing::error!(error = %error, "a spool append failed unexpectedly; its messages are lost");
                }
                self.in_flight = None;
            }
            None => std::future::pending().await,
        }
    }
}

/// Sleeps until `deadline`, or for ever without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

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
    pub async fn spool(&self, messages: Vec<(Arc<str>, Message)>, stop: &CancellationToken) {
        let count = messages.len() as u64;
        if self.append(messages, stop).await
            && let Some(ack) = &self.ack
        {
            ack.confirm(count);
        }
    }

    /// Appends; `false` when the messages could not be spooled (and are lost).
    async fn append(&self, messages: Vec<(Arc<str>, Message)>, stop: &CancellationToken) -> bool {
        let received_at = SystemTime::now();
        let routes = self.routes.snapshot();
        let mut appends = Vec::with_capacity(messages.len());
        let mut targets: Vec<(usize, Envelope, u64)> = Vec::with_capacity(messages.len());
        for (session, message) in messages {
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
    /// Channels being subscribed by [`Source::reconcile`], so that none is asked twice.
    pub subscribing: Arc<std::sync::Mutex<BTreeSet<String>>>,
}

/// How often a source checks that every route's channel is subscribed upstream.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);

impl Source {
    /// Runs until `stop` is cancelled; returns the client, still open, so that shutdown can
    /// disconnect it after the forwarders drained.
    pub async fn run(self, stop: CancellationToken) -> Client {
        let mut known_session: Option<Arc<str>> = None;
        let mut appends = Appends::default();
        'session: loop {
            if !self.open(&stop).await {
                self.finish(&mut appends, &stop).await;
                return self.client;
            }
            let mut status = self.client.watch_status().expect("the client was opened");
            let mut session: Arc<str> =
                status.borrow_and_update().client_id.clone().unwrap_or_default().into();
            self.session_changed(&mut known_session, &session);
            self.metrics.source_connected(&self.name, true);
            let mut reconcile = tokio::time::interval(RECONCILE_EVERY);
            reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let window = self.spooler.store.append_window();
            loop {
                let window_ends = appends.window_ends(window);
                if appends.in_flight.is_none()
                    && !appends.staged.is_empty()
                    && (appends.staged.len() >= GROUP_MIN
                        || window_ends.is_none_or(|ends| ends <= Instant::now()))
                {
                    self.start_append(&mut appends, &stop);
                    continue;
                }
                let full = self.limit.is_full();
                if full != appends.paused {
                    self.paused(&mut appends, full);
                }
                // Messages are taken from the session while an append runs, up to STAGED_MAX;
                // so the session keeps polling whatever the store's latency.
                let can_take = appends.staged.len() < STAGED_MAX && !full;
                let window_wait =
                    window_ends.filter(|_| appends.in_flight.is_none() && !appends.staged.is_empty());
                let item = tokio::select! {
                    biased;
                    _ = stop.cancelled() => {
                        self.finish(&mut appends, &stop).await;
                        return self.client;
                    }
                    () = appends.appended() => continue,
                    () = sleep_until_some(window_wait) => continue,
                    () = self.limit.wait_for_room(), if full => continue,
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
                    item = self.client.receive(), if can_take => item,
                };
                match item {
                    Ok(message) => {
                        appends.staged.push((session.clone(), message));
                        let deferred = self.take_ready(&mut appends.staged, &session);
                        self.metrics.pending(&self.name, self.client.pending_count());
                        match deferred {
                            Some(Error::Closed) => continue 'session,
                            Some(error) => {
                                tracing::error!(source = %self.name, error = %error, "the CometD server reported an error")
                            }
                            None => {}
                        }
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

    /// Appends what is staged, in the background.
    fn start_append(&self, appends: &mut Appends, stop: &CancellationToken) {
        let batch = std::mem::take(&mut appends.staged);
        let (spooler, stop) = (self.spooler.clone(), stop.clone());
        appends.started = Some(Instant::now());
        appends.in_flight = Some(tokio::spawn(async move { spooler.spool(batch, &stop).await }));
    }

    /// Waits for the append in flight, then appends what is still staged: at a stop, what
    /// was taken from the session is spooled before the session closes.
    async fn finish(&self, appends: &mut Appends, stop: &CancellationToken) {
        if appends.in_flight.is_some() {
            appends.appended().await;
        }
        let staged = std::mem::take(&mut appends.staged);
        if !staged.is_empty() {
            self.spooler.spool(staged, stop).await;
        }
    }

    /// Reports that the spools are full (the source stops taking messages) or have room.
    fn paused(&self, appends: &mut Appends, full: bool) {
        appends.paused = full;
        self.metrics.source_paused(&self.name, full);
        if full {
            tracing::error!(source = %self.name, "the spools are full (state.spool_max_bytes): this source stops polling until sinks catch up");
        } else {
            tracing::info!(source = %self.name, "the spools have room again; polling resumes");
        }
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
            self.spooler.routes.snapshot().iter().map(|route| route.pattern.as_str().to_string()).collect();
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

    /// Moves the messages already received into `batch`, up to [`STAGED_MAX`]; returns an
    /// error the client reported on the way.
    fn take_ready(&self, batch: &mut Vec<(Arc<str>, Message)>, session: &Arc<str>) -> Option<Error> {
        while batch.len() < STAGED_MAX {
            match self.client.receive().now_or_never() {
                Some(Ok(message)) => batch.push((session.clone(), message)),
                Some(Err(error)) => return Some(error),
                None => return None,
            }
        }
        None
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
                        tracing::warn!(source = %source, channel = %channel, error = %error, "subscribe failed; trying again later")
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
}

/// The delays between attempts to open a session: 100 ms doubling to 30 s, with jitter.
fn open_backoff() -> Backoff {
    Backoff::try_new(Duration::from_millis(100), Duration::from_secs(30)).expect("a valid backoff")
}
