//! The session task: one per open client. It owns the transport, the client id, the
//! server's advice and the set of subscriptions; it handshakes, negotiates the connection
//! type, runs the `/meta/connect` loop, follows advice, backs off, re-handshakes and
//! resubscribes. [`Client`](super::Client) handles talk to it through commands and read its
//! state from a `watch`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::error::{CLIENT_ID_LIMIT, Error, TransportErrorKind};
use super::machine::{Action, Event, Machine, Next, Note, Wait, needs_new_credentials};
use super::message::{
    Advice, BAYEUX_VERSION, Data, META_CONNECT, META_DISCONNECT, META_HANDSHAKE, META_SUBSCRIBE,
    META_UNSUBSCRIBE, Message, Protocol,
};
use super::options::ConnectionType;
use super::transport::{Shared, Transport};

/// How long the server holds a `/meta/connect` when it has not said (faye's default).
const DEFAULT_CONNECT_HOLD: Duration = Duration::from_secs(60);

/// The longest the extensions may hold a `/meta/connect` back (also at most a quarter of
/// `connection_timeout`).
const MAX_CONNECT_HOLD_BACK: Duration = Duration::from_secs(1);

/// Waits until `at`, or for ever when there is no `at`.
/// `wait` after `from`, or about thirty years after it when a configured wait is too long
/// for the clock to add (saturating: a timeout of `"300000000000y"` must not panic).
pub(crate) fn deadline(from: Instant, wait: Duration) -> Instant {
    from.checked_add(wait).unwrap_or_else(|| from + Duration::from_secs(30 * 365 * 24 * 3600))
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What a session can be doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionState {
    /// Not opened yet.
    Unconnected,
    /// Handshaking, at open or after the server forgot the session.
    Handshaking,
    /// The last `/meta/connect` succeeded.
    Connected,
    /// The link failed; the session retries with backoff.
    Reconnecting,
    /// Closing: `/meta/disconnect` is on its way.
    Disconnecting,
    /// Closed by the application, by a failed open, or by the server (`reconnect: none`).
    Closed,
}

/// A snapshot of the session, published on every change.
#[derive(Clone, Debug)]
pub struct SessionStatus {
    /// What the session is doing.
    pub state: SessionState,
    /// When it started doing it.
    pub since: Instant,
    /// Whether `open` succeeded and the client has not been closed since.
    pub open: bool,
    /// The negotiated connection type.
    pub connection_type: Option<ConnectionType>,
    /// The server-assigned session id.
    pub client_id: Option<String>,
    /// The channels the server confirmed.
    pub subscriptions: BTreeSet<String>,
    /// The last failure, for operators.
    pub last_error: Option<String>,
    /// When the server last carried a request through (a handshake, a resubscription, a
    /// connect or a client request that succeeded). An outage is reported once
    /// `connection_timeout` has passed since both this and the outage's start.
    pub last_exchange: Instant,
}

impl SessionStatus {
    pub(crate) fn new() -> Self {
        SessionStatus {
            state: SessionState::Unconnected,
            since: Instant::now(),
            open: false,
            connection_type: None,
            client_id: None,
            subscriptions: BTreeSet::new(),
            last_error: None,
            last_exchange: Instant::now(),
        }
    }
}

/// A request from a [`Client`](super::Client) handle.
pub(crate) enum Command {
    Publish { channel: String, data: Value, reply: oneshot::Sender<Result<Message, Error>> },
    Subscribe { channel: String, reply: oneshot::Sender<Result<(), Error>> },
    Unsubscribe { channel: String, reply: oneshot::Sender<Result<(), Error>> },
    Close { reply: oneshot::Sender<()> },
}

/// What the session needs to build requests; cheap to clone into request futures.
#[derive(Clone)]
pub(crate) struct Context {
    pub(crate) shared: Arc<Shared>,
    /// Message ids, increasing over the client's whole life (never reset by a handshake).
    pub(crate) ids: Arc<AtomicU64>,
    /// The latest advice on a reply other than a handshake's or a connect's (which the
    /// machine reads itself), for the machine to take in after its next step.
    pub(crate) advice: Arc<std::sync::Mutex<Option<Advice>>>,
}

impl Context {
    fn with_ids(&self, mut messages: Vec<Message>) -> Vec<Message> {
        for message in &mut messages {
            message.id = Some(self.ids.fetch_add(1, Ordering::Relaxed).to_string());
        }
        messages
    }

    /// Sends `messages` and returns their replies, one per message and in their order.
    /// After an authentication failure of the first message ([`needs_new_credentials`]:
    /// not a refused channel), asks the auth extension to re-authenticate and sends them
    /// once more.
    async fn exchange(
        &self,
        transport: &Transport,
        messages: Vec<Message>,
        timeout: Duration,
    ) -> Result<Vec<Message>, Error> {
        let replies = self.send(transport, messages.clone(), timeout).await?;
        self.keep_advice(&replies);
        let Some(auth) = &self.shared.options.auth else {
            return Ok(replies);
        };
        if !replies.first().is_some_and(|reply| needs_new_credentials(&messages[0].channel, reply)) {
            return Ok(replies);
        }
        tracing::info!(channel = %messages[0].channel, "the server rejected the credentials; re-authenticating");
        self.shared.within_request_timeout("re-authentication", auth.authenticate()).await?;
        // A websocket sends headers only when it opens: reopen it so the new ones apply.
        transport.reset().await;
        self.send(transport, messages, timeout).await
    }

    /// Keeps the advice of replies the machine does not see (subscribe, publish...): the
    /// latest advice from any reply is followed.
    fn keep_advice(&self, replies: &[Message]) {
        let advised = replies.iter().rev().find(|reply| {
            reply.protocol.is_some() && !matches!(reply.channel.as_str(), META_CONNECT | META_HANDSHAKE)
        });
        if let Some(advice) = advised.and_then(|reply| reply.protocol().advice.clone()) {
            *self.advice.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(advice);
        }
    }

    /// The advice kept by [`keep_advice`](Self::keep_advice) since it was last taken.
    fn take_advice(&self) -> Option<Advice> {
        self.advice.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }

    /// Numbers `messages`, sends them, and picks each one's reply from what came back.
    async fn send(
        &self,
        transport: &Transport,
        messages: Vec<Message>,
        timeout: Duration,
    ) -> Result<Vec<Message>, Error> {
        let requests = self.with_ids(messages);
        let keys: Vec<(String, Option<String>)> =
            requests.iter().map(|request| (request.channel.clone(), request.id.clone())).collect();
        let replies = transport.send(requests, timeout).await?;
        replies_in_order(&keys, replies)
    }
}

/// The reply to each request (by channel and id), in the requests' order. The outgoing
/// extensions may have added, dropped or reordered messages in the payload: a request left
/// without a reply is the extension's error, reported, never a reply shifted onto the
/// wrong request.
fn replies_in_order(
    keys: &[(String, Option<String>)],
    mut replies: Vec<Message>,
) -> Result<Vec<Message>, Error> {
    let in_place = replies.len() == keys.len()
        && keys
            .iter()
            .zip(&replies)
            .all(|((channel, id), reply)| reply.channel == *channel && reply.id == *id);
    if in_place {
        return Ok(replies);
    }
    keys.iter()
        .map(|(channel, id)| {
            let position = replies.iter().position(|reply| reply.channel == *channel && reply.id == *id);
            match position {
                Some(position) => Ok(replies.swap_remove(position)),
                None => Err(Error::InvalidOperation(format!(
                    "an outgoing extension removed or changed the {channel} request (id {}), so it has no reply",
                    id.as_deref().unwrap_or("none")
                ))),
            }
        })
        .collect()
}

fn failure_name(channel: &str) -> &'static str {
    match channel {
        META_HANDSHAKE => "handshake request failed",
        META_CONNECT => "connect request failed",
        META_DISCONNECT => "disconnect request failed",
        META_SUBSCRIBE => "subscribe request failed",
        META_UNSUBSCRIBE => "unsubscribe request failed",
        channel if channel.starts_with("/service/") => "service request failed",
        _ => "publish request failed",
    }
}

