//! The source task: one per CometD server. It keeps the session open (re-opening it if the
//! server closes it), subscribes to every channel its subscriptions need, and appends each
//! message to the spool of every subscription whose pattern matches, in one durable
//! transaction per batch of what has arrived. It never waits on a sink nor on a full
//! spool, disk or store: it keeps polling at the server's pace, and a subscription that
//! cannot take a message is full (with replay its channel is held upstream and subscribed
//! again later from the newest spooled replay id; without, the message is dropped and
//! counted), which costs no other subscription anything.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;

use super::commit::Pipeline;
use super::gate::{Gate, LeaseClock};

use super::forwarder::Counters;
use super::replay::ReplayState;
use super::spool::{FullCause, Spool, Spooled};
use crate::cometd::{
    AckConfirmer, Backoff, ChannelPattern, Client, Error, Message, SessionState, TransportErrorKind,
    replay_id,
};
use crate::delivery::Envelope;
use crate::sink::pause;
use crate::store::{SpoolAppend, Store, StoreError};
use crate::telemetry::metrics::Metrics;

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
    /// With replay: the replay state, whose spooled positions this keeps.
    pub replay: Option<Arc<ReplayState>>,
    /// Metrics (messages dropped by full subscriptions).
    pub metrics: Metrics,
    /// Arrival order within the source, over the process's life.
    pub sequence: Arc<AtomicU64>,
    /// With the ack extension: told once messages are spooled, so that the server drops
    /// a batch only then.
    pub ack: Option<AckConfirmer>,
    /// Until when this replica may append for the source (see [`LeaseClock`]).
    pub lease: Arc<LeaseClock>,
    /// With replicas: this process's own mark, added to the session in delivery ids. A
    /// session continued by another replica restarts the arrival order, and its
    /// messages must not take the ids of the previous owner's (a sink that
    /// de-duplicates by id would drop them).
    pub incarnation: Option<u64>,
}

impl Spooler {
    /// Appends `messages` to the matching spools, durably. A subscription that cannot take
    /// a message (its quota, the total, the store) is full: see [`Appended`]. A failing
    /// store is tried a few times, briefly, so that polling never waits long.
    pub async fn spool(
        &self,
        messages: Vec<Message>,
        session: &Arc<str>,
        stop: &CancellationToken,
    ) -> Appended {
        let count = messages.len() as u64;
        let session = match self.incarnation {
            Some(mark) => format!("{session}~{mark:016x}").into(),
            None => session.clone(),
        };
        let appended = self.append(messages, &session, stop).await;
        if let Some(ack) = &self.ack {
            // Dropped messages are counted: asking the server for them again would only
            // drop them again.
            ack.confirm(count);
        }
        appended
    }