/// The reply, or a server error if it says the request failed.
fn check(reply: Message) -> Result<Message, Error> {
    if reply.successful == Some(true) {
        Ok(reply)
    } else {
        Err(Error::server(failure_name(&reply.channel), Some(reply)))
    }
}

/// A negotiated transport and the session the server opened on it.
struct Handshaken {
    transport: Arc<Transport>,
    client_id: String,
    advice: Option<Advice>,
}

/// Handshakes over each accepted connection type in turn (so websocket-only servers work,
/// and a refused upgrade falls back), then moves to the best type both sides support.
async fn handshake(ctx: Context) -> Result<Handshaken, Error> {
    let options = &ctx.shared.options;
    let accepted: Vec<String> =
        options.connection_types.iter().map(|kind| kind.as_str().to_string()).collect();
    let mut last_error = None;
    for (index, kind) in options.connection_types.iter().enumerate() {
        let is_last = index + 1 == options.connection_types.len();
        let transport = Transport::new(*kind, ctx.shared.clone());
        let request = Message::new(META_HANDSHAKE).with_protocol(Protocol {
            version: Some(BAYEUX_VERSION.into()),
            minimum_version: Some(BAYEUX_VERSION.into()),
            supported_connection_types: Some(accepted.clone()),
            ..Protocol::default()
        });
        let sent = match transport.prepare().await {
            Ok(()) => ctx.exchange(&transport, vec![request], options.request_timeout).await,
            Err(error) => Err(error),
        };
        let reply = match sent {
            Ok(mut replies) => replies.remove(0),
            Err(error) if !is_last && matches!(error, Error::Transport { .. }) => {
                tracing::debug!(connection_type = %kind, error = %error, "handshake failed; trying the next connection type");
                transport.close().await;
                last_error = Some(error);
                continue;
            }
            Err(error) => return Err(error),
        };
        let reply = check(reply)?;
        let client_id = reply.client_id.clone().ok_or_else(|| {
            Error::transport(TransportErrorKind::InvalidOperation(
                "the server accepted the handshake but sent no clientId".into(),
            ))
        })?;
        if client_id.len() > CLIENT_ID_LIMIT {
            transport.close().await;
            return Err(Error::transport(TransportErrorKind::InvalidOperation(format!(
                "the server sent a clientId of {} bytes, over the {CLIENT_ID_LIMIT}-byte limit",
                client_id.len()
            ))));
        }
        let offered =
            reply.protocol().supported_connection_types.clone().unwrap_or_else(|| vec![kind.as_str().into()]);
        let common: Vec<ConnectionType> = options
            .connection_types
            .iter()
            .copied()
            .filter(|candidate| offered.iter().any(|name| name == candidate.as_str()))
            .collect();
        if common.is_empty() {
            transport.close().await;
            return Err(Error::NoCommonConnectionType { offered, accepted });
        }
        let mut chosen = None;
        for candidate in common {
            if candidate == *kind {
                chosen = Some(transport);
                break;
            }
            let other = Transport::new(candidate, ctx.shared.clone());
            match other.prepare().await {
                Ok(()) => {
                    transport.close().await;
                    chosen = Some(other);
                    break;
                }
                Err(error) => {
                    tracing::info!(connection_type = %candidate, error = %error, "cannot use the negotiated connection type; falling back")
                }
            }
        }
        let Some(transport) = chosen else {
            return Err(last_error.unwrap_or_else(|| Error::transport(TransportErrorKind::Connect)));
        };
        return Ok(Handshaken {
            transport: Arc::new(transport),
            client_id,
            advice: reply.protocol().advice.clone(),
        });
    }
    Err(last_error.unwrap_or_else(|| Error::transport(TransportErrorKind::Connect)))
}

/// Each channel resubscribed after a new handshake, with the server's verdict.
type Resubscription = Vec<(String, Result<(), Error>)>;

/// Subscribes again to every channel after a new handshake, in one payload. A transport
/// failure fails the whole batch; server rejections come back per channel.
async fn resubscribe(
    ctx: Context,
    transport: Arc<Transport>,
    client_id: String,
    channels: Vec<String>,
) -> Result<Resubscription, Error> {
    subscribe_all(&ctx, &transport, &client_id, channels).await
}

/// Subscribes to `channels` in one payload. A channel the server refuses is offered to the
/// extensions ([`Extension::subscription_refused`](super::Extension::subscription_refused));
/// if one of them adjusted its state (e.g. a replay fallback), that channel is sent once
/// more. A transport failure fails the whole batch.
async fn subscribe_all(
    ctx: &Context,
    transport: &Transport,
    client_id: &str,
    channels: Vec<String>,
) -> Result<Resubscription, Error> {
    if channels.len() > 1 {
        let batches = subscription_batches(&channels, client_id);
        if batches.len() > 1 {
            let mut results = Vec::with_capacity(channels.len());
            for batch in batches {
                results.extend(
                    Box::pin(subscribe_batch(ctx, transport, client_id, channels[batch].to_vec())).await?,
                );
            }
            return Ok(results);
        }
    }
    subscribe_batch(ctx, transport, client_id, channels).await
}

/// The request body Salesforce takes at most (it answers 413 above it).
const MAX_REQUEST_BODY: usize = 32 * 1024;

/// `channels` cut into runs whose subscribe payload stays well under
/// [`MAX_REQUEST_BODY`]: each message is estimated from its fields, twice its channel (an
/// extension such as replay repeats it), and a run is kept to half the limit, leaving room
/// for what extensions add.
fn subscription_batches(channels: &[String], client_id: &str) -> Vec<std::ops::Range<usize>> {
    const FIELDS: usize = 160;
    let mut batches = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (index, channel) in channels.iter().enumerate() {
        let estimate = FIELDS + client_id.len() + 2 * channel.len();
        if index > start && size + estimate > MAX_REQUEST_BODY / 2 {
            batches.push(start..index);
            (start, size) = (index, 0);
        }
        size += estimate;
    }
    batches.push(start..channels.len());
    batches
}

/// One payload of [`subscribe_all`].
async fn subscribe_batch(
    ctx: &Context,
    transport: &Transport,
    client_id: &str,
    channels: Vec<String>,
) -> Result<Resubscription, Error> {
    let timeout = ctx.shared.options.request_timeout;
    let requests =
        channels.iter().map(|channel| subscription_request(META_SUBSCRIBE, client_id, channel)).collect();
    let replies = ctx.exchange(transport, requests, timeout).await?;
    let mut results: Resubscription =
        channels.into_iter().zip(replies).map(|(channel, reply)| (channel, check(reply).map(drop))).collect();
    let retry: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, (channel, result))| {
            let reply =
                result.as_ref().err().and_then(Error::as_server_error).and_then(|error| error.response());
            reply.is_some_and(|reply| {
                ctx.shared
                    .options
                    .extensions
                    .iter()
                    .any(|extension| extension.subscription_refused(channel, reply))
            })
        })
        .map(|(index, _)| index)
        .collect();
    if retry.is_empty() {
        return Ok(results);
    }
    let requests = retry
        .iter()
        .map(|index| subscription_request(META_SUBSCRIBE, client_id, &results[*index].0))
        .collect();
    let replies = ctx.exchange(transport, requests, timeout).await?;
    for (index, reply) in retry.into_iter().zip(replies) {
        results[index].1 = check(reply).map(drop);
    }
    Ok(results)
}

fn subscription_request(meta: &str, client_id: &str, channel: &str) -> Message {
    Message { client_id: Some(client_id.into()), ..Message::new(meta) }
        .with_protocol(Protocol { subscription: Some(Value::String(channel.into())), ..Protocol::default() })
}