    async fn append(&self, messages: Vec<Message>, session: &Arc<str>, stop: &CancellationToken) -> Appended {
        let received_at = SystemTime::now();
        let routes = self.routes.snapshot();
        let mut outcome = Appended::default();
        let mut appends = Vec::with_capacity(messages.len());
        let mut targets: Vec<(usize, Envelope, u64)> = Vec::with_capacity(messages.len());
        // Per route: bytes promised in this append, and what it dropped (counted once per
        // append: a full subscription's messages must cost its neighbours next to nothing).
        let mut pending = vec![0u64; routes.len()];
        let mut drops = Drops::new(routes.len());
        // Routes whose forwarder is behind keep what they are given in memory for a while:
        // their messages get buffers of their own instead of pinning the network buffer
        // they arrived in (with the other messages of its reply). A full route is behind
        // too, but keeps nothing: its messages are not copied only to be dropped.
        let behind: Vec<bool> =
            routes.iter().map(|route| route.spool.backlog().messages > 0 && !route.spool.is_full()).collect();
        for message in messages {
            let sequence = self.sequence.fetch_add(1, Ordering::Relaxed) + 1;
            let replay_id = self.replay.as_ref().and_then(|_| replay_id(&message));
            let kept = routes
                .iter()
                .zip(&behind)
                .any(|(route, behind)| *behind && route.pattern.matches(&message.channel));
            let message = Arc::new(if kept { detached(message) } else { message });
            for (index, route) in
                routes.iter().enumerate().filter(|(_, route)| route.pattern.matches(&message.channel))
            {
                if let (Some(replay), Some(replay_id)) = (&self.replay, replay_id)
                    && replay.already_spooled(&route.subscription, &message.channel, replay_id)
                {
                    // Replayed from a neighbour's older position, or sent again: spooled once.
                    continue;
                }
                if route.spool.is_held() {
                    // Its channel is being unsubscribed; the event comes again on resubscribe.
                    continue;
                }
                route.received.inc();
                route.counters.received.fetch_add(1, Ordering::Relaxed);
                if let Err(cause) = route.spool.room_for(pending[index], 1) {
                    // Full whatever its size: not worth building its record.
                    self.full(&routes, index, cause, replay_id.is_some(), &mut outcome, &mut drops);
                    continue;
                }
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
                match route.spool.room_for(pending[index], bytes) {
                    Ok(()) => {
                        if drops.count[index] == 0 {
                            route.spool.end_quota_episode();
                        }
                        pending[index] += bytes;
                        appends.push(SpoolAppend { subscription: route.subscription.clone(), record });
                        targets.push((index, envelope, bytes));
                    }
                    Err(cause) => {
                        self.full(&routes, index, cause, replay_id.is_some(), &mut outcome, &mut drops)
                    }
                }
            }
        }
        if appends.is_empty() {
            drops.count_in(&routes, &self.metrics);
            return outcome;
        }
        if !self.lease.may_write() {
            // Another replica may own the source already: it receives these on its own
            // session; spooling them here would forward them twice.
            // With replay the subscription is held, as when the store fails, and resumes
            // from the newest spooled replay id: the lease may well come back (a renewal
            // late under load), and what was received meanwhile must not be skipped.
            tracing::warn!(source = %self.name, messages = appends.len(), "this replica's lease on the source has lapsed: not spooling what it received");
            let cause = FullCause::Store("this replica's lease on the source lapsed".into());
            for (index, envelope, _) in &targets {
                let replayed = envelope.replay_id.is_some();
                self.full(&routes, *index, cause.clone(), replayed, &mut outcome, &mut drops);
            }
            drops.count_in(&routes, &self.metrics);
            return outcome;
        }
        let appends: Arc<[SpoolAppend]> = appends.into();
        let mut failures = 0;
        let sequences = loop {
            match self.store.spool_append(appends.clone()).await {
                Ok(sequences) => break sequences,
                Err(error)
                    if failures >= APPEND_TRIES
                        || stop.is_cancelled()
                        || matches!(error, StoreError::Unavailable { .. } | StoreError::Full { .. }) =>
                {
                    let cause = FullCause::Store(error.to_string());
                    if stop.is_cancelled() {
                        for append in appends.iter() {
                            tracing::error!(source = %self.name, subscription = %append.subscription, error = %error, record = %String::from_utf8_lossy(&append.record), "cannot spool a received message while stopping; it is dropped");
                        }
                    }
                    for (index, envelope, _) in &targets {
                        let replayed = envelope.replay_id.is_some();
                        self.full(&routes, *index, cause.clone(), replayed, &mut outcome, &mut drops);
                    }
                    drops.count_in(&routes, &self.metrics);
                    return outcome;
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(source = %self.name, error = %error, attempt = failures, "cannot append received messages to the spool; trying again");
                    let _ = pause(Duration::from_millis(50 << failures), stop).await;
                }
            }
        };
        let mut per_route: Vec<Vec<Spooled>> = vec![Vec::new(); routes.len()];
        let mut refused = Vec::new();
        for ((index, envelope, bytes), sequence) in targets.into_iter().zip(sequences) {
            if let Some(sequence) = sequence {
                if let (Some(replay), Some(replay_id)) = (&self.replay, envelope.replay_id) {
                    replay.spooled(&envelope.subscription, &envelope.message.channel, replay_id);
                }
                per_route[index].push(Spooled { sequence, bytes, envelope });
            } else {
                refused.push((index, envelope, bytes));
            }
        }
        for (index, envelope, bytes) in refused {
            self.refused(&routes[index], &envelope, bytes).await;
        }
        for (route, spooled) in routes.iter().zip(per_route) {
            if !spooled.is_empty() {
                route.spool.end_store_episode();
                route.spool.appended(spooled);
            }
        }
        drops.count_in(&routes, &self.metrics);
        outcome
    }