/// One `/meta/connect`. A probe (after a handshake or a failure) asks the server not to hold it, so
/// `open` returns at once; later ones are timed from the advised hold plus a margin.
async fn connect(
    ctx: Context,
    transport: Arc<Transport>,
    client_id: String,
    hold: Option<Duration>,
    probe: bool,
) -> Result<Message, Error> {
    if !probe {
        // Backpressure: ask for more events only when the application has room for them.
        ctx.shared.queue.wait_for_space().await;
    }
    // Extensions that hold the connect back (acknowledgements) wait here, bounded, and
    // outside the outgoing hooks' request_timeout.
    let options = &ctx.shared.options;
    if !options.extensions.is_empty() {
        let max_wait = options.connection_timeout.map_or(MAX_CONNECT_HOLD_BACK, |timeout| timeout / 4);
        let max_wait = max_wait.min(MAX_CONNECT_HOLD_BACK);
        for extension in &options.extensions {
            extension.before_connect(max_wait).await;
        }
    }
    let mut request =
        Message { client_id: Some(client_id), ..Message::new(META_CONNECT) }.with_protocol(Protocol {
            connection_type: Some(transport.connection_type().as_str().into()),
            ..Protocol::default()
        });
    let timeout = if probe {
        request.protocol_mut().advice = Some(Advice { timeout: Some(0), ..Advice::default() });
        ctx.shared.options.request_timeout
    } else {
        let hold = hold.unwrap_or(DEFAULT_CONNECT_HOLD);
        hold + hold / 5 + Duration::from_secs(2)
    };
    let mut replies = ctx.exchange(&transport, vec![request], timeout).await?;
    Ok(replies.remove(0))
}

/// What a finished step of the session's own work produced. One exists at a time, so
/// its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Step {
    Handshaken(Result<Handshaken, Error>),
    Resubscribed(Result<Resubscription, Error>),
    Connected(Result<Message, Error>),
}

/// A finished client request, ready to be answered; short-lived.
#[allow(clippy::large_enum_variant)]
enum Done {
    Publish(oneshot::Sender<Result<Message, Error>>, Result<Message, Error>),
    Subscribe(oneshot::Sender<Result<(), Error>>, String, Result<(), Error>),
    Unsubscribe(oneshot::Sender<Result<(), Error>>, String, Result<(), Error>),
    /// A refused resubscription tried again.
    Resubscribed(String, Result<(), Error>),
}

/// The session task's state.
pub(crate) struct Session {
    ctx: Context,
    commands: mpsc::Receiver<Command>,
    status: watch::Sender<SessionStatus>,
    /// `open`'s answer, until the first `/meta/connect` settles it.
    opened: Option<oneshot::Sender<Result<(), Error>>>,
    /// The decisions after each step, and the state they depend on.
    machine: Machine,
    /// The last error while opening, for `open` to report at its deadline.
    open_error: Option<Error>,
    /// Whether `open` failed (its session, if it got a client id, is disconnected).
    open_failed: bool,
    transport: Option<Arc<Transport>>,
    client_id: Option<String>,
    subscriptions: BTreeSet<String>,
    /// Requests that arrived while the session was not connected, with when they give up.
    deferred: VecDeque<(Instant, Command)>,
    /// Channels the server refused to subscribe again after a new handshake: tried again
    /// with backoff while connected, until they succeed or are unsubscribed.
    refused: BTreeMap<String, Retry>,
}

/// When a refused resubscription is tried next, and how many times it failed.
#[derive(Clone, Copy, Debug)]
struct Retry {
    at: Instant,
    failures: u32,
}

impl Session {
    pub(crate) fn new(
        ctx: Context,
        commands: mpsc::Receiver<Command>,
        status: watch::Sender<SessionStatus>,
        opened: oneshot::Sender<Result<(), Error>>,
    ) -> Self {
        let open_deadline =
            ctx.shared.options.connection_timeout.map(|timeout| deadline(Instant::now(), timeout));
        let machine = Machine::new(open_deadline, ctx.shared.options.auth.is_some());
        Session {
            ctx,
            commands,
            status,
            opened: Some(opened),
            machine,
            open_error: None,
            open_failed: false,
            transport: None,
            client_id: None,
            subscriptions: BTreeSet::new(),
            deferred: VecDeque::new(),
            refused: BTreeMap::new(),
        }
    }

    /// Runs the session until it is closed by a handle, by the server, by a failed open, or
    /// because every handle was dropped.
    pub(crate) async fn run(mut self) {
        self.set_state(SessionState::Handshaking, None);
        let mut step: Option<BoxFuture<'static, Step>> = Some(self.start(Next::Handshake));
        let mut scheduled: Option<(Instant, Next)> = None;
        let mut requests: FuturesUnordered<BoxFuture<'static, Done>> = FuturesUnordered::new();
        loop {
            // The timers' deadlines, read before the select borrows the session.
            let deferred_gives_up = self.deferred.front().map(|(at, _)| *at);
            let open_gives_up = self.machine.open_deadline.filter(|_| self.opened.is_some());
            let refused_retry = self.next_refused_retry().filter(|_| self.is_connected());
            tokio::select! {
                biased;
                command = self.commands.recv() => match command {
                    None => {
                        Box::pin(self.shut_down(true)).await;
                        return;
                    }
                    Some(Command::Close { reply }) => {
                        drop(step.take());
                        Box::pin(self.shut_down(true)).await;
                        let _ = reply.send(());
                        return;
                    }
                    Some(command) if self.is_connected() => requests.push(self.request(command)),
                    Some(command) => {
                        let gives_up = deadline(Instant::now(), self.ctx.shared.options.request_timeout);
                        self.deferred.push_back((gives_up, command));
                    }
                },
                Some(done) = requests.next(), if !requests.is_empty() => self.answer(done),
                _ = sleep_until_some(deferred_gives_up), if deferred_gives_up.is_some() => {
                    self.expire_deferred();
                },
                _ = sleep_until_some(open_gives_up), if open_gives_up.is_some() => {
                    drop(step.take());
                    self.give_up_opening();
                    Box::pin(self.shut_down(false)).await;
                    return;
                },
                _ = sleep_until_some(refused_retry), if refused_retry.is_some() => {
                    for channel in self.due_refused() {
                        requests.push(self.resubscribe_one(channel));
                    }
                },
                finished = async { step.as_mut().expect("guarded by is_some").await }, if step.is_some() => {
                    step = None;
                    match self.apply(finished) {
                        Ok(Some((delay, next))) if delay.is_zero() => step = Some(self.start(next)),
                        Ok(Some((delay, next))) => scheduled = Some((deadline(Instant::now(), delay), next)),
                        Ok(None) => {}
                        Err(()) => {
                            Box::pin(self.shut_down(false)).await;
                            return;
                        }
                    }
                    if self.is_connected() {
                        while let Some((_, command)) = self.deferred.pop_front() {
                            requests.push(self.request(command));
                        }
                    }
                },
                _ = tokio::time::sleep_until(scheduled.map_or_else(Instant::now, |(at, _)| at)), if scheduled.is_some() => {
                    let (_, next) = scheduled.take().expect("guarded by is_some");
                    step = Some(self.start(next));
                },
            }
        }
    }