    /// The store could not hold a message (too large for it): it becomes a dead letter at
    /// once, with the store's reason, rather than being lost.
    async fn refused(&self, route: &Route, envelope: &Envelope, bytes: u64) {
        let reason = self.store.refused_reason(bytes);
        let letter = super::dead_letters::dead_letter(envelope, &reason, 0);
        match self.store.add_dead_letter(&letter).await {
            Ok(()) => {
                tracing::warn!(source = %self.name, subscription = %route.subscription, id = %letter.id, reason = %reason, "a received message the spool cannot hold is a dead letter");
                self.metrics.dead_lettered(&route.subscription);
                route.counters.dead_letters.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                tracing::error!(source = %self.name, subscription = %route.subscription, reason = %reason, error = %error, record = %envelope.to_json(), "a received message the spool cannot hold could not be stored as a dead letter either; it is lost");
                self.metrics.dropped(&route.subscription, "store_unavailable", 1);
                route.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The route at `index` cannot take a message: with replay (and its channel its own)
    /// its channel is held upstream; otherwise the message is dropped and counted.
    fn full(
        &self,
        routes: &[Route],
        index: usize,
        cause: FullCause,
        replayed: bool,
        outcome: &mut Appended,
        drops: &mut Drops,
    ) {
        let route = &routes[index];
        let pattern = route.pattern.as_str();
        let shared = routes
            .iter()
            .enumerate()
            .any(|(other, neighbour)| other != index && neighbour.pattern.as_str() == pattern);
        if replayed && !shared {
            route.spool.mark_full(cause, true, 0);
            outcome.hold.insert(pattern.to_string());
            return;
        }
        drops.count[index] += 1;
        drops.cause[index].get_or_insert(cause);
    }
}

/// What the routes of one append dropped, counted once at its end.
struct Drops {
    count: Vec<u64>,
    cause: Vec<Option<FullCause>>,
}

impl Drops {
    fn new(routes: usize) -> Self {
        Drops { count: vec![0; routes], cause: vec![None; routes] }
    }

    /// Counts the drops in the metrics, the API's counters and each spool's episode.
    fn count_in(self, routes: &[Route], metrics: &Metrics) {
        for ((route, count), cause) in routes.iter().zip(self.count).zip(self.cause) {
            if let (Some(cause), true) = (cause, count > 0) {
                metrics.dropped(&route.subscription, cause.label(), count);
                route.counters.dropped.fetch_add(count, Ordering::Relaxed);
                route.spool.mark_full(cause, false, count);
            }
        }
    }
}

/// `message` with its data in a buffer of its own.
pub fn detached(mut message: Message) -> Message {
    message.data = message.data.as_ref().map(crate::cometd::Data::detach);
    message
}

/// Store failures an append tries again before its subscriptions count as full (a store
/// that is being reopened, or has no room, is not tried again: it says so at once).
const APPEND_TRIES: u32 = 3;

/// What an append left for the source to do.
#[derive(Debug, Default)]
pub struct Appended {
    /// Channels to unsubscribe upstream: their (replay) subscriptions are full.
    pub hold: BTreeSet<String>,
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
    /// Metrics.
    pub metrics: Metrics,
    /// Channels being subscribed in the background, so that none is asked twice.
    pub subscribing: Arc<std::sync::Mutex<BTreeSet<String>>>,
    /// The session to continue on the next open (left by the previous owner).
    pub ticket: super::handover::TicketSlot,
    /// Whether the source changes hands among replicas: its session is detached, not
    /// disconnected, when given up, and its ticket kept in the shared store.
    pub hands_over: bool,
}

/// How often a source checks that every route's channel is subscribed upstream (and
/// whether a held subscription has room to resume).
const RECONCILE_EVERY: Duration = Duration::from_secs(1);

/// How long a source given up waits for the server to answer its disconnect.
const GIVE_UP_WAIT: Duration = Duration::from_secs(2);

/// How long a subscription held because the store failed waits before it tries again.
const STORE_HOLD: Duration = Duration::from_secs(5);

impl Source {
    /// Runs while this replica owns the source (`owned`; always, with one replica) until
    /// `stop` is cancelled; returns the client, still open, so that shutdown can disconnect
    /// it after the forwarders drained. A source given up is disconnected (its new owner
    /// opens a session of its own).
    pub async fn run_while_owned(self, stop: CancellationToken, mut gate: Gate) -> Client {
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return self.client,
                owned = gate.opened() => if !owned { return self.client },
            }
            let _running = gate.enter();
            let period = stop.child_token();
            let run = self.clone().run(period.clone());
            tokio::pin!(run);
            let client = tokio::select! {
                client = &mut run => client,
                () = gate.closed() => {
                    period.cancel();
                    run.await
                }
            };
            if stop.is_cancelled() {
                return client;
            }
            self.metrics.source_connected(&self.name, false);
            if self.hands_over {
                tracing::info!(source = %self.name, "this replica no longer owns the source: handing its session over");
                self.hand_over(&stop).await;
            } else {
                tracing::info!(source = %self.name, "this replica no longer owns the source: disconnecting");
                if tokio::time::timeout(GIVE_UP_WAIT, client.close()).await.is_err() {
                    tracing::warn!(source = %self.name, "the CometD server did not answer the disconnect in time");
                }
            }
        }
    }

    /// Runs until `stop` is cancelled; returns the client, still open, so that shutdown can
    /// disconnect it after the forwarders drained.
    pub async fn run(self, stop: CancellationToken) -> Client {
        let mut known_session: Option<Arc<str>> = None;
        let mut saved: super::handover::SavedSession = None;
        'session: loop {
            if !self.open(&stop).await {
                return self.client;
            }
            let mut status = self.client.watch_status().expect("the client was opened");
            let mut session: Arc<str> =
                status.borrow_and_update().client_id.clone().unwrap_or_default().into();
            self.session_changed(&mut known_session, &session);
            self.save_ticket(&mut saved).await;
            self.metrics.source_connected(&self.name, true);
            // Group commit, pipelined: the next batch gathers while the previous one syncs.
            let mut pipeline = Pipeline::new(self.spooler.store.append_window());
            let mut reconcile = tokio::time::interval(RECONCILE_EVERY);
            reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                if pipeline.start_if_due(&self.spooler, &session, &stop) {
                    self.metrics.pending(&self.name, self.client.pending_count());
                }
                let item = tokio::select! {
                    biased;
                    _ = stop.cancelled() => {
                        // What was received is spooled before the source stops.
                        pipeline.flush(&self.spooler, &session, &stop).await;
                        return self.client;
                    }
                    appended = pipeline.progress() => {
                        if let Some(appended) = appended {
                            self.hold(appended.hold);
                        }
                        continue;
                    }
                    changed = status.changed() => {
                        // The status is read in a block of its own: its guard is never
                        // held across an await, nor while `reconcile` reads it again.
                        let connected = {
                            let status = status.borrow_and_update();
                            if changed.is_err() || status.state == SessionState::Closed {
                                None
                            } else {
                                if let Some(client_id) = &status.client_id && **client_id != *session {
                                    session = client_id.as_str().into();
                                    self.session_changed(&mut known_session, &session);
                                }
                                Some(status.state == SessionState::Connected)
                            }
                        };
                        let Some(connected) = connected else {
                            self.metrics.source_connected(&self.name, false);
                            // What was received is spooled before the session is opened again.
                            self.hold(pipeline.flush(&self.spooler, &session, &stop).await.hold);
                            continue 'session;
                        };
                        self.metrics.source_connected(&self.name, connected);
                        if connected {
                            self.reconcile();
                            self.save_ticket(&mut saved).await;
                        }
                        continue;
                    }
                    _ = reconcile.tick() => {
                        self.reconcile();
                        continue;
                    }
                    item = self.client.receive(), if pipeline.has_room() => item,
                };
                let mut failed = match item {
                    Ok(message) => {
                        pipeline.push(message);
                        None
                    }
                    Err(error) => Some(error),
                };
                if failed.is_none() {
                    // Whatever else has arrived joins the batch at once.
                    while pipeline.has_room() {
                        match self.client.receive().now_or_never() {
                            Some(Ok(message)) => pipeline.push(message),
                            Some(Err(error)) => {
                                failed = Some(error);
                                break;
                            }
                            None => break,
                        }
                    }
                }
                match failed {
                    None => {}
                    Some(Error::Closed) => {
                        self.hold(pipeline.flush(&self.spooler, &session, &stop).await.hold);
                        continue 'session;
                    }
                    Some(Error::Transport { kind: TransportErrorKind::ConnectionTimeout, .. }) => {
                        tracing::warn!(source = %self.name, "lost the connection to the CometD server; reconnecting");
                    }
                    Some(error) => {
                        tracing::error!(source = %self.name, error = %crate::redact::mask_urls_in(&error.to_string()), "the CometD server reported an error");
                    }
                }
            }
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
                opened = self.open_session() => opened,
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
        let continued = self.client.subscriptions();
        for channel in wanted_channels(&self.spooler.routes.snapshot()).difference(&continued) {
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
    /// have: one added while the session was down, one whose subscribe failed on the way,
    /// or one held while its subscription was full that has room again.
    fn reconcile(&self) {
        if self.client.status().state != SessionState::Connected {
            return;
        }
        let subscribed = self.client.subscriptions();
        let routes = self.spooler.routes.snapshot();
        // Channels of held subscriptions resuming now: subscribed again even if the server
        // still has them (an unsubscribe that failed, or raced a subscribe), so that the
        // replay extension asks from the newest spooled replay id and what was skipped
        // while held comes again.
        let mut resumed = BTreeSet::new();
        for route in routes.iter() {
            if let Some(episode) = route.spool.full()
                && episode.held
                && route.spool.has_room_to_resume()
                && (!matches!(episode.cause, FullCause::Store(_)) || episode.since.elapsed() >= STORE_HOLD)
            {
                tracing::info!(source = %self.name, subscription = %route.subscription, channel = %route.pattern, "the subscription has room again: subscribing from the newest spooled replay id");
                route.spool.end_full();
                resumed.insert(route.pattern.as_str().to_string());
            }
        }
        for pattern in wanted_channels(&routes) {
            let again = subscribed.contains(&pattern);
            if again && !resumed.contains(&pattern) {
                continue;
            }
            if !self
                .subscribing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(pattern.clone())
            {
                continue;
            }
            let (client, subscribing, source, channel) =
                (self.client.clone(), self.subscribing.clone(), self.name.clone(), pattern);
            tokio::spawn(async move {
                if again && let Err(error) = client.unsubscribe(&channel).await {
                    tracing::warn!(source = %source, channel = %channel, error = %error, "could not unsubscribe a resuming channel before subscribing it again");
                }
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

    /// Unsubscribes upstream, in the background, the channels of full subscriptions with
    /// replay: the server keeps their events, which come again from the newest spooled
    /// replay id once there is room.
    fn hold(&self, channels: BTreeSet<String>) {
        for channel in channels {
            if !self.client.subscriptions().contains(&channel)
                || !self
                    .subscribing
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(channel.clone())
            {
                continue;
            }
            let (client, subscribing, source) =
                (self.client.clone(), self.subscribing.clone(), self.name.clone());
            tokio::spawn(async move {
                match client.unsubscribe(&channel).await {
                    Ok(()) => {
                        tracing::info!(source = %source, channel = %channel, "unsubscribed while its subscription is full")
                    }
                    Err(error) => {
                        tracing::warn!(source = %source, channel = %channel, error = %error, "could not unsubscribe a full subscription's channel; its events are skipped until there is room")
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

/// The channels a source subscribes upstream: every route's, except those whose every
/// subscription is held (full, with replay).
pub fn wanted_channels(routes: &[Route]) -> BTreeSet<String> {
    routes
        .iter()
        .filter(|route| !route.spool.is_held())
        .map(|route| route.pattern.as_str().to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::spool::SpoolLimit;
    use crate::store::MemoryStore;

    fn spooler(store: Arc<dyn Store>, spool: Arc<Spool>) -> Spooler {
        let metrics = Metrics::new();
        let routes = Routes::default();
        routes.add(Route {
            subscription: "sub".into(),
            pattern: ChannelPattern::new("/a").expect("a channel"),
            spool,
            counters: Arc::default(),
            received: metrics.received_counter("src", "sub"),
        });
        Spooler {
            name: "src".into(),
            routes,
            store,
            replay: None,
            metrics,
            sequence: Arc::default(),
            ack: None,
            lease: LeaseClock::forever(),
            incarnation: None,
        }
    }

    /// A message whose data shares a 1 MB network buffer.
    fn message_in_a_big_buffer() -> (bytestring::ByteString, Message) {
        let payload = bytestring::ByteString::from(format!("{{\"x\":1}}{}", " ".repeat(1 << 20)));
        let raw: &serde_json::value::RawValue = serde_json::from_str(&payload[..7]).expect("raw JSON");
        let data = crate::cometd::Data::shared(&payload, raw);
        (payload.clone(), Message { data: Some(data), ..Message::new("/a") })
    }

    fn shares(message: &Message, buffer: &bytestring::ByteString) -> bool {
        let data = message.data.as_ref().expect("data").json_bytes();
        let range = buffer.as_bytes().as_ptr_range();
        range.contains(&data.as_ptr())
    }

    /// Messages a spool keeps while its forwarder is behind hold only their own bytes;
    /// while it keeps up they stay in the buffer they came in (no copy).
    #[tokio::test]
    async fn a_message_kept_while_the_forwarder_is_behind_does_not_pin_its_network_buffer() {
        let store: Arc<dyn Store> = MemoryStore::new();
        let spool = Spool::new("sub".into(), store.clone(), SpoolLimit::new(u64::MAX), u64::MAX, None);
        let spooler = spooler(store, spool.clone());
        let stop = CancellationToken::new();
        let (buffer, message) = message_in_a_big_buffer();
        spooler.spool(vec![message], &"session".into(), &stop).await;
        let first = spool.next_batch(1, 10).await.expect("read");
        assert!(shares(&first[0].envelope.message, &buffer), "delivered at once: not copied");
        // The forwarder has not settled it: the next message waits behind it.
        let (buffer, message) = message_in_a_big_buffer();
        spooler.spool(vec![message], &"session".into(), &stop).await;
        let second = spool.next_batch(2, 10).await.expect("read");
        assert!(!shares(&second[0].envelope.message, &buffer), "kept in memory: detached");
        assert_eq!(second[0].envelope.message.data.as_ref().expect("data").json(), "{\"x\":1}");
    }
}