    fn is_connected(&self) -> bool {
        self.status.borrow().state == SessionState::Connected
    }

    fn set_state(&self, state: SessionState, error: Option<&Error>) {
        self.status.send_modify(|status| {
            if status.state != state {
                // Handshaking again after a lost link is still the same outage.
                let same_outage =
                    matches!(status.state, SessionState::Reconnecting | SessionState::Handshaking)
                        && matches!(state, SessionState::Reconnecting | SessionState::Handshaking);
                if !same_outage {
                    status.since = Instant::now();
                }
                status.state = state;
            }
            if let Some(error) = error {
                status.last_error = Some(error.to_string());
            }
        });
    }

    /// Notes that the server just carried a request through. Receivers are not woken:
    /// `receive` reads it again when its outage deadline comes.
    fn exchanged(&self) {
        self.status.send_if_modified(|status| {
            status.last_exchange = Instant::now();
            false
        });
    }

    fn publish_session(&self) {
        self.status.send_modify(|status| {
            status.connection_type = self.transport.as_ref().map(|transport| transport.connection_type());
            status.client_id = self.client_id.clone();
            status.subscriptions = self.subscriptions.clone();
        });
    }

    fn start(&self, next: Next) -> BoxFuture<'static, Step> {
        let ctx = self.ctx.clone();
        match (next, &self.transport, &self.client_id) {
            (Next::Connect { probe }, Some(transport), Some(client_id)) => {
                let hold = self.machine.advice.timeout.map(Duration::from_millis);
                connect(ctx, transport.clone(), client_id.clone(), hold, probe).map(Step::Connected).boxed()
            }
            (Next::Resubscribe, Some(transport), Some(client_id)) => {
                let channels = self.subscriptions.iter().chain(self.refused.keys()).cloned().collect();
                resubscribe(ctx, transport.clone(), client_id.clone(), channels)
                    .map(Step::Resubscribed)
                    .boxed()
            }
            _ => {
                let previous = self.transport.clone();
                async move {
                    if let Some(previous) = previous {
                        previous.close().await;
                    }
                    Step::Handshaken(handshake(ctx).await)
                }
                .boxed()
            }
        }
    }

    /// Takes in a finished step: keeps what it established, asks the machine what
    /// follows, and carries that out. Returns what to do next and after how long, or
    /// `Err(())` when the session must stop.
    fn apply(&mut self, step: Step) -> Result<Option<(Duration, Next)>, ()> {
        let now = Instant::now();
        if let Some(advice) = self.ctx.take_advice() {
            self.machine.merge_advice(&advice);
        }
        match step {
            Step::Handshaken(Ok(handshaken)) => {
                self.exchanged();
                // A /meta/disconnect of the earlier session is answered by this handshake.
                self.ctx.shared.server_disconnected.store(false, std::sync::atomic::Ordering::Release);
                tracing::debug!(client_id = %handshaken.client_id, connection_type = %handshaken.transport.connection_type(), "handshake succeeded");
                self.transport = Some(handshaken.transport);
                self.client_id = Some(handshaken.client_id);
                self.publish_session();
                let resubscribe = !self.subscriptions.is_empty() || !self.refused.is_empty();
                let event = Event::Handshaken { advice: handshaken.advice.as_ref(), resubscribe };
                let action = self.machine.on_step(event, now);
                self.carry_out(action, None, None)
            }
            Step::Handshaken(Err(error)) => {
                let action = self.machine.on_step(Event::HandshakeFailed(&error), now);
                let reply = error.as_server_error().and_then(|server| server.response()).cloned();
                self.carry_out(action, Some(error), reply)
            }
            Step::Resubscribed(Ok(results)) => {
                self.exchanged();
                for (channel, result) in results {
                    match result {
                        Ok(()) => {
                            self.refused.remove(&channel);
                            self.subscriptions.insert(channel);
                        }
                        Err(error) => {
                            tracing::warn!(channel = %channel, error = %error, "resubscription failed after a new handshake; trying again with backoff");
                            self.subscriptions.remove(&channel);
                            if !self.refused.contains_key(&channel) {
                                // Told once; the retries are logged, not queued.
                                self.ctx.shared.queue.push(Err(error));
                            }
                            self.refuse(channel);
                        }
                    }
                }
                self.publish_session();
                let action = self.machine.on_step(Event::Resubscribed, now);
                self.carry_out(action, None, None)
            }
            Step::Resubscribed(Err(error)) => {
                let action = self.machine.on_step(Event::ResubscribeFailed, now);
                self.carry_out(action, Some(error), None)
            }
            Step::Connected(Ok(mut reply)) => {
                if reply.successful == Some(true) {
                    self.exchanged();
                }
                if self.ctx.shared.server_disconnected.swap(false, std::sync::atomic::Ordering::AcqRel) {
                    // A /meta/disconnect the server sent on its own: as `reconnect: handshake`.
                    let advice = reply.protocol_mut().advice.get_or_insert_with(Advice::default);
                    advice.reconnect = Some(super::message::Reconnect::Handshake);
                }
                let action = self.machine.on_step(Event::ConnectReply(&reply), now);
                let error = (reply.successful != Some(true))
                    .then(|| Error::server(failure_name(META_CONNECT), Some(reply.clone())));
                self.carry_out(action, error, Some(reply))
            }
            Step::Connected(Err(error)) => {
                let action = self.machine.on_step(Event::ConnectFailed(&error), now);
                self.carry_out(action, Some(error), None)
            }
        }
    }

    /// Does what the machine decided after a step that brought `error` and `reply`.
    fn carry_out(
        &mut self,
        action: Action,
        error: Option<Error>,
        reply: Option<Message>,
    ) -> Result<Option<(Duration, Next)>, ()> {
        let (wait, next, state, note) = match action {
            Action::Go { wait, next, state, note } => (wait, next, state, note),
            Action::FailOpen => {
                self.open_failed = true;
                let error =
                    error.unwrap_or_else(|| Error::InvalidOperation("open failed without an error".into()));
                if let Some(opened) = self.opened.take() {
                    let _ = opened.send(Err(error));
                }
                return Err(());
            }
            Action::ServerClosed => {
                self.server_closed(reply);
                return Err(());
            }
        };
        if let Some(error) = &error {
            match note {
                Note::Quiet => {}
                Note::Debug(what) => tracing::debug!(error = %error, "{what}"),
                Note::Info(what) => tracing::info!(error = %error, "{what}"),
                Note::Warn(what) => tracing::warn!(error = %error, "{what}"),
            }
            if self.opened.is_some() {
                // For `open` to report if it reaches its deadline before a session.
                self.open_error = Some(error.duplicate());
            }
        }
        self.set_state(state, error.as_ref());
        if state == SessionState::Connected
            && let Some(opened) = self.opened.take()
        {
            self.status.send_modify(|status| status.open = true);
            let _ = opened.send(Ok(()));
        }
        let backoff = &self.ctx.shared.options.backoff;
        let delay = match wait {
            Wait::Now => Duration::ZERO,
            Wait::Interval(millis) => Duration::from_millis(millis),
            // Capped so that an outage shorter than `connection_timeout` is always met by
            // a few attempts before `receive` reports it.
            Wait::Backoff(failures) => backoff.delay_within(failures, self.retry_cap()),
            Wait::BackoffAndInterval(failures, interval) => {
                backoff.delay_within(failures, self.retry_cap()) + Duration::from_millis(interval)
            }
            Wait::Longest => {
                let delay = backoff.bound(u32::MAX);
                let error = error.as_ref().map(ToString::to_string).unwrap_or_default();
                // Salesforce says why in `ext.sfdc.failureReason`.
                let reason = reply
                    .as_ref()
                    .and_then(|reply| reply.ext.as_ref())
                    .and_then(|ext| ext.get("sfdc"))
                    .and_then(|sfdc| sfdc.get("failureReason"))
                    .and_then(Value::as_str)
                    .map(|reason| super::error::bounded(reason.to_owned(), super::error::ERROR_TEXT_LIMIT));
                tracing::error!(error = %error, reason = ?reason, delay = ?delay, "the server reports a limit; backing off");
                delay
            }
        };
        Ok(Some((delay, next)))
    }

    /// The longest pause between reconnect attempts: a quarter of `connection_timeout`.
    fn retry_cap(&self) -> Duration {
        self.ctx.shared.options.connection_timeout.map_or(Duration::MAX, |timeout| timeout / 4)
    }

    /// Fails the requests that have waited for a connection longer than `request_timeout`.
    fn expire_deferred(&mut self) {
        let now = Instant::now();
        while self.deferred.front().is_some_and(|(at, _)| *at <= now) {
            let Some((_, command)) = self.deferred.pop_front() else { break };
            let timed_out = || {
                Error::transport_from(
                    TransportErrorKind::RequestTimeout,
                    "the session was not connected within request_timeout",
                )
            };
            match command {
                Command::Publish { reply, .. } => drop(reply.send(Err(timed_out()))),
                Command::Subscribe { reply, .. } | Command::Unsubscribe { reply, .. } => {
                    drop(reply.send(Err(timed_out())))
                }
                Command::Close { reply } => drop(reply.send(())),
            }
        }
    }

    /// `open` reached `connection_timeout`: it fails with the last error seen, or a
    /// connection timeout if the server never answered.
    fn give_up_opening(&mut self) {
        let error = self.open_error.take().unwrap_or_else(|| {
            Error::transport_from(
                TransportErrorKind::ConnectionTimeout,
                "the server did not answer within connection_timeout",
            )
        });
        tracing::debug!(error = %error, "giving up opening at connection_timeout");
        self.open_failed = true;
        if let Some(opened) = self.opened.take() {
            let _ = opened.send(Err(error));
        }
    }

    /// When the next refused resubscription is due.
    fn next_refused_retry(&self) -> Option<Instant> {
        self.refused.values().map(|retry| retry.at).min()
    }

    /// The refused channels due now, marked as in flight.
    fn due_refused(&mut self) -> Vec<String> {
        let now = Instant::now();
        let mut due = Vec::new();
        for (channel, retry) in &mut self.refused {
            if retry.at <= now {
                // Until its answer comes: the answer schedules the next try.
                retry.at = now + Duration::from_secs(24 * 3600);
                due.push(channel.clone());
            }
        }
        due
    }

    /// Subscribes once more to a channel refused after a new handshake.
    fn resubscribe_one(&self, channel: String) -> BoxFuture<'static, Done> {
        let ctx = self.ctx.clone();
        let transport = self.transport.clone().expect("connected sessions have a transport");
        let client_id = self.client_id.clone().expect("connected sessions have a client id");
        async move {
            let result = subscribe_all(&ctx, &transport, &client_id, vec![channel.clone()]).await;
            Done::Resubscribed(channel, result.and_then(|mut results| results.remove(0).1))
        }
        .boxed()
    }

    /// Records a refused resubscription and when to try it again.
    fn refuse(&mut self, channel: String) {
        let failures = self.refused.get(&channel).map_or(0, |retry| retry.failures);
        let delay = self.ctx.shared.options.backoff.delay(failures);
        self.refused.insert(
            channel,
            Retry { at: deadline(Instant::now(), delay), failures: failures.saturating_add(1) },
        );
    }

    /// The server said `reconnect: none`: hand out what is pending, then the error.
    fn server_closed(&mut self, reply: Option<Message>) {
        let error = Error::server("connection closed by the server", reply);
        let cause = error.as_server_error().and_then(|server| server.error()).map(str::to_owned);
        tracing::warn!(error = ?cause, "the server closed the session (advice reconnect: none)");
        self.status.send_modify(|status| status.last_error = Some(error.to_string()));
        self.ctx.shared.queue.push(Err(error));
    }

    /// Starts a client request.
    fn request(&self, command: Command) -> BoxFuture<'static, Done> {
        let ctx = self.ctx.clone();
        let transport = self.transport.clone().expect("connected sessions have a transport");
        let client_id = self.client_id.clone().expect("connected sessions have a client id");
        let timeout = ctx.shared.options.request_timeout;
        async move {
            match command {
                Command::Publish { channel, data, reply } => {
                    let request = Message {
                        client_id: Some(client_id),
                        data: Some(Data::from(data)),
                        ..Message::new(channel)
                    };
                    let result = ctx.exchange(&transport, vec![request], timeout).await;
                    Done::Publish(reply, result.and_then(|mut replies| check(replies.remove(0))))
                }
                Command::Subscribe { channel, reply } => {
                    let result = subscribe_all(&ctx, &transport, &client_id, vec![channel.clone()]).await;
                    let result = result.and_then(|mut results| results.remove(0).1);
                    Done::Subscribe(reply, channel, result)
                }
                Command::Unsubscribe { channel, reply } => {
                    let request = subscription_request(META_UNSUBSCRIBE, &client_id, &channel);
                    let result = ctx.exchange(&transport, vec![request], timeout).await;
                    Done::Unsubscribe(
                        reply,
                        channel,
                        result.and_then(|mut replies| check(replies.remove(0)).map(drop)),
                    )
                }
                Command::Close { .. } => unreachable!("close is handled by the session loop"),
            }
        }
        .boxed()
    }

    /// Records what a finished request changed, then answers it.
    fn answer(&mut self, done: Done) {
        match done {
            Done::Publish(reply, result) => {
                let _ = reply.send(result);
            }
            Done::Subscribe(reply, channel, result) => {
                if result.is_ok() {
                    self.refused.remove(&channel);
                    self.subscriptions.insert(channel);
                    self.publish_session();
                }
                let _ = reply.send(result);
            }
            Done::Unsubscribe(reply, channel, result) => {
                // The application no longer wants it, whatever the server says.
                self.refused.remove(&channel);
                if result.is_ok() {
                    self.subscriptions.remove(&channel);
                    self.publish_session();
                }
                let _ = reply.send(result);
            }
            Done::Resubscribed(channel, result) => {
                if !self.refused.contains_key(&channel) {
                    return; // unsubscribed meanwhile
                }
                match result {
                    Ok(()) => {
                        tracing::info!(channel = %channel, "resubscribed after an earlier refusal");
                        self.refused.remove(&channel);
                        self.subscriptions.insert(channel);
                        self.publish_session();
                    }
                    Err(error) => {
                        tracing::warn!(channel = %channel, error = %error, "resubscription refused again; trying again with backoff");
                        self.refuse(channel);
                    }
                }
            }
        }
    }

    /// Ends the session: `/meta/disconnect` if it is connected and `polite`, then closes the
    /// transport and answers whatever still waits.
    async fn shut_down(&mut self, polite: bool) {
        let was_connected = self.is_connected();
        self.set_state(SessionState::Disconnecting, None);
        // A failed open that got a client id ends that session on the server too, instead
        // of leaving it there until it expires; in the background, so that `open` may be
        // called again at once.
        if self.open_failed
            && let (Some(transport), Some(client_id)) = (self.transport.take(), self.client_id.clone())
        {
            let ctx = self.ctx.clone();
            tokio::spawn(async move {
                let request = Message { client_id: Some(client_id), ..Message::new(META_DISCONNECT) };
                let sent = ctx.exchange(&transport, vec![request], ctx.shared.options.request_timeout).await;
                tracing::debug!(replied = sent.is_ok(), "disconnected the session of a failed open");
                transport.close().await;
            });
        }
        if let (true, true, Some(transport), Some(client_id)) =
            (polite, was_connected, &self.transport, &self.client_id)
        {
            let request = Message { client_id: Some(client_id.clone()), ..Message::new(META_DISCONNECT) };
            match self.ctx.exchange(transport, vec![request], self.ctx.shared.options.request_timeout).await {
                Ok(_) => tracing::debug!("disconnected"),
                // faye closes the websocket instead of answering: that is a disconnect too.
                Err(error) => tracing::debug!(error = %error, "disconnect got no reply"),
            }
        }
        if let Some(transport) = &self.transport {
            transport.close().await;
        }
        for (_, command) in self.deferred.drain(..) {
            let closed =
                || Error::InvalidOperation("the client was closed before the request could be sent".into());
            match command {
                Command::Publish { reply, .. } => drop(reply.send(Err(closed()))),
                Command::Subscribe { reply, .. } | Command::Unsubscribe { reply, .. } => {
                    drop(reply.send(Err(closed())))
                }
                Command::Close { reply } => drop(reply.send(())),
            }
        }
        if let Some(opened) = self.opened.take() {
            let _ = opened.send(Err(Error::InvalidOperation("the client was closed while opening".into())));
        }
        self.status.send_modify(|status| {
            status.state = SessionState::Closed;
            status.since = Instant::now();
            status.open = false;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_deadline_too_far_for_the_clock_saturates() {
        let now = Instant::now();
        assert!(deadline(now, Duration::MAX) > now + Duration::from_secs(365 * 24 * 3600));
        assert_eq!(deadline(now, Duration::from_secs(1)), now + Duration::from_secs(1));
    }

    fn reply(value: Value) -> Message {
        serde_json::from_value(value).expect("message")
    }

    #[test]
    fn replies_are_matched_to_requests_whatever_an_extension_did_to_the_payload() {
        let key = |channel: &str, id: &str| (channel.to_string(), Some(id.to_string()));
        let answer =
            |channel: &str, id: &str| reply(json!({"channel": channel, "id": id, "successful": true}));
        let keys = [key("/meta/subscribe", "1"), key("/meta/subscribe", "2")];
        let swapped = vec![answer("/meta/subscribe", "2"), answer("/meta/subscribe", "1")];
        let ids: Vec<_> = replies_in_order(&keys, swapped)
            .expect("all answered")
            .into_iter()
            .map(|reply| reply.id)
            .collect();
        assert_eq!(ids, [Some("1".to_string()), Some("2".to_string())]);
        let added =
            vec![answer("/meta/subscribe", "1"), answer("/extra", "9"), answer("/meta/subscribe", "2")];
        assert_eq!(replies_in_order(&keys, added).expect("extra ignored").len(), 2);
        let dropped = replies_in_order(&keys, vec![answer("/meta/subscribe", "1")]).expect_err("one missing");
        assert!(
            dropped.to_string().contains("extension removed or changed the /meta/subscribe request (id 2)"),
            "{dropped}"
        );
    }

    #[test]
    fn many_subscriptions_go_out_in_payloads_under_the_body_limit() {
        let channels: Vec<String> =
            (0..300).map(|n| format!("/event/Order_Change_Number_{n:04}__e")).collect();
        let batches = subscription_batches(&channels, "client-id-of-some-length");
        assert!(batches.len() > 1, "{batches:?}");
        assert_eq!(batches.iter().map(|batch| batch.len()).sum::<usize>(), 300, "every channel once");
        for batch in &batches {
            let payload: Vec<Message> = channels[batch.clone()]
                .iter()
                .map(|channel| subscription_request(META_SUBSCRIBE, "client-id-of-some-length", channel))
                .collect();
            assert!(serde_json::to_vec(&payload).unwrap().len() < MAX_REQUEST_BODY / 2);
        }
        assert_eq!(subscription_batches(&channels[..3], "c"), vec![0..3]);
    }

    #[test]
    fn failure_messages_name_the_request() {
        assert_eq!(failure_name(META_SUBSCRIBE), "subscribe request failed");
        assert_eq!(failure_name("/service/echo"), "service request failed");
        assert_eq!(failure_name("/chat"), "publish request failed");
    }
}

#[cfg(test)]
mod size_tests {
    /// An idle session holds its task and a pending `/meta/connect`; with thousands of
    /// sessions in a process their futures are most of the memory. Large, rarely used
    /// futures (opening a socket, an HTTP request, shutting down) are boxed to keep these
    /// small; this guards against losing that by accident.
    #[test]
    fn an_idle_sessions_futures_stay_small() {
        let options = super::super::options::ClientOptions::new("http://127.0.0.1:1/x").validate().unwrap();
        let queue = std::sync::Arc::new(super::super::pending::PendingQueue::new(None));
        let shared = std::sync::Arc::new(super::Shared::new(options, queue).unwrap());
        let ctx =
            super::Context { shared: shared.clone(), ids: Default::default(), advice: Default::default() };
        let transport = std::sync::Arc::new(super::Transport::new(super::ConnectionType::WebSocket, shared));
        let connect = super::connect(ctx.clone(), transport.clone(), "x".into(), None, false);
        assert!(
            std::mem::size_of_val(&connect) <= 1024,
            "connect: {} bytes",
            std::mem::size_of_val(&connect)
        );
        let (_commands, receiver) = tokio::sync::mpsc::channel(1);
        let (status, _) = tokio::sync::watch::channel(super::SessionStatus::new());
        let (opened, _) = tokio::sync::oneshot::channel();
        let run = super::Session::new(ctx, receiver, status, opened).run();
        assert!(std::mem::size_of_val(&run) <= 2048, "session task: {} bytes", std::mem::size_of_val(&run));
    }
}
